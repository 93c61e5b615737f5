"""Convert the tiny digits CNN in every format x precision and check each artifact by running it."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq.convert import capabilities
from edgeq.manifest import read_manifest, sha256_file, sha256_tree, verify_artifact
from edgeq.profiles import load_profile

pytestmark = pytest.mark.slow

# bf16 runs only on CPUs with native bf16: test_bf16_is_pinned_or_refused covers it on every host.
MATRIX = [(c.format, c.precision) for c in capabilities() if c.precision != "bf16"]
MODEL_FILES = {"tflite": {"model.tflite"}, "onnx": {"model.onnx"}, "openvino": {"model.xml", "model.bin"}}


def _run_artifact(directory, manifest, eval_x):
    from edgeq.device.runtimes import open_session

    session = open_session(directory / manifest.model_file, manifest.format, precision=manifest.precision)
    name = session.inputs[0]["name"]
    step = 50 if session.inputs[0]["shape"][0] is None else 1  # a static batch (OpenVINO) takes one at a time
    return session, np.concatenate([session.run({name: eval_x[i : i + step]})[0]
                                    for i in range(0, len(eval_x), step)])


@pytest.mark.parametrize(("fmt", "precision"), MATRIX, ids=[f"{f}-{p}" for f, p in MATRIX])
def test_every_format_and_precision(make_artifact, digits, fmt, precision):
    directory = make_artifact(fmt, precision)
    manifest = verify_artifact(directory)  # files exist with their size and sha256; id matches
    assert (manifest.format, manifest.precision, manifest.status) == (fmt, precision, "ok")
    assert {f.path for f in manifest.files} == MODEL_FILES[fmt]
    assert manifest.model_file in MODEL_FILES[fmt]
    assert all(f.size == (directory / f.path).stat().st_size > 0 for f in manifest.files)

    # Source, profile, tools and options are all recorded.
    assert manifest.source.kind == "keras"
    assert manifest.source.sha256 == sha256_tree(digits["model"])
    assert manifest.profile == load_profile("x86-avx2").model_dump(mode="json")
    assert manifest.tool_versions["edgeq"]
    expected_tools = {"tflite": {"tensorflow", "keras"}, "onnx": {"onnx", "onnxruntime", "tf2onnx"},
                      "openvino": {"openvino"}}[fmt]
    assert expected_tools <= set(manifest.tool_versions)
    if fmt == "openvino" and precision == "int8":
        assert "nncf" in manifest.tool_versions
    if fmt == "onnx" and precision == "fp16":
        assert "onnxconverter-common" in manifest.tool_versions
    assert manifest.options["format"] == fmt and manifest.options["precision"] == precision
    assert manifest.options["source_sha256"] == manifest.source.sha256

    # I/O specs come from the runtime's view of the artifact.
    (inp,), (out,) = manifest.inputs, manifest.outputs
    # OpenVINO builds a free batch as 1 (static shapes run faster there; tests/test_input_shapes.py).
    assert inp.shape == [1 if fmt == "openvino" else None, 8, 8, 1] and out.shape[-1] == 10
    if fmt == "tflite":
        assert inp.name == "serving_default_x:0" and inp.source_name == "x"
    else:
        assert inp.name == "x"
    if (fmt, precision) == ("tflite", "int8"):
        assert inp.dtype == out.dtype == "int8"  # the x86-avx2 profile's tflite_quantized_io
        assert inp.scale == pytest.approx(1 / 255, rel=1e-3) and inp.zero_point == -128  # inputs are in [0, 1]
        assert out.scale > 0 and isinstance(out.zero_point, int)
    else:
        assert inp.dtype == "float32" and inp.scale is None and inp.zero_point is None

    # Calibration is recorded for int8 only.
    if precision == "int8":
        cal = manifest.calibration
        assert cal.sha256 == sha256_file(digits["calib"])
        assert cal.samples_available == cal.samples_used == 300
        assert cal.method == "minmax"
        assert manifest.options["calibration_sha256"] == cal.sha256
    else:
        assert manifest.calibration is None

    # Validation against the FP32 Keras model on the held-out digits.
    val = manifest.validation
    assert val.status == "passed" and val.samples == 450
    assert val.top1_reference > 0.85
    assert val.top1_drop == pytest.approx(val.top1_reference - val.top1)
    if precision == "fp32":
        assert val.top1_agreement == 1.0 and val.max_abs_error < 1e-4
    elif precision == "fp16":
        assert val.top1_agreement >= 0.995 and abs(val.top1_drop) <= 0.002 and val.max_abs_error < 0.01
    else:  # int8 and dynamic: the budget is at most 1 point of top-1
        assert val.top1_drop <= 0.01
        assert val.top1_agreement >= 0.97 and val.cosine_similarity > 0.99

    # Run the artifact with its runtime, independently of convert, and get the recorded accuracy back.
    data = np.load(digits["eval"])
    session, scores = _run_artifact(directory, manifest, data["x"])
    assert float(np.mean(np.argmax(scores, axis=1) == data["labels"])) == pytest.approx(val.top1)
    if (fmt, precision) == ("tflite", "int8"):
        assert session.inputs[0]["quant"] == pytest.approx((inp.scale, inp.zero_point))

    # What ran is what was pinned, read back from the runtime (the same on AVX2 and on bf16/AMX hosts).
    assert_pinned(session.execution, fmt, precision)
    assert val.execution == session.execution  # host validation ran the same pinned settings


def assert_pinned(execution: dict, fmt: str, precision: str) -> None:
    """The runtime's own report of what it compiled matches the artifact's precision."""
    assert execution["precision"] == precision
    if fmt == "openvino":
        # Unpinned, the CPU plugin compiles f32 models in bf16 on AVX512_BF16/AMX CPUs.
        assert execution["inference_precision_requested"] == execution["inference_precision"] == "f32"
        runtime, output = execution["layer_precisions"]["runtime"], execution["layer_precisions"]["output"]
        assert "bf16" not in runtime and "bf16" not in output and "f16" not in output, execution
        assert output.get("f32", 0) > 0
        if precision != "fp16":  # fp16 IR: layers with compressed weights report f16 as their own precision
            assert "f16" not in runtime, runtime
        if precision == "int8":
            assert runtime.get("u8", 0) + runtime.get("i8", 0) > 0, runtime
        assert execution["execution_devices"] == ["CPU"]
    elif fmt == "onnx":
        assert execution["providers_used"] == ["CPUExecutionProvider"]
        assert execution["session_config"] == {"mlas.enable_gemm_fastmath_arm64_bfloat16": "0"}
    else:
        assert execution["delegate"]["name"] in ("xnnpack", "none")
        assert execution["delegate"]["nodes"] > 0


def test_bf16_is_pinned_or_refused(digits, tmp_path):
    """On a CPU with native bf16 the artifact compiles in bf16 (read back) and validates; elsewhere convert
    refuses it in one line. Either branch asserts what this host can show."""
    from edgeq.convert import convert
    from edgeq.device.runtimes import cpu_supports_bf16, open_session
    from edgeq.errors import ConversionError

    supported, why = cpu_supports_bf16()
    if not supported:
        with pytest.raises(ConversionError, match="bf16 needs a CPU with native bf16") as info:
            convert(digits["model"], load_profile("x86-amx"), tmp_path / "bf16", format="openvino",
                    precision="bf16", eval_path=digits["eval"])
        assert "--precision fp16" in info.value.hint and not (tmp_path / "bf16").exists()
        return
    manifest = convert(digits["model"], load_profile("x86-amx"), tmp_path / "bf16", format="openvino",
                       precision="bf16", eval_path=digits["eval"], max_accuracy_drop=0.01)
    assert manifest.precision == "bf16" and manifest.options["inference_precision"] == "bf16"
    session = open_session(tmp_path / "bf16" / manifest.model_file, "openvino", precision="bf16")
    assert session.execution["inference_precision"] == "bf16"
    assert session.execution["layer_precisions"]["runtime"].get("bf16", 0) > 0
    assert manifest.validation.execution["inference_precision"] == "bf16"
    val = manifest.validation
    assert val.status == "passed" and val.top1_agreement >= 0.99 and 0 < val.max_abs_error < 0.1
    # Weights stored as fp16: about half the fp32 IR's weights file.
    fp32 = convert(digits["model"], load_profile("x86-amx"), tmp_path / "fp32", format="openvino", precision="fp32")
    sizes = {m.precision: next(f.size for f in m.files if f.path == "model.bin") for m in (manifest, fp32)}
    assert sizes["bf16"] < 0.6 * sizes["fp32"]


def test_bf16_refusal_on_a_cpu_without_it(digits, tmp_path, monkeypatch):
    """The refusal branch on every host: the CPU's capability list is the seam (OpenVINO's own answer on an
    AVX2 host is "FP32, INT8, ..." without BF16), everything after it is real."""
    from edgeq.cli import cli
    from edgeq.device.runtimes import openvino as openvino_runtime

    monkeypatch.setattr(openvino_runtime, "cpu_supports_bf16",
                        lambda: (False, "this CPU's OpenVINO plugin offers only FP32, INT8, BIN, EXPORT_IMPORT"))
    result = CliRunner().invoke(cli, ["convert", str(digits["model"]), "--profile", "x86-amx", "--format",
                                      "openvino", "--precision", "bf16", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "bf16 needs a CPU with native bf16 (AVX512_BF16 or AMX)" in result.output
    assert "offers only FP32, INT8" in result.output and "hint: use --precision fp16" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("fmt", "precision"), [("tflite", "int8"), ("onnx", "fp32"), ("onnx", "int8"),
                                                ("tflite", "fp16")])
def test_same_conversion_twice_gives_the_same_id(make_artifact, digits, tmp_path, fmt, precision):
    from edgeq.convert import convert

    first = read_manifest(make_artifact(fmt, precision))
    again = convert(digits["model"], load_profile("x86-avx2"), tmp_path / "again", format=fmt, precision=precision,
                    calibration=digits["calib"] if precision == "int8" else None)
    assert again.id == first.id
    assert [f.sha256 for f in again.files] == [f.sha256 for f in first.files]


@pytest.mark.parametrize("io_type", ["uint8", "float32"])
def test_tflite_int8_io_type_flag(digits, tmp_path, io_type):
    from edgeq.convert import convert

    manifest = convert(digits["model"], load_profile("rpi4"), tmp_path / "a", format="tflite", precision="int8",
                       calibration=digits["calib"], calibration_samples=120, quantized_io=io_type,
                       eval_path=digits["eval"])
    (inp,) = manifest.inputs
    assert inp.dtype == io_type
    assert (inp.scale is None) == (io_type == "float32")
    assert manifest.options["quantized_io"] == io_type
    assert manifest.calibration.samples_used == 120 and manifest.calibration.samples_available == 300
    assert manifest.profile["name"] == "rpi4"
    assert manifest.validation.top1_drop <= 0.01


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_onnx_int8_calibration_methods(digits, tmp_path, method):
    from edgeq.convert import convert

    manifest = convert(digits["model"], load_profile("x86-avx2"), tmp_path / "a", format="onnx", precision="int8",
                       calibration=digits["calib"], calibration_method=method, eval_path=digits["eval"])
    assert manifest.calibration.method == method == manifest.options["calibration_method"]
    assert manifest.options["quant_format"] == "QDQ" and manifest.options["per_channel"] is True
    assert manifest.validation.top1_drop <= 0.01


def test_from_onnx_source(make_artifact, digits, tmp_path):
    """An ONNX model is a source too: onnx int8 and openvino int8 from it, validated against it in ORT."""
    from edgeq.convert import convert

    onnx_model = make_artifact("onnx", "fp32") / "model.onnx"
    for fmt in ("onnx", "openvino"):
        manifest = convert(onnx_model, load_profile("x86-avx2"), tmp_path / fmt, format=fmt, precision="int8",
                           calibration=digits["calib"], eval_path=digits["eval"], max_accuracy_drop=0.01)
        assert manifest.source.kind == "onnx" and manifest.status == "ok"
        assert manifest.validation.reference.startswith("onnx source")
        assert "tf2onnx" not in manifest.tool_versions


def test_onnx_fp16_of_an_output_the_graph_also_reads(tmp_path):
    """An output that later nodes read too (Basic Pitch's ``contour``): onnxconverter-common casts it back to
    float32 for the caller under its own name, and the nodes reading it then got float32 where float16 was
    declared, which ORT refused. The output now has an Identity of its own."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgeq.convert import convert

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["hidden"], name="fc"),
         helper.make_node("Relu", ["hidden"], ["features"], name="relu"),  # an output, and read below
         helper.make_node("Mul", ["features", "two"], ["doubled"], name="double")],
        "consumed_output", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("doubled", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.random.default_rng(0).normal(0, 1, (4, 4)).astype(np.float32), "W"),
         numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "eval.npz", x=np.random.default_rng(1).normal(0, 1, (20, 4)).astype(np.float32))
    manifest = convert(tmp_path / "model.onnx", load_profile("x86-avx2"), tmp_path / "fp16", format="onnx",
                       precision="fp16", eval_path=tmp_path / "eval.npz")
    assert manifest.status == "ok" and manifest.options["fp16_outputs_separated"] == 1
    assert [t.name for t in manifest.outputs] == ["features", "doubled"]  # the outputs keep their names
    assert all(o.cosine_mean > 0.9999 for o in manifest.validation.outputs.values()), manifest.validation.outputs


