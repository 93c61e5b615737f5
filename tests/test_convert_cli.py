"""``edgeq convert`` through the CLI: bad input gets one line and exit 1, the gate, atomic writes, lazy imports."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq.cli import cli
from edgeq.convert import export_formats, find_capability, supported_pairs
from edgeq.errors import ConversionError
from edgeq.manifest import read_manifest, verify_artifact

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str):
    result = CliRunner().invoke(cli, ["convert", *map(str, args)])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def assert_fails(result, *fragments: str, code: int = 1):
    assert result.exit_code == code, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


# ---- capability table (no backends needed) ---------------------------------------------------------

def test_capability_table_covers_the_issue_matrix():
    rows = {(r["format"], r["precision"]) for r in export_formats()}
    assert rows == {("tflite", p) for p in ("fp32", "fp16", "int8", "dynamic")} | \
        {("onnx", p) for p in ("fp32", "fp16", "int8", "dynamic")} | \
        {("openvino", p) for p in ("fp32", "fp16", "bf16", "int8", "dynamic")}
    assert "tflite/int8" not in supported_pairs("onnx")
    assert "tflite/fp32" not in supported_pairs("pytorch") and "onnx/dynamic" in supported_pairs("pytorch")
    assert "openvino/int8" in supported_pairs("onnx")


def test_unsupported_pairs_list_what_is_supported():
    with pytest.raises(ConversionError, match=r"tflite/bf16 is not supported \(tflite supports: fp32, fp16, int8, dynamic\)"):
        find_capability("tflite", "bf16", "keras", "m.keras")
    with pytest.raises(ConversionError, match="tflite int8 cannot be built from a onnx model") as info:
        find_capability("tflite", "int8", "onnx", "m.onnx")
    assert "onnx/int8" in info.value.hint and "tflite" not in info.value.hint


# ---- bad input: one line, exit 1, no traceback -----------------------------------------------------

def test_missing_model_file(tmp_path):
    assert_fails(run_cli(tmp_path / "nope.keras", "--profile", "x86-avx2", "-o", tmp_path / "out"),
                 "nope.keras: model file not found")


def test_unsupported_model_type(tmp_path):
    model = tmp_path / "model.caffemodel"
    model.write_bytes(b"\x80\x02caffe")
    assert_fails(run_cli(model, "--profile", "x86-avx2", "-o", tmp_path / "out"),
                 "model.caffemodel: unsupported model type '.caffemodel'", "hint: give a .keras/.h5 file",
                 "a PyTorch .pt2 (torch.export.save)")


def test_directory_that_is_not_a_savedmodel(tmp_path):
    (tmp_path / "notamodel").mkdir()
    assert_fails(run_cli(tmp_path / "notamodel", "--profile", "x86-avx2", "-o", tmp_path / "out"),
                 "notamodel: directory is not a TensorFlow SavedModel")


@pytest.mark.slow
def test_corrupt_keras_file(tmp_path):
    model = tmp_path / "broken.keras"
    model.write_bytes(b"this is not a zip archive")
    assert_fails(run_cli(model, "--profile", "x86-avx2", "--format", "tflite", "--precision", "fp32",
                         "-o", tmp_path / "out"), "broken.keras: cannot load the Keras model")
    assert not (tmp_path / "out").exists()


def test_corrupt_onnx_file(tmp_path):
    model = tmp_path / "broken.onnx"
    model.write_bytes(b"\x08\x07garbage" * 10)
    assert_fails(run_cli(model, "--profile", "x86-avx2", "--format", "onnx", "--precision", "fp32",
                         "-o", tmp_path / "out"), "broken.onnx: not a valid ONNX model")


def test_unknown_profile(tmp_path, digits):
    assert_fails(run_cli(digits["model"], "--profile", "rpi44", "-o", tmp_path / "out"),
                 "unknown device profile 'rpi44'", "did you mean 'rpi4'")


def test_unsupported_format_precision_pair(tmp_path, digits):
    assert_fails(run_cli(digits["model"], "--profile", "x86-avx2", "--format", "tflite", "--precision",
                         "bf16", "-o", tmp_path / "out"),
                 "tflite/bf16 is not supported (tflite supports: fp32, fp16, int8, dynamic)", "hint: supported:")


def test_tflite_from_onnx_is_refused_with_the_alternatives(tmp_path, make_artifact):
    onnx_model = make_artifact("onnx", "fp32") / "model.onnx"
    assert_fails(run_cli(onnx_model, "--profile", "rpi4", "-o", tmp_path / "out"),
                 "tflite int8 cannot be built from a onnx model", "onnx/int8", "openvino/int8")


def test_int8_without_calibration(tmp_path, digits):
    assert_fails(run_cli(digits["model"], "--profile", "rpi4", "-o", tmp_path / "out"),
                 "tflite int8 needs calibration data", "hint: pass --calibration")


def test_calibration_method_not_available_for_format(tmp_path, digits):
    assert_fails(run_cli(digits["model"], "--profile", "rpi4", "--calibration", digits["calib"],
                         "--calibration-method", "entropy", "-o", tmp_path / "out"),
                 "calibration method 'entropy' is not available for tflite int8 (it supports: minmax)")


@pytest.mark.slow
def test_calibration_shape_mismatch(tmp_path, digits):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.zeros((120, 28, 28, 1), np.float32))
    assert_fails(run_cli(digits["model"], "--profile", "rpi4", "--calibration", calib, "-o", tmp_path / "out"),
                 f"{calib}: array for input 'x' has shape [120, 28, 28, 1], the model expects [N, 8, 8, 1]")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_calibration_dtype_mismatch(tmp_path, digits):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.zeros((120, 8, 8, 1), bool))
    assert_fails(run_cli(digits["model"], "--profile", "rpi4", "--calibration", calib, "-o", tmp_path / "out"),
                 f"{calib}: array for input 'x' has dtype bool, the model expects float32")


@pytest.mark.slow
def test_eval_labels_out_of_range(tmp_path, digits):
    data = np.load(digits["eval"])
    bad = tmp_path / "eval.npz"
    labels = data["labels"].copy()
    labels[3] = 12
    np.savez(bad, x=data["x"], labels=labels)
    assert_fails(run_cli(digits["model"], "--profile", "x86-avx2", "--format", "onnx", "--precision", "fp32",
                         "--eval", bad, "-o", tmp_path / "out"),
                 f"{bad}: label 12 is out of range: the model has 10 classes (ids 0..9)")
    assert not (tmp_path / "out").exists()


def test_calibration_file_missing(tmp_path, digits):
    assert_fails(run_cli(digits["model"], "--profile", "rpi4", "--calibration", tmp_path / "none.npz",
                         "-o", tmp_path / "out"), "none.npz: calibration file not found")


def test_missing_backend_names_the_extra(tmp_path, digits, monkeypatch):
    # The seam: an import of tf2onnx fails exactly as it does where the onnx extra is not installed.
    monkeypatch.setitem(sys.modules, "tf2onnx", None)
    assert_fails(run_cli(digits["model"], "--profile", "x86-avx2", "--format", "onnx", "--precision", "fp32",
                         "-o", tmp_path / "out"),
                 "the onnx backend is not installed (tf2onnx cannot be imported", "hint: pip install 'edgeq[onnx]'")


def test_usage_errors_exit_2(tmp_path, digits):
    assert_fails(run_cli(digits["model"], "--profile", "x86-avx2", "--format", "coreml", "-o", tmp_path / "o"),
                 "Invalid value for '--format'", code=2)
    assert_fails(run_cli(digits["model"], "--profile", "x86-avx2", "--max-accuracy-drop", "0.01",
                         "-o", tmp_path / "o"), "--max-accuracy-drop needs --eval", code=2)
    assert_fails(run_cli(digits["model"], "--profile", "x86-avx2", "--max-accuracy-drop", "-1",
                         "--eval", digits["eval"], "-o", tmp_path / "o"), "--max-accuracy-drop", code=2)


@pytest.fixture(scope="module")
def unsupported_op_model(tmp_path_factory) -> Path:
    """A real SavedModel whose only op (Igamma) no edgeq format can express."""
    import tensorflow as tf

    class Odd(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def serve(self, x):
            return {"y": tf.math.igamma(x, x)}

    path = tmp_path_factory.mktemp("odd") / "odd_savedmodel"
    module = Odd()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "converter"), [("tflite", "tflite"), ("onnx", "tf2onnx"), ("openvino", "openvino")])
def test_unsupported_op_names_model_and_op(tmp_path, unsupported_op_model, fmt, converter):
    result = run_cli(unsupported_op_model, "--profile", "x86-avx2", "--format", fmt, "--precision", "fp32",
                     "-o", tmp_path / "out")
    assert_fails(result, f"odd_savedmodel: cannot convert to {fmt} fp32: op(s) Igamma not supported by {converter}")
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1
    # A failed conversion leaves nothing behind: no output, no staging directory.
    assert list(tmp_path.iterdir()) == []


# ---- the accuracy gate and atomic output -----------------------------------------------------------

@pytest.fixture(scope="module")
def hard_eval(make_artifact, digits, tmp_path_factory) -> Path:
    """Noisy digits labelled with the FP32 model's own answers: top-1 reference is 100%, so any int8 flip is a drop."""
    from edgeq.device.runtimes import open_session

    x = np.load(digits["eval"])["x"][:200]
    noisy = np.clip(x + np.random.default_rng(1).normal(0, 0.35, x.shape), 0, 1).astype(np.float32)
    fp32 = open_session(make_artifact("onnx", "fp32") / "model.onnx", "onnx")
    labels = np.argmax(fp32.run({"x": noisy})[0], axis=1)
    path = tmp_path_factory.mktemp("hard") / "hard_eval.npz"
    np.savez(path, x=noisy, labels=labels)
    return path


