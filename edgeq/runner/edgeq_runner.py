#!/usr/bin/env python3
"""edgeq on-device runner: loads one artifact with its runtime, runs it, and writes a result JSON.

Self-contained on purpose: it needs only the standard library, numpy and one
runtime (TFLite via ai_edge_litert / tflite_runtime / tensorflow.lite, ONNX
Runtime, or OpenVINO), runs on Python 3.8+, and never imports edgeq. The
controller imports it too, to run artifacts on the host with the same code.

It is started as ``python -I RELEASE/edgeq_runner.py``: isolated mode keeps the release directory (and
PYTHONPATH, the user's site-packages) off ``sys.path``, so no file shipped beside the runner can shadow
``json`` or ``numpy``. A Python started without ``-I`` still puts the script's directory first on
``sys.path``; the runner removes it before its first import of anything that is not built in.
"""
import sys

if __name__ == "__main__" and sys.path and not sys.flags.isolated:
    import os.path as _os_path  # posixpath is loaded at startup already: sys.modules, not the release dir

    if _os_path.realpath(sys.path[0] or ".") == _os_path.dirname(_os_path.realpath(__file__)):
        del sys.path[0]

import argparse
import glob
import importlib
import json
import os
import platform
import re
import signal
import subprocess
import threading
import time
import traceback

try:
    import numpy as np
except ImportError as _numpy_missing:  # a device without its setup: reported in the result, not a traceback
    np = None
    NUMPY_ERROR = str(_numpy_missing)

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

    def bind(self, prepared):
        """A zero-argument callable doing exactly one runtime call on ``prepared`` inputs (what is timed).

        Everything that can be done once (quantizing, resizing, looking up methods) is done here, outside
        the timed region, so the timed call is what a hand-written loop over the runtime would do.
        """
        run_prepared = self.run_prepared
        return lambda: run_prepared(prepared)


class TFLiteSession(Session):
    runtime = "tflite"

    def __init__(self, model_path, threads=None, precision=None):
        Session.__init__(self)
        interpreter_cls, module_name = _tflite_interpreter()
        self.runtime_module = module_name
        self.runtime_version = _package_version(TFLITE_DISTRIBUTIONS[module_name])
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


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int32)": "int32",
              "tensor(int64)": "int64", "tensor(bool)": "bool"}


ORT_ARM64_BF16_FASTMATH = "mlas.enable_gemm_fastmath_arm64_bfloat16"


class OnnxSession(Session):
    runtime = "onnxruntime"

    def __init__(self, model_path, threads=None, providers=None, precision=None):
        Session.__init__(self)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RunnerError("onnxruntime is not importable: %s" % exc) from exc
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
        # MLAS may run fp32 GEMMs in bf16 on ARM CPUs with bf16 (off by default today): pinned off, so an
        # fp32 artifact is measured in fp32 whatever the device and ORT version.
        options.add_session_config_entry(ORT_ARM64_BF16_FASTMATH, "0")
        self.session = ort.InferenceSession(str(model_path), sess_options=options, providers=usable)
        self.inputs = [{"name": i.name, "shape": [d if isinstance(d, int) else None for d in i.shape],
                        "dtype": _ORT_TYPES.get(i.type, i.type), "quant": None} for i in self.session.get_inputs()]
        self.outputs = [{"name": o.name, "shape": [d if isinstance(d, int) else None for d in o.shape],
                         "dtype": _ORT_TYPES.get(o.type, o.type), "quant": None} for o in self.session.get_outputs()]
        used = self.session.get_providers()
        self.execution = {"providers_requested": requested, "providers_available": available,
                          "providers_used": used, "provider": used[0] if used else None, "threads": threads,
                          "precision": precision,
                          "session_config": {ORT_ARM64_BF16_FASTMATH: options.get_session_config_entry(
                              ORT_ARM64_BF16_FASTMATH)}}
        self._names = [o["name"] for o in self.outputs]

    def run_prepared(self, prepared):
        return self.session.run(self._names, prepared)

    def bind(self, prepared):
        run, names = self.session.run, self._names
        return lambda: run(names, prepared)


class OpenVINOSession(Session):
    runtime = "openvino"

    def __init__(self, model_path, threads=None, device="CPU", precision=None):
        Session.__init__(self)
        try:
            import openvino as ov
        except ImportError as exc:
            raise RunnerError("openvino is not importable: %s" % exc) from exc
        self.runtime_version = ov.__version__ if hasattr(ov, "__version__") else ov.get_version()
        core = ov.Core()
        if device.split(":")[0].split(".")[0] not in ("AUTO", "MULTI", "HETERO") and device not in core.available_devices:
            raise RunnerError("OpenVINO device '%s' is not available here (available: %s)"
                              % (device, ", ".join(core.available_devices)))
        plugin = device.split(":")[0].split(".")[0]
        hint = openvino_precision_hint(precision, plugin)
        if hint == "bf16" and plugin == "CPU":
            supported, why = cpu_supports_bf16()
            if not supported:
                raise RunnerError("bf16 needs a CPU with native bf16 (AVX512_BF16 or AMX); %s" % why)
        config = {"INFERENCE_PRECISION_HINT": hint}
        if threads and device.startswith("CPU"):
            config["INFERENCE_NUM_THREADS"] = int(threads)
        model = core.read_model(str(model_path))
        self.compiled = core.compile_model(model, device, config)
        self.request = self.compiled.create_infer_request()
        self.inputs = [self._spec(p) for p in self.compiled.inputs]
        self.outputs = [self._spec(p) for p in self.compiled.outputs]
        compiled_hint = _ov_property(self.compiled, "INFERENCE_PRECISION_HINT")
        if compiled_hint is not None and _ov_type_name(compiled_hint) != hint:
            raise RunnerError("OpenVINO compiled the model for %s at %s although %s was asked for; refusing to "
                              "measure a precision other than the artifact's" % (device, _ov_type_name(compiled_hint), hint))
        self.execution = {"device": device, "threads": threads, "precision": precision,
                          "inference_precision_requested": hint,
                          "inference_precision": _ov_type_name(compiled_hint) if compiled_hint is not None else None,
                          "execution_devices": list(self.compiled.get_property("EXECUTION_DEVICES")),
                          "layer_precisions": _ov_layer_precisions(self.compiled)}

    @staticmethod
    def _spec(port):
        shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
        return {"name": port.get_any_name(), "shape": shape,
                "dtype": np.dtype(port.get_element_type().to_dtype()).name, "quant": None, "port": port}

    def run_prepared(self, prepared):
        results = self.request.infer({spec["name"]: prepared[spec["name"]] for spec in self.inputs})
        return [np.asarray(results[spec["port"]]) for spec in self.outputs]

    def bind(self, prepared):
        infer = self.request.infer
        feed = {spec["name"]: prepared[spec["name"]] for spec in self.inputs}
        return lambda: infer(feed)


