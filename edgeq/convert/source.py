"""The model being converted: detect its kind, load it, describe its inputs, and run it in FP32.

Five kinds of source are understood: Keras files (``.keras``, ``.h5``), TensorFlow
SavedModel directories, ONNX files, and PyTorch's ``.pt2`` (``torch.export``) and TorchScript ``.pt``
(``edgeq.convert.source_torch``). Every TensorFlow-based conversion works from a SavedModel; a Keras
model is exported to one in a scratch directory (``model.export``) the first time a backend asks for it.
A PyTorch model is exported to ONNX the same way for the ONNX backend (``onnx_file``).
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeq.convert.onnx_files import check_external_data, onnx_sha256, read_onnx
from edgeq.convert.savedmodel_files import inference_copy
from edgeq.convert.source_torch import (
    PICKLE_SUFFIXES,
    PT2_SUFFIXES,
    TORCHSCRIPT_SUFFIXES,
    export_onnx,
    load_exported,
    load_torchscript,
    run_module,
    torch_kind,
)
from edgeq.data import InputSpec
from edgeq.device.feeds import run_samples, spec_ranks, whole_inputs
from edgeq.device.runtimes.onnx import ORT_TYPES
from edgeq.errors import ConversionError, first_line, require_backend
from edgeq.manifest import sha256_file, sha256_tree

log = logging.getLogger(__name__)

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
ONNX_SUFFIXES = (".onnx",)
SAVEDMODEL_MARKERS = ("saved_model.pb", "saved_model.pbtxt")
SOURCE_KINDS = ("keras", "savedmodel", "onnx", "pytorch", "torchscript")
TORCH_KINDS = ("pytorch", "torchscript")
MODEL_HINT = "give a .keras/.h5 file, a SavedModel directory, an .onnx file or a PyTorch .pt2 (torch.export.save)"

TORCH_SUFFIXES = PT2_SUFFIXES + TORCHSCRIPT_SUFFIXES + PICKLE_SUFFIXES

# Reference batches: big enough to be quick, small enough for a 224x224 model on a small host.
REFERENCE_BATCH = 64


def detect_kind(path: Path) -> str:
    """One of ``SOURCE_KINDS`` for ``path``; ConversionError naming the file otherwise."""
    if not path.exists():
        raise ConversionError(f"{path}: model file not found")
    if path.is_dir():
        if any((path / marker).is_file() for marker in SAVEDMODEL_MARKERS):
            return "savedmodel"
        raise ConversionError(
            f"{path}: directory is not a TensorFlow SavedModel (no saved_model.pb)", hint=MODEL_HINT)
    suffix = path.suffix.lower()
    if suffix in KERAS_SUFFIXES:
        return "keras"
    if suffix in ONNX_SUFFIXES:
        return "onnx"
    if suffix in TORCH_SUFFIXES:
        return torch_kind(path)
    raise ConversionError(f"{path}: unsupported model type '{suffix or path.name}'", hint=MODEL_HINT)


def _dims(shape) -> list[int | None]:
    return [int(d) if d is not None and not isinstance(d, str) and int(d) >= 0 else None for d in shape]


@dataclass
class SourceModel:
    """A loaded source model: what it is, what it takes, and how to run it in FP32."""

    path: Path
    kind: str
    sha256: str
    inputs: list[InputSpec]
    outputs: list[str]
    _keras_model: object | None = field(default=None, repr=False)
    _signature: object | None = field(default=None, repr=False)
    _ort_session: object | None = field(default=None, repr=False)
    _savedmodel_dir: Path | None = field(default=None, repr=False)
    _keep_alive: object | None = field(default=None, repr=False)
    torch_module: object | None = field(default=None, repr=False)  # what runs: ep.module() or the ScriptModule
    exported_program: object | None = field(default=None, repr=False)  # the ExportedProgram (pytorch)
    _onnx_file: Path | None = field(default=None, repr=False)
    quantized_ops: dict[str, int] = field(default_factory=dict)  # an already quantized ONNX model's (prequantized.py)

    @property
    def reference_label(self) -> str:
        """What validation compares an artifact with: the FP32 source, or the quantized source kept as it is."""
        what = "pre-quantized int8" if self.quantized_ops else "fp32"
        return f"{self.kind} source ({what}) {self.path.name}"

    @property
    def display(self) -> str:
        return str(self.path)

    def savedmodel_dir(self, scratch: Path) -> Path:
        """A SavedModel of this source: the source itself (or its copy without optimizer slots, see
        ``savedmodel_files``), or a Keras export into ``scratch``."""
        if self.kind == "savedmodel":
            return self._savedmodel_dir or self.path
        if self.kind != "keras":
            raise ConversionError(f"{self.path}: a {self.kind} model cannot be turned into a TensorFlow SavedModel")
        if self._savedmodel_dir is None:
            target = scratch / "savedmodel"
            try:
                self._keras_model.export(str(target), format="tf_saved_model", verbose=False)
            except Exception as exc:  # Keras raises many types here; all mean "cannot export"
                raise ConversionError(f"{self.path}: cannot export the Keras model to a SavedModel: "
                                      f"{_first_line(exc)}") from exc
            self._savedmodel_dir = target
        return self._savedmodel_dir

    def onnx_file(self, scratch: Path, shapes: dict[str, list[int]], opset: int) -> Path:
        """An ONNX file of this source: the source itself, or a PyTorch export into ``scratch``."""
        if self.kind == "onnx":
            return self.path
        if self.kind not in TORCH_KINDS:
            raise ConversionError(f"{self.path}: a {self.kind} model is exported to ONNX with tf2onnx")
        if self._onnx_file is None:
            target = scratch / "from-torch.onnx"
            export_onnx(self, target, shapes, opset)
            self._onnx_file = target
        return self._onnx_file

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """FP32 reference outputs for ``feed`` (arrays keyed by source input name, samples first), batched
        where the model's inputs allow it (``edgeq.device.feeds``)."""
        # A model exported with a fixed batch (1x3x224x224, common in the wild) takes one sample at a time.
        step = 1 if any(spec.shape and spec.shape[0] is not None for spec in self.inputs) else REFERENCE_BATCH
        return run_samples(self._run_batch, feed, whole_inputs(feed, spec_ranks(self.inputs)), step)

    def _run_batch(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.kind == "keras":
            args = [feed[spec.name] for spec in self.inputs]
            out = self._keras_model(args[0] if len(args) == 1 else args, training=False)
            out = out if isinstance(out, (list, tuple)) else [out]
            return [np.asarray(o, dtype=np.float32) for o in out]
        if self.kind == "savedmodel":
            tf = require_backend("tensorflow", "tflite")
            result = self._signature(**{name: tf.constant(arr) for name, arr in feed.items()})
            return [np.asarray(result[name], dtype=np.float32) for name in self.outputs]
        if self.kind in TORCH_KINDS:
            return run_module(self.torch_module, [spec.name for spec in self.inputs], feed)
        return [np.asarray(o, dtype=np.float32) for o in self._ort_session.run(self.outputs, feed)]


_first_line = first_line  # the backends import it from here


def load_source(path: Path | str, input_shapes=None) -> SourceModel:
    """Load ``path`` (one of ``SOURCE_KINDS``); ConversionError naming the file when it cannot be read.

    ``input_shapes`` (name or None -> dims, as ``--input-shape`` gives them) is needed for TorchScript only,
    whose files record no input shapes."""
    path = Path(path)
    kind = detect_kind(path)
    if kind == "pytorch":
        return _load_pt2(path)
    if kind == "torchscript":
        return _load_torchscript(path, input_shapes or {})
    if kind == "keras":
        return _load_keras(path)
    if kind == "savedmodel":
        return _load_savedmodel(path)
    return _load_onnx(path)


def _load_keras(path: Path) -> SourceModel:
    require_backend("tensorflow", "tflite")
    keras = require_backend("keras", "tflite")
    try:
        # Safe mode refuses code stored in the file (Lambda layers' bytecode, arbitrary imports). The scope
        # enforces it even when something in this process called keras.config.enable_unsafe_deserialization(),
        # which would otherwise override safe_mode=True for .keras files.
        with _keras_safe_mode():
            model = keras.models.load_model(str(path), compile=False, safe_mode=True)
    except Exception as exc:  # zip/h5/json/deserialization errors all mean the same to the user
        if "safe_mode" in str(exc) or "unsafe_deserialization" in str(exc):
            raise ConversionError(
                f"{path}: refused: the Keras model holds Python code (e.g. a Lambda layer) and edgeq never runs "
                "code from a model file (Keras safe mode)",
                hint="replace the Lambda with built-in layers or a registered custom layer class, "
                     "or export the model yourself to a SavedModel or ONNX") from exc
        raise ConversionError(f"{path}: cannot load the Keras model ({_first_line(exc)})",
                              hint="is it a model saved with model.save()? Custom layers must be importable") from exc
    inputs = [InputSpec(name=t.name, shape=_dims(t.shape), dtype=str(np.dtype(t.dtype).name))
              for t in model.inputs]
    outputs = [f"output_{i}" for i in range(len(model.outputs))]
    return SourceModel(path=path, kind="keras", sha256=sha256_tree(path), inputs=inputs, outputs=outputs,
                       _keras_model=model)


def _load_pt2(path: Path) -> SourceModel:
    program, inputs, outputs = load_exported(path)
    return SourceModel(path=path, kind="pytorch", sha256=sha256_file(path), inputs=inputs, outputs=outputs,
                       torch_module=program.module(), exported_program=program)


def _load_torchscript(path: Path, shapes) -> SourceModel:
    module, names = load_torchscript(path)
    inputs = []
    for name in names:
        dims = shapes.get(name, shapes.get(None) if len(names) == 1 else None)
        if dims is None:
            raise ConversionError(f"{path}: a TorchScript file records no input shapes: give --input-shape for "
                                  f"input '{name}'", hint=f"e.g. --input-shape {name}=1x3x224x224 (or export the "
                                  "model with torch.export.save to a .pt2, which records them)")
        inputs.append(InputSpec(name=name, shape=[None, *dims[1:]], dtype="float32"))  # batch free; fp32 assumed
    # The output count is known once it runs: run it once on zeros of the given shapes.
    probe = run_module(module, names, {s.name: np.zeros([1, *s.shape[1:]], np.float32) for s in inputs})
    return SourceModel(path=path, kind="torchscript", sha256=sha256_file(path), inputs=inputs,
                       outputs=[f"output_{i}" for i in range(len(probe))], torch_module=module)


def _keras_safe_mode():
    """Keras' own safe-mode scope (forces safe mode for nested deserialization), or a no-op where it is missing."""
    try:
        from keras.src.saving.serialization_lib import SafeModeScope
    except ImportError:  # private module: older or newer Keras may not have it; safe_mode=True still applies
        return contextlib.nullcontext()
    return SafeModeScope(True)


def _load_savedmodel(path: Path) -> SourceModel:
    tf = require_backend("tensorflow", "tflite")
    sha256 = sha256_tree(path)
    loadable, _ = inference_copy(path, sha256)  # without optimizer slots, which newer TF cannot restore
    try:
        loaded = tf.saved_model.load(str(loadable))
    except Exception as exc:  # protobuf/variables errors
        raise ConversionError(f"{path}: cannot load the SavedModel ({_first_line(exc)})") from exc
    signatures = getattr(loaded, "signatures", {})
    if "serving_default" not in signatures:
        raise ConversionError(f"{path}: the SavedModel has no 'serving_default' signature "
                              f"(it has {sorted(signatures) or 'none'})",
                              hint="save it with signatures={'serving_default': fn} or model.export()")
    signature = signatures["serving_default"]
    specs = signature.structured_input_signature[1]
    inputs = [InputSpec(name=name, shape=_dims(spec.shape.as_list()) if spec.shape.rank is not None else [],
                        dtype=spec.dtype.name) for name, spec in specs.items()]
    outputs = list(signature.structured_outputs)
    # The signature needs the loaded object (its variables) alive as long as the source is used.
    return SourceModel(path=path, kind="savedmodel", sha256=sha256, inputs=inputs, outputs=outputs,
                       _signature=signature, _keep_alive=loaded, _savedmodel_dir=loadable)


def _load_onnx(path: Path) -> SourceModel:
    onnx = require_backend("onnx", "onnx")
    ort = require_backend("onnxruntime", "onnx")
    external = check_external_data(path, read_onnx(onnx, path))  # before onnx/onnxruntime read external files
    try:
        onnx.checker.check_model(str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # DecodeError, ValidationError, ORT Fail: the file is not a usable model
        raise ConversionError(f"{path}: not a valid ONNX model ({_first_line(exc)})") from exc
    inputs = [InputSpec(name=i.name, shape=[d if isinstance(d, int) and d > 0 else None for d in i.shape],
                        dtype=ORT_TYPES.get(i.type, i.type)) for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    return SourceModel(path=path, kind="onnx", sha256=onnx_sha256(path, external), inputs=inputs,
                       outputs=outputs, _ort_session=session)


_OP_PATTERNS = (
    re.compile(r"Custom ops: ([\w, ]+)"),  # TFLite converter
    re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op"),  # TFLite converter, older wording
    re.compile(r"No conversion rule found for operations: ([\w, ]+)"),  # OpenVINO frontends
    re.compile(r"Unsupported ops: Counter\(\{([^}]*)\}\)"),  # tf2onnx
)


def unsupported_ops(message: str) -> list[str]:
    """Op names a converter's error message says it cannot handle (empty when it names none)."""
    found: list[str] = []
    for pattern in _OP_PATTERNS:
        for match in pattern.finditer(message):
            text = match.group(1)
            names = re.findall(r"'(\w+)'", text) if "'" in text else re.split(r"[,\s]+", text)
            for op in names:
                op = op.strip()
                if op and op not in found:
                    found.append(op)
    return found


def conversion_failure(source: SourceModel, fmt: str, precision: str, exc: BaseException) -> ConversionError:
    """A one-line ConversionError for a converter's exception, naming the model and the op when it can."""
    text = str(exc)
    failed = re.search(r"Conversion is failed for: ([^\n]+)", text)  # OpenVINO's frontend summary
    if failed:
        reasons = [r for r in re.findall(r"FrontEnd API failed with \w+:\n([^\n]+)", text)
                   if "wasn't fully converted" not in r]
        return ConversionError(
            f"{source.path}: cannot convert to {fmt} {precision}: OpenVINO's frontend failed on "
            f"{failed.group(1).strip()}" + (f": {reasons[0].strip()}" if reasons else ""),
            hint="static input shapes often help (--input-shape NAME=DIMS), or try another --format")
    ops = unsupported_ops(text)
    if ops:
        return ConversionError(
            f"{source.path}: cannot convert to {fmt} {precision}: op(s) {', '.join(ops)} not supported by {fmt}",
            hint="replace the op in the model, or try another --format",
        )
    return ConversionError(f"{source.path}: cannot convert to {fmt} {precision}: {_first_line(exc)}")
