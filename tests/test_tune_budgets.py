"""Tune's budgets beyond top-1: output agreement over every output (the worst one counts) and ``--gate`` over
any metric, a user's own included; the FP32 reference of every output cached by content hash; and a candidate
whose float layers a backend chose on eval samples judged on the others."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq.cli import cli
from edgeq.errors import TuneError
from edgeq.profiles import load_profile
from edgeq.targets import local_target
from edgeq.taskmetrics import parse_gate
from edgeq.tune import Budget, tune

pytestmark = pytest.mark.slow

QUICK = {"runs": 20, "min_seconds": 0.05}
PROFILE = "x86-avx2"  # pinned: reduce_range and the int8 settings depend on it


def _tune(paths, output, budget, **kwargs):
    return tune(paths["model"], local_target(), load_profile(PROFILE), calibration=paths["calib"],
                eval_path=paths["eval"], output=output, budget=budget, formats=["onnx"], **QUICK, **kwargs)


def test_min_cosine_is_read_on_every_output(stateful, tmp_path, tune_env):
    """The silero-shaped model's two outputs: its state is where dynamic INT8 differs most, and counts."""
    result = _tune(stateful, tmp_path / "tuned", Budget(min_cosine=0.9))
    by_id = {c.id: c for c in result.candidates}
    dynamic = next(c for c in result.candidates if c.precision == "dynamic")
    assert set(dynamic.score.outputs) == {"output", "stateN"}
    worst = min(dynamic.score.outputs, key=lambda name: dynamic.score.outputs[name]["cosine_mean"])
    assert dynamic.score.worst_output == worst
    assert dynamic.score.cosine_mean == dynamic.score.outputs[worst]["cosine_mean"]
    assert dynamic.score.nmse == max(o["nmse"] for o in dynamic.score.outputs.values())
    # Static INT8 of a model whose layers all sit in If branches quantizes nothing: refused, not passed off.
    static = [c for c in result.candidates if c.precision == "int8"]
    assert static and all(not c.passed and "no op was quantized" in (c.error or "") for c in static)
    assert result.chosen is not None and result.chosen.passed
    assert by_id[result.chosen.id].score.outputs["stateN"]["cosine_mean"] >= 0.9
    # Every output of the reference is cached, and a second tune reads them back.
    cached = list((tmp_path / "cache" / "tune").glob("*.npz"))
    assert len(cached) == 1 and set(np.load(cached[0]).files) == {"output_0", "output_1"}
    again = _tune(stateful, tmp_path / "again", Budget(min_cosine=0.9), max_candidates=1)
    assert again.reference_cached and not result.reference_cached


def test_a_gate_over_a_user_metric_is_the_budget(stateful, tmp_path, tune_env):
    metric = tmp_path / "state_metric.py"
    metric.write_text("import numpy as np\n\n"
                      "def state(references, outputs, inputs, labels):\n"
                      "    error = np.abs(references['stateN'] - outputs['stateN'])\n"
                      "    return {'max_error': float(error.max()), 'mean_error': float(error.mean())}\n")
    gate = f"{metric}:state.max_error<=0.02"
    result = _tune(stateful, tmp_path / "tuned", Budget(gates=(parse_gate(gate),), metric_specs=("nmse",)))
    for candidate in result.candidates:
        if candidate.score is None:
            continue
        measured = candidate.score.metrics[f"{metric}:state"]["max_error"]
        assert candidate.passed == (measured <= 0.02), candidate.to_json()
        assert candidate.score.metric() == -measured  # a <= gate: the Pareto axis is its negation
        assert "nmse" in candidate.score.metrics  # --metric: computed for every candidate too
    assert result.chosen is not None
    saved = json.loads((tmp_path / "tuned" / "tune.json").read_text())
    assert saved["budget"]["gates"] == [gate] and saved["budget"]["metrics"] == ["nmse"]
    # The chosen artifact's gate metric, measured again from the device's own outputs.
    assert f"{metric}:state" in result.device_accuracy["metrics"]
    assert "<svg" in (tmp_path / "tuned" / "tune.html").read_text()


def test_budgets_are_exclusive_and_gates_need_their_data(stateful, sensitive_model, tmp_path, tune_env):
    with pytest.raises(TuneError, match="give one accuracy budget"):
        Budget(min_cosine=0.9, gates=(parse_gate("nmse<=0.1"),))
    runner = CliRunner()
    base = ["tune", str(stateful["model"]), "--profile", PROFILE, "--calibration", str(stateful["calib"]),
            "--eval", str(stateful["eval"]), "-o", str(tmp_path / "out")]
    # top1 reads labels, which this eval set has none of: one line, before any candidate is built.
    failed = runner.invoke(cli, [*base, "--gate", "top1<=0.01"])
    assert failed.exit_code != 0 and "Traceback" not in failed.output
    assert f"{stateful['eval']}: --metric top1 needs labels" in failed.output
    assert not (tmp_path / "out").exists()
    failed = runner.invoke(cli, [*base, "--gate", "nmse<=0.1", "--min-cosine", "0.9"])
    assert failed.exit_code != 0 and "give one accuracy budget" in failed.output and "Traceback" not in failed.output
    failed = runner.invoke(cli, [*base, "--gate", "nmse=0.1"])
    assert failed.exit_code != 0 and "expected METRIC[.FIELD]>=VALUE" in failed.output


def test_accuracy_control_chooses_on_one_half_and_is_judged_on_the_other(sensitive_model, tmp_path, tune_env):
    """NNCF's accuracy control picks float layers by its own metric on the validation samples it is given; a
    score on those same samples would be optimistic. It gets the first half; the candidate is scored on the
    second. (On the sensitive model NNCF reverts every layer, so this drives the split directly.)"""
    import time

    from edgeq.convert import convert
    from edgeq.convert.source import load_source
    from edgeq.data import load_dataset
    from edgeq.manifest import read_manifest
    from edgeq.tune.cache import reference_outputs
    from edgeq.tune.candidates import Candidate
    from edgeq.tune.search import Progress, _Search

    source = load_source(sensitive_model["model"])
    dataset = load_dataset(sensitive_model["eval"], source.inputs, role="eval")
    references, _ = reference_outputs(source, dataset)
    search = _Search(sensitive_model["model"], load_profile(PROFILE), sensitive_model["calibration"], 300,
                     Budget(max_accuracy_drop=0.02), source, dataset, references, tmp_path, time.monotonic() + 60,
                     10, Progress())
    control = search._accuracy_control()
    assert len(next(iter(control.inputs.values()))) == 150 == search.selection_samples()
    np.testing.assert_array_equal(control.inputs["x"], dataset.inputs["x"][:150])
    artifact = tmp_path / "artifact"
    convert(sensitive_model["model"], load_profile(PROFILE), artifact, format="onnx", precision="fp32")
    judged = Candidate("onnx", "int8", "mixed", accuracy_control=True, directory=artifact)
    search._evaluate(judged, read_manifest(artifact))
    assert judged.score.samples == 150 and judged.scored_on.startswith("held out: samples 150-299")
    # Lined up: the fp32 artifact against the references and labels of those same 150 samples is exact.
    assert judged.score.top1_drop == 0 and judged.score.top1 == 1.0 and judged.score.cosine_min > 0.99999
    assert judged.screen is None  # no screen: it was chosen on the first samples, the screen's own
    plain = Candidate("onnx", "fp32", "fp32", directory=artifact)
    search._evaluate(plain, read_manifest(artifact))
    assert plain.score.samples == 300 and plain.scored_on is None