def openvino_precision_hint(precision, plugin="CPU"):
    """The INFERENCE_PRECISION_HINT that runs an artifact of ``precision`` as what it is.

    Without a hint the CPU plugin runs f32 models in bf16 on CPUs with native bf16 (AVX512_BF16, AMX),
    and GPUs run them in f16: an "fp32" measurement would be a bf16 or f16 one. int8 models keep their
    non-quantized layers in f32. fp16 artifacts only store fp16 weights on the CPU (it has no fp16
    arithmetic) and compute in f32; on a GPU they run in f16, as they were made for.
    """
    if precision == "bf16":
        if plugin not in ("CPU", "AUTO", "MULTI", "HETERO"):
            raise RunnerError("bf16 artifacts run on the OpenVINO CPU plugin only, not on '%s'" % plugin)
        return "bf16"
    if precision == "fp16" and plugin not in ("CPU", "AUTO", "MULTI", "HETERO"):
        return "f16"
    if precision not in (None, "fp32", "fp16", "int8", "dynamic"):
        raise RunnerError("unknown artifact precision '%s'" % precision)
    return "f32"


def cpu_supports_bf16():
    """(True, None) when OpenVINO's CPU plugin reports native bf16 here, else (False, why)."""
    try:
        import openvino as ov
    except ImportError as exc:
        return False, "openvino is not importable: %s" % exc
    capabilities = list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    if "BF16" in capabilities:
        return True, None
    return False, "this CPU's OpenVINO plugin offers only %s" % ", ".join(capabilities)


def _ov_property(compiled, name):
    try:
        return compiled.get_property(name)
    except Exception:  # AUTO/MULTI answer only what the device behind them supports
        return None


def _ov_type_name(value):
    """'f32', 'bf16', 'f16'... from an openvino Type (or its string)."""
    name = getattr(value, "get_type_name", None)
    return name() if callable(name) else str(value)


# Runtime-model nodes that compute nothing: left out of the per-precision layer counts.
_OV_NON_COMPUTE = ("Input", "Output", "Const", "Parameter", "Result")


def _ov_layer_precisions(compiled):
    """How many executed layers the plugin built at each precision, from ``get_runtime_model()`` (after its
    own transformations): ``{"runtime": {...}, "output": {...}}``, e.g. ``{"runtime": {"u8": 9, "f32": 3},
    "output": {"f32": 12}}``. ``runtime`` is the layer's own precision as the plugin reports it (a layer
    with fp16-compressed weights reports f16 there while it computes at the inference precision);
    ``output`` is what its outputs carry."""
    counts = {"runtime": {}, "output": {}}
    try:
        for op in compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if info["layerType"].astype(str) in _OV_NON_COMPUTE:
                continue
            runtime = info["runtimePrecision"].astype(str)
            counts["runtime"][runtime] = counts["runtime"].get(runtime, 0) + 1
            for output in info["outputPrecisions"].astype(str).split(","):
                output = output.strip()
                counts["output"][output] = counts["output"].get(output, 0) + 1
    except Exception as exc:  # a plugin without runtime-model info: say so instead of an empty count
        return {"unknown_reason": "%s: %s" % (type(exc).__name__, exc)}
    return counts


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
    if fmt == "tflite":
        return TFLiteSession(model_path, threads, precision)
    if fmt == "onnx":
        return OnnxSession(model_path, threads, providers, precision)
    if fmt == "openvino":
        return OpenVINOSession(model_path, threads, openvino_device, precision)
    raise RunnerError("unknown artifact format '%s'" % fmt)



# --------------------------------------------------------------------------------------------------
# Latency statistics
# --------------------------------------------------------------------------------------------------

def latency_stats(samples_ns):
    """Statistics (milliseconds) over per-inference samples in nanoseconds; percentiles interpolate linearly."""
    values = np.asarray(samples_ns, dtype=np.float64) / 1e6
    if values.size == 0:
        raise RunnerError("no timed inferences to summarize")
    mean = float(values.mean())
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    p50, p90, p95, p99 = (float(v) for v in np.percentile(values, [50, 90, 95, 99]))
    return {"p50": p50, "p90": p90, "p95": p95, "p99": p99, "mean": mean, "std": std,
            "cv": std / mean if mean > 0 else None, "min": float(values.min()), "max": float(values.max()),
            "count": int(values.size), "samples": [round(float(v), 6) for v in values]}


def timed_loop(call, runs, min_seconds):
    """Run ``call`` until both ``runs`` calls and ``min_seconds`` of wall time are done.

    Only the call itself sits between the two clock reads; returns (samples in ns, wall ns of the loop).
    """
    clock = time.perf_counter_ns
    min_ns = int(float(min_seconds) * 1e9)
    runs = max(int(runs), 1)
    samples = []
    append = samples.append
    loop_start = clock()
    while True:
        t0 = clock()
        call()
        t1 = clock()
        append(t1 - t0)
        if len(samples) >= runs and t1 - loop_start >= min_ns:
            return samples, t1 - loop_start


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------

def _proc_status_kb(field):
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss_mb():
    """Resident set size now (MiB), from /proc/self/status; None where unavailable."""
    kb = _proc_status_kb("VmRSS")
    return kb / 1024.0 if kb is not None else None


def peak_rss_mb():
    """Peak resident set size (MiB): VmHWM where present, else getrusage's ru_maxrss."""
    kb = _proc_status_kb("VmHWM")
    if kb is not None:
        return kb / 1024.0
    try:
        import resource
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):  # pragma: no cover - non-Unix
        return None
    # ru_maxrss is KiB on Linux and bytes on macOS.
    return maxrss / (1024.0 * 1024.0) if sys.platform == "darwin" else maxrss / 1024.0


# --------------------------------------------------------------------------------------------------
# Power sources. Each read() returns (watts or None, cumulative joules or None) at one instant.
# --------------------------------------------------------------------------------------------------

class PowerUnavailable(Exception):
    """The configured sensor cannot be read here; the message is the reason shown in the result."""


def _read_text(path):
    with open(path) as handle:
        return handle.read().strip()


def _read_number(path):
    try:
        return float(_read_text(path))
    except PermissionError:
        raise PowerUnavailable("permission denied reading %s (needs root or a udev rule granting read access)"
                               % path) from None
    except (OSError, ValueError) as exc:
        raise PowerUnavailable("cannot read %s: %s" % (path, exc)) from exc


class PowerSource(object):
    """Base class: ``read()`` -> (watts or None, cumulative joules or None)."""

    sensor = ""

    def read(self):  # pragma: no cover - overridden
        raise NotImplementedError

    def describe(self):
        return {}

    def close(self):
        pass


