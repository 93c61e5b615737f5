"""A model that arrives already quantized (a QDQ ONNX model written by ORT here) keeps its scales: int8 needs no
calibration, the ONNX artifact holds the same quantization parameters bit for bit, OpenVINO converts it as it is,
and every precision that would re-quantize it or call it float is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq.cli import cli
from edgeq.convert import convert
from edgeq.device.runtimes import open_session
from edgeq.profiles import load_profile

PROFILE = "x86-avx512-vnni"  # reduce_range off: the profile does not change what is kept anyway


@pytest.fixture(scope="module")
def qdq_model(tmp_path_factory):
    """A float conv + matmul classifier, then ORT's static QDQ quantization of it (as a QAT export or a
    quantizer run elsewhere would hand it over)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(5)
    conv = rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32)
    dense = rng.normal(0, 0.5, (4 * 6 * 6, 5)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "conv_w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "dense_w"], ["scores"], name="dense")]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(conv, "conv_w"), numpy_helper.from_array(dense, "dense_w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    root = tmp_path_factory.mktemp("prequantized")
    float_path, qdq_path = root / "float.onnx", root / "qdq.onnx"
    onnx.save(model, str(float_path))
    samples = rng.normal(0, 1, (64, 1, 8, 8)).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter({"x": samples[i : i + 1]} for i in range(len(samples)))

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(float_path), str(qdq_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    evaluation = rng.normal(0, 1, (40, 1, 8, 8)).astype(np.float32)
    np.savez(root / "eval.npz", x=evaluation)
    np.savez(root / "calib.npz", x=samples)
    return {"model": qdq_path, "eval": root / "eval.npz", "calib": root / "calib.npz", "eval_x": evaluation}


def _initializers(path) -> dict[str, tuple[str, bytes]]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return {init.name: (str(numpy_helper.to_array(init).dtype), numpy_helper.to_array(init).tobytes())
            for init in model.graph.initializer}


def test_onnx_int8_keeps_the_models_scales_bit_for_bit(qdq_model, tmp_path):
    out = tmp_path / "onnx"
    manifest = convert(qdq_model["model"], load_profile(PROFILE), out, format="onnx", precision="int8",
                       eval_path=qdq_model["eval"])  # no calibration
    assert manifest.options["quantization"] == "from source" and manifest.calibration is None
    assert manifest.options["source_quantized_ops"]["QuantizeLinear"] >= 2
    source, artifact = _initializers(qdq_model["model"]), _initializers(out / manifest.model_file)
    scales = [name for name in source if name.endswith(("_scale", "_zero_point"))]
    assert len(scales) >= 6, sorted(source)  # input, conv weight, relu, matmul weight, ... each scale and zero point
    assert artifact == source  # every scale, zero point and quantized weight, bit for bit
    assert "pre-quantized int8" in manifest.validation.reference
    assert manifest.validation.cosine_similarity == pytest.approx(1.0, abs=1e-7)  # the model itself


def test_openvino_converts_it_as_it_is(qdq_model, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "openvino"
    manifest = convert(qdq_model["model"], load_profile(PROFILE), out, format="openvino", precision="int8",
                       eval_path=qdq_model["eval"])
    assert manifest.options["quantization"] == "from source" and manifest.options["fake_quantize_ops"] >= 2
    assert "nncf_preset" not in manifest.options and manifest.calibration is None
    session = open_session(out / manifest.model_file, "openvino", precision="int8")
    got = np.concatenate([session.run({session.inputs[0]["name"]: x[None]})[0] for x in qdq_model["eval_x"]])
    qdq = ort.InferenceSession(str(qdq_model["model"]), providers=["CPUExecutionProvider"])
    expected = qdq.run(None, {"x": qdq_model["eval_x"]})[0]
    cosine = np.sum(got * expected, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    # The same scales, two runtimes' int8 kernels (which differ by CPU: measured on AMD AVX2, mean 0.999, min
    # 0.990). The scales themselves are checked bit for bit in the ONNX test; here, that the IR keeps the
    # model's QDQ pairs as FakeQuantize ops and no NNCF pass ran.
    assert cosine.mean() > 0.99 and cosine.min() > 0.95, cosine
    assert manifest.validation.cosine_similarity == pytest.approx(float(cosine.mean()), abs=1e-5)


def test_bench_compares_with_the_quantized_source(qdq_model, tmp_path, monkeypatch):
    from edgeq.bench import bench
    from edgeq.targets import local_target

    monkeypatch.setenv("EDGEQ_LOCAL_WORKDIR", str(tmp_path / "device"))
    convert(qdq_model["model"], load_profile(PROFILE), tmp_path / "a", format="onnx", precision="int8")
    run = bench(tmp_path / "a", local_target(), eval_path=qdq_model["eval"], output_dir=tmp_path / "r", warmup=1,
                runs=5, min_seconds=0, idle_seconds=0)
    assert run.ok, run.result.error
    accuracy = json.loads(run.path.read_text())["accuracy"]
    assert "pre-quantized int8" in accuracy["reference"] and accuracy["agreement"]["top1_agreement"] == 1.0


@pytest.mark.parametrize(("extra", "expected"), [
    (["--format", "onnx", "--precision", "fp16"], "already quantized (6 DequantizeLinear, 4 QuantizeLinear); an fp16 artifact"),
    (["--format", "onnx", "--precision", "dynamic"], "would quantize it a second time"),
    (["--format", "openvino", "--precision", "fp32"], "an fp32 artifact of it would still compute its int8 ops"),
    (["--format", "onnx", "--precision", "int8", "--calibration-method", "entropy"], "calibration_method would "
     "re-quantize it"),
])
def test_refusals_are_one_line(qdq_model, tmp_path, extra, expected):
    result = CliRunner().invoke(cli, ["convert", str(qdq_model["model"]), "--profile", PROFILE, *extra,
                                      "--calibration", str(qdq_model["calib"]), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert str(qdq_model["model"]) in line and expected in line, line
    assert not (tmp_path / "out").exists()


def test_tune_refuses_a_model_whose_scales_are_fixed(qdq_model, tmp_path):
    result = CliRunner().invoke(cli, ["tune", str(qdq_model["model"]), "--target", "local", "--profile", PROFILE,
                                      "--calibration", str(qdq_model["calib"]), "--eval", str(qdq_model["eval"]),
                                      "--min-cosine", "0.99", "--output", str(tmp_path / "tuned")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "the model is already quantized (6 DequantizeLinear, 4 QuantizeLinear)" in result.output
    assert not (tmp_path / "tuned").exists()


def test_folded_qat_weights_go_back_to_int8_only_when_they_lie_on_their_grid():
    """tf2onnx leaves a QAT model's weights as fake-quantized floats: on a symmetric narrow-range grid (per output
    channel for Conv, per tensor for a MatMul here) they become int8 + DequantizeLinear with the same values;
    a weight off any grid is left alone."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgeq.convert.onnx_weight_grid import restore_weight_quantizers

    rng = np.random.default_rng(0)
    per_channel = rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.float32)
    per_channel[:, 0, 0, 0] = 127  # each channel reaches its peak, as tfmot's LastValueQuant makes it
    per_channel *= np.array([0.01, 0.5, 2.0, 0.003], np.float32).reshape(4, 1, 1, 1)
    per_tensor = rng.integers(-127, 128, (36, 5)).astype(np.float32)
    per_tensor[0, 0] = 127
    per_tensor *= np.float32(0.02)
    off_grid = rng.normal(0, 1, (5, 2)).astype(np.float32)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
             helper.make_node("Conv", ["dq", "w_conv"], ["c"]), helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("MatMul", ["f", "w_fc"], ["h"]), helper.make_node("MatMul", ["h", "w_off"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
                              [numpy_helper.from_array(per_channel, "w_conv"), numpy_helper.from_array(per_tensor, "w_fc"),
                               numpy_helper.from_array(off_grid, "w_off"),
                               numpy_helper.from_array(np.array(0.02, np.float32), "s"),
                               numpy_helper.from_array(np.array(128, np.uint8), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(0, 1, (1, 3, 5, 5)).astype(np.float32)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")  # float math: the values, not kernels
    before = ort.InferenceSession(model.SerializeToString(), options).run(None, {"x": x})[0]
    assert restore_weight_quantizers(model) == 2
    kept = {t.name: t for t in model.graph.initializer}
    assert kept["w_conv_int8"].data_type == kept["w_fc_int8"].data_type == TensorProto.INT8 and "w_off" in kept
    assert list(kept["w_conv_scale"].dims) == [4] and list(kept["w_fc_scale"].dims) == []  # per channel, per tensor
    after = ort.InferenceSession(model.SerializeToString(), options).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-4)
