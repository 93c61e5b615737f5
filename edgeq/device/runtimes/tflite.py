"""TFLite artifacts, through ai_edge_litert, tflite_runtime or tensorflow.lite (first importable)."""

import importlib

import numpy as np

from ..errors import RunnerError, RuntimeMissing
from ..util import package_version
from .base import Session, _quant_params


class TFLiteSession(Session):
    runtime = "tflite"

    def __init__(self, model_path, threads=None, precision=None):
        Session.__init__(self)
        interpreter_cls, module_name = _tflite_interpreter()
        self.runtime_module = module_name
        self.runtime_version = package_version(TFLITE_DISTRIBUTIONS[module_name])
        kwargs = {"model_path": str(model_path)}
        if threads:
            kwargs["num_threads"] = int(threads)
        self.interpreter = interpreter_cls(**kwargs)
        self.interpreter.allocate_tensors()
        self._batch = 1
        self._in = self.interpreter.get_input_details()
        self._out = self.interpreter.get_output_details()
        self.inputs = [self._spec(d) for d in self._in]
        self.outputs = [self._spec(d) for d in self._out]
        # The default op resolver applies XNNPACK where it can; which delegate took the graph is read back
        # from the execution plan's nodes, not assumed. XNNPACK computes fp16-weight models in fp32 unless
        # the model asks for reduced precision (edgeq's converter never does), so nothing runs below the
        # artifact's precision.
        self.execution = {"module": module_name, "threads": threads, "precision": precision,
                          "delegate": _tflite_delegate(self.interpreter)}

    @staticmethod
    def _spec(detail):
        signature = detail.get("shape_signature")
        shape = [int(s) if s >= 0 else None for s in (signature if signature is not None and len(signature) else detail["shape"])]
        scale, zero_point = detail.get("quantization", (0.0, 0))
        return {"name": detail["name"], "shape": shape, "dtype": np.dtype(detail["dtype"]).name,
                "quant": _quant_params(scale, zero_point), "index": detail["index"]}

    def _resize(self, batch):
        if batch == self._batch:
            return
        for detail in self._in:
            shape = list(detail["shape"])
            shape[0] = batch
            self.interpreter.resize_tensor_input(detail["index"], shape)
        self.interpreter.allocate_tensors()
        self._batch = batch

    def run_prepared(self, prepared):
        batch = len(next(iter(prepared.values())))
        self._resize(batch)
        for spec in self.inputs:
            self.interpreter.set_tensor(spec["index"], prepared[spec["name"]])
        self.interpreter.invoke()
        return [self.interpreter.get_tensor(spec["index"]) for spec in self.outputs]

    def bind(self, prepared):
        self._resize(len(next(iter(prepared.values()))))
        set_tensor, invoke, get_tensor = self.interpreter.set_tensor, self.interpreter.invoke, self.interpreter.get_tensor
        feeds = [(spec["index"], prepared[spec["name"]]) for spec in self.inputs]
        fetches = [spec["index"] for spec in self.outputs]

        def call():
            for index, value in feeds:
                set_tensor(index, value)
            invoke()
            return [get_tensor(index) for index in fetches]
        return call


def _tflite_delegate(interpreter):
    """``{"name": "xnnpack" | "none", "delegated_nodes": n, "nodes": total}`` from the interpreter's nodes."""
    try:
        names = [op.get("op_name") for op in interpreter._get_ops_details()]
    except Exception as exc:  # a private API: say it could not be read rather than guess
        return {"name": None, "unknown_reason": "%s: %s" % (type(exc).__name__, exc)}
    delegated = sum(1 for name in names if name == "DELEGATE")
    return {"name": "xnnpack" if delegated else "none", "delegate_nodes": delegated, "nodes": len(names)}


# The TFLite interpreter modules tried in turn, and the distributions whose version each one reports.
TFLITE_DISTRIBUTIONS = {"ai_edge_litert.interpreter": ["ai-edge-litert"],
                        "tflite_runtime.interpreter": ["tflite-runtime"],
                        "tensorflow.lite": ["tensorflow-cpu", "tensorflow"]}


def _tflite_interpreter():
    errors = []
    for module_name in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        try:
            return importlib.import_module(module_name).Interpreter, module_name
        except ImportError as exc:
            errors.append("%s: %s" % (module_name, exc))
    try:
        import tensorflow as tf  # noqa: PLC0415 - last resort, heavy
        return tf.lite.Interpreter, "tensorflow.lite"
    except ImportError as exc:
        errors.append("tensorflow: %s" % exc)
    raise RunnerError("no TFLite runtime is importable (tried ai_edge_litert, tflite_runtime, tensorflow): "
                      + "; ".join(errors))


FORMAT = "tflite"
# What ``targets check`` imports on a device to tell whether this format can run there, in the order tried.
PROBE_MODULES = ["ai_edge_litert.interpreter", "tflite_runtime.interpreter", "tensorflow"]
# pip requirements for this runtime on a device whose profile names none (``targets setup --format``).
PACKAGES = ["ai-edge-litert", "numpy"]


def open(model_path, threads=None, providers=None, device=None, precision=None):  # noqa: A001 - the runtime interface
    return TFLiteSession(model_path, threads, precision)


def import_runtime():
    try:
        _, module_name = _tflite_interpreter()
    except RunnerError as exc:
        raise RuntimeMissing(str(exc)) from exc
    return "tflite", package_version(TFLITE_DISTRIBUTIONS[module_name])
