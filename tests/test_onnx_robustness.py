"""ONNX graphs from the wild that broke convert, rebuilt small: what Magika's ONNX (jax2tf) showed."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.convert import convert
from edgeq.device.runtimes import open_session
from edgeq.profiles import load_profile

pytestmark = pytest.mark.slow

RNG = np.random.default_rng(0)
W = RNG.normal(0, 0.3, (16, 16)).astype(np.float32)


def _save(path, nodes, initializers, opset=17, batch="N"):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, path.stem, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 16])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _data_dependent_expand(path):
    """A constant expanded to a shape computed from the data: ORT's symbolic shape inference gives up
    ("Incomplete symbolic shape inference") though the model runs fine."""
    from onnx import helper, numpy_helper

    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("ReduceMax", ["h"], ["peak"], keepdims=0),
             helper.make_node("Cast", ["peak"], ["k0"], to=7), helper.make_node("Abs", ["k0"], ["k1"]),
             helper.make_node("Max", ["k1", "one_scalar"], ["k2"]), helper.make_node("Reshape", ["k2", "one"], ["k"]),
             helper.make_node("Concat", ["k", "width"], ["shape"], axis=0),
             helper.make_node("Expand", ["c", "shape"], ["e"]),
             helper.make_node("ReduceMean", ["e"], ["offset"], axes=[0], keepdims=1),
             helper.make_node("Add", ["h", "offset"], ["h2"]), helper.make_node("MatMul", ["h2", "W"], ["y"])]
    inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(np.full((1, 16), 0.01, np.float32), "c"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array(1, np.int64), "one_scalar"),
             numpy_helper.from_array(np.array([16], np.int64), "width")]
    return _save(path, nodes, inits)


def _cast_to_float(path):
    """A boolean mask cast to float (jax2tf's one_hot does this): onnxconverter-common's fp16 pass retypes
    the Cast's output as float16 but not the Cast itself, and ORT refuses the result."""
    from onnx import helper, numpy_helper

    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Greater", ["h", "zero"], ["mask"]),
             helper.make_node("Cast", ["mask"], ["maskf"], to=1), helper.make_node("Mul", ["h", "maskf"], ["y"])]
    return _save(path, nodes, [numpy_helper.from_array(W, "W"), numpy_helper.from_array(np.zeros(1, np.float32), "zero")])


def _run(directory, manifest, x):
    session = open_session(directory / manifest.model_file, manifest.format, precision=manifest.precision)
    return session.run({"x": x})[0]


@pytest.mark.parametrize("precision", ["int8", "dynamic"])
def test_quantizing_falls_back_when_symbolic_shape_inference_gives_up(tmp_path, precision, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # ORT dumps sym_shape_infer_temp.onnx + external data into the cwd on failure
    model = _data_dependent_expand(tmp_path / "expand.onnx")
    x = RNG.normal(0, 1, (64, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / precision
    manifest = convert(model, load_profile("x86-avx2"), out, format="onnx", precision=precision,
                       calibration=tmp_path / "calib.npz" if precision == "int8" else None)
    assert manifest.options["symbolic_shape_inference"].startswith("failed, fell back to onnx shape inference")
    assert "Incomplete symbolic shape inference" in manifest.options["symbolic_shape_inference"]
    assert list(cwd.iterdir()) == []  # nothing left in the user's directory
    import onnxruntime as ort

    reference = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x[:8]})[0]
    got = _run(out, manifest, x[:8])
    cosine = np.sum(got * reference) / (np.linalg.norm(got) * np.linalg.norm(reference))
    assert got.shape == reference.shape and cosine > 0.99


def test_fp16_keeps_casts_to_float_consistent(tmp_path):
    model = _cast_to_float(tmp_path / "cast.onnx")
    manifest = convert(model, load_profile("x86-avx2"), tmp_path / "fp16", format="onnx", precision="fp16")
    assert manifest.options["fp16_casts_retyped"] == 1
    x = RNG.normal(0, 1, (8, 16)).astype(np.float32)
    expected = np.maximum(x @ W, 0)
    np.testing.assert_allclose(_run(tmp_path / "fp16", manifest, x), expected, atol=0.02, rtol=0.01)


def test_an_old_opset_is_upgraded_before_per_channel_int8(tmp_path):
    import onnx
    from onnx import helper, numpy_helper

    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W"], ["y"])]
    model = _save(tmp_path / "opset12.onnx", nodes, [numpy_helper.from_array(W, "W")], opset=12)
    x = RNG.normal(0, 1, (64, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    manifest = convert(model, load_profile("x86-avx2"), tmp_path / "int8", format="onnx", precision="int8",
                       calibration=tmp_path / "calib.npz")
    assert manifest.options["opset_upgraded"] == {"from": 12, "to": 13} and manifest.options["per_channel"] is True
    quantized = onnx.load(str(tmp_path / "int8" / manifest.model_file))
    assert next(o.version for o in quantized.opset_import if o.domain in ("", "ai.onnx")) >= 13
    assert any(n.op_type == "DequantizeLinear" for n in quantized.graph.node)
    expected = np.maximum(x[:8] @ W, 0) @ W
    got = _run(tmp_path / "int8", manifest, x[:8])
    assert np.sum(got * expected) / (np.linalg.norm(got) * np.linalg.norm(expected)) > 0.99


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_a_source_with_a_fixed_batch_of_one_is_validated_sample_by_sample(tmp_path, fmt):
    """Models exported at a static 1xC... input are common; validation ran them in batches of 64, and ORT's
    dimension error came out as a traceback."""
    from onnx import helper, numpy_helper

    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    model = _save(tmp_path / "batch1.onnx", nodes, [numpy_helper.from_array(W, "W")], batch=1)
    x = RNG.normal(0, 1, (100, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    np.savez(tmp_path / "eval.npz", x=x)
    manifest = convert(model, load_profile("x86-avx2"), tmp_path / fmt, format=fmt, precision="int8",
                       calibration=tmp_path / "calib.npz", eval_path=tmp_path / "eval.npz")
    assert manifest.validation.samples == 100 and manifest.validation.cosine_similarity > 0.99
