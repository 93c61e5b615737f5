"""FP32 reference outputs, computed once per (source model, eval data) and kept by content hash, so a
second tune of the same model skips the FP32 pass.

The cache is ``$XDG_CACHE_HOME/edgeq/tune`` (default ``~/.cache/edgeq/tune``; ``EDGEQ_CACHE_DIR``
overrides). Files are plain ``.npy`` read with ``allow_pickle=False``: a cache file can never run code.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from edgeq.convert.source import SourceModel
from edgeq.data import Dataset

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    if os.environ.get("EDGEQ_CACHE_DIR"):
        return Path(os.environ["EDGEQ_CACHE_DIR"]) / "tune"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgeq" / "tune"


def _key(source: SourceModel, dataset: Dataset) -> str:
    text = f"fp32-outputs:v1:{source.sha256}:{dataset.sha256}:{dataset.samples}:{source.outputs[:1]}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def reference_outputs(source: SourceModel, dataset: Dataset) -> tuple[np.ndarray, bool]:
    """(the source's first output on every eval sample, whether it came from the cache)."""
    path = cache_dir() / f"{_key(source, dataset)}.npy"
    try:
        cached = np.load(path, allow_pickle=False)
        if cached.shape[:1] == (dataset.samples,):
            return cached, True
        log.info("%s: cached fp32 outputs have the wrong shape; recomputing", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:  # unreadable or not an array: recompute, never trust it
        log.info("%s: cached fp32 outputs unreadable (%s); recomputing", path, exc)
    # The eval set was read against the source's inputs, so its arrays are keyed as the source expects.
    reference = np.asarray(source.run(dataset.inputs)[0])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
            np.save(handle, reference, allow_pickle=False)
        os.replace(handle.name, path)
    except OSError as exc:  # a read-only home must not stop a tune
        log.warning("cannot cache fp32 outputs in %s: %s", path.parent, exc)
    return reference, False
