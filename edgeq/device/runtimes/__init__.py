"""Runtimes, one module per artifact format: ``tflite``, ``onnx``, ``openvino``.

Each module defines ``FORMAT``, ``import_runtime()`` -> (runtime name, version) and
``open(model_path, threads, providers, device, precision)`` -> Session. A module is imported only when an
artifact of its format is opened, so the runtime (and numpy) load only where they are used. Host
validation imports this package as an ordinary module; on a device it runs from the zipapp.
"""

import importlib
import os

from ..errors import RunnerError

# Artifact format -> the module of this package that runs it. Adding a format adds a module and a line here.
RUNTIME_MODULES = {"tflite": "tflite", "onnx": "onnx", "openvino": "openvino"}


def runtime_module(fmt):
    """The runtime module for artifact format ``fmt``."""
    name = RUNTIME_MODULES.get(fmt)
    if name is None:
        raise RunnerError("unknown artifact format '%s'" % fmt)
    return importlib.import_module("." + name, __name__)


def open_session(model_path, fmt, threads=None, providers=None, openvino_device="CPU", precision=None):
    """Load ``model_path`` with the runtime for ``fmt`` (tflite, onnx, openvino), pinned to run at
    ``precision`` (the artifact's: fp32, fp16, bf16, int8, dynamic; None is taken as fp32).

    Host validation and the device bench both open artifacts here, so both run the same pinned settings;
    ``session.execution`` records what the runtime reports it runs.
    """
    if not os.path.exists(str(model_path)):
        raise RunnerError("model file not found: %s" % model_path)
    if precision == "bf16" and fmt != "openvino":
        raise RunnerError("bf16 artifacts are OpenVINO IR only, not %s" % fmt)
    return runtime_module(fmt).open(model_path, threads, providers, openvino_device, precision)


def import_runtime(fmt):
    """Import the runtime for ``fmt`` up front (so its import cost is not counted as model load); returns
    (runtime name, version); RuntimeMissing when it is not installed."""
    return runtime_module(fmt).import_runtime()


def cpu_supports_bf16():
    """(True, None) when OpenVINO's CPU plugin reports native bf16 here, else (False, why)."""
    return runtime_module("openvino").cpu_supports_bf16()