@pytest.mark.slow
def test_gate_failure_keeps_the_artifact_marked_failed(tmp_path, digits, hard_eval):
    out = tmp_path / "art"
    result = run_cli(digits["model"], "--profile", "rpi4", "--calibration", digits["calib"], "--eval", hard_eval,
                     "--max-accuracy-drop", "0", "-o", out)
    manifest = read_manifest(out)
    assert manifest.validation.top1_reference == 1.0 and manifest.validation.top1_drop > 0  # precondition
    assert_fails(result, "tflite int8 artifact failed validation: top-1 accuracy drop",
                 "exceeds --max-accuracy-drop 0.00 points", "marked failed")
    assert manifest.status == "failed" and manifest.validation.status == "failed"
    assert manifest.validation.max_accuracy_drop == 0
    verify_artifact(out)  # complete and intact, just failed
    assert "status    failed" in result.output

    # The same artifact with a budget it meets passes.
    ok = run_cli(digits["model"], "--profile", "rpi4", "--calibration", digits["calib"], "--eval", hard_eval,
                 "--max-accuracy-drop", "1", "-o", out, "--force")
    assert ok.exit_code == 0, ok.output
    assert read_manifest(out).status == "ok"
    assert read_manifest(out).id == manifest.id


@pytest.mark.slow
def test_existing_output_refused_then_replaced_with_force(tmp_path, digits):
    out = tmp_path / "art"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    args = [digits["model"], "--profile", "x86-avx2", "--format", "onnx", "--precision", "fp16", "-o", out]
    assert_fails(run_cli(*args), f"{out}: output already exists", "hint: use --force")
    assert (out / "stale.txt").read_text() == "old"

    result = run_cli(*args, "--force")
    assert result.exit_code == 0, result.output
    assert not (out / "stale.txt").exists()
    manifest = verify_artifact(out)
    assert manifest.id in result.output and "model.onnx" in result.output
    assert "validation  not run" in result.output and "status    ok" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no staging or retired dirs left
    assert json.loads((out / "manifest.json").read_text())["validation"]["status"] == "not-run"


@pytest.mark.slow
def test_cli_summary_with_validation(tmp_path, digits, caplog):
    caplog.set_level(logging.WARNING, logger="edgeq.convert.core")
    result = run_cli(digits["model"], "--profile", "x86-avx2", "--calibration", digits["calib"],
                     "--calibration-samples", "50", "--eval", digits["eval"], "--max-accuracy-drop", "0.05",
                     "-o", tmp_path / "art")  # x86-avx2: onnx int8
    assert result.exit_code == 0, result.output
    assert "(onnx int8, profile x86-avx2" in result.output
    assert "calibration  50/300 samples, minmax" in result.output
    assert "validation  450 samples: top-1" in result.output
    assert "only 50 calibration samples; at least 100 are needed" in caplog.text  # logged warning (stderr)


# ---- lazy imports ----------------------------------------------------------------------------------

HEAVY = ("tensorflow", "keras", "onnx", "onnxruntime", "tf2onnx", "openvino", "nncf")


@pytest.mark.parametrize("argv", [["--help"], ["profiles", "list"], ["convert", "--help"]])
def test_cli_does_not_import_backends(argv):
    code = (
        "import sys\nfrom edgeq.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
        f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out, out
