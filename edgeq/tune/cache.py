"""FP32 reference outputs, computed once per (source model, eval data) and kept by content hash, so a
second tune of the same model skips the FP32 pass.

The cache is ``$XDG_CACHE_HOME/edgeq/tune`` (default ``~/.cache/edgeq/tune``; ``EDGEQ_CACHE_DIR``
overrides). Files are plain ``.npz`` (one array per output) read with edgeq's checked reader: a cache file
can never run code.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from edgeq.convert.source import SourceModel
from edgeq.data import Dataset, read_npz
from edgeq.errors import DataError
from edgeq.files import cache_dir

log = logging.getLogger(__name__)


def _key(source: SourceModel, dataset: Dataset) -> str:
    text = f"fp32-outputs:v2:{source.sha256}:{dataset.sha256}:{dataset.samples}:{source.outputs}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _read(path: Path, source: SourceModel, dataset: Dataset) -> dict[str, np.ndarray] | None:
    """The cached outputs, or None when there are none or they do not fit (never trusted beyond that)."""
    try:
        arrays = read_npz(path)  # edgeq's checked reader: headers first, no pickles
    except DataError as exc:
        if path.exists():
            log.info("%s: cached fp32 outputs unreadable (%s); recomputing", path, exc.message)
        return None
    outputs = {name: arrays.get(f"output_{i}") for i, name in enumerate(source.outputs)}
    if len(arrays) != len(outputs) or any(a is None or a.shape[:1] != (dataset.samples,) for a in outputs.values()):
        log.info("%s: cached fp32 outputs do not fit this model and eval set; recomputing", path)
        return None
    return outputs


def reference_outputs(source: SourceModel, dataset: Dataset) -> tuple[dict[str, np.ndarray], bool]:
    """(every output of the source on every eval sample, by output name in the source's order; whether they
    came from the cache)."""
    path = cache_dir("tune") / f"{_key(source, dataset)}.npz"
    cached = _read(path, source, dataset)
    if cached is not None:
        return cached, True
    # The eval set was read against the source's inputs, so its arrays are keyed as the source expects.
    references = dict(zip(source.outputs, (np.asarray(o) for o in source.run(dataset.inputs)), strict=True))
    handle = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
            np.savez(handle, **{f"output_{i}": array for i, array in enumerate(references.values())})
        os.replace(handle.name, path)
    except OSError as exc:  # a read-only home or a full disk must not stop a tune
        log.warning("cannot cache fp32 outputs in %s: %s", path.parent, exc)
        if handle is not None:
            Path(handle.name).unlink(missing_ok=True)
    return references, False
