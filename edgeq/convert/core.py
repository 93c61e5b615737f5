"""``convert``: source model + device profile (+ calibration, eval data) -> a verified artifact directory."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from edgeq import __version__
from edgeq.convert import registry
from edgeq.convert.base import AccuracyControl, BuildRequest, BuildResult
from edgeq.convert.formats import find_capability
from edgeq.convert.prequantized import check_prequantized_request, quantized_ops
from edgeq.convert.shapes import frozen_inputs, resolve_input_shapes
from edgeq.convert.source import SourceModel, detect_kind, load_source
from edgeq.convert.validate import host_caveat, host_profile_name, validate
from edgeq.data import MIN_CALIBRATION_SAMPLES, Dataset, InputSpec, load_dataset, subsample
from edgeq.errors import ConversionError, ValidationError, require_backend
from edgeq.manifest import (
    CalibrationInfo,
    Manifest,
    SourceInfo,
    TensorSpec,
    artifact_id,
    file_entries,
    refuse_code,
    write_manifest,
)
from edgeq.profiles import CalibrationMethod, DeviceProfile
from edgeq.taskmetrics import check_labels, metrics_for, parse_gate

log = logging.getLogger(__name__)

def tool_versions(tools: tuple[str, ...]) -> dict[str, str]:
    """edgeq's version plus each named tool's installed version (distributions from the format registry)."""
    versions = {"edgeq": __version__}
    distributions = registry.tool_distributions()
    for tool in tools:
        for dist in distributions.get(tool, (tool,)):
            try:
                versions[tool] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions


def convert(
    model: Path | str,
    profile: DeviceProfile,
    output: Path | str,
    *,
    format: str | None = None,  # noqa: A002 - the CLI's word for it
    precision: str | None = None,
    calibration: Path | str | None = None,
    calibration_samples: int = 300,
    calibration_method: CalibrationMethod | None = None,
    quantized_io: str | None = None,
    eval_path: Path | str | None = None,
    max_accuracy_drop: float | None = None,
    min_cosine: float | None = None,
    metrics: Sequence[str] = (),
    gates: Sequence[str] = (),
    float_nodes: list[str] | tuple[str, ...] = (),
    int8_preset: str | None = None,
    transformer: bool | None = None,
    fast_bias_correction: bool | None = None,
    accuracy_control: AccuracyControl | None = None,
    int8_op_types: str | None = None,
    input_shapes: Mapping[str | None, Sequence[int]] | None = None,
    activation_bits: int | None = None,
    force: bool = False,
) -> Manifest:
    """Convert ``model`` for ``profile`` into the artifact directory ``output`` and return its manifest.

    Format and precision default to the profile's. INT8 needs ``calibration`` (.npz keyed by input
    name). With ``eval_path`` the artifact is run against the FP32 source on the host and, when
    ``max_accuracy_drop`` is set, gated: over budget the artifact is still written, marked
    ``status: failed``, and ValidationError is raised. The directory is written atomically (temp
    dir beside it, then rename); an existing ``output`` is refused unless ``force``. ``float_nodes`` keeps
    those nodes of a quantized model in float (mixed precision; recorded in ``options.float_nodes``).
    ``int8_preset``, ``fast_bias_correction``, ``transformer``, ``accuracy_control`` (OpenVINO's NNCF) and ``int8_op_types``
    (ONNX: ``weighted`` quantizes only Conv/MatMul/Gemm) tune int8 where the format's backend takes them
    (``FormatBackend.int8_tunables``). ``input_shapes`` (input name, or None for the only input -> dims)
    freezes free dimensions; see ``edgeq.convert.shapes``. ``activation_bits=16`` quantizes int8 weights with
    16-bit activations (TFLite 16x8, ORT w8a16): for models whose activation ranges 8 bits cannot hold.
    ``metrics`` (``--metric`` values) and ``gates`` (``METRIC[.FIELD]>=VALUE``) need ``eval_path``: see
    ``edgeq.taskmetrics``; a failed gate fails validation as ``max_accuracy_drop`` does.
    """
    started = time.perf_counter()
    output = Path(output)
    fmt = format or profile.format
    precision = precision or profile.precision
    if output.exists() and not force:
        raise ConversionError(f"{output}: output already exists", hint="use --force to replace it")
    if calibration_samples < 1:
        raise ConversionError(f"calibration_samples must be at least 1, got {calibration_samples}")
    if min_cosine is not None and not -1 <= min_cosine <= 1:
        raise ConversionError(f"min_cosine must be in [-1, 1], got {min_cosine}")
    if min_cosine is not None and eval_path is None:
        raise ConversionError("min_cosine needs eval data to measure the agreement", hint="give --eval")
    if max_accuracy_drop is not None and max_accuracy_drop < 0:
        raise ConversionError(f"max_accuracy_drop must be >= 0, got {max_accuracy_drop}")
    if (metrics or gates) and eval_path is None:
        raise ConversionError("--metric and --gate need eval data to measure on", hint="give --eval")
    parsed_gates = [parse_gate(gate) for gate in gates]
    task_metrics = metrics_for(list(metrics), parsed_gates)  # a user metric imports here, before any work
    if quantized_io is not None and quantized_io not in ("int8", "uint8", "float32"):
        raise ConversionError(f"quantized_io must be int8, uint8 or float32, got '{quantized_io}'")

    model_path = Path(model)
    # Cheap checks (file type, format/precision pair, calibration present) before loading anything heavy.
    kind = detect_kind(model_path)
    capability = find_capability(fmt, precision, kind, str(model_path))
    _require_backends(fmt, precision, kind)
    # The int8 settings asked for beyond calibration (None: not asked; activation_bits 8 is everyone's default).
    asked = {"int8_preset": int8_preset, "fast_bias_correction": fast_bias_correction, "transformer": transformer,
             "accuracy_control": accuracy_control, "int8_op_types": int8_op_types,
             "activation_bits": None if activation_bits == 8 else activation_bits}
    source_quantized_ops = quantized_ops(model_path, kind)
    if source_quantized_ops:  # its own scales are kept: see edgeq.convert.prequantized
        check_prequantized_request(model_path, kind, source_quantized_ops, fmt, precision, calibration, float_nodes,
                                   {"calibration_method": calibration_method, **asked})
        capability, calibration = replace(capability, needs_calibration=False), None
    _check_calibration_request(capability, fmt, precision, calibration, calibration_method, model_path)
    if precision == "bf16":
        _require_host_bf16(model_path)

    log.debug("converting %s (%s) to %s %s for profile %s", model_path, kind, fmt, precision, profile.name)
    source = load_source(model_path, input_shapes)  # TorchScript takes its shapes from here
    source.quantized_ops = source_quantized_ops
    backend = registry.backend(fmt)
    shapes, shapes_from = resolve_input_shapes(source.inputs, input_shapes or {}, backend.freeze_free_batch,
                                               str(model_path))
    data_inputs = frozen_inputs(source.inputs, shapes)  # what calibration and eval data must match
    calib = _load_calibration(data_inputs, calibration, calibration_samples) if capability.needs_calibration else None
    dataset = load_dataset(eval_path, data_inputs, role="eval") if eval_path is not None else None
    if dataset is not None:
        check_labels(task_metrics, dataset.labels is not None, eval_path)
    if float_nodes and precision not in backend.float_node_precisions:
        raise ConversionError(f"{model_path}: {fmt} {precision} cannot keep nodes in float",
                              hint=f"float nodes apply to {fmt} {', '.join(backend.float_node_precisions)}"
                              if backend.float_node_precisions else f"no {fmt} precision keeps nodes in float")
    for name, value in asked.items():
        if value is not None and (precision != "int8" or name not in backend.int8_tunables):
            raise ConversionError(f"{model_path}: {fmt} {precision} does not take {name}",
                                  hint=f"{fmt} int8 takes: {', '.join(backend.int8_tunables) or 'none of them'}")
    if int8_preset not in (None, "performance", "mixed"):
        raise ConversionError(f"int8_preset must be performance or mixed, got '{int8_preset}'")
    if activation_bits not in (None, 8, 16):
        raise ConversionError(f"activation_bits must be 8 or 16, got {activation_bits!r}")
    if int8_op_types not in (None, "all", "weighted"):
        raise ConversionError(f"int8_op_types must be all or weighted, got '{int8_op_types}'")
    if quantized_io is not None and precision not in backend.quantized_io_precisions:
        log.warning("--quantized-io does not apply to %s %s; ignored", fmt, precision)
        quantized_io = None

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    scratch = Path(tempfile.mkdtemp(prefix="edgeq-convert-"))
    try:
        request = BuildRequest(source=source, precision=precision, out_dir=staging, scratch=scratch, profile=profile,
                               calibration=calib, calibration_method=calibration_method or
                               (profile.calibration_method if backend.uses_profile_calibration_method else None),
                               quantized_io=quantized_io, float_nodes=tuple(float_nodes), int8_preset=int8_preset,
                               transformer=transformer,
                               fast_bias_correction=fast_bias_correction, accuracy_control=accuracy_control,
                               int8_op_types=int8_op_types, input_shapes=shapes,
                               activation_bits=activation_bits or 8)
        result: BuildResult = backend.build(request)
        if shapes:
            result.options.update(input_shapes=shapes, input_shapes_from=shapes_from)
        manifest = _manifest(source, profile, fmt, precision, staging, result, calib, calibration_samples,
                             started)
        session = _open_artifact(staging / result.model_file, fmt, precision, source)
        manifest.inputs = _specs(session.inputs, result.source_names)
        manifest.outputs = _specs(session.outputs, result.source_names)
        if dataset is not None:
            manifest.validation = validate(source, session, result.source_names, dataset, max_accuracy_drop,
                                           min_cosine, task_metrics, parsed_gates)
            manifest.validation.host_profile = host_profile_name()
            if manifest.validation.host_profile:
                manifest.validation.host_caveat = host_caveat(fmt, precision, profile,
                                                              manifest.validation.host_profile)
            if manifest.validation.status == "failed":
                manifest.status = "failed"
        del session
        manifest.conversion_seconds = round(time.perf_counter() - started, 3)
        write_manifest(staging, manifest)
        _move_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if manifest.status == "failed":
        raise ValidationError(f"{output}: {fmt} {precision} artifact failed validation: {manifest.validation.message}",
                              hint=f"the artifact is kept, marked failed in {output / 'manifest.json'}")
    return manifest


def _require_backends(fmt: str, precision: str, kind: str) -> None:
    """Fail before any work when an extra this conversion needs is missing (the hint names the extra)."""
    # The source's loader (TensorFlow for Keras and SavedModel), then what the format's backend needs.
    needed = [("tensorflow", "tflite")] if kind != "onnx" else []
    needed += registry.backend(fmt).required_modules(precision, kind)
    for module, extra in needed:
        require_backend(module, extra)


def _require_host_bf16(model_path: Path) -> None:
    """bf16 artifacts are validated here by running them in bf16, which needs a CPU that computes it."""
    from edgeq.device.runtimes import cpu_supports_bf16

    supported, why = cpu_supports_bf16()
    if not supported:
        raise ConversionError(f"{model_path}: bf16 needs a CPU with native bf16 (AVX512_BF16 or AMX) to run and "
                              f"validate the artifact; {why}",
                              hint="use --precision fp16 (half the size, fp32 compute on CPUs), or convert on a "
                              "host with AVX512_BF16/AMX")


def _check_calibration_request(capability, fmt, precision, calibration, method, model_path) -> None:
    if capability.needs_calibration and calibration is None:
        raise ConversionError(f"{model_path}: {fmt} {precision} needs calibration data",
                              hint="pass --calibration calib.npz (arrays keyed by input name, ~100-500 samples)")
    if method is not None and capability.calibration_methods and method not in capability.calibration_methods:
        raise ConversionError(
            f"calibration method '{method}' is not available for {fmt} {precision} "
            f"(it supports: {', '.join(capability.calibration_methods)})",
            hint="entropy and percentile calibration are available for --format onnx --precision int8")
    if not capability.needs_calibration and calibration is not None:
        log.warning("%s %s does not use calibration data; ignoring %s", fmt, precision, calibration)


def _load_calibration(inputs: list[InputSpec], path, limit: int) -> Dataset:
    dataset = subsample(load_dataset(path, inputs, role="calibration"), limit)
    if dataset.samples < MIN_CALIBRATION_SAMPLES:
        log.warning("%s: only %d calibration samples; at least %d are needed to calibrate well",
                    dataset.path, dataset.samples, MIN_CALIBRATION_SAMPLES)
    return dataset


def _open_artifact(model_file: Path, fmt: str, precision: str, source: SourceModel):
    from edgeq.device.errors import RunnerError
    from edgeq.device.runtimes import open_session

    try:
        # Host validation always runs on this machine's CPU, whatever the profile's accelerator, pinned to the
        # artifact's precision by the same code path the device runner uses.
        return open_session(model_file, fmt, providers=["CPUExecutionProvider"], openvino_device="CPU",
                            precision=precision)
    except RunnerError as exc:
        raise ConversionError(f"{source.path}: the {fmt} runtime cannot load the converted model: {exc}") from exc
    except Exception as exc:  # a runtime rejecting what its converter wrote is a conversion failure
        raise ConversionError(f"{source.path}: the {fmt} runtime cannot load the converted model: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from exc


def _specs(tensors: list[dict], source_names: dict[str, str]) -> list[TensorSpec]:
    specs = []
    for tensor in tensors:
        quant = tensor.get("quant")
        specs.append(TensorSpec(name=tensor["name"], source_name=source_names.get(tensor["name"]),
                                shape=list(tensor["shape"]), dtype=tensor["dtype"],
                                scale=quant[0] if quant else None, zero_point=quant[1] if quant else None))
    return specs


def _manifest(source: SourceModel, profile: DeviceProfile, fmt: str, precision: str, staging: Path,
              result: BuildResult, calib: Dataset | None, calibration_samples: int, started: float) -> Manifest:
    files = file_entries(staging)
    refuse_code(staging, [entry.path for entry in files])  # a backend never writes code; if one did, stop
    calibration = None
    options: dict[str, object] = {"format": fmt, "precision": precision, "source_sha256": source.sha256,
                                  "edgeq_version": __version__}
    if calib is not None:
        calibration = CalibrationInfo(path=str(calib.path), sha256=calib.sha256,
                                      samples_available=calib.samples_available, samples_used=calib.samples,
                                      method=result.calibration_method or "default")
        options.update({"calibration_sha256": calib.sha256, "calibration_samples": calibration_samples,
                        "calibration_method": result.calibration_method})
    options.update(result.options)
    return Manifest(
        id=artifact_id(files), format=fmt, precision=precision, model_file=result.model_file, files=files,
        source=SourceInfo(path=str(source.path), sha256=source.sha256, kind=source.kind),
        calibration=calibration, inputs=[], outputs=[], profile=profile.model_dump(mode="json"),
        tool_versions=tool_versions(result.tools), created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        conversion_seconds=round(time.perf_counter() - started, 3), options=options,
    )


def _move_into_place(staging: Path, output: Path) -> None:
    """Rename the finished staging directory to ``output``, replacing an existing one (force) atomically."""
    if not output.exists():
        staging.rename(output)
        return
    # Two renames: the old artifact steps aside, the new one takes its name; only then is the old deleted.
    retired = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
    output.rename(retired)
    try:
        staging.rename(output)
    except OSError:
        retired.rename(output)
        raise
    if retired.is_dir() and not retired.is_symlink():
        shutil.rmtree(retired, ignore_errors=True)
    else:
        retired.unlink()

