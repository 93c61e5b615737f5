"""Tune's budgets beyond top-1: output agreement over every output (the worst one counts) and ``--gate`` over
any metric, a user's own included; the FP32 reference of every output cached by content hash."""

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


@pytest.fixture
def tune_env(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQ_LOCAL_WORKDIR", str(tmp_path / "local-device"))
    monkeypatch.setenv("EDGEQ_CACHE_DIR", str(tmp_path / "cache"))


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
