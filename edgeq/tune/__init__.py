"""``edgeq tune``: for one device, the fastest artifact that meets an accuracy budget.

    from edgeq.tune import Budget, tune
    result = tune(model, target, profile, calibration=..., eval_path=..., budget=Budget(max_accuracy_drop=0.01),
                  output="tuned/")
    result.chosen_dir   # the artifact, ready for deploy; tuned/tune.json, tune.md, tune.html hold the table

Stages: ``candidates`` (what is tried, in order), ``budget`` (host scores against FP32, cached by ``cache``),
``sensitivity`` (which layers to keep float), ``choose`` (device bench, objective, Pareto), ``output``.
"""

from edgeq.errors import TuneError
from edgeq.tune.budget import Budget, Score
from edgeq.tune.candidates import Candidate
from edgeq.tune.search import Progress, TuneResult, tune

__all__ = ["Budget", "Candidate", "Progress", "Score", "TuneError", "TuneResult", "tune"]
