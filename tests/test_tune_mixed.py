"""Tune's stage B by shortlist on a model deeper than the shortlist: the bound (the whole shortlist float) first,
then single layers ranked on the first half of the eval set, then k-layer sets judged on the other half."""

from __future__ import annotations

import json

import pytest

from edgeq.profiles import load_profile
from edgeq.targets import local_target
from edgeq.tune import Budget, tune
from tests.tune_fixtures import DEEP_TRAP_LAYER

pytestmark = pytest.mark.slow

PROFILE = "x86-avx2"  # pinned: the local target's detected profile (and its int8 settings) depends on the CPU


def _tune(paths, output, budget):
    return tune(paths["model"], local_target(), load_profile(PROFILE), calibration=paths["calibration"],
                eval_path=paths["eval"], budget=budget, output=output, formats=["onnx"], runs=20, min_seconds=0.05)


def test_bound_then_singles_ranked_on_one_half_then_a_set_judged_on_the_other(deep_sensitive_model, tmp_path,
                                                                               tune_env):
    # Measured at 0.9978: the bound 0.9989, the trap's layer alone 0.9974 (misses), the best two together 0.9982.
    result = _tune(deep_sensitive_model, tmp_path / "tuned", Budget(min_cosine=0.9978))
    mixed = [c for c in result.candidates if c.scheme == "mixed"]
    roles = [c.leave_one_out for c in mixed]
    assert roles[0] == "bound" and set(roles[1:-1]) == {"single"} and roles[-1] == "set", roles
    bound, singles, chosen_set = mixed[0], mixed[1:-1], mixed[-1]
    assert bound.passed and DEEP_TRAP_LAYER in bound.float_nodes and len(bound.float_nodes) > 8
    assert not any(c.passed for c in singles), [c.to_json() for c in singles]
    assert len(singles) == 8  # every shortlisted layer, alone
    for single in singles:
        if single.score is not None:  # not screened out: scored on all 300, ranked on the first 150
            assert single.score.samples == 300 and single.ranking.samples == 150 and single.scored_on is None
        else:
            assert single.rejected_by == "screen" and single.screen.samples == 100  # inside the first 150
    trap_single = next(c for c in singles if DEEP_TRAP_LAYER in c.float_nodes)
    assert trap_single.ranking.metric() == max(c.ranking.metric() for c in singles if c.ranking)
    assert set(trap_single.float_nodes) < set(chosen_set.float_nodes) < set(bound.float_nodes)
    assert chosen_set.passed and chosen_set.score.samples == 150
    assert chosen_set.scored_on.startswith("held out: samples 150-299 (leave-one-out chose its float layers on 0-149")
    assert chosen_set.screen is None
    assert not [c for c in result.candidates if c.scheme == "a16"]  # stage B met the budget

    rows = {row["id"]: row for row in json.loads((tmp_path / "tuned" / "tune.json").read_text())["candidates"]}
    assert rows[chosen_set.id]["leave_one_out"] == "set" and rows[chosen_set.id]["host"]["samples"] == 150
    assert rows[trap_single.id]["ranking"]["samples"] == 150


def test_a_bound_that_misses_ends_stage_b_after_one_candidate(deep_sensitive_model, tmp_path, tune_env):
    result = _tune(deep_sensitive_model, tmp_path / "tuned", Budget(min_cosine=0.9995))
    mixed = [c for c in result.candidates if c.scheme == "mixed"]
    assert [c.leave_one_out for c in mixed] == ["bound"] and not mixed[0].passed
    assert any(note.startswith("onnx: mixed precision ended at its bound: all 8 shortlisted layers kept float (")
               and note.endswith("miss the budget, so no subset was tried") for note in result.notes), result.notes
    schemes = [c.scheme for c in result.candidates]
    assert schemes.index("a16") == schemes.index("mixed") + 1  # stage C follows at once
