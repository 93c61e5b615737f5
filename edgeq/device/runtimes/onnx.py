"""ONNX artifacts through ONNX Runtime, with the requested execution providers."""

from ..errors import RunnerError, RuntimeMissing
from .base import Session

# ONNX Runtime's type names -> numpy's (host validation reads source models with this map too).
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
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
                        "dtype": ORT_TYPES.get(i.type, i.type), "quant": None} for i in self.session.get_inputs()]
        self.outputs = [{"name": o.name, "shape": [d if isinstance(d, int) else None for d in o.shape],
                         "dtype": ORT_TYPES.get(o.type, o.type), "quant": None} for o in self.session.get_outputs()]
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


FORMAT = "onnx"
PROBE_MODULES = ["onnxruntime"]  # what ``targets check`` imports on a device
# pip requirements for this runtime on a device whose profile names none (``targets setup --format``).
PACKAGES = ["onnxruntime", "numpy"]


def open(model_path, threads=None, providers=None, device=None, precision=None):  # noqa: A001 - the runtime interface
    return OnnxSession(model_path, threads, providers, precision)


def import_runtime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeMissing("onnxruntime is not installed on this device (import failed: %s)" % exc) from exc
    return "onnxruntime", getattr(onnxruntime, "__version__", None)
