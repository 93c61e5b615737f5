"""The model being converted: detect its kind, load it, describe its inputs, and run it in FP32.

Three kinds of source are understood: Keras files (``.keras``, ``.h5``), TensorFlow
SavedModel directories and ONNX files. Every TensorFlow-based conversion works from a
SavedModel; a Keras model is exported to one in a scratch directory (``model.export``)
the first time a backend asks for it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeq.data import InputSpec
from edgeq.errors import ConversionError, require_backend
from edgeq.manifest import sha256_tree

log = logging.getLogger(__name__)

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
ONNX_SUFFIXES = (".onnx",)
SAVEDMODEL_MARKERS = ("saved_model.pb", "saved_model.pbtxt")
SOURCE_KINDS = ("keras", "savedmodel", "onnx")

# Reference batches: big enough to be quick, small enough for a 224x224 model on a small host.
REFERENCE_BATCH = 64


def detect_kind(path: Path) -> str:
    """``keras``, ``savedmodel`` or ``onnx`` for ``path``; ConversionError naming the file otherwise."""
    if not path.exists():
        raise ConversionError(f"{path}: model file not found")
    if path.is_dir():
        if any((path / marker).is_file() for marker in SAVEDMODEL_MARKERS):
            return "savedmodel"
        raise ConversionError(
            f"{path}: directory is not a TensorFlow SavedModel (no saved_model.pb)",
            hint="give a .keras/.h5 file, a SavedModel directory or an .onnx file",
        )
    suffix = path.suffix.lower()
    if suffix in KERAS_SUFFIXES:
        return "keras"
    if suffix in ONNX_SUFFIXES:
        return "onnx"
    raise ConversionError(
        f"{path}: unsupported model type '{suffix or path.name}'",
        hint="give a .keras/.h5 file, a SavedModel directory or an .onnx file",
    )


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

    @property
    def display(self) -> str:
        return str(self.path)

    def savedmodel_dir(self, scratch: Path) -> Path:
        """A SavedModel of this source (the source itself, or a Keras export into ``scratch``)."""
        if self.kind == "savedmodel":
            return self.path
        if self.kind != "keras":
            raise ConversionError(f"{self.path}: an ONNX model cannot be turned into a TensorFlow SavedModel")
        if self._savedmodel_dir is None:
            target = scratch / "savedmodel"
            try:
                self._keras_model.export(str(target), format="tf_saved_model", verbose=False)
            except Exception as exc:  # Keras raises many types here; all mean "cannot export"
                raise ConversionError(f"{self.path}: cannot export the Keras model to a SavedModel: "
                                      f"{_first_line(exc)}") from exc
            self._savedmodel_dir = target
        return self._savedmodel_dir

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """FP32 reference outputs for ``feed`` (arrays keyed by source input name), batched."""
        count = len(next(iter(feed.values())))
        chunks: list[list[np.ndarray]] = []
        for start in range(0, count, REFERENCE_BATCH):
            part = {name: arr[start : start + REFERENCE_BATCH] for name, arr in feed.items()}
            chunks.append(self._run_batch(part))
        return [np.concatenate([chunk[i] for chunk in chunks]) for i in range(len(chunks[0]))]

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
        return [np.asarray(o, dtype=np.float32) for o in self._ort_session.run(self.outputs, feed)]


def _first_line(exc: BaseException) -> str:
    """The informative line of a (possibly multi-line) third-party error message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].startswith("in user code:"):  # tf.function errors: the cause is the last line
        return lines[-1]
    return lines[0]


def load_source(path: Path | str) -> SourceModel:
    """Load ``path`` (Keras, SavedModel or ONNX); ConversionError naming the file when it cannot be read."""
    path = Path(path)
    kind = detect_kind(path)
    if kind == "keras":
        return _load_keras(path)
    if kind == "savedmodel":
        return _load_savedmodel(path)
    return _load_onnx(path)


def _load_keras(path: Path) -> SourceModel:
    require_backend("tensorflow", "tflite")
    keras = require_backend("keras", "tflite")
    try:
        model = keras.models.load_model(str(path), compile=False)
    except Exception as exc:  # zip/h5/json/deserialization errors all mean the same to the user
        raise ConversionError(f"{path}: cannot load the Keras model ({_first_line(exc)})",
                              hint="is it a model saved with model.save()? Custom layers must be importable") from exc
    inputs = [InputSpec(name=t.name, shape=_dims(t.shape), dtype=str(np.dtype(t.dtype).name))
              for t in model.inputs]
    outputs = [f"output_{i}" for i in range(len(model.outputs))]
    return SourceModel(path=path, kind="keras", sha256=sha256_tree(path), inputs=inputs, outputs=outputs,
                       _keras_model=model)


def _load_savedmodel(path: Path) -> SourceModel:
    tf = require_backend("tensorflow", "tflite")
    try:
        loaded = tf.saved_model.load(str(path))
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
    return SourceModel(path=path, kind="savedmodel", sha256=sha256_tree(path), inputs=inputs, outputs=outputs,
                       _signature=signature, _keep_alive=loaded)


_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int32)": "int32", "tensor(int64)": "int64"}


def _load_onnx(path: Path) -> SourceModel:
    onnx = require_backend("onnx", "onnx")
    ort = require_backend("onnxruntime", "onnx")
    try:
        onnx.checker.check_model(str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # DecodeError, ValidationError, ORT Fail: the file is not a usable model
        raise ConversionError(f"{path}: not a valid ONNX model ({_first_line(exc)})") from exc
    inputs = [InputSpec(name=i.name, shape=[d if isinstance(d, int) and d > 0 else None for d in i.shape],
                        dtype=_ORT_DTYPES.get(i.type, i.type)) for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    return SourceModel(path=path, kind="onnx", sha256=sha256_tree(path), inputs=inputs, outputs=outputs,
                       _ort_session=session)


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
    ops = unsupported_ops(text)
    if ops:
        return ConversionError(
            f"{source.path}: cannot convert to {fmt} {precision}: op(s) {', '.join(ops)} not supported by {fmt}",
            hint="replace the op in the model, or try another --format",
        )
    return ConversionError(f"{source.path}: cannot convert to {fmt} {precision}: {_first_line(exc)}")
