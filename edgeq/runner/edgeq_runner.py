#!/usr/bin/env python3
"""edgeq on-device runner: loads one artifact with its runtime, runs it, and writes a result JSON.

Self-contained on purpose: it needs only the standard library, numpy and one
runtime (TFLite via ai_edge_litert / tflite_runtime / tensorflow.lite, ONNX
Runtime, or OpenVINO), runs on Python 3.8+, and never imports edgeq. The
controller imports it too, to run artifacts on the host with the same code.
"""
from __future__ import annotations

import importlib
import os
import sys

import numpy as np

RUNNER_VERSION = "1"


class RunnerError(Exception):
    """A problem the runner reports in its result JSON (missing runtime, bad input...)."""


def _package_version(dist_names):
    try:
        from importlib import metadata
    except ImportError:  # pragma: no cover - Python < 3.8
        return None
    for dist in dist_names:
        try:
            return metadata.version(dist)
        except Exception:
            continue
    return None


def _quant_params(scale, zero_point):
    """Per-tensor (scale, zero_point) or None; per-channel I/O quantization is not used for I/O tensors."""
    scale = np.asarray(scale, dtype=np.float64).reshape(-1) if scale is not None else np.zeros(0)
    zero_point = np.asarray(zero_point, dtype=np.int64).reshape(-1) if zero_point is not None else np.zeros(0)
    if scale.size == 0 or float(scale[0]) == 0.0:
        return None
    return float(scale[0]), int(zero_point[0]) if zero_point.size else 0


def quantize(values, dtype, params):
    """float -> integer tensor with the artifact's own scale/zero-point (round half to even, saturating)."""
    scale, zero_point = params
    info = np.iinfo(dtype)
    q = np.round(np.asarray(values, dtype=np.float64) / scale) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(values, params):
    scale, zero_point = params
    return ((np.asarray(values, dtype=np.float64) - zero_point) * scale).astype(np.float32)


class Session:
    """One loaded model: ``inputs``/``outputs`` describe tensors, ``run`` maps float inputs to float outputs."""

    runtime = ""
    runtime_version = None

    def __init__(self):
        self.inputs = []  # [{name, shape, dtype, quant: (scale, zp) or None}]
        self.outputs = []
        self.execution = {}  # what actually ran: provider, device, delegate, threads

    def prepare(self, feed):
        """Convert float arrays keyed by input name into what the runtime takes (quantized where needed)."""
        prepared = {}
        for spec in self.inputs:
            if spec["name"] not in feed:
                raise RunnerError("no data for model input '%s'" % spec["name"])
            value = np.asarray(feed[spec["name"]])
            dtype = np.dtype(spec["dtype"])
            if spec.get("quant") and np.issubdtype(dtype, np.integer) and not np.issubdtype(value.dtype, np.integer):
                value = quantize(value, dtype, spec["quant"])
            else:
                value = value.astype(dtype, copy=False)
            prepared[spec["name"]] = np.ascontiguousarray(value)
        return prepared

    def run(self, feed):
        """Run on float inputs; returns float32 outputs (dequantized) in ``self.outputs`` order."""
        raw = self.run_prepared(self.prepare(feed))
        return [dequantize(r, spec["quant"]) if spec.get("quant") and np.issubdtype(r.dtype, np.integer)
                else np.asarray(r, dtype=np.float32) for r, spec in zip(raw, self.outputs)]

    def run_prepared(self, prepared):  # pragma: no cover - overridden
        raise NotImplementedError


class TFLiteSession(Session):
    runtime = "tflite"

    def __init__(self, model_path, threads=None):
        Session.__init__(self)
        interpreter_cls, module_name = _tflite_interpreter()
        self.runtime_module = module_name
        self.runtime_version = _package_version(
            {"ai_edge_litert.interpreter": ["ai-edge-litert"], "tflite_runtime.interpreter": ["tflite-runtime"],
             "tensorflow.lite": ["tensorflow-cpu", "tensorflow"]}[module_name])
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
        self.execution = {"module": module_name, "threads": threads}

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


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int32)": "int32",
              "tensor(int64)": "int64", "tensor(bool)": "bool"}


