"""Small file helpers shared by the controller's writers (results, reports, lab history) and its caches."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """Where edgeq keeps the cache ``kind`` (``tune``: FP32 outputs; ``calibration``: ORT's activation ranges):
    ``$EDGEQ_CACHE_DIR/KIND``, else ``$XDG_CACHE_HOME/edgeq/KIND`` (default ``~/.cache/edgeq/KIND``)."""
    if os.environ.get("EDGEQ_CACHE_DIR"):
        return Path(os.environ["EDGEQ_CACHE_DIR"]) / kind
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgeq" / kind


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` so a reader never sees half a file: a temp file beside ``path``, then a rename.

    A device node or pipe (``/dev/stdout``, a FIFO) is written through instead: renaming over it would
    replace the node itself (as root, ``/dev/null`` became a regular file that way). The file gets the
    usual ``0666 & ~umask`` mode rather than mkstemp's 0600, since results and reports are for reading.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        with open(path, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