class RaplSource(PowerSource):
    """Intel/AMD RAPL via powercap ``energy_uj`` counters, unwrapped with ``max_energy_range_uj``."""

    sensor = "rapl"
    DEFAULT_ROOT = "/sys/class/powercap"

    def __init__(self, root=None, rails=None):
        root = root or self.DEFAULT_ROOT
        if not os.path.isdir(root):
            raise PowerUnavailable("no powercap directory %s (RAPL not exposed by this kernel/CPU)" % root)
        zones = []
        for name in sorted(os.listdir(root)):
            zone = os.path.join(root, name)
            if not (name.startswith("intel-rapl:") or name.startswith("amd-rapl:")):
                continue
            if not os.path.isfile(os.path.join(zone, "energy_uj")):
                continue
            try:
                label = _read_text(os.path.join(zone, "name"))
            except OSError:
                label = name
            zones.append((name, label, zone))
        if not zones:
            raise PowerUnavailable("no RAPL domains with energy_uj under %s" % root)
        if rails:
            chosen = [z for z in zones if z[1] in rails or z[0] in rails]
            missing = [r for r in rails if r not in [z[1] for z in zones] + [z[0] for z in zones]]
            if missing:
                raise PowerUnavailable("RAPL domain(s) %s not found under %s (available: %s)"
                                       % (", ".join(missing), root, ", ".join(sorted(set(z[1] for z in zones)))))
        else:
            # Top-level package domains only (intel-rapl:N): sub-zones (core, uncore, dram) are inside them.
            chosen = [z for z in zones if z[0].count(":") == 1 and z[1] != "psys"] or \
                [z for z in zones if z[0].count(":") == 1]
        self.domains = []
        for name, label, zone in chosen:
            max_range = None
            if os.path.exists(os.path.join(zone, "max_energy_range_uj")):
                max_range = _read_number(os.path.join(zone, "max_energy_range_uj"))
            raw = _read_number(os.path.join(zone, "energy_uj"))
            self.domains.append({"name": name, "label": label, "path": os.path.join(zone, "energy_uj"),
                                 "max": max_range, "last": raw, "total_uj": 0.0})

    def read(self):
        total = 0.0
        for domain in self.domains:
            raw = _read_number(domain["path"])
            delta = raw - domain["last"]
            if delta < 0:
                if not domain["max"]:
                    raise PowerUnavailable("%s went backwards and max_energy_range_uj is unknown" % domain["path"])
                delta += domain["max"]  # the counter wrapped around
            domain["last"] = raw
            domain["total_uj"] += delta
            total += domain["total_uj"]
        return None, total / 1e6

    def describe(self):
        return {"domains": [d["label"] for d in self.domains]}


class Ina3221Source(PowerSource):
    """INA3221 rails (Jetson): hwmon ``power*_input`` (uW) or ``in*_input`` (mV) x ``curr*_input`` (mA),
    or the older iio driver's ``in_power*_input`` (mW) with ``rail_name_*``."""

    sensor = "ina3221"
    DEFAULT_ROOTS = ("/sys/class/hwmon", "/sys/bus/i2c/drivers/ina3221x", "/sys/bus/i2c/drivers/ina3221")

    def __init__(self, root=None, rails=None):
        channels = []
        for directory in self._chip_dirs(root):
            channels.extend(self._channels(directory))
        where = root or " or ".join(self.DEFAULT_ROOTS)
        if not channels:
            raise PowerUnavailable("no INA3221 power rails found under %s" % where)
        labels = [c["label"] for c in channels]
        if rails:
            missing = [r for r in rails if r not in labels]
            if missing:
                raise PowerUnavailable("INA3221 rail(s) %s not found (available: %s)"
                                       % (", ".join(missing), ", ".join(labels)))
            chosen = [c for c in channels if c["label"] in rails]
        else:
            # The module input rail is the whole board; the others are parts of it and would double count.
            inputs = [c for c in channels if c["label"].upper() in ("VDD_IN", "POM_5V_IN", "VIN_SYS_5V0")]
            chosen = inputs[:1] or channels
        self.channels = chosen
        self.read()  # fail now, not in the sampling thread

    @staticmethod
    def _chip_dirs(root):
        roots = [root] if root else list(Ina3221Source.DEFAULT_ROOTS)
        found = []
        for base in roots:
            if not os.path.isdir(base):
                continue
            candidates = [base] + [os.path.join(base, n) for n in sorted(os.listdir(base))]
            for candidate in list(candidates):
                for sub in ("hwmon", "iio:device0", "iio_device"):
                    nested = os.path.join(candidate, sub)
                    if os.path.isdir(nested):
                        candidates.extend(os.path.join(nested, n) for n in sorted(os.listdir(nested))
                                          if n.startswith("hwmon"))
                        candidates.append(nested)
            for candidate in candidates:
                if not os.path.isdir(candidate):
                    continue
                name_file = os.path.join(candidate, "name")
                if os.path.isfile(name_file):
                    try:
                        if "ina3221" not in _read_text(name_file).lower():
                            continue
                    except OSError:
                        continue
                elif not any(n.startswith("rail_name_") for n in os.listdir(candidate)):
                    continue
                if candidate not in found:
                    found.append(candidate)
        return found

    @staticmethod
    def _channels(directory):
        names = os.listdir(directory)
        channels = []
        for entry in sorted(names):
            m = re.match(r"^in(\d+)_label$", entry)
            if m:
                n = m.group(1)
                label = _read_text(os.path.join(directory, entry))
                power = os.path.join(directory, "power%s_input" % n)
                volt = os.path.join(directory, "in%s_input" % n)
                curr = os.path.join(directory, "curr%s_input" % n)
                if os.path.exists(power):
                    channels.append({"label": label, "power_uw": power})
                elif os.path.exists(volt) and os.path.exists(curr):
                    channels.append({"label": label, "volt_mv": volt, "curr_ma": curr})
                continue
            m = re.match(r"^rail_name_(\d+)$", entry)
            if m:
                n = m.group(1)
                power = os.path.join(directory, "in_power%s_input" % n)
                if os.path.exists(power):
                    channels.append({"label": _read_text(os.path.join(directory, entry)), "power_mw": power})
        if not channels:  # hwmon power without labels
            for entry in sorted(names):
                m = re.match(r"^power(\d+)_input$", entry)
                if m:
                    channels.append({"label": "power%s" % m.group(1), "power_uw": os.path.join(directory, entry)})
        return channels

    def read(self):
        watts = 0.0
        for channel in self.channels:
            if "power_uw" in channel:
                watts += _read_number(channel["power_uw"]) / 1e6
            elif "power_mw" in channel:
                watts += _read_number(channel["power_mw"]) / 1e3
            else:
                watts += _read_number(channel["volt_mv"]) * _read_number(channel["curr_ma"]) / 1e6
        return watts, None

    def describe(self):
        return {"rails": [c["label"] for c in self.channels]}


def _run_command(argv, timeout=10.0):
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    except OSError as exc:
        raise PowerUnavailable("cannot run %s: %s" % (argv[0], exc)) from exc
    except subprocess.TimeoutExpired:
        raise PowerUnavailable("%s did not answer within %.0f s" % (" ".join(argv), timeout)) from None
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        raise PowerUnavailable("%s exited with %d %s" % (" ".join(argv), proc.returncode, tail[0]))
    return proc.stdout.decode("utf-8", "replace")


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


