"""The small interface between the orchestrator and a format backend."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeq.convert.source import SourceModel
from edgeq.data import Dataset
from edgeq.profiles import DeviceProfile


@dataclass(frozen=True)
class Capability:
    """One buildable artifact kind: a row of the capability table (like ultralytics' ``export_formats()``)."""

    format: str
    precision: str
    sources: tuple[str, ...]  # source kinds accepted: keras, savedmodel, onnx, pytorch, torchscript
    needs_calibration: bool
    extra: str  # the pip extra whose packages build it
    calibration_methods: tuple[str, ...]  # accepted --calibration-method values (empty: no calibration)
    how: str  # one line for people: which library call builds it


TF_SOURCES = ("keras", "savedmodel")
TORCH_SOURCES = ("pytorch", "torchscript")
ALL_SOURCES = ("keras", "savedmodel", "onnx", *TORCH_SOURCES)


@dataclass(frozen=True)
class FormatBackend:
    """Everything the controller knows about one artifact format, declared by its backend module as
    ``BACKEND`` (``edgeq.convert.registry`` finds it; the device side is ``edgeq.device.runtimes.<name>``).

    ``required_modules(precision, source_kind)`` lists the (module, extra) pairs a conversion needs, checked
    before any work; ``tools`` maps tool_versions keys to the distributions that provide them.
    """

    name: str
    extra: str
    capabilities: tuple[Capability, ...]
    build: Callable[[BuildRequest], BuildResult]
    required_modules: Callable[[str, str], list[tuple[str, str]]]
    tools: dict[str, tuple[str, ...]] = field(default_factory=dict)
    uses_profile_calibration_method: bool = False  # the profile's calibration_method is this format's default
    quantized_io_precisions: tuple[str, ...] = ()  # precisions that take --quantized-io
    float_node_precisions: tuple[str, ...] = ()  # precisions that can keep named nodes in float
    int8_tunables: tuple[str, ...] = ()  # the int8 settings besides calibration it accepts (preset, ...)
    freeze_free_batch: bool = False  # build a free batch dim as 1 unless --input-shape says otherwise


@dataclass(frozen=True)
class AccuracyControl:
    """Quantize, then keep layers in float until ``metric`` is within ``max_drop`` of the float model's
    (NNCF's ``quantize_with_accuracy_control``). ``metric(outputs, indices)`` gets the first output of each
    validation sample (and the samples' indices into ``inputs``) and returns (metric, per-sample values),
    higher better."""

    inputs: dict[str, np.ndarray]  # validation inputs keyed by source input name
    metric: Callable[[list[np.ndarray], list[int]], tuple[float, list[float]]]
    max_drop: float
    max_iterations: int = 8  # at most this many layers (groups of quantizers) go back to float
    ranking_subset: int = 100


@dataclass
class BuildRequest:
    """Everything a backend needs to write its model file(s) into ``out_dir``."""

    source: SourceModel
    precision: str
    out_dir: Path  # the (temporary) artifact directory: only model files go here
    scratch: Path  # intermediate files (SavedModel export, FP32 ONNX before quantization)
    profile: DeviceProfile
    calibration: Dataset | None = None
    calibration_method: str | None = None
    quantized_io: str | None = None
    float_nodes: tuple[str, ...] = ()  # nodes kept in float in an otherwise quantized model (mixed precision)
    int8_preset: str | None = None  # NNCF preset: performance (symmetric) or mixed (asymmetric activations)
    transformer: bool | None = None  # NNCF model_type TRANSFORMER: SmoothQuant and transformer ignored patterns
    fast_bias_correction: bool | None = None  # NNCF: fast (default) or full bias correction
    accuracy_control: AccuracyControl | None = None
    int8_op_types: str | None = None  # ONNX: quantize "all" supported ops (default) or only "weighted" ones
    input_shapes: dict[str, list[int]] = field(default_factory=dict)  # source input name -> frozen shape
    activation_bits: int = 8  # int8: 16 keeps activations in 16 bits, weights in 8 (TFLite 16x8, ORT w8a16)


@dataclass
class BuildResult:
    """What a backend built."""

    model_file: str  # relative to out_dir: the file a runtime loads
    source_names: dict[str, str] = field(default_factory=dict)  # artifact tensor name -> source name
    calibration_method: str | None = None  # as recorded in manifest.calibration.method
    options: dict[str, object] = field(default_factory=dict)  # settings that determine the artifact
    tools: tuple[str, ...] = ()  # distributions whose versions go into tool_versions


@contextlib.contextmanager
def captured_stdout(logger: logging.Logger) -> Iterator[None]:
    """Route a third-party library's prints (progress, calibration chatter) to the debug log.

    edgeq's library never writes to stdout; the CLI's summary must stay clean.
    """
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    text = buffer.getvalue().strip()
    if text:
        logger.debug("%s", text)
