"""ONNX static INT8 (QDQ) with ONNX Runtime's quantizer: the settings per device profile (U8S8 and
reduce_range on x86, S8S8 elsewhere), opset 13 for per-channel scales, calibration feeding, float nodes and the
op types to quantize. ``edgeq.convert.onnx`` calls it for ``--precision int8``."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

from edgeq.convert.base import BuildRequest, captured_stdout
from edgeq.convert.source import _first_line
from edgeq.errors import ConversionError, require_backend
from edgeq.profiles import DeviceProfile

log = logging.getLogger(__name__)

# Calibration batches for models with a free batch dimension (fewer, larger ORT calls; same min/max).
CALIBRATION_BATCH = 16


def needs_reduce_range(profile: DeviceProfile) -> bool:
    """7-bit weights where the profile asks for them (x86 without VNNI).

    ONNX Runtime's U8S8 kernels on AVX2 / AVX-512 without VNNI use vpmaddubsw, whose int16
    pair sums saturate with full 8-bit weights (ORT's quantization docs: "reduce_range ...
    designed for the U8S8 format on AVX2 and AVX512 (non-VNNI) machines"). Measured on the
    digits model on this project's AVX2 host: top-1 94.7% fp32 -> 92.7% without, 95.6% with.
    ARM and VNNI CPUs keep the full 8 bits.
    """
    return profile.onnx_reduce_range


def activation_type_for(profile: DeviceProfile, bits: int = 8) -> str:
    """uint8 activations (U8S8) on x86, int8 (S8S8) elsewhere; uint16 / int16 with ``bits=16`` (w8a16).

    ONNX Runtime's x86 kernels are built around U8S8 (vpmaddubsw, VNNI's vpdpbusd take unsigned x signed
    bytes); S8S8 QDQ models run slower there. ORT's quantization guide recommends U8S8 on x86-64 and S8S8
    on ARM. Measured on MobileNetV2 on this project's AVX2 host, 1 thread: see benchmarks/results/.
    """
    return ("uint" if profile.arch == "x86_64" else "int") + str(bits)


WEIGHTED_OP_TYPES = ["Conv", "ConvTranspose", "MatMul", "Gemm"]
PER_CHANNEL_OPSET = 13  # DequantizeLinear's ``axis`` (per-channel scales) arrived in opset 13


def opset_for_per_channel(prepared: Path, options: dict[str, object]) -> bool:
    """Make ``prepared`` opset >= 13 so per-channel QDQ is valid; True when it is (per-channel), False when
    the upgrade failed (quantize per-tensor). Both are recorded in ``options``."""
    onnx = require_backend("onnx", "onnx")
    model = onnx.load(str(prepared))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), PER_CHANNEL_OPSET)
    if opset >= PER_CHANNEL_OPSET:
        return True
    try:
        from onnx import version_converter

        upgraded = version_converter.convert_version(model, PER_CHANNEL_OPSET)
        onnx.checker.check_model(upgraded)
    except Exception as exc:  # noqa: BLE001 - the converter raises plain RuntimeErrors per unsupported op
        log.warning("%s: opset %d cannot be upgraded to %d (%s); quantizing per-tensor", prepared, opset,
                    PER_CHANNEL_OPSET, _first_line(exc))
        options["per_channel_off"] = f"opset {opset} could not be upgraded to {PER_CHANNEL_OPSET}: {_first_line(exc)}"
        return False
    onnx.save(upgraded, str(prepared))
    options["opset_upgraded"] = {"from": opset, "to": PER_CHANNEL_OPSET}
    return True


def quantize_static(request: BuildRequest, prepared: Path, target: Path, method: str, reduce_range: bool,
                     activation_type: str, per_channel: bool = True) -> dict[str, object]:
    """Write the QDQ model; returns the settings that had to differ from the defaults (for the manifest)."""
    quantization = require_backend("onnxruntime.quantization", "onnx")
    calibration = request.calibration
    if calibration is None:
        raise ConversionError(f"{request.source.path}: onnx int8 needs calibration data")
    free_batch = all(spec.shape and spec.shape[0] is None and spec.name not in request.input_shapes
                     for spec in request.source.inputs)
    # Histogram calibrators (entropy, percentile) stack per-batch outputs with np.asarray, which fails
    # on a short last batch: feed them one sample at a time.
    step = CALIBRATION_BATCH if free_batch and method == "minmax" and not calibration.whole else 1

    class Reader(quantization.CalibrationDataReader):
        """Feeds the calibration set in order (ORT's smallest data interface: get_next)."""

        def __init__(self):
            self._starts = iter(range(0, calibration.samples, step))

        def get_next(self):
            start = next(self._starts, None)
            if start is None:
                return None
            if step == 1:
                return calibration.batch(start)
            return {name: arr[start : start + step] for name, arr in calibration.inputs.items()}

    methods = {"minmax": quantization.CalibrationMethod.MinMax, "entropy": quantization.CalibrationMethod.Entropy,
               "percentile": quantization.CalibrationMethod.Percentile}

    cache = CalibrationCache(prepared, calibration, method, activation_type, step,
                             WEIGHTED_OP_TYPES if request.int8_op_types == "weighted" else None)

    def quantize(extra_options: dict) -> None:
        with captured_stdout(log), cache.use(extra_options) as cache_path:
            quantization.quantize_static(
                str(prepared), str(target), Reader(),
                quant_format=quantization.QuantFormat.QDQ,
                per_channel=per_channel,
                # 16-bit activations make ORT raise the model to opset 21 (native 16-bit QuantizeLinear);
                # ORT's CPU kernels run those layers as DequantizeLinear -> float op -> QuantizeLinear.
                activation_type={"uint8": quantization.QuantType.QUInt8, "int8": quantization.QuantType.QInt8,
                                 "uint16": quantization.QuantType.QUInt16,
                                 "int16": quantization.QuantType.QInt16}[activation_type],
                weight_type=quantization.QuantType.QInt8,
                reduce_range=reduce_range,
                calibrate_method=methods[method],
                nodes_to_exclude=list(request.float_nodes),
                # None: every op ORT can quantize, elementwise ones too (GELU's Mul/Tanh, LayerNorm's pieces),
                # which is what breaks transformer-like graphs; "weighted": the layers that carry weights.
                op_types_to_quantize=WEIGHTED_OP_TYPES if request.int8_op_types == "weighted" else None,
                extra_options=extra_options,
                **({"calibration_cache_path": cache_path} if cache_path else {}),
            )

    try:
        quantize({})
    except ValueError as exc:
        # ORT's int32-bias weight-scale adjustment indexes a per-channel bias as if it were 1-D and fails
        # on biases of another shape (seen on Magika's Conv, ORT 1.32): quantize without that adjustment.
        if "truth value of an array" not in str(exc):
            raise
        log.info("%s: ORT's int32-bias weight adjustment failed (%s); quantizing without it", prepared, exc)
        quantize({"QDQDisableWeightAdjustForInt32Bias": True})
        return {"int32_bias_weight_adjust": False, "calibration_cache": cache.outcome}
    return {"calibration_cache": cache.outcome}


def _arrays_digest(arrays: dict) -> str:
    """A content hash of the calibration arrays as fed (a subset of a file is other content than the file)."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def model_digest(path: Path) -> str:
    """A content hash of an ONNX model that does not depend on its initializers' names.

    tf2onnx and ORT's optimizer keep one of two identical constants (two BatchNorm scales of a fresh model,
    say) under whichever name came first in that process, so the same source exported twice gives other
    bytes. Initializers are named by their content here, for the hash only. The activation tensors, whose
    names ORT's ranges are keyed by, are node outputs, and keep their names."""
    import hashlib

    onnx = require_backend("onnx", "onnx")
    model = onnx.load(str(path))
    graph = model.graph
    by_content = {}
    for init in graph.initializer:
        anonymous = onnx.TensorProto()
        anonymous.CopyFrom(init)
        anonymous.name = ""
        by_content[init.name] = "init:" + hashlib.sha256(anonymous.SerializeToString(deterministic=True)).hexdigest()
    renamed = {}
    for init in graph.initializer:
        renamed.setdefault(by_content[init.name], init)
    graph.ClearField("initializer")  # identical constants are one tensor here, as they are to the model
    for name in sorted(renamed):
        init = graph.initializer.add()
        init.CopyFrom(renamed[name])
        init.name = name
    for node in graph.node:
        node.input[:] = [by_content.get(name, name) for name in node.input]
    for item in (*graph.input, *graph.value_info):  # IR < 4 lists initializers among the inputs too
        item.name = by_content.get(item.name, item.name)
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