class RpiPmicSource(PowerSource):
    """Raspberry Pi 5 PMIC: ``vcgencmd pmic_read_adc`` lists ``<rail>_A current(n)=..A`` and
    ``<rail>_V volt(n)=..V``; power is the sum of V*I over rails present with both."""

    sensor = "rpi-pmic"

    def __init__(self, command=None, rails=None):
        self.argv = list(command or ["vcgencmd", "pmic_read_adc"])
        self.rails = list(rails or [])
        readings = self._parse(_run_command(self.argv))
        paired = sorted(set(readings["A"]) & set(readings["V"]))
        if not paired:
            raise PowerUnavailable("%s printed no rail with both current and voltage" % " ".join(self.argv))
        if self.rails:
            missing = [r for r in self.rails if r not in paired]
            if missing:
                raise PowerUnavailable("PMIC rail(s) %s not found (available: %s)"
                                       % (", ".join(missing), ", ".join(paired)))
        self.used = self.rails or paired

    @staticmethod
    def _parse(text):
        readings = {"A": {}, "V": {}}
        for line in text.splitlines():
            m = re.match(r"^\s*(\S+)_([AV])\s+\w+\(\d+\)=\s*([-+0-9.eE]+)\s*[AV]?\s*$", line)
            if m:
                readings[m.group(2)][m.group(1)] = float(m.group(3))
        return readings

    def read(self):
        readings = self._parse(_run_command(self.argv))
        try:
            return sum(readings["A"][r] * readings["V"][r] for r in self.used), None
        except KeyError as exc:
            raise PowerUnavailable("PMIC rail %s vanished from %s" % (exc, " ".join(self.argv))) from exc

    def describe(self):
        return {"rails": list(self.used), "command": self.argv}


class CommandSource(PowerSource):
    """A user command (e.g. reading a USB power meter) that prints the current power in watts."""

    sensor = "command"

    def __init__(self, command):
        if not command:
            raise PowerUnavailable("sensor 'command' needs power.command, the argv of a program printing watts")
        self.argv = list(command)
        self.read()

    def read(self):
        text = _run_command(self.argv)
        match = _NUMBER.search(text)
        if not match:
            raise PowerUnavailable("%s printed no number (expected watts): %r" % (" ".join(self.argv), text[:80]))
        return float(match.group(0)), None

    def describe(self):
        return {"command": self.argv}


class _CtypesNvml(object):
    """The few NVML calls we need, through libnvidia-ml directly when pynvml is not installed."""

    def __init__(self):
        import ctypes
        self.ctypes = ctypes
        lib = None
        errors = []
        for name in ("libnvidia-ml.so.1", "libnvidia-ml.so", "nvml.dll"):
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError as exc:
                errors.append(str(exc))
        if lib is None:
            raise PowerUnavailable("NVML library not found (pynvml not installed; %s)" % "; ".join(errors))
        self.lib = lib
        self._check(getattr(lib, "nvmlInit_v2", None) or lib.nvmlInit, ())

    def _check(self, func, args):
        code = func(*args)
        if code != 0:
            err = self.lib.nvmlErrorString
            err.restype = self.ctypes.c_char_p
            raise PowerUnavailable("NVML call %s failed: %s" % (func.__name__, err(code).decode()))

    def handle(self, index):
        handle = self.ctypes.c_void_p()
        self._check(self.lib.nvmlDeviceGetHandleByIndex_v2, (self.ctypes.c_uint(index), self.ctypes.byref(handle)))
        return handle

    def name(self, handle):
        buf = self.ctypes.create_string_buffer(96)
        self._check(self.lib.nvmlDeviceGetName, (handle, buf, self.ctypes.c_uint(96)))
        return buf.value.decode()

    def power_mw(self, handle):
        value = self.ctypes.c_uint()
        self._check(self.lib.nvmlDeviceGetPowerUsage, (handle, self.ctypes.byref(value)))
        return value.value

    def energy_mj(self, handle):
        value = self.ctypes.c_ulonglong()
        self._check(self.lib.nvmlDeviceGetTotalEnergyConsumption, (handle, self.ctypes.byref(value)))
        return value.value

    def shutdown(self):
        self.lib.nvmlShutdown()


class _PynvmlAdapter(object):
    def __init__(self, pynvml):
        self.nv = pynvml
        try:
            pynvml.nvmlInit()
        except Exception as exc:
            raise PowerUnavailable("NVML init failed: %s" % exc) from exc

    def handle(self, index):
        return self.nv.nvmlDeviceGetHandleByIndex(index)

    def name(self, handle):
        name = self.nv.nvmlDeviceGetName(handle)
        return name.decode() if isinstance(name, bytes) else name

    def power_mw(self, handle):
        return self.nv.nvmlDeviceGetPowerUsage(handle)

    def energy_mj(self, handle):
        return self.nv.nvmlDeviceGetTotalEnergyConsumption(handle)

    def shutdown(self):
        self.nv.nvmlShutdown()


class NvmlSource(PowerSource):
    """NVIDIA GPU board power (mW) and, where supported (Volta+), the total energy counter (mJ)."""

    sensor = "nvml"

    def __init__(self, gpu_index=0):
        try:
            import pynvml
            self.api = _PynvmlAdapter(pynvml)
            self.binding = "pynvml"
        except ImportError:
            self.api = _CtypesNvml()
            self.binding = "ctypes"
        try:
            self.handle = self.api.handle(int(gpu_index))
            self.gpu_name = self.api.name(self.handle)
            self.api.power_mw(self.handle)
        except PowerUnavailable:
            raise
        except Exception as exc:
            raise PowerUnavailable("NVML cannot read GPU %s: %s" % (gpu_index, exc)) from exc
        try:
            self.api.energy_mj(self.handle)
            self.has_counter = True
        except Exception:
            self.has_counter = False  # pre-Volta GPUs: integrate the power readings instead

    def read(self):
        try:
            watts = self.api.power_mw(self.handle) / 1000.0
            joules = self.api.energy_mj(self.handle) / 1000.0 if self.has_counter else None
        except PowerUnavailable:
            raise
        except Exception as exc:
            raise PowerUnavailable("NVML read failed: %s" % exc) from exc
        return watts, joules

    def describe(self):
        return {"gpu": self.gpu_name, "gpu_index": self.gpu_index if hasattr(self, "gpu_index") else None,
                "binding": self.binding, "energy_counter": self.has_counter}

    def close(self):
        try:  # noqa: SIM105 - best effort on the way out
            self.api.shutdown()
        except Exception:
            pass


