"""``--input-shape``: free dims frozen in every format, OpenVINO's free batch frozen to 1 by default, and the
one-line errors for shapes that cannot apply."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq.cli import cli
from edgeq.convert import convert
from edgeq.convert.shapes import parse_input_shape, resolve_input_shapes
from edgeq.data import InputSpec
from edgeq.errors import ConversionError
from edgeq.manifest import read_manifest
from edgeq.profiles import load_profile

PROFILE = "x86-avx2"


@pytest.fixture(scope="module")
def free_hw_model(tmp_path_factory):
    """A Keras CNN taking images of any height and width (input [?, ?, ?, 3]), its data at 16x16, and the
    same model as ONNX (free dims kept)."""
    import keras

    root = tmp_path_factory.mktemp("free-hw")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 3), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    model.save(root / "free.keras")
    rng = np.random.default_rng(0)
    for name in ("calib", "eval"):
        np.savez(root / f"{name}.npz", image=rng.uniform(-1, 1, (24, 16, 16, 3)).astype(np.float32))
    np.savez(root / "other.npz", image=rng.uniform(-1, 1, (4, 20, 20, 3)).astype(np.float32))
    onnx_dir = root / "onnx-fp32"
    convert(root / "free.keras", load_profile(PROFILE), onnx_dir, format="onnx", precision="fp32")
    return {"keras": root / "free.keras", "onnx": onnx_dir / "model.onnx", "calib": root / "calib.npz",
            "eval": root / "eval.npz", "other": root / "other.npz", "root": root}


def test_parse_and_resolve():
    assert parse_input_shape("images=1x3x640x640") == ("images", (1, 3, 640, 640))
    assert parse_input_shape("1X8") == (None, (1, 8))
    assert parse_input_shape("a=b=1x2") == ("a=b", (1, 2))
    for bad in ("x=1x0x3", "x=", "x=1,3", "x=-1x3"):
        with pytest.raises(ConversionError, match="expected NAME=DxDx"):
            parse_input_shape(bad)
    one = [InputSpec("x", [None, None, None, 3])]
    assert resolve_input_shapes(one, {None: (1, 8, 8, 3)}, False, "m") == ({"x": [1, 8, 8, 3]}, "--input-shape")
    assert resolve_input_shapes(one, {}, True, "m") == ({}, None)  # free H/W: nothing frozen by default
    batch = [InputSpec("x", [None, 8, 8, 3]), InputSpec("mask", [None, 8])]
    shapes, why = resolve_input_shapes(batch, {}, True, "m")
    assert shapes == {"x": [1, 8, 8, 3], "mask": [1, 8]} and why.startswith("free batch frozen to 1")
    assert resolve_input_shapes(batch, {}, False, "m") == ({}, None)
    errors = [
        (one, {"y": (1, 8, 8, 3)}, "m: --input-shape names 'y', which is not an input of the model (its inputs: x)"),
        (one, {None: (1, 8, 3)}, "m: --input-shape x: 3 dims given, the input has 4 (?x?x?x3)"),
        (one, {None: (1, 8, 8, 4)}, "m: --input-shape x: dim 3 is fixed at 3 in the model, not 4 (?x?x?x3)"),
        (one, {None: (2, 8, 8, 3)}, "the batch (dim 0) must be 1, not 2"),
        (batch, {None: (1, 8, 8, 3)}, "m: --input-shape without a name, but the model has 2 inputs (x, mask)"),
    ]
    for inputs, requested, message in errors:
        with pytest.raises(ConversionError) as info:
            resolve_input_shapes(inputs, requested, True, "m")
        assert message in info.value.message


FROZEN_CASES = [(source, fmt, precision) for source in ("keras", "onnx")
                for fmt, precision in (("onnx", "int8"), ("openvino", "int8"), ("openvino", "fp16"),
                                       ("tflite", "int8"), ("tflite", "fp32"))
                if not (fmt == "tflite" and source == "onnx")]  # no ONNX -> TFLite converter


@pytest.mark.parametrize("source, fmt, precision", FROZEN_CASES)
def test_free_dims_are_frozen_in_every_format(free_hw_model, tmp_path, source, fmt, precision):
    manifest = convert(free_hw_model[source], load_profile(PROFILE), tmp_path / "a", format=fmt, precision=precision,
                       calibration=free_hw_model["calib"] if precision == "int8" else None,
                       eval_path=free_hw_model["eval"], input_shapes={"image": (1, 16, 16, 3)})
    (spec,) = manifest.inputs
    assert spec.shape == [1, 16, 16, 3]  # as the runtime reports the artifact's input
    assert manifest.options["input_shapes"] == {"image": [1, 16, 16, 3]}
    assert manifest.options["input_shapes_from"] == "--input-shape"
    assert manifest.validation.status == "passed" and manifest.validation.cosine_similarity > 0.99


def test_openvino_freezes_a_free_batch_by_default(make_artifact, digits, tmp_path):
    manifest = read_manifest(make_artifact("openvino", "fp32"))
    (spec,) = manifest.inputs
    assert spec.shape[0] == 1 and None not in spec.shape
    assert manifest.options["input_shapes_from"].startswith("free batch frozen to 1")
    onnx = read_manifest(make_artifact("onnx", "fp32"))
    assert onnx.inputs[0].shape[0] is None and "input_shapes" not in onnx.options  # ORT keeps it free


def test_cli_input_shape_and_its_errors(free_hw_model, tmp_path):
    model, calib = str(free_hw_model["keras"]), str(free_hw_model["calib"])
    base = ["convert", model, "--profile", PROFILE, "--format", "openvino", "--precision", "int8",
            "--calibration", calib]
    ok = CliRunner().invoke(cli, [*base, "--input-shape", "1x16x16x3", "-o", str(tmp_path / "ok")])
    assert ok.exit_code == 0, ok.output
    assert "input  image [1, 16, 16, 3]" in ok.output and "shapes      --input-shape" in ok.output

    usage = CliRunner().invoke(cli, [*base, "--input-shape", "image=1x16", "--input-shape", "image=1x16x16x3",
                                     "-o", str(tmp_path / "twice")])
    assert usage.exit_code == 2 and "image is given twice" in usage.output
    bad = CliRunner().invoke(cli, [*base, "--input-shape", "image=1xx3", "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "'image=1xx3': expected NAME=DxDx" in bad.output
    cases = [
        (["--input-shape", "img=1x16x16x3"], "names 'img', which is not an input of the model (its inputs: image)"),
        (["--input-shape", "image=1x20x20x3"], f"{free_hw_model['calib']}: "),  # data of another size
    ]
    for extra, message in cases:
        result = CliRunner().invoke(cli, [*base, *extra, "-o", str(tmp_path / "no")])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        (line,) = [line for line in result.output.splitlines() if line.startswith("error: ")]
        assert message in line, line
        assert not (tmp_path / "no").exists()