def test_from_savedmodel_source(digits, tmp_path):
    import keras

    from edgeq.convert import convert

    saved = tmp_path / "saved"
    keras.models.load_model(digits["model"]).export(str(saved), verbose=False)
    manifest = convert(saved, load_profile("rpi4"), tmp_path / "art", calibration=digits["calib"],
                       eval_path=digits["eval"])  # rpi4: tflite int8 by default
    assert (manifest.format, manifest.precision, manifest.source.kind) == ("tflite", "int8", "savedmodel")
    assert manifest.validation.top1_drop <= 0.01


def test_host_caveat_names_saturating_int8_kernels_only_where_they_apply():
    """Pure rule, the same on every CPU: an AVX2 host (no VNNI) validating an int8 ONNX or OpenVINO artifact
    that keeps full 8-bit weights (any profile but x86-avx2) says its figures may be below the device's."""
    from edgeq.convert.validate import host_caveat

    amx, vnni, avx2, rpi4 = (load_profile(p) for p in ("x86-amx", "x86-avx512-vnni", "x86-avx2", "rpi4"))
    for fmt in ("onnx", "openvino"):
        for profile in (amx, vnni, rpi4):
            caveat = host_caveat(fmt, "int8", profile, "x86-avx2")
            assert caveat and "without VNNI" in caveat and profile.name in caveat and "bench --eval" in caveat
        assert host_caveat(fmt, "int8", avx2, "x86-avx2") is None  # 7-bit weights there: nothing saturates
        assert host_caveat(fmt, "int8", avx2, "x86-amx") is None
        assert host_caveat(fmt, "int8", amx, "x86-avx512-vnni") is None
        assert host_caveat(fmt, "fp32", amx, "x86-avx2") is None
        assert host_caveat(fmt, "int8", amx, "x86-avx-vnni") is None  # AVX-VNNI (no AVX-512): no saturation
    assert host_caveat("tflite", "int8", amx, "x86-avx2") is None


def test_validation_records_the_host_and_its_caveat(digits, tmp_path):
    """What the manifest says follows from the host's detected profile (asserted against the rule, so the test
    holds on every CPU), and the CLI prints the caveat."""
    from edgeq.cli import cli
    from edgeq.convert.validate import host_caveat, host_profile_name

    result = CliRunner().invoke(cli, ["convert", str(digits["model"]), "--profile", "x86-amx", "--format", "onnx",
                                      "--precision", "int8", "--calibration", str(digits["calib"]), "--eval",
                                      str(digits["eval"]), "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    validation = read_manifest(tmp_path / "a").validation
    assert validation.host_profile == host_profile_name()
    expected = host_caveat("onnx", "int8", load_profile("x86-amx"), validation.host_profile)
    assert validation.host_caveat == expected
    assert ("caveat      validated on a CPU without VNNI" in result.output) == (expected is not None)
