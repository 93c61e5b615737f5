"""OpenVINO IR artifacts, compiled with their inference precision pinned and read back."""

import numpy as np

from ..errors import RunnerError, RuntimeMissing
from .base import Session


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
        # Named as the IR names them: a compiled output also takes the names of the tensor feeding its
        # Result (silero-vad's ``output`` becomes ``F0::If_0_.../ReduceMean_output_0`` too), and its any_name
        # would then not be the model's own.
        self.inputs = [self._spec(p, m) for p, m in zip(self.compiled.inputs, model.inputs)]
        self.outputs = [self._spec(p, m) for p, m in zip(self.compiled.outputs, model.outputs)]
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
    def _spec(port, model_port):
        shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
        return {"name": model_port.get_any_name(), "shape": shape,
                "dtype": np.dtype(port.get_element_type().to_dtype()).name, "quant": None, "port": port}

    def run_prepared(self, prepared):
        results = self.request.infer({spec["port"]: prepared[spec["name"]] for spec in self.inputs})
        return [np.asarray(results[spec["port"]]) for spec in self.outputs]

    def bind(self, prepared):
        infer = self.request.infer
        feed = {spec["port"]: prepared[spec["name"]] for spec in self.inputs}
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


FORMAT = "openvino"
PROBE_MODULES = ["openvino"]  # what ``targets check`` imports on a device
# pip requirements for this runtime on a device whose profile names none (``targets setup --format``).
PACKAGES = ["openvino", "numpy"]


def open(model_path, threads=None, providers=None, device="CPU", precision=None):  # noqa: A001 - the runtime interface
    return OpenVINOSession(model_path, threads, device or "CPU", precision)


def import_runtime():
    try:
        import openvino
    except ImportError as exc:
        raise RuntimeMissing("openvino is not installed on this device (import failed: %s)" % exc) from exc
    return "openvino", getattr(openvino, "__version__", None)
