"""Runtimes, one module per artifact format: ``tflite``, ``onnx``, ``openvino``.

Each module is named after its format and defines ``FORMAT``, ``PROBE_MODULES`` (what ``targets check``
imports to tell whether the format can run), ``PACKAGES`` (its pip requirements on a device whose profile
names none), ``import_runtime()`` -> (runtime name, version) and
``open(model_path, threads, providers, device, precision)`` -> Session. The modules here *are* the list of
formats (``formats()``): the controller's names and its format registry are checked against it. A module is imported only when an
artifact of its format is opened, so the runtime (and numpy) load only where they are used. Host
validation imports this package as an ordinary module; on a device it runs from the zipapp.
"""

import importlib
import os
import pkgutil

from ..errors import RunnerError

_NOT_RUNTIMES = {"base"}  # modules here that are not a format
_FORMATS = None


def formats():
    """The artifact formats that have a runtime module here, sorted by name."""
    global _FORMATS
    if _FORMATS is None:  # pkgutil lists modules from a directory and from the zipapp alike
        _FORMATS = tuple(sorted(info.name for info in pkgutil.iter_modules(__path__)
                                if not info.ispkg and info.name not in _NOT_RUNTIMES))
    return _FORMATS


def runtime_module(fmt):
    """The runtime module for artifact format ``fmt``."""
    if fmt not in formats():
        raise RunnerError("unknown artifact format '%s' (known: %s)" % (fmt, ", ".join(formats())))
    return importlib.import_module("." + fmt, __name__)


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