def open_power_source(config):
    """The PowerSource for a profile's ``power`` mapping; raises PowerUnavailable with the reason."""
    sensor = (config or {}).get("sensor") or "none"
    rails = config.get("rails") or []
    path = config.get("path")
    if sensor == "none":
        raise PowerUnavailable("the device profile has no power sensor (power.sensor: none)")
    if sensor == "rapl":
        return RaplSource(path, rails)
    if sensor == "ina3221":
        return Ina3221Source(path, rails)
    if sensor == "rpi-pmic":
        return RpiPmicSource(config.get("command"), rails)
    if sensor == "command":
        return CommandSource(config.get("command"))
    if sensor == "nvml":
        source = NvmlSource(config.get("gpu_index") or 0)
        source.gpu_index = config.get("gpu_index") or 0
        return source
    raise PowerUnavailable("unknown power sensor '%s'" % sensor)


class PowerSampler(object):
    """Samples a PowerSource on a thread every ``interval_s``; ``mark()`` takes a synchronous sample
    so measurement windows start and end exactly on a reading."""

    def __init__(self, source, interval_s):
        self.source = source
        self.interval_s = max(float(interval_s), 0.001)
        self.samples = []  # (monotonic seconds, watts or None, cumulative joules or None, from_thread)
        self.errors = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="edgeq-power", daemon=True)

    def _sample(self, from_thread):
        with self._lock:
            before = time.monotonic()
            try:
                watts, joules = self.source.read()
            except PowerUnavailable as exc:
                self.errors.append(str(exc))
                return None
            after = time.monotonic()
            stamp = (before + after) / 2.0
            self.samples.append((stamp, watts, joules, from_thread))
            return stamp

    def _loop(self):
        next_at = time.monotonic()
        while not self._stop.is_set():
            self._sample(True)
            next_at += self.interval_s
            now = time.monotonic()
            if next_at < now:  # a slow read: skip the missed ticks rather than bursting
                next_at = now + self.interval_s
            self._stop.wait(next_at - now)

    def start(self):
        self._thread.start()
        return self

    def mark(self):
        stamp = self._sample(False)
        if stamp is None:
            raise PowerUnavailable("power sensor read failed: %s" % self.errors[-1])
        return stamp

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)

    def window(self, start, end):
        """Energy and statistics between two marks: counter delta where the source counts energy,
        else the trapezoid rule over the power readings."""
        with self._lock:
            inside = [s for s in self.samples if start <= s[0] <= end]
        duration = end - start
        out = {"duration_s": duration, "samples": sum(1 for s in inside if s[3]),
               "readings": len(inside)}
        counters = [(s[0], s[2]) for s in inside if s[2] is not None]
        powers = [(s[0], s[1]) for s in inside if s[1] is not None]
        integrated = None
        if len(powers) >= 2:
            integrated = 0.0
            for (t0, p0), (t1, p1) in zip(powers, powers[1:]):
                integrated += (t1 - t0) * (p0 + p1) / 2.0
        if len(counters) >= 2:
            out["energy_j"] = counters[-1][1] - counters[0][1]
            out["method"] = "counter"
            if integrated is not None:
                out["integrated_energy_j"] = integrated
        elif integrated is not None:
            out["energy_j"] = integrated
            out["method"] = "trapezoid"
        else:
            out["energy_j"] = None
            out["method"] = None
        if powers:
            values = [p for _, p in powers]
            out["min_w"], out["max_w"] = min(values), max(values)
        out["avg_w"] = out["energy_j"] / duration if out["energy_j"] is not None and duration > 0 else None
        return out


def summarize_power(sensor, source, sampler, idle, timed, inferences):
    """The result's ``power`` block and the energy per inference (J) from the idle and timed windows."""
    power = {"available": True, "sensor": sensor, "interval_ms": sampler.interval_s * 1000.0,
             "method": timed["method"], "idle_w": idle["avg_w"] if idle else None, "avg_w": timed["avg_w"],
             "active_w": None, "min_w": timed.get("min_w"), "max_w": timed.get("max_w"),
             "samples": timed["samples"], "idle_samples": idle["samples"] if idle else 0,
             "sample_rate_hz": timed["samples"] / timed["duration_s"] if timed["duration_s"] > 0 else None,
             "window_s": timed["duration_s"], "idle_window_s": idle["duration_s"] if idle else 0.0,
             "energy_j": timed["energy_j"], "active_energy_j_per_inference": None,
             "read_errors": len(sampler.errors)}
    power.update(source.describe())
    if "integrated_energy_j" in timed:
        power["integrated_energy_j"] = timed["integrated_energy_j"]
    if power["idle_w"] is not None and power["avg_w"] is not None:
        power["active_w"] = power["avg_w"] - power["idle_w"]
        power["active_energy_j_per_inference"] = power["active_w"] * timed["duration_s"] / inferences
    warnings = []
    if timed["samples"] < 10:
        warnings.append("only %d power samples in the timed window; raise --min-seconds for a steadier energy "
                        "figure" % timed["samples"])
    if sampler.errors:
        warnings.append("%d sensor reads failed, last: %s" % (len(sampler.errors), sampler.errors[-1]))
    if warnings:
        power["warnings"] = warnings
    energy = timed["energy_j"] / inferences if timed["energy_j"] is not None and inferences else None
    return power, energy


# --------------------------------------------------------------------------------------------------
# Environment fingerprint (every probe is best effort: a missing file is simply left out)
# --------------------------------------------------------------------------------------------------

# ARM CPU part numbers (MIDR) for the cores edge boards use; /proc/cpuinfo on arm64 has no model name.
_ARM_PARTS = {"0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
              "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
              "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77", "0xd41": "Cortex-A78", "0xd42": "Cortex-A78AE",
              "0xd4b": "Cortex-A78C", "0xd44": "Cortex-X1", "0xd46": "Cortex-A510", "0xd47": "Cortex-A710",
              "0xd48": "Cortex-X2", "0xd4d": "Cortex-A715", "0xd80": "Cortex-A520", "0xd81": "Cortex-A720",
              "0x004": "Carmel (NVIDIA)"}
_X86_MARKERS = ("GenuineIntel", "AuthenticAMD", "HygonGenuine")


def _safe(func, default=None):
    try:
        return func()
    except Exception:
        return default


def _cpuinfo():
    try:
        with open("/proc/cpuinfo") as handle:
            return handle.read()
    except OSError:
        return ""


def _cpu_model(cpuinfo):
    fields = {}
    for line in cpuinfo.splitlines():
        if ":" in line:
            key, _, value = line.partition(":")
            fields.setdefault(key.strip().lower(), value.strip())
    for key in ("model name", "cpu model", "processor") if "model name" in fields else ("cpu model",):
        if fields.get(key) and not fields[key].isdigit():
            return fields[key]
    part = fields.get("cpu part")
    if part:
        return _ARM_PARTS.get(part.lower(), "ARM part %s" % part)
    return fields.get("hardware") or platform.processor() or None


def _board():
    for path in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model", "/sys/class/dmi/id/product_name"):
        value = _safe(lambda p=path: _read_text(p).rstrip("\x00"))
        if value:
            return value
    return None


def _governors():
    found = set()
    for path in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor"):
        value = _safe(lambda p=path: _read_text(p))
        if value:
            found.add(value)
    return ",".join(sorted(found)) if found else None


