"""The packages quantization-aware training needs, kept apart from the main environment.

TensorFlow Model Optimization (tfmot) needs Keras 2 (``tf-keras``), and ``tf-keras`` declares a dependency on the
full ``tensorflow`` distribution: a plain ``pip install tf-keras`` puts a second TensorFlow (``tensorflow``
2.21.0) on top of ``tensorflow-cpu`` and downgrades absl-py 2.x to 1.4 for tfmot's ``absl-py~=1.2``. Both run
against the installed ``tensorflow-cpu`` 2.21 (checked: a tfmot QAT model trains, saves and converts), so they
are installed without their dependencies into their own directory, which only the QAT subprocess puts on its
path. ``python -m edgeq.qat.deps install`` (``make`` runs it) fetches them once; nothing is fetched at run time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from edgeq.errors import MissingBackendError

#: Pinned to the TensorFlow that the tflite extra installs (tf-keras follows TensorFlow's minor version).
QAT_PACKAGES = ("tf-keras==2.21.0", "tensorflow-model-optimization==0.8.1", "dm-tree==0.1.10", "mock==5.2.0")
INSTALL_COMMAND = "python -m edgeq.qat.deps install"


def qat_site() -> Path:
    """Where the QAT packages live: ``$EDGEQ_QAT_SITE``, else ``edgeq-qat`` inside this Python's prefix (the venv)."""
    return Path(os.environ.get("EDGEQ_QAT_SITE") or Path(sys.prefix) / "edgeq-qat")


def require_qat_site() -> Path:
    site = qat_site()
    if not (site / "tensorflow_model_optimization").is_dir() or not (site / "tf_keras").is_dir():
        raise MissingBackendError(f"{site}: the QAT packages (tf-keras, tensorflow-model-optimization) are not "
                                  "installed", hint=f"run `{INSTALL_COMMAND}` once (needs PyPI), with the tflite "
                                  "extra installed")
    return site


def install(site: Path | None = None) -> int:
    site = site or qat_site()
    argv = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--target", str(site),
            *QAT_PACKAGES]
    print(f"installing {', '.join(QAT_PACKAGES)} into {site} (without their dependencies; see edgeq.qat.deps)")
    return subprocess.call(argv)


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit(f"usage: {INSTALL_COMMAND}")
    sys.exit(install())
