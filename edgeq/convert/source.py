"""The model being converted: detect its kind, load it, describe its inputs, and run it in FP32.

Three kinds of source are understood: Keras files (``.keras``, ``.h5``), TensorFlow
SavedModel directories and ONNX files. Every TensorFlow-based conversion works from a
SavedModel; a Keras model is exported to one in a scratch directory (``model.export``)
the first time a backend asks for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeq.data import InputSpec
from edgeq.device.runtimes.onnx import ORT_TYPES
from edgeq.errors import ConversionError, require_backend
from edgeq.manifest import sha256_file, sha256_tree

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


def _keras_safe_mode():
    """Keras' own safe-mode scope (forces safe mode for nested deserialization), or a no-op where it is missing."""
    try:
        from keras.src.saving.serialization_lib import SafeModeScope
    except ImportError:  # private module: older or newer Keras may not have it; safe_mode=True still applies
        return contextlib.nullcontext()
    return SafeModeScope(True)


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


def _load_onnx(path: Path) -> SourceModel:
    onnx = require_backend("onnx", "onnx")
    ort = require_backend("onnxruntime", "onnx")
    external = check_external_data(path, _read_onnx(onnx, path))  # before onnx/onnxruntime read external files
    try:
        onnx.checker.check_model(str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # DecodeError, ValidationError, ORT Fail: the file is not a usable model
        raise ConversionError(f"{path}: not a valid ONNX model ({_first_line(exc)})") from exc
    inputs = [InputSpec(name=i.name, shape=[d if isinstance(d, int) and d > 0 else None for d in i.shape],
                        dtype=ORT_TYPES.get(i.type, i.type)) for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    return SourceModel(path=path, kind="onnx", sha256=_onnx_sha256(path, external), inputs=inputs,
                       outputs=outputs, _ort_session=session)


def _onnx_sha256(path: Path, external: list[str]) -> str:
    """The model file's sha256; with external data, a digest of it and of each data file (by location)."""
    if not external:
        return sha256_file(path)
    digest = hashlib.sha256(sha256_file(path).encode() + b"\n")
    for location in external:
        digest.update(location.encode() + b"\0" + sha256_file(path.parent / location).encode() + b"\n")
    return digest.hexdigest()


# The keys of a tensor's external_data entries that the ONNX spec defines.
_EXTERNAL_DATA_KEYS = frozenset({"location", "offset", "length", "checksum", "basepath"})


def load_onnx_model(path: Path):
    """The ONNX model at ``path`` with its external data, after checking that data stays in the model's folder."""
    onnx = require_backend("onnx", "onnx")
    model = _read_onnx(onnx, path)
    if check_external_data(path, model):
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:  # OSError, ValueError (bounds), onnx's own path checks
            raise ConversionError(f"{path}: cannot read the model's external data ({_first_line(exc)})") from exc
    return model


def _read_onnx(onnx, path: Path):
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError, OSError: the file is not a readable ONNX model
        raise ConversionError(f"{path}: not a valid ONNX model ({_first_line(exc)})") from exc


def check_external_data(path: Path, model) -> list[str]:
    """Refuse tensors whose external data is not a plain file inside the model's own folder; their locations.

    ``location`` must be relative and resolve (symlinks followed) inside the folder of ``path``, to an
    existing regular file with a single link, with integer offset/length within it. ConversionError names
    the model file and the tensor.
    """
    folder = os.path.realpath(path.parent)
    locations: set[str] = set()
    for tensor in _all_tensors(model):
        if not len(tensor.external_data) and tensor.data_location != tensor.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}

        def refuse(why: str, tensor=tensor) -> ConversionError:
            return ConversionError(f"{path}: tensor '{tensor.name}': external data {why}",
                                   hint="keep a model's external data files in the model's own folder")

        unknown = sorted(set(entries) - _EXTERNAL_DATA_KEYS)
        location = entries.get("location", "")
        if unknown:
            raise refuse(f"has unknown key(s) {unknown[:5]}")
        if not location or os.path.isabs(location) or os.path.splitdrive(location)[0] or "\0" in location:
            raise refuse(f"location {location!r} is not a relative path inside the model's folder")
        real = os.path.realpath(os.path.join(folder, location))
        if os.path.commonpath([folder, real]) != folder:
            raise refuse(f"location {location!r} points outside the model's folder ({real})")
        try:
            info = os.stat(real)
        except OSError as exc:
            raise refuse(f"file {location!r} cannot be read ({exc.strerror or exc})") from exc
        if not stat.S_ISREG(info.st_mode):
            raise refuse(f"file {location!r} is not a regular file")
        if info.st_nlink > 1:
            raise refuse(f"file {location!r} has other hard links (it may be a file from elsewhere)")
        try:
            offset, length = int(entries.get("offset", 0)), int(entries.get("length", 0))
        except ValueError as exc:
            raise refuse("has a non-integer offset or length") from exc
        if offset < 0 or length < 0 or offset + length > info.st_size:
            raise refuse(f"offset {offset} + length {length} is outside {location!r} ({info.st_size} bytes)")
        locations.add(os.path.relpath(real, folder))
    return sorted(locations)


def _all_tensors(model):
    """Every TensorProto of ``model``: initializers, sparse initializers, attributes, subgraphs and functions."""
    graphs = [model.graph]
    nodes = [node for function in model.functions for node in function.node]
    while graphs or nodes:
        if graphs:
            graph = graphs.pop()
            yield from graph.initializer
            for sparse in graph.sparse_initializer:
                yield from (sparse.values, sparse.indices)
            nodes.extend(graph.node)
            continue
        for attribute in nodes.pop().attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("sparse_tensor"):
                yield from (attribute.sparse_tensor.values, attribute.sparse_tensor.indices)
            for sparse in attribute.sparse_tensors:
                yield from (sparse.values, sparse.indices)
            if attribute.HasField("g"):
                graphs.append(attribute.g)
            graphs.extend(attribute.graphs)


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