def _frequencies_mhz():
    freqs = {}
    for path in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq"):
        cpu = path.split("/")[5]
        value = _safe(lambda p=path: float(_read_text(p)) / 1000.0)
        if value is not None:
            freqs[cpu] = value
    if not freqs:
        return None
    ordered = [freqs[k] for k in sorted(freqs, key=lambda c: int(c[3:]))]
    return {"min": min(ordered), "max": max(ordered), "per_cpu": ordered}


def temperatures_c():
    """Thermal zone temperatures in Celsius keyed by zone type."""
    temps = {}
    for zone in sorted(glob.glob("/sys/class/thermal/thermal_zone*")):
        kind = _safe(lambda z=zone: _read_text(os.path.join(z, "type")), os.path.basename(zone))
        value = _safe(lambda z=zone: float(_read_text(os.path.join(z, "temp"))) / 1000.0)
        if value is not None:
            key = kind
            n = 1
            while key in temps:
                n += 1
                key = "%s#%d" % (kind, n)
            temps[key] = value
    return temps


_THROTTLE_BITS = {0: "under_voltage", 1: "arm_freq_capped", 2: "throttled", 3: "soft_temp_limit"}


def _throttling():
    state = {}
    text = _safe(lambda: _run_command(["vcgencmd", "get_throttled"], timeout=5.0))
    if text and "=" in text:
        raw = text.strip().split("=", 1)[1]
        value = _safe(lambda: int(raw, 16))
        state["vcgencmd"] = raw
        if value is not None:
            state["now"] = [name for bit, name in _THROTTLE_BITS.items() if value & (1 << bit)]
            state["since_boot"] = [name for bit, name in _THROTTLE_BITS.items() if value & (1 << (bit + 16))]
    text = _safe(lambda: _run_command(["nvpmodel", "-q"], timeout=5.0))
    if text:
        for line in text.splitlines():
            if "Power Mode" in line:
                state["nvpmodel"] = line.split(":", 1)[-1].strip()
    return state or None


def _os_release():
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        text = _safe(lambda p=path: _read_text(p))
        if text:
            fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
            return fields.get("PRETTY_NAME", "").strip('"') or None
    return platform.platform()


def detect_emulation(machine=None, cpuinfo=None, binfmt_dir="/proc/sys/fs/binfmt_misc"):
    """(emulated, reason): an ARM userland running on an x86 CPU through qemu-user, where timings are
    those of the emulator, not of any real device."""
    machine = machine or platform.machine()
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    is_arm = machine.startswith(("aarch64", "arm"))
    if is_arm and any(marker in cpuinfo for marker in _X86_MARKERS):
        return True, "%s userland but /proc/cpuinfo shows an x86 CPU (qemu-user emulation)" % machine
    if is_arm and re.search(r"^flags\s*:.*\bsse\d?\b", cpuinfo, re.M):
        return True, "%s userland but /proc/cpuinfo lists x86 flags (qemu-user emulation)" % machine
    if is_arm:
        handler = os.path.join(binfmt_dir, "qemu-%s" % ("aarch64" if machine.startswith("aarch64") else "arm"))
        text = _safe(lambda: _read_text(handler))
        if text and text.startswith("enabled"):
            return True, "binfmt_misc handler %s is registered for this architecture" % handler
    if "QEMU" in (_cpu_model(cpuinfo) or ""):
        return True, "the CPU model is QEMU's (full-system emulation)"
    return False, None


def environment(runtime=None, runtime_version=None):
    """What the report needs to explain the numbers: hardware, clocks, temperatures, OS and software."""
    cpuinfo = _cpuinfo()
    emulated, why = detect_emulation(cpuinfo=cpuinfo)
    affinity = _safe(lambda: len(os.sched_getaffinity(0)))
    return {
        "hostname": platform.node(), "arch": platform.machine(), "cpu_model": _cpu_model(cpuinfo),
        "board": _board(), "cpu_count": os.cpu_count(), "cpu_affinity": affinity,
        "governor": _governors(), "freq_mhz": _frequencies_mhz(), "temperatures_c": temperatures_c(),
        "throttling": _throttling(), "loadavg": _safe(lambda: list(os.getloadavg())),
        "os": _os_release(), "kernel": platform.release(), "python": platform.python_version(),
        "numpy": np.__version__, "runtime": runtime, "runtime_version": runtime_version,
        "emulated": emulated, "emulation_reason": why,
    }


# --------------------------------------------------------------------------------------------------
# Orphan watchdog: stop when whatever started us is gone (an SSH session that dropped)
# --------------------------------------------------------------------------------------------------

