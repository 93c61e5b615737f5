"""``edgeq tune`` on a model that full INT8 breaks: real ORT conversions, benches on `local` and over SSH."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeq.cli import cli
from edgeq.manifest import read_manifest, verify_artifact
from edgeq.profiles import load_profile
from edgeq.targets import load_inventory, local_target, resolve_targets
from edgeq.tune import Budget, tune
from tests.tune_fixtures import SENSITIVE_NODES

pytestmark = pytest.mark.slow

QUICK = {"runs": 20, "min_seconds": 0.05}
# Pinned: the local target's detected profile depends on the CPU, and so would int8 settings (reduce_range).
PROFILE = "x86-avx2"


def _tune(paths, output, **kwargs):
    kwargs.setdefault("budget", Budget(max_accuracy_drop=0.02))
    kwargs.setdefault("formats", ["onnx"])  # ONNX only: no bf16 candidate, whose presence depends on the CPU
    return tune(paths["model"], kwargs.pop("target", local_target()), load_profile(PROFILE),
                calibration=paths["calibration"], eval_path=kwargs.pop("eval_path", paths["eval"]),
                output=output, **QUICK, **kwargs)


def test_tune_keeps_the_sensitive_layers_in_float(sensitive_model, tmp_path, tune_env):
    result = _tune(sensitive_model, tmp_path / "tuned")

    full = [c for c in result.candidates if c.scheme == "int8"]
    # One parameter at a time, the best kept: calibration method, then ORT on the weighted layers only.
    assert [c.calibration_method for c in full[:3]] == ["minmax", "percentile", "entropy"]
    best_method = max(full[:3], key=lambda c: c.measured.metric()).calibration_method
    assert [(c.calibration_method, c.settings) for c in full[3:]] == [(best_method, {"int8_op_types": "weighted"})]
    assert all(not c.passed and c.measured.top1_drop > 0.5 for c in full), [c.to_json() for c in full]
    mixed = [c for c in result.candidates if c.scheme == "mixed" and c.passed]
    assert len(mixed) == 1, "the search stops at the first mixed candidate that meets the budget"
    assert not [c for c in result.candidates if c.scheme == "a16"]  # stage C only when A and B both missed
    winner = mixed[0]
    assert set(winner.float_nodes) == SENSITIVE_NODES
    assert winner.score.top1_drop <= 0.02 and winner.score.samples == 300
    low, high = winner.score.top1_drop_ci95
    assert low <= winner.score.top1_drop <= high
    manifest = read_manifest(winner.directory)  # an ordinary artifact that records its float layers
    assert (manifest.format, manifest.precision) == ("onnx", "int8")
    assert manifest.options["float_nodes"] == sorted(SENSITIVE_NODES)

    # Every passing candidate was measured on the device; the chosen one is the fastest of them there.
    passing = [c for c in result.candidates if c.passed]
    assert {c.scheme for c in passing} >= {"fp32", "fp16", "mixed"}
    assert all(c.bench["status"] == "ok" and c.bench["p50_ms"] > 0 for c in passing)
    assert result.chosen is min(passing, key=lambda c: (c.bench["p50_ms"], c.size_bytes or 0))
    if any(c.bench.get("energy_j_per_inference") is None for c in passing):  # no sensor here: said, never zero
        assert any(note.startswith("no energy figures from local: ") for note in result.notes), result.notes
    assert verify_artifact(result.chosen_dir).id == result.chosen.artifact_id
    assert result.device_accuracy["top1"] == pytest.approx(result.chosen.score.top1, abs=0.01)

    data = json.loads((tmp_path / "tuned" / "tune.json").read_text())
    assert data["chosen"] == result.chosen.id and len(data["candidates"]) == len(result.candidates)
    row = next(c for c in data["candidates"] if c["id"] == winner.id)
    assert row["stage"] == "B" and row["host"]["top1_drop"] == winner.score.top1_drop
    assert row["device"]["p50_ms"] == winner.bench["p50_ms"]
    assert any(c["pareto"] for c in data["candidates"])
    page = (tmp_path / "tuned" / "tune.html").read_text()
    assert 'class="chosen"' in page and winner.id in page
    assert winner.id in (tmp_path / "tuned" / "tune.md").read_text()


def test_openvino_int8_settings_one_at_a_time_then_accuracy_control(sensitive_model, tmp_path, tune_env):
    result = _tune(sensitive_model, tmp_path / "tuned", formats=["openvino"], max_candidates=6)
    # Stage A also tries dynamic (weight-only INT8), after the full-INT8 settings.
    assert [c.scheme for c in result.candidates][:6] == ["fp32", "int8", "int8", "int8", "dynamic", "mixed"]
    # Then the float candidates, whatever the limits (bf16 only on a CPU that has it: not asserted).
    assert "fp16" in {c.scheme for c in result.candidates[6:]} <= {"fp16", "bf16"}
    plain, asym, full_bc = result.candidates[1:4]
    assert (plain.settings, asym.settings) == ({}, {"int8_preset": "mixed"})
    better = max((plain, asym), key=lambda c: c.measured.metric())  # kept, then the next setting on top
    assert full_bc.settings == {**better.settings, "fast_bias_correction": False}
    for candidate in (plain, asym, full_bc):
        options = read_manifest(candidate.directory).options
        assert options["nncf_preset"] == candidate.settings.get("int8_preset", "performance")
        assert options["fast_bias_correction"] is candidate.settings.get("fast_bias_correction", True)
        assert not candidate.passed  # the wide-range channel breaks every full-INT8 variant

    assert read_manifest(result.candidates[4].directory).options["weight_compression"] == "INT8_ASYM"
    control = result.candidates[5]
    assert control.accuracy_control and control.settings == max((plain, asym, full_bc),
                                                                key=lambda c: c.measured.metric()).settings
    options = read_manifest(control.directory).options
    assert options["accuracy_control"]["max_drop"] == pytest.approx(0.01)  # half the budget: ours decides
    if control.rejected_by is not None:  # NNCF reverted every weighted layer: not a quantized model
        assert control.rejected_by == "no int8 layer left" and options["int8_layers"] == 0
    else:
        assert options["int8_layers"] > 0 and set(control.float_nodes) == set(options["float_layers"])
        # NNCF chose on the first half of the eval set; the candidate is judged on the other half only
        # (tests/test_tune_budgets.py checks the split itself: NNCF reverts every layer of this model).
        assert control.score.samples == 150 and control.scored_on.startswith("held out: samples 150-299")
    # The quantized search ended with its sixth candidate and the float ones are not capped: nothing was cut.
    assert not any("--max-candidates" in note for note in result.notes)


def test_a_budget_no_quantized_candidate_meets_returns_float_and_says_why(sensitive_model, tmp_path, tune_env):
    result = _tune(sensitive_model, tmp_path / "tuned", budget=Budget(min_cosine=0.999999),
                   eval_path=sensitive_model["eval_unlabelled"])
    assert not any(c.passed for c in result.candidates if c.quantized)
    # Mixed precision missed it too, so 16-bit activations were tried (stage C), with A's best settings.
    (a16,) = [c for c in result.candidates if c.scheme == "a16"]
    assert a16.stage == "C" and a16.settings["activation_bits"] == 16 and a16.measured is not None
    assert read_manifest(a16.directory).options["activation_type"] == "uint16"
    assert result.chosen.scheme in ("fp32", "fp16")
    assert "no quantized candidate met it" in result.reason
    assert "edgeq qat" not in result.reason  # suggested for Keras models only: QAT takes those
    assert all(c.measured.top1_drop is None for c in result.candidates if c.measured)  # no labels, no top-1


def test_limits_and_the_fp32_cache(sensitive_model, tmp_path, tune_env):
    first = _tune(sensitive_model, tmp_path / "a", max_time_s=0)
    # The baseline and the float candidates (ONNX: fp16) are built whatever the limits; nothing quantized is.
    assert [c.scheme for c in first.candidates] == ["fp32", "fp16"]
    assert any("--max-time" in note for note in first.notes)
    assert first.reference_cached is False

    second = _tune(sensitive_model, tmp_path / "b", max_candidates=3)
    searched = [c for c in second.candidates if c.scheme != "fp16"]
    assert len(searched) == 3 and any("--max-candidates 3" in n for n in second.notes)
    assert second.reference_cached is True  # same model, same eval data: the FP32 pass is not repeated


def test_cli_tune_and_its_one_line_errors(sensitive_model, tmp_path, tune_env):
    common = [str(sensitive_model["model"]), "--profile", PROFILE, "--calibration",
              str(sensitive_model["calibration"]), "--runs", "20"]
    result = CliRunner().invoke(cli, ["tune", *common, "--eval", str(sensitive_model["eval"]),
                                      "--max-accuracy-drop", "0.02", "--format", "onnx", "--max-candidates", "2",
                                      "-o", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    # Two candidates (fp32, full INT8, which misses), then fp16, built whatever the limits; the device picks.
    assert re.search(r"chosen: \d\d-onnx-fp(32|16)", result.output), result.output
    assert (tmp_path / "cli" / "chosen" / "manifest.json").exists()

    cases = [
        (["--eval", str(sensitive_model["eval_unlabelled"]), "--max-accuracy-drop", "0.01"],
         "--max-accuracy-drop needs labels"),
        (["--eval", str(sensitive_model["eval"]), "--min-cosine", "0.99", "--profile", "jetson-nano",
          "--format", "openvino"], "profile 'jetson-nano' does not allow format 'openvino'"),
        (["--eval", str(sensitive_model["eval"])], "give one accuracy budget"),
        (["--eval", str(sensitive_model["eval"]), "--min-cosine", "0.99", "-o", str(tmp_path / "cli")],
         "output directory is not empty"),
        (["--eval", str(sensitive_model["eval"]), "--min-cosine", "0.99", "-o", str(sensitive_model["model"].parent),
          "--force"], "not an edgeq tune output directory; refusing to replace it"),
    ]
    for extra, message in cases:
        args = ["tune", *common, *extra]
        if "-o" not in extra:
            args += ["-o", str(tmp_path / "other")]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1, (extra, result.output)
        assert message in result.output and "Traceback" not in result.output
        assert [line for line in result.output.splitlines() if line.startswith("error: ")], result.output


@pytest.mark.sshd
def test_tune_on_an_sshd_device(sensitive_model, trusted_inventory, tmp_path, tune_env):
    (target,) = resolve_targets(load_inventory(trusted_inventory.path), "dev-0")
    result = _tune(sensitive_model, tmp_path / "tuned", target=target, max_candidates=10)
    assert result.target == "dev-0"
    passing = [c for c in result.candidates if c.passed]
    assert {c.scheme for c in passing} >= {"fp32", "mixed"}
    for candidate in passing:
        assert candidate.bench["status"] == "ok", candidate.bench
        assert json.loads(Path(candidate.bench["result"]).read_text())["target"] == "dev-0"
        assert (trusted_inventory.workdirs["dev-0"] / "releases" / candidate.artifact_id).is_dir()
    assert result.chosen in passing and result.device_accuracy is not None


@pytest.mark.sshd
def test_a_group_is_tuned_once_per_device_class(sensitive_model, trusted_inventory, tmp_path, tune_env):
    result = CliRunner().invoke(cli, [
        "tune", str(sensitive_model["model"]), "--target", "fleet", "-i", str(trusted_inventory.path),
        "--calibration", str(sensitive_model["calibration"]), "--eval", str(sensitive_model["eval"]),
        "--max-accuracy-drop", "0.02", "--format", "onnx", "--max-candidates", "2", "--runs", "20",
        "-o", str(tmp_path / "fleet")])
    assert result.exit_code == 0, result.output
    # dev-0..dev-2 share the x86-avx2 profile: one class, measured on its first device.
    assert "fleet: 3 targets in 1 device class" in result.output
    assert "x86-avx2 (dev-0, dev-1, dev-2), measured on dev-0" in result.output
    data = json.loads((tmp_path / "fleet" / "x86-avx2" / "tune.json").read_text())
    assert data["target"] == "dev-0" and data["profile"] == "x86-avx2"
    assert (tmp_path / "fleet" / "x86-avx2" / "chosen" / "manifest.json").exists()
    assert not (trusted_inventory.workdirs["dev-1"] / "releases").exists()  # only the measured device was used


def _python_without(tmp_path: Path, blocked: tuple[str, ...]) -> str:
    """An interpreter as on a device that has only some runtimes: a venv that sees this one's packages
    (a .pth file) but cannot import ``blocked`` (``sys.modules[name] = None`` makes ``import name`` fail)."""
    import site
    import subprocess
    import sys

    venv = tmp_path / "partial-venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (packages,) = (venv / "lib").glob("python3*/site-packages")
    (packages / "edgeq_test_parent.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    (packages / "edgeq_test_block.pth").write_text(
        "import sys; " + "; ".join(f"sys.modules[{name!r}] = None" for name in blocked) + "\n")
    return str(venv / "bin" / "python")


@pytest.mark.sshd
def test_tune_uses_only_the_runtimes_the_device_has(sensitive_model, trusted_inventory, tmp_path, tune_env):
    """A device with ONNX Runtime only: tune asks it first, tries no OpenVINO or TFLite candidate and says
    why; asking for a missing format by name is a one-line error naming the setup command."""
    import yaml

    python = _python_without(tmp_path, ("openvino", "ai_edge_litert", "tflite_runtime", "tensorflow"))
    data = yaml.safe_load(trusted_inventory.path.read_text())
    data["targets"]["dev-0"]["python"] = python
    trusted_inventory.path.write_text(yaml.safe_dump(data))
    (target,) = resolve_targets(load_inventory(trusted_inventory.path), "dev-0")
    result = _tune(sensitive_model, tmp_path / "tuned", target=target, formats=None, max_candidates=3,
                   budget=Budget(max_accuracy_drop=0.99))
    assert {c.format for c in result.candidates} == {"onnx"}
    # (TFLite is never built from an ONNX source, so only OpenVINO is missing here.)
    assert "openvino not tried: no runtime on dev-0 (install it: edgeq targets setup dev-0)" in result.notes
    assert result.chosen is not None and result.chosen.bench["status"] == "ok"

    refused = CliRunner().invoke(cli, [
        "tune", str(sensitive_model["model"]), "--target", "dev-0", "-i", str(trusted_inventory.path),
        "--calibration", str(sensitive_model["calibration"]), "--eval", str(sensitive_model["eval"]),
        "--min-cosine", "0.9", "--format", "openvino", "-o", str(tmp_path / "refused")])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "error: dev-0: no openvino runtime on the device" in refused.output
    assert "hint: install it: edgeq targets setup dev-0" in refused.output
    assert not (tmp_path / "refused").exists()


def test_tflite_layers_kept_float_through_the_quantization_debugger(sensitive_keras_model, tmp_path, tune_env):
    """TFLite's stage B: ops ranked by RMSE / scale (TensorFlow's QuantizationDebugger), each kept float with
    the ops that read its output (``denylisted_nodes``), measured one by one: fc1 with its reader fc2, the
    wide-range activation's producer and consumer (as in the ONNX case), meets the budget."""
    result = _tune(sensitive_keras_model, tmp_path / "tuned", formats=["tflite"], budget=Budget(max_accuracy_drop=0.04))
    names = [c.name for c in result.candidates]
    assert names[:3] == ["tflite-fp32", "tflite-int8-minmax", "tflite-dynamic"], names
    full = result.candidates[1]
    assert not full.passed and full.measured.top1_drop > 0.4
    mixed = [c for c in result.candidates if c.scheme == "mixed"]
    winner = mixed[-1]
    assert winner.passed and winner.score.top1_drop <= 0.04, [c.to_json() for c in mixed]
    assert not any(c.passed for c in mixed[:-1])  # the search stops at the first that meets the budget
    assert len(winner.float_nodes) == 2 and "fc1_1/MatMul" in winner.float_nodes[0], winner.float_nodes
    assert winner.float_nodes[1].startswith("StatefulPartitionedCall")  # fc2's output, the model output
    options = read_manifest(winner.directory).options
    assert options["float_nodes"] == sorted(winner.float_nodes) and options["quantized_io"] == "float32"
    assert not [c for c in result.candidates if c.scheme == "a16"]  # mixed met the budget: no stage C
    assert winner.bench["status"] == "ok" and winner.bench["p50_ms"] > 0
    passing = [c for c in result.candidates if c.passed]
    assert result.chosen is min(passing, key=lambda c: (c.bench["p50_ms"], c.size_bytes or 0))