class CalibrationCache:
    """ORT's own calibration cache (``quantize_static(calibration_cache_path=...)``, ONNX Runtime 1.32+: the
    activation ranges as JSON), one file per content hash of what the ranges depend on: the pre-processed model
    (``model_digest``), the calibration arrays as fed, the method, the op types calibrated, the feeding and ORT's
    version. Float nodes and reduce_range do not change the ranges, so every candidate of a tune that shares a
    method (mixed precision tries several) and a second tune of the same model calibrate once.

    A hit is read by ORT (JSON: no code); a miss is written to a temporary name and renamed into place, so a
    reader never sees half a file. ``outcome`` is what happened, for the manifest."""

    def __init__(self, prepared: Path, calibration, method: str, activation_type: str, step: int,
                 op_types: tuple[str, ...] | None):
        import hashlib
        import inspect

        import onnxruntime

        from edgeq.files import cache_dir

        quantization = require_backend("onnxruntime.quantization", "onnx")
        self.outcome = "off"
        self.path: Path | None = None
        if "calibration_cache_path" not in inspect.signature(quantization.quantize_static).parameters:
            self.outcome = f"off (onnxruntime {onnxruntime.__version__} has no calibration cache)"
            return
        text = (f"ort-calibration:v3:{model_digest(prepared)}:{_arrays_digest(calibration.inputs)}:{method}:"
                f"{activation_type}:{step}:{sorted(op_types) if op_types else 'all'}:{onnxruntime.__version__}")
        self.path = cache_dir("calibration") / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"

    def _readable(self) -> bool:
        """Whether ORT can read the cached file; one it cannot (truncated, edited) is removed, to be recomputed."""
        from onnxruntime.quantization.calibrate import load_tensors_data

        try:
            load_tensors_data(self.path)
            return True
        except Exception as exc:  # noqa: BLE001 - JSON, key and shape errors all mean "recompute"
            log.info("%s: unreadable calibration cache (%s); recomputing", self.path, _first_line(exc))
            self.path.unlink(missing_ok=True)
            return False

    @contextlib.contextmanager
    def use(self, extra_options: dict):
        """The path to hand ORT for one quantize_static call (None: no cache)."""
        if self.path is None or any(key.startswith("Calib") for key in extra_options):
            yield None
            return
        if self.path.is_file() and self._readable():
            self.outcome = "hit"
            yield str(self.path)
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=self.path.parent)
            os.close(fd)
            os.unlink(tmp)  # ORT treats an existing file as a hit: give it a free name in the cache directory
        except OSError as exc:  # a read-only home must not stop a conversion
            log.warning("cannot cache calibration ranges in %s: %s", self.path.parent, exc)
            self.outcome = "off (cache directory not writable)"
            yield None
            return
        try:
            yield tmp
        finally:
            # ORT writes the ranges once calibrated, before it quantizes: they are good even when quantizing
            # then failed (the int32-bias retry reads them instead of calibrating again).
            if Path(tmp).is_file():
                try:
                    os.replace(tmp, self.path)
                    self.outcome = "stored"
                except OSError as exc:  # the ranges were used; only keeping them failed
                    log.warning("cannot cache calibration ranges in %s: %s", self.path, exc)
                    Path(tmp).unlink(missing_ok=True)


def check_node_names(model_path: Path, wanted: tuple[str, ...], source: Path) -> None:
    """ConversionError naming the float nodes the (pre-processed) model does not have."""
    onnx = require_backend("onnx", "onnx")
    present = {node.name for node in onnx.load(str(model_path), load_external_data=False).graph.node}
    missing = sorted(set(wanted) - present)
    if missing:
        raise ConversionError(f"{source}: no node named {', '.join(repr(m) for m in missing[:5])} to keep in float",
                              hint="float nodes are node names of the pre-processed ONNX model")