def _proc_stat(pid):
    """(state, ppid, session id, start time in clock ticks) of ``pid`` from /proc, or None if it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            text = handle.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[3]), int(fields[19])


def _ancestors():
    """[(pid, ppid or None, start time)]: the processes whose exit means the run lost its controller.

    Only the processes that started this run are watched, not everything up to init: the parents inside
    the runner's own session (the ``timeout`` wrapper), then the first process outside it, where the walk
    stops; an unrelated far ancestor exiting (the shell that started the controller with ``&`` and logged
    out, an sshd listener restarted) must not stop a healthy run. When that first outside process leads a
    session of its own while the runner does not (``setsid -w`` exec'd by the shell sshd made for the
    command), it is only the launcher, so its parent (the SSH connection's process) is watched too. A
    ppid is recorded (re-parenting = gone) only inside the runner's session; outside it only exit counts.
    """
    try:
        own_sid = os.getsid(0)
    except OSError:
        own_sid = None
    chain = []
    pid = os.getppid()
    while pid > 1 and len(chain) < 64:
        stat = _proc_stat(pid)
        if stat is None:
            break
        _, ppid, sid, started = stat
        if sid == own_sid:
            chain.append((pid, ppid, started))
            pid = ppid
            continue
        chain.append((pid, None, started))
        if sid == pid and own_sid != os.getpid() and ppid > 1:
            launcher_parent = _proc_stat(ppid)
            if launcher_parent is not None:
                chain.append((ppid, None, launcher_parent[3]))
        break
    return chain


def _gone(pid, ppid, started):
    """True when ``pid`` exited (also as an unreaped zombie: containers' init may never reap it), was
    replaced, or (when ``ppid`` is given) lost its parent (re-parented to init or a subreaper)."""
    stat = _proc_stat(pid)
    return (stat is None or stat[0] in ("Z", "X") or stat[3] != started
            or (ppid is not None and stat[1] != ppid))


class OrphanWatchdog(object):
    """Kills the runner's process group once a process that started it (``_ancestors``) has exited.

    A dropped SSH connection ends sshd's session process but not what it started; this makes the runner
    (and the ``timeout`` wrapping it) exit within a poll period instead of running on unattended.
    """

    def __init__(self, poll_s=0.5):
        self.chain = _ancestors()
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="edgeq-watchdog", daemon=True)

    def start(self):
        if self.chain:
            self._thread.start()
        return self

    def stop(self):
        self._stop.set()

    def _loop(self):
        while not self._stop.wait(self.poll_s):
            for pid, ppid, started in self.chain:
                if _gone(pid, ppid, started):
                    try:  # stderr may be the dropped connection itself: a write can fail with EPIPE
                        sys.stderr.write("edgeq_runner: parent process %d is gone (connection lost); stopping\n"
                                         % pid)
                        sys.stderr.flush()
                    except (OSError, ValueError):
                        pass
                    try:
                        if _own_group():
                            os.killpg(os.getpgrp(), signal.SIGTERM)
                        else:
                            os.kill(os.getpid(), signal.SIGTERM)
                    except OSError:
                        os._exit(3)
                    return


def _own_group():
    """True when the runner leads-or-shares a session made for this run (setsid, or sshd's per-command
    session), so the whole group (the ``timeout`` wrapper included) may be stopped together."""
    try:
        return os.getpgrp() == os.getsid(0)
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------
# Request -> result
# --------------------------------------------------------------------------------------------------

REQUEST_VERSION = 1
RESULT_VERSION = 1
DEFAULTS = {"warmup": 10, "runs": 100, "min_seconds": 1.0, "threads": None, "seed": 0}


class RuntimeMissing(RunnerError):
    """The artifact's runtime is not importable on this device."""


def import_runtime(fmt):
    """Import the runtime for ``fmt`` up front (so its import cost is not counted as model load); returns
    (runtime name, version)."""
    if fmt == "tflite":
        try:
            _, module_name = _tflite_interpreter()
        except RunnerError as exc:
            raise RuntimeMissing(str(exc)) from exc
        return "tflite", _package_version(TFLITE_DISTRIBUTIONS[module_name])
    module = {"onnx": "onnxruntime", "openvino": "openvino"}.get(fmt)
    if module is None:
        raise RunnerError("unknown artifact format '%s'" % fmt)
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise RuntimeMissing("%s is not installed on this device (import failed: %s)" % (module, exc)) from exc
    return module, getattr(mod, "__version__", None)


def _read_manifest(release_dir):
    path = os.path.join(release_dir, "manifest.json")
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError) as exc:
        raise RunnerError("cannot read the artifact manifest %s: %s" % (path, exc)) from exc


def _latency_feed(session, eval_feed, seed):
    """One batch-of-one input: the first eval sample when there is eval data, else seeded random data."""
    if eval_feed is not None:
        return dict((name, arr[0:1]) for name, arr in eval_feed.items())
    rng = np.random.RandomState(seed)
    feed = {}
    for spec in session.inputs:
        shape = [1] + [d if d else 1 for d in spec["shape"][1:]] if spec["shape"] else []
        dtype = np.dtype(spec["dtype"])
        if np.issubdtype(dtype, np.floating) or spec.get("quant"):
            feed[spec["name"]] = rng.random_sample(shape).astype(np.float32)
        else:
            feed[spec["name"]] = np.zeros(shape, dtype=dtype)
    return feed


def _load_eval(path, session, manifest):
    """Eval inputs keyed by the session's input names (labels never reach the device)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = dict((k, npz[k]) for k in npz.files)
    except Exception as exc:
        raise RunnerError("cannot read eval inputs %s: %s" % (path, exc)) from exc
    arrays.pop("labels", None)
    names = [spec["name"] for spec in session.inputs]
    manifest_names = [spec.get("name") for spec in manifest.get("inputs", [])]
    feed = {}
    for position, name in enumerate(names):
        if name in arrays:
            feed[name] = arrays[name]
        elif position < len(manifest_names) and manifest_names[position] in arrays:
            feed[name] = arrays[manifest_names[position]]
        elif len(names) == 1 and len(arrays) == 1:
            feed[name] = next(iter(arrays.values()))
        else:
            raise RunnerError("eval inputs %s have no array for model input '%s' (arrays: %s)"
                              % (path, name, ", ".join(sorted(arrays))))
    counts = set(len(a) for a in feed.values())
    if len(counts) != 1 or 0 in counts:
        raise RunnerError("eval inputs %s: arrays must hold the same, non-zero number of samples" % path)
    return feed


def _run_eval(session, feed, outputs_path):
    count = len(next(iter(feed.values())))
    collected = [[] for _ in session.outputs]
    started = time.perf_counter()
    for index in range(count):
        outputs = session.run(dict((name, arr[index:index + 1]) for name, arr in feed.items()))
        for slot, value in zip(collected, outputs):
            slot.append(value)
    seconds = time.perf_counter() - started
    arrays = dict(("output_%d" % i, np.concatenate(values, axis=0)) for i, values in enumerate(collected))
    tmp = outputs_path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, outputs_path)
    return {"samples": count, "seconds": seconds, "outputs_file": os.path.basename(outputs_path),
            "output_names": [spec["name"] for spec in session.outputs]}


def _resolve(path, base_dir):
    if path is None:
        return None
    path = os.path.expanduser(str(path))
    return path if os.path.isabs(path) else os.path.join(base_dir, path)


def usable_cpus():
    """CPUs this process may run on (affinity-aware where the OS tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cap_profile_threads(settings, request):
    """A profile's thread count is for its device class; on a device with fewer CPUs it would oversubscribe
    the cores and distort latency, so cap it there (an explicit --threads is taken as asked) and say so."""
    if not settings.get("threads") or not request.get("threads_from_profile"):
        return
    cpus = usable_cpus()
    if int(settings["threads"]) > cpus:
        settings["threads_requested"] = int(settings["threads"])
        settings["threads"] = cpus
        settings["threads_note"] = "profile asks for %d threads; capped to the %d usable CPUs" % (
            settings["threads_requested"], cpus)


def run_request(request, base_dir="."):
    """Execute one bench request; returns the result fields (raises RunnerError on problems)."""
    if int(request.get("request_version", REQUEST_VERSION)) != REQUEST_VERSION:
        raise RunnerError("request_version %s is not supported by this runner (expects %d)"
                          % (request.get("request_version"), REQUEST_VERSION))
    settings = dict(DEFAULTS)
    settings.update(dict((k, request[k]) for k in DEFAULTS if request.get(k) is not None))
    release_dir = _resolve(request.get("release_dir") or os.path.dirname(os.path.abspath(__file__)), base_dir)
    manifest = _read_manifest(release_dir)
    fmt = manifest.get("format")
    model_path = os.path.join(release_dir, manifest.get("model_file", ""))
    result = {"artifact": {"id": manifest.get("id"), "format": fmt, "precision": manifest.get("precision"),
                           "model_file": manifest.get("model_file")}}
    power_config = dict(request.get("power") or {})
    power_enabled = bool(power_config.pop("enabled", True)) and bool(power_config)
    sensor = power_config.get("sensor") or "none"
    settings.update({"power": power_enabled, "power_sensor": sensor,
                     "idle_seconds": float(power_config.get("idle_seconds", 2.0)),
                     "interval_ms": float(power_config.get("interval_ms", 20.0))})
    _cap_profile_threads(settings, request)
    result["settings"] = settings
    result["env"] = environment()

    memory = {"baseline_rss": current_rss_mb()}
    runtime_name, runtime_version = import_runtime(fmt)
    result["env"].update({"runtime": runtime_name, "runtime_version": runtime_version})
    memory["after_import_rss"] = current_rss_mb()
    started = time.perf_counter()
    session = open_session(model_path, fmt, threads=settings["threads"], providers=request.get("providers"),
                           openvino_device=request.get("openvino_device") or "CPU",
                           precision=manifest.get("precision"))
    result["load_ms"] = (time.perf_counter() - started) * 1000.0
    memory["after_load_rss"] = current_rss_mb()
    if memory["after_load_rss"] is not None and memory["after_import_rss"] is not None:
        memory["model_load_delta"] = memory["after_load_rss"] - memory["after_import_rss"]
    result["runtime"] = {"name": session.runtime, "version": session.runtime_version or runtime_version,
                         "execution": session.execution}

    eval_path = _resolve(request.get("eval_inputs"), base_dir)
    eval_feed = _load_eval(eval_path, session, manifest) if eval_path else None
    call = session.bind(session.prepare(_latency_feed(session, eval_feed, int(settings["seed"]))))

    # Idle power first: right after the first inference and the warm-up the clocks and rails are still up,
    # which would read as idle what the model's runs cost.
    source = sampler = idle = None
    if not power_enabled:
        result["power"] = {"available": False, "sensor": sensor, "reason": "power measurement turned off (--no-power)"}
    else:
        try:
            source = open_power_source(power_config)
            sampler = PowerSampler(source, settings["interval_ms"] / 1000.0).start()
            idle_start = sampler.mark()
            time.sleep(settings["idle_seconds"])
            idle = sampler.window(idle_start, sampler.mark()) if settings["idle_seconds"] > 0 else None
        except PowerUnavailable as exc:
            if sampler is not None:
                sampler.stop()
            source = sampler = None
            result["power"] = {"available": False, "sensor": sensor, "reason": str(exc)}

    try:
        warmup_window = [time.monotonic()]
        started = time.perf_counter_ns()
        call()
        result["first_inference_ms"] = (time.perf_counter_ns() - started) / 1e6
        for _ in range(int(settings["warmup"])):
            call()
        warmup_window.append(time.monotonic())
        timed_start = sampler.mark() if sampler else None
        samples, wall_ns = timed_loop(call, settings["runs"], settings["min_seconds"])
    except BaseException:  # a failing model or a SIGTERM: no sampler thread left reading the sensor
        if sampler:
            sampler.stop()
            source.close()
        raise
    if sampler:
        try:
            timed = sampler.window(timed_start, sampler.mark())
            sampler.stop()
            result["power"], result["energy_j_per_inference"] = summarize_power(
                sensor, source, sampler, idle, timed, len(samples))
            result["power"]["clock_windows"] = {"idle": [idle_start, idle_start + idle["duration_s"]] if idle else None,
                                                "warmup": warmup_window,
                                                "timed": [timed_start, timed_start + timed["duration_s"]]}
        except PowerUnavailable as exc:
            sampler.stop()
            result["power"] = {"available": False, "sensor": sensor, "reason": str(exc)}
        finally:
            source.close()
    result.setdefault("energy_j_per_inference", None)
    result["latency_ms"] = latency_stats(samples)
    result["timed_wall_s"] = wall_ns / 1e9
    result["throughput_ips"] = len(samples) / (wall_ns / 1e9) if wall_ns > 0 else None

    if eval_feed is not None:
        outputs_path = _resolve(request.get("outputs") or "outputs.npz", base_dir)
        result["eval"] = _run_eval(session, eval_feed, outputs_path)
    else:
        result["eval"] = None
    memory["peak_rss"] = peak_rss_mb()
    result["memory_mb"] = memory
    result["env"]["temperatures_c_end"] = temperatures_c()
    return result


class _Terminated(Exception):
    pass


# A stop comes as a burst of SIGTERMs (the watchdog signals the group, ``timeout`` passes it on to the
# runner and to its group again): only the first one interrupts the run; the others must not interrupt
# the writing of the result.
_stopping = {"now": False}


def _on_sigterm(signum, frame):
    if _stopping["now"]:
        return
    _stopping["now"] = True
    raise _Terminated("terminated by signal %d (time limit reached or connection lost)" % signum)


def _write_json(path, data):
    if os.path.exists(path) and not os.path.isfile(path):
        # --result /dev/stdout: write through the node; a rename would replace the node itself.
        with open(path, "w") as handle:
            json.dump(data, handle, indent=1, allow_nan=False, default=str)
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=1, allow_nan=False, default=str)
    os.replace(tmp, path)


def _json_safe(value):
    """NaN/inf become None so the result stays strict JSON."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return dict((k, _json_safe(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def main(argv=None):
    """``edgeq_runner.py --request req.json --result res.json``; the result is written also on failure."""
    parser = argparse.ArgumentParser(description="edgeq on-device runner")
    parser.add_argument("--request", required=True, help="request JSON written by the controller")
    parser.add_argument("--result", required=True, help="where to write the result JSON")
    args = parser.parse_args(argv)
    wall_start = time.time()
    result = {"result_version": RESULT_VERSION, "runner_version": RUNNER_VERSION, "status": "failed",
              "error": None, "error_kind": None, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "pid": os.getpid()}
    watchdog = None
    previous = None
    in_main_thread = threading.current_thread() is threading.main_thread()
    _stopping["now"] = False
    if in_main_thread:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if np is None:
            raise RuntimeMissing("numpy is not installed on this device (import failed: %s)" % NUMPY_ERROR)
        try:
            with open(args.request) as handle:
                request = json.load(handle)
        except (OSError, ValueError) as exc:
            raise RunnerError("cannot read request %s: %s" % (args.request, exc)) from exc
        if request.get("stop_when_orphaned"):
            watchdog = OrphanWatchdog().start()
        result.update(run_request(request, os.path.dirname(os.path.abspath(args.request))))
        result["status"] = "ok"
    except BaseException as exc:  # noqa: BLE001 - everything ends up in the result file
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        kind = "runtime_missing" if isinstance(exc, RuntimeMissing) else \
            "terminated" if isinstance(exc, (_Terminated, KeyboardInterrupt)) else \
            "runner" if isinstance(exc, RunnerError) else "exception"
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        result["error"] = message if isinstance(exc, RunnerError) else "%s: %s" % (type(exc).__name__, message)
        result["error_kind"] = kind
        result["traceback"] = traceback.format_exc().splitlines()[-15:]
    finally:
        _stopping["now"] = True  # from here on a SIGTERM waits for the result to be written
        if watchdog:
            watchdog.stop()
        result["duration_s"] = time.time() - wall_start
        try:
            _write_json(args.result, _json_safe(result))
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
