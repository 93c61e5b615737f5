"""ONNX backend: fp32 (tf2onnx, or the ONNX source shape-inferred), fp16, int8 static QDQ, int8 dynamic."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from edgeq.convert import savedmodel_files
from edgeq.convert.base import (
    ALL_SOURCES,
    TF_SOURCES,
    TORCH_SOURCES,
    BuildRequest,
    BuildResult,
    Capability,
    FormatBackend,
    captured_stdout,
)
from edgeq.convert.export_cache import cached_export, export_key
from edgeq.convert.onnx_dynamic import quantize_dynamic
from edgeq.convert.onnx_files import load_onnx_model, separate_consumed_outputs
from edgeq.convert.onnx_int8 import (
    activation_type_for,
    check_node_names,
    needs_reduce_range,
    opset_for_per_channel,
    quantize_static,
)
from edgeq.convert.prequantized import FROM_SOURCE
from edgeq.convert.source import _first_line, conversion_failure, unsupported_ops
from edgeq.errors import ConversionError, require_backend

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
OPSET = 17


def build(request: BuildRequest) -> BuildResult:
    """Write ``model.onnx`` for ``request.precision`` into ``request.out_dir``."""
    require_backend("onnx", "onnx")
    target = request.out_dir / MODEL_FILE
    tools: tuple[str, ...] = ("onnx", "onnxruntime")
    options: dict[str, object] = {}
    if request.source.kind in TF_SOURCES:
        tools += ("tensorflow", "keras", "tf2onnx")
        options["opset"] = OPSET
    elif request.source.kind in TORCH_SOURCES:
        tools += ("torch", "onnxscript")
        options["exported_by"] = ("torch.onnx.export (dynamo)" if request.source.kind == "pytorch"
                                  else "torch.onnx.export (TorchScript)")
    if request.source.quantized_ops:  # int8 already (prequantized.py checked the request): kept as it is
        _fp32_model(request, target, options)
        options.update(quantization=FROM_SOURCE, source_quantized_ops=request.source.quantized_ops)
        if request.source.kind in TF_SOURCES:  # tf2onnx folded the weight FakeQuants: their int8 back
            options["weights_restored_to_int8"] = _restore_weights(target)
        return BuildResult(model_file=MODEL_FILE, options=options, tools=tools)
    if request.precision == "fp32":
        _fp32_model(request, target, options)
        _canonical_constants(target)
        return BuildResult(model_file=MODEL_FILE, options=options, tools=tools)
    fp32 = request.scratch / "fp32.onnx"
    _fp32_model(request, fp32, options)
    try:
        if request.precision == "fp16":
            _to_fp16(fp32, target, options)
            _canonical_constants(target)
            return BuildResult(model_file=MODEL_FILE, options=options, tools=(*tools, "onnxconverter-common"))
        prepared = _pre_process(fp32, request.scratch / "preprocessed.onnx", options)
        if request.precision == "dynamic":
            quantize_dynamic(prepared, target, request.scratch, needs_reduce_range(request.profile), options,
                             where=request.source.path)
            _canonical_constants(target)
            return BuildResult(model_file=MODEL_FILE, options=options, tools=tools)
        method = request.calibration_method or request.profile.calibration_method
        reduce_range = needs_reduce_range(request.profile)
        activation_type = activation_type_for(request.profile, request.activation_bits)
        per_channel = opset_for_per_channel(prepared, options)
        options.update({"quant_format": "QDQ", "per_channel": per_channel, "activation_type": activation_type,
                        "weight_type": "int8", "reduce_range": reduce_range,
                        "op_types": request.int8_op_types or "all"})
        if request.activation_bits != 8:
            options["activation_bits"] = request.activation_bits
        if request.float_nodes:
            check_node_names(prepared, request.float_nodes, request.source.path)
            options["float_nodes"] = sorted(request.float_nodes)
        options.update(quantize_static(request, prepared, target, method, reduce_range, activation_type,
                                        per_channel))
        if not _quantized_weights(target):  # an int8 artifact that computes in float would be a lie
            raise ConversionError(
                f"{request.source.path}: onnx int8: no op was quantized (ORT's static quantization does not reach "
                "into If/Loop bodies, where this model may keep its layers)",
                hint="try --precision dynamic, which does, or --format openvino")
        _canonical_constants(target)
        return BuildResult(model_file=MODEL_FILE, calibration_method=method, options=options, tools=tools)
    except ConversionError:
        raise
    except Exception as exc:  # onnxruntime.quantization / onnxconverter-common raise plain exceptions
        raise conversion_failure(request.source, "onnx", request.precision, exc) from exc


def _quantized_weights(target: Path) -> int:
    """How many weights of the QDQ model ``target`` are stored quantized (a DequantizeLinear reading an
    initializer); QDQ pairs around activations alone (Split, Unsqueeze) quantize nothing that matters."""
    onnx = require_backend("onnx", "onnx")
    model = onnx.load(str(target))
    initializers = {tensor.name for tensor in model.graph.initializer}
    return sum(node.op_type == "DequantizeLinear" and node.input[0] in initializers for node in model.graph.node)


def _restore_weights(target: Path) -> int:
    """The folded QAT weights of ``target`` back as int8 on their learned grid (edgeq.convert.onnx_weight_grid)."""
    onnx = require_backend("onnx", "onnx")
    from edgeq.convert.onnx_weight_grid import restore_weight_quantizers

    model = onnx.load(str(target))
    count = restore_weight_quantizers(model)
    if count:
        onnx.save(model, str(target))
    return count


def _fp32_model(request: BuildRequest, target: Path, options: dict[str, object]) -> None:
    """The source as an FP32 ONNX model at ``target``; a TensorFlow source's export is cached
    (``export_cache``: ``options["onnx_export_cache"]`` says hit or stored)."""
    onnx = require_backend("onnx", "onnx")
    source = request.source
    if source.kind not in TF_SOURCES:
        location = source.onnx_file(request.scratch, request.input_shapes, OPSET)  # PyTorch: exported first
        model = load_onnx_model(location)  # external data checked to stay in the model's folder
        if request.input_shapes:
            freeze_onnx_inputs(model, request.input_shapes)
        try:
            model = onnx.shape_inference.infer_shapes(model)
        except Exception as exc:  # onnx raises InferenceError/ValidationError
            raise conversion_failure(source, "onnx", "fp32", exc) from exc
        if model.ByteSize() == location.stat().st_size:
            shutil.copyfile(location, target)
        else:
            onnx.save(model, str(target))
        return
    tf = require_backend("tensorflow", "tflite")
    tf2onnx = require_backend("tf2onnx", "onnx")
    exporter = hashlib.sha256(b"".join(Path(module).read_bytes()  # the code that exports: a change is a miss
                                       for module in (__file__, savedmodel_files.__file__))).hexdigest()
    key = export_key("tf2onnx", source.sha256, sorted(request.input_shapes.items()), OPSET, tf.__version__,
                     tf2onnx.__version__, onnx.__version__, exporter)
    options["onnx_export_cache"] = cached_export(key, target, lambda path: _tf_to_onnx(request, path))


def freeze_onnx_inputs(model, shapes: dict[str, list[int]]) -> None:
    """Give the graph inputs in ``shapes`` those fixed dims; the intermediate shapes recorded for the free
    dims are dropped so that shape inference works them out again from the fixed ones."""
    for graph_input in model.graph.input:
        if graph_input.name in shapes:
            for dim, value in zip(graph_input.type.tensor_type.shape.dim, shapes[graph_input.name], strict=True):
                dim.dim_value = value  # (clears dim_param: one field of a oneof)
    del model.graph.value_info[:]
    for output in model.graph.output:
        for dim in output.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.Clear()


class _UnsupportedOpsLog(logging.Handler):
    """tf2onnx logs unsupported ops and still returns a model; collect them to fail loudly instead."""

    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.ops: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.ops.extend(op for op in unsupported_ops(record.getMessage()) if op not in self.ops)


def _tf_to_onnx(request: BuildRequest, target: Path) -> None:
    tf = require_backend("tensorflow", "tflite")
    tf2onnx = require_backend("tf2onnx", "onnx")
    onnx = require_backend("onnx", "onnx")
    source = request.source
    saved_model = source.savedmodel_dir(request.scratch)
    loaded = tf.saved_model.load(str(saved_model))  # keep it referenced: the signature uses its variables
    signature = loaded.signatures["serving_default"]
    specs_by_name = signature.structured_input_signature[1]
    names = list(specs_by_name)
    specs = [tf.TensorSpec(request.input_shapes.get(name, spec.shape), spec.dtype, name=name)
             for name, spec in specs_by_name.items()]

    if any(t.dtype != tf.resource for t in signature.captured_inputs):
        # Constants captured by value (Basic Pitch's CQT kernels): tf2onnx makes each a graph input of the model,
        # which nothing feeds. Frozen first, they are constants of the graph like the variables.
        from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

        frozen = convert_variables_to_constants_v2(signature)
        order = [tensor.name.split(":")[0] for tensor in frozen.inputs]  # its placeholders, by argument name

        def call(*args):
            given = dict(zip(names, args, strict=True))
            # Its outputs in the signature's structure, so that tf2onnx names them as the signature does.
            flat = tf.nest.flatten(frozen(*[given[name] for name in order]))
            return tf.nest.pack_sequence_as(signature.structured_outputs, flat)
    else:
        def call(*args):
            return signature(**dict(zip(names, args, strict=True)))

    function = tf.function(call, input_signature=specs)
    # tf2onnx names new nodes from a process-wide counter, and which of two identical constants
    # survives deduplication depends on those names: start every conversion from the same count.
    tf2onnx.utils.INTERNAL_NAME = 1
    watcher = _UnsupportedOpsLog()
    tf2onnx_log = logging.getLogger("tf2onnx")
    tf2onnx_log.addHandler(watcher)
    try:
        with captured_stdout(log):
            model, _ = tf2onnx.convert.from_function(function, input_signature=specs, opset=OPSET)
    except Exception as exc:  # tf2onnx raises ValueError/RuntimeError/KeyError on graphs it cannot map
        raise conversion_failure(source, "onnx", request.precision, exc) from exc
    finally:
        tf2onnx_log.removeHandler(watcher)
    if watcher.ops:
        raise ConversionError(
            f"{source.path}: cannot convert to onnx {request.precision}: op(s) {', '.join(watcher.ops)} "
            "not supported by tf2onnx",
            hint="replace the op in the model, or try another --format",
        )
    _renumber_generated_names(model.graph)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx.checker.ValidationError
        raise ConversionError(f"{source.path}: tf2onnx produced an invalid ONNX model ({_first_line(exc)})") from exc
    onnx.save(model, str(target))


_GENERATED = re.compile(r"__(\d+)")


def _renumber_generated_names(graph) -> None:
    """Renumber tf2onnx's generated ``name__N`` / ``unk__N`` suffixes in order of first appearance.

    tf2onnx numbers the nodes it creates from a process-wide counter, so converting the same
    model twice in one process gives different names (and a different artifact id). Renumbering
    makes the file depend on the model only.
    """
    numbers: dict[str, str] = {}

    def rename(name: str) -> str:
        return _GENERATED.sub(lambda m: "__" + numbers.setdefault(m.group(1), str(len(numbers) + 1)), name)

    def walk(g) -> None:
        for node in g.node:
            node.name = rename(node.name)
            node.input[:] = [rename(n) for n in node.input]
            node.output[:] = [rename(n) for n in node.output]
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    walk(attribute.g)
                for sub in attribute.graphs:
                    walk(sub)
        for collection in (g.initializer, g.value_info, g.input, g.output):
            for item in collection:
                item.name = rename(item.name)
        for collection in (g.value_info, g.input, g.output):
            for item in collection:
                if item.type.HasField("tensor_type"):
                    for dim in item.type.tensor_type.shape.dim:
                        if dim.HasField("dim_param"):
                            dim.dim_param = rename(dim.dim_param)

    walk(graph)
    # "converted from b'__inference_call_941'": TensorFlow's function counter, not the model.
    graph.doc_string = ""


def _canonical_constants(path: Path) -> None:
    """Name generated constants by content and sort initializers, so equal models give equal files.

    Which of two identical constants (``const_starts__8`` / ``const_axes__8``) survives
    deduplication in tf2onnx and ONNX Runtime's optimizer depends on process state, not on the
    model; naming them by content removes that. Hand-named weights keep their names.
    """
    onnx = require_backend("onnx", "onnx")
    model = onnx.load(str(path))
    graph = model.graph
    renamed: dict[str, str] = {}
    kept = []
    for init in graph.initializer:
        if _GENERATED.search(init.name):
            anonymous = onnx.TensorProto()
            anonymous.CopyFrom(init)
            anonymous.name = ""
            digest = hashlib.sha256(anonymous.SerializeToString(deterministic=True)).hexdigest()[:12]
            renamed[init.name] = new = f"const__{digest}"
            if any(k.name == new for k in kept):
                continue  # same content under another generated name: one copy is enough
            init.name = new
        kept.append(init)
    if not renamed:
        return
    for node in graph.node:
        node.input[:] = [renamed.get(n, n) for n in node.input]
    for item in graph.value_info:
        item.name = renamed.get(item.name, item.name)
    kept.sort(key=lambda init: init.name)
    copies = [onnx.TensorProto() for _ in kept]
    for copy, init in zip(copies, kept, strict=True):
        copy.CopyFrom(init)
    del graph.initializer[:]
    graph.initializer.extend(copies)
    onnx.save(model, str(path))


def _to_fp16(fp32: Path, target: Path, options: dict[str, object]) -> None:
    onnx = require_backend("onnx", "onnx")
    float16 = require_backend("onnxconverter_common.float16", "onnx")
    model = onnx.load(str(fp32))
    if separated := separate_consumed_outputs(onnx, model):
        options["fp16_outputs_separated"] = separated
    model = float16.convert_float_to_float16(model, keep_io_types=True)
    retyped = _retype_float_casts(onnx, model)
    if retyped:
        options["fp16_casts_retyped"] = retyped
    onnx.save(model, str(target))


def _retype_float_casts(onnx, model) -> int:
    """Make Cast-to-float nodes cast to float16 where the converter declared their output float16.

    onnxconverter-common retypes every float tensor of the graph as float16, but leaves the ``to`` of Cast
    nodes that cast *to* float (common in exported graphs, e.g. jax2tf's one_hot): ORT then refuses the model
    ("Type (tensor(float16)) of output arg ... does not match expected type (tensor(float))"). Returns the
    number of nodes changed."""
    fp16_tensors = {v.name for v in [*model.graph.value_info, *model.graph.output]
                    if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
    changed = 0
    for node in model.graph.node:
        if node.op_type != "Cast" or node.output[0] not in fp16_tensors:
            continue
        for attribute in node.attribute:
            if attribute.name == "to" and attribute.i == onnx.TensorProto.FLOAT:
                attribute.i = onnx.TensorProto.FLOAT16
                changed += 1
    return changed


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _pre_process(fp32: Path, target: Path, options: dict[str, object]) -> Path:
    """ONNX Runtime's recommended pre-processing (shape inference + graph optimization) before quantizing."""
    shape_inference = require_backend("onnxruntime.quantization.shape_inference", "onnx")
    try:
        import sympy  # noqa: F401 - only needed by symbolic shape inference
        symbolic = True
    except ImportError:
        # Symbolic shape inference needs sympy (not an edgeq dependency); ONNX's own shape inference
        # still runs, which is enough for models with static non-batch dimensions.
        symbolic = False
    if symbolic:
        try:
            # On failure ORT's symbolic pass dumps sym_shape_infer_temp.onnx and its external data into the
            # current directory: run it from the scratch directory so nothing lands in the user's.
            with captured_stdout(log), _working_directory(fp32.parent):
                shape_inference.quant_pre_process(str(fp32.resolve()), str(target.resolve()),
                                                  skip_symbolic_shape=False)
            options["symbolic_shape_inference"] = True
            return target
        except Exception as exc:  # noqa: BLE001 - ORT raises bare Exceptions ("Incomplete symbolic shape inference")
            # Real models with dynamic spatial dimensions or data-dependent shapes defeat the symbolic pass;
            # ONNX's own shape inference and the graph optimizations still apply, which quantization needs.
            log.info("%s: symbolic shape inference failed (%s); using ONNX shape inference", fp32, _first_line(exc))
            options["symbolic_shape_inference"] = f"failed, fell back to onnx shape inference: {_first_line(exc)}"
    else:
        options["symbolic_shape_inference"] = False
    with captured_stdout(log):
        shape_inference.quant_pre_process(str(fp32), str(target), skip_symbolic_shape=True)
    return target


def _required_modules(precision: str, source_kind: str) -> list[tuple[str, str]]:
    needed = [("onnx", "onnx"), ("onnxruntime", "onnx")]
    needed += [("tf2onnx", "onnx")] if source_kind in TF_SOURCES else []
    needed += [("torch", "torch"), ("onnxscript", "torch")] if source_kind in TORCH_SOURCES else []
    needed += [("onnxconverter_common", "onnx")] if precision == "fp16" else []
    return needed


BACKEND = FormatBackend(
    name="onnx", extra="onnx", build=build, required_modules=_required_modules,
    capabilities=(
        Capability("onnx", "fp32", ALL_SOURCES, False, "onnx", (),
                   "tf2onnx (opset 17), or the ONNX source shape-inferred"),
        Capability("onnx", "fp16", ALL_SOURCES, False, "onnx", (),
                   "onnxconverter-common convert_float_to_float16(keep_io_types=True)"),
        Capability("onnx", "int8", ALL_SOURCES, True, "onnx", ("minmax", "entropy", "percentile"),
                   "onnxruntime quant_pre_process + quantize_static (QDQ, per-channel)"),
        Capability("onnx", "dynamic", ALL_SOURCES, False, "onnx", (), "onnxruntime quantize_dynamic (int8 per-channel weights)"),
    ),
    tools={"onnx": ("onnx",), "onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "tf2onnx": ("tf2onnx",),
           "onnxscript": ("onnxscript",), "onnxconverter-common": ("onnxconverter-common",)},
    uses_profile_calibration_method=True,
    float_node_precisions=("int8",),
    int8_tunables=("int8_op_types", "activation_bits"),
)
