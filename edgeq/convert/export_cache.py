"""The FP32 ONNX export of a TensorFlow source, kept by content hash in ``cache_dir("onnx-export")``.

tf2onnx does not export a model the same way twice: on Basic Pitch two exports in one tune had 233 and 234
nodes under other generated names. Every ONNX candidate of a tune exported again, so no two shared ORT's
calibration ranges (keyed by tensor names), and a float layer named from one export was looked up in another.
One export per source, exporter and settings, reused, makes the candidates of a tune (and a second tune) start
from the same model, and saves an export per candidate.

The key holds the source's content hash, the input shapes asked for, the opset, the versions of TensorFlow,
tf2onnx and ONNX, and the text of the modules that export (so that a change to the export is a miss, not a
stale model). A file is written under a temporary name and renamed, so a reader never sees half of one.
An entry is an ONNX model, data only: it is checked by ``onnx.checker`` before it is used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def export_key(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def cached_export(key: str, target: Path, export: Callable[[Path], None]) -> str:
    """Put the export for ``key`` at ``target``: copied from the cache ("hit"), or made by ``export(target)``
    and kept ("stored"). A cache that cannot be read or written is skipped ("off"), never an error."""
    from edgeq.files import cache_dir

    directory = cache_dir("onnx-export")
    cached = directory / f"{key}.onnx"
    if cached.is_file() and _valid(cached):
        shutil.copyfile(cached, target)
        return "hit"
    export(target)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=directory)
        os.close(fd)
        shutil.copyfile(target, tmp)
        os.replace(tmp, cached)
        return "stored"
    except OSError as exc:  # a read-only home must not stop a conversion
        log.warning("cannot keep the onnx export in %s: %s", directory, exc)
        return "off (cache directory not writable)"


def _valid(path: Path) -> bool:
    """Whether a cached export is a whole, valid model; one that is not (truncated, edited) is removed."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
        return True
    except Exception as exc:  # noqa: BLE001 - a protobuf DecodeError or a ValidationError: export again
        log.info("%s: unusable cached onnx export (%s); exporting again", path, str(exc).splitlines()[0] if str(exc) else exc)
        path.unlink(missing_ok=True)
        return False