@pytest.fixture(scope="module")
def tiny_attention_model(tmp_path_factory) -> dict[str, Path]:
    """A Keras self-attention block (float inputs, so the layer, not the dtype, makes it a transformer)."""
    import keras
    import numpy as np

    root = tmp_path_factory.mktemp("attention")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 16), name="x")
    attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8, name="mha")(inputs, inputs)
    outputs = keras.layers.Dense(4, name="head")(keras.layers.Flatten()(attended + inputs))
    model = keras.Model(inputs, outputs)
    model.save(root / "attention.keras")
    rng = np.random.default_rng(0)
    np.savez(root / "calib.npz", x=rng.normal(size=(64, 8, 16)).astype(np.float32))
    np.savez(root / "eval.npz", x=rng.normal(size=(32, 8, 16)).astype(np.float32))
    return {"model": root / "attention.keras", "calibration": root / "calib.npz", "eval": root / "eval.npz"}


def test_smoothquant_is_a_stage_a_setting_for_transformers_only(tiny_attention_model, sensitive_model, tmp_path,
                                                                tune_env):
    from edgeq.convert.source import load_source
    from edgeq.tune.candidates import looks_like_transformer

    assert looks_like_transformer(load_source(tiny_attention_model["model"]))
    assert not looks_like_transformer(load_source(sensitive_model["model"]))  # an MLP: every MatMul has a weight
    result = _tune(tiny_attention_model, tmp_path / "tuned", formats=["openvino"], max_candidates=7,
                   budget=Budget(min_cosine=0.999999))  # out of int8's reach: stage A tries every setting
    smooth = [c for c in result.candidates if c.settings.get("transformer")]
    assert len(smooth) == 1 and smooth[0].name.endswith("-sq") and smooth[0].scheme == "int8", \
        [c.name for c in result.candidates]
    assert read_manifest(smooth[0].directory).options["model_type"] == "transformer"
    cnn = _tune(sensitive_model, tmp_path / "cnn", formats=["openvino"], max_candidates=5)
    assert not [c for c in cnn.candidates if c.settings.get("transformer")]
