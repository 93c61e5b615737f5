"""SavedModel files that today's TensorFlow cannot load as they are.

A SavedModel written by TF 2.5-era Keras with its optimizer records the optimizer's slot variables (Adam's
moments) in its object graph. ``tf.saved_model.load`` of a newer TensorFlow restores them through the
optimizer's ``add_slot``, which a revived object lacks, and fails with "'_UserObject' object has no attribute
'add_slot'" (tensorflow#52091, open since 2021). Basic Pitch's pretrained model is one. The slots are training
state that inference never reads, so edgeq loads a copy without them, kept in the cache by the model's
content hash, and every backend converts that copy.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from edgeq.errors import ConversionError, first_line
from edgeq.files import cache_dir

log = logging.getLogger(__name__)


def inference_copy(path: Path, sha256: str) -> tuple[Path, int]:
    """The SavedModel at ``path`` with no optimizer slot variables: ``path`` itself when it has none, else a
    cached copy; and how many slot variables were left out."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    try:
        proto.ParseFromString((path / "saved_model.pb").read_bytes())
    except Exception as exc:  # noqa: BLE001 - a damaged file: protobuf's DecodeError, OSError
        raise ConversionError(f"{path / 'saved_model.pb'}: not a readable SavedModel ({first_line(exc)})") from exc
    slots = 0
    for graph in proto.meta_graphs:
        for node in graph.object_graph_def.nodes:
            slots += len(node.slot_variables)
            del node.slot_variables[:]
    if not slots:
        return path, 0
    target = cache_dir("savedmodel") / sha256
    if not (target / "saved_model.pb").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{sha256[:12]}-", dir=target.parent))
        try:
            for item in path.iterdir():
                if item.name != "saved_model.pb":
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, building / item.name)
            (building / "saved_model.pb").write_bytes(proto.SerializeToString())
            building.rename(target)
        except OSError:
            if not (target / "saved_model.pb").is_file():  # not another process's copy, finished first
                raise
        finally:
            shutil.rmtree(building, ignore_errors=True)
    log.info("%s: %d optimizer slot variables left out (%s)", path, slots, target)
    _quiet_unrestored_slots()
    return target, slots


class _UnrestoredSlotsFilter(logging.Filter):
    """TensorFlow warns, per slot and on every load, that the checkpoint holds values the restored object does
    not: the slots left out on purpose. The other checkpoint warnings still pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Detecting that an object or model or tf.train.Checkpoint is being "
                                       "deleted with unrestored values")
                    or (message.startswith("Value in checkpoint could not be found in the restored object")
                        and "optimizer" in message))


def _quiet_unrestored_slots() -> None:
    tf_log = logging.getLogger("tensorflow")
    if not any(isinstance(f, _UnrestoredSlotsFilter) for f in tf_log.filters):
        tf_log.addFilter(_UnrestoredSlotsFilter())