class OnnxSession(Session):
    runtime = "onnxruntime"

    def __init__(self, model_path, threads=None, providers=None):
        Session.__init__(self)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RunnerError("onnxruntime is not importable: %s" % exc)
        self.runtime_version = ort.__version__
        available = ort.get_available_providers()
        requested = list(providers or ["CPUExecutionProvider"])
        usable = [p for p in requested if p in available]
        if "CPUExecutionProvider" not in usable and "CPUExecutionProvider" in available:
            usable.append("CPUExecutionProvider")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(model_path), sess_options=options, providers=usable)
        self.inputs = [{"name": i.name, "shape": [d if isinstance(d, int) else None for d in i.shape],
                        "dtype": _ORT_TYPES.get(i.type, i.type), "quant": None} for i in self.session.get_inputs()]
        self.outputs = [{"name": o.name, "shape": [d if isinstance(d, int) else None for d in o.shape],
                         "dtype": _ORT_TYPES.get(o.type, o.type), "quant": None} for o in self.session.get_outputs()]
        used = self.session.get_providers()
        self.execution = {"providers_requested": requested, "providers_available": available,
                          "providers_used": used, "provider": used[0] if used else None, "threads": threads}
        self._names = [o["name"] for o in self.outputs]

    def run_prepared(self, prepared):
        return self.session.run(self._names, prepared)


class OpenVINOSession(Session):
    runtime = "openvino"

    def __init__(self, model_path, threads=None, device="CPU"):
        Session.__init__(self)
        try:
            import openvino as ov
        except ImportError as exc:
            raise RunnerError("openvino is not importable: %s" % exc)
        self.runtime_version = ov.__version__ if hasattr(ov, "__version__") else ov.get_version()
        core = ov.Core()
        if device.split(":")[0].split(".")[0] not in ("AUTO", "MULTI", "HETERO") and device not in core.available_devices:
            raise RunnerError("OpenVINO device '%s' is not available here (available: %s)"
                              % (device, ", ".join(core.available_devices)))
        config = {}
        if threads and device.startswith("CPU"):
            config["INFERENCE_NUM_THREADS"] = int(threads)
        model = core.read_model(str(model_path))
        self.compiled = core.compile_model(model, device, config)
        self.request = self.compiled.create_infer_request()
        self.inputs = [self._spec(p) for p in self.compiled.inputs]
        self.outputs = [self._spec(p) for p in self.compiled.outputs]
        self.execution = {"device": device, "threads": threads,
                          "execution_devices": list(self.compiled.get_property("EXECUTION_DEVICES"))}

    @staticmethod
    def _spec(port):
        shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
        return {"name": port.get_any_name(), "shape": shape,
                "dtype": np.dtype(port.get_element_type().to_dtype()).name, "quant": None, "port": port}

    def run_prepared(self, prepared):
        results = self.request.infer({spec["name"]: prepared[spec["name"]] for spec in self.inputs})
        return [np.asarray(results[spec["port"]]) for spec in self.outputs]


def open_session(model_path, fmt, threads=None, providers=None, openvino_device="CPU"):
    """Load ``model_path`` with the runtime for ``fmt`` (tflite, onnx, openvino)."""
    if not os.path.exists(str(model_path)):
        raise RunnerError("model file not found: %s" % model_path)
    if fmt == "tflite":
        return TFLiteSession(model_path, threads)
    if fmt == "onnx":
        return OnnxSession(model_path, threads, providers)
    if fmt == "openvino":
        return OpenVINOSession(model_path, threads, openvino_device)
    raise RunnerError("unknown artifact format '%s'" % fmt)


def main(argv=None):  # pragma: no cover - filled in by the bench runner
    raise SystemExit("edgeq_runner: not yet implemented")


if __name__ == "__main__":
    sys.exit(main())
