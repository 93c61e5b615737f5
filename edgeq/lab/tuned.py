"""``precisions: [auto]`` in a LAB.yaml: the artifact ``edgeq tune`` chooses for a profile, tuned on the
profile's first run target, kept in the artifact cache and tuned again only when something it used changed
(the model, its data, the budget, the formats, the limits, the profile, the device or edgeq). A nightly lab
must not re-decide every night: a choice that flips on noise would break every comparison with the baseline.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from edgeq import __version__
from edgeq.errors import EdgeqError, Failure
from edgeq.lab.builds import BuildOutcome, BuildSpec
from edgeq.lab.config import LabConfig
from edgeq.profiles import DeviceProfile
from edgeq.tune.budget import SCORING_VERSION

KEY_FILE = "lab-tune-key.json"  # beside tune.json: what the tune in this directory was run with


def tune_key(spec: BuildSpec, config: LabConfig, profile: DeviceProfile) -> dict:
    """Everything the tune's choice depends on; a cached tune is reused only while it is equal."""
    from edgeq.manifest import sha256_file, sha256_tree

    build = config.build
    return {
        "edgeq_version": __version__,
        "tune_scoring": SCORING_VERSION,  # how a budget is read (a change makes a cached choice stale)
        "source_sha256": sha256_tree(spec.model.path),
        "calibration_sha256": sha256_file(spec.model.calibration),
        "eval_sha256": sha256_file(spec.model.eval),
        "budget": {"max_accuracy_drop": build.max_accuracy_drop, "min_cosine": build.min_cosine},
        "formats": build.formats,
        "calibration_samples": build.calibration_samples,
        "input_shapes": spec.model.input_shapes,
        "limits": build.tune.model_dump(mode="json"),
        "profile": profile.model_dump(mode="json"),
        "measured_on": spec.measure_on.name if spec.measure_on else None,
    }


def _cached_choice(out_dir: Path, key: dict):
    """The cached tune's chosen manifest when the tune was run with ``key`` and its artifact is intact."""
    from edgeq.manifest import read_manifest, verify_artifact

    try:
        if json.loads((out_dir / KEY_FILE).read_text()) != key:
            return None
        return verify_artifact(out_dir / "chosen", read_manifest(out_dir / "chosen"))
    except (OSError, ValueError, EdgeqError):
        return None


def tuned_artifact(spec: BuildSpec, config: LabConfig, profile: DeviceProfile, out_dir: Path,
                   started: float) -> BuildOutcome:
    """Reuse the cached tune of ``spec`` or run it; the outcome's artifact is ``out_dir/chosen``."""
    from edgeq.files import write_text_atomic
    from edgeq.manifest import read_manifest
    from edgeq.tune import Budget, tune

    key = tune_key(spec, config, profile)
    manifest = _cached_choice(out_dir, key)
    if manifest is not None:
        return BuildOutcome(spec, "reused", out_dir / "chosen", manifest, time.perf_counter() - started)
    build = config.build
    result = tune(spec.model.path, spec.measure_on, profile, calibration=spec.model.calibration,
                  eval_path=spec.model.eval,
                  budget=Budget(max_accuracy_drop=build.max_accuracy_drop, min_cosine=build.min_cosine),
                  output=out_dir, formats=build.formats, max_time_s=build.tune.max_time_s,
                  max_candidates=build.tune.max_candidates, calibration_samples=build.calibration_samples,
                  runs=build.tune.runs, input_shapes=spec.model.input_shapes, force=True)
    if result.chosen is None:
        return BuildOutcome(spec, "failed", None, None, time.perf_counter() - started,
                            failure=Failure(kind="artifact", message=f"tune chose nothing ({out_dir / 'tune.json'}): "
                                            f"{result.reason}"))
    write_text_atomic(out_dir / KEY_FILE, json.dumps(key, indent=1, sort_keys=True) + "\n")
    return BuildOutcome(spec, "tuned", result.chosen_dir, read_manifest(result.chosen_dir),
                        time.perf_counter() - started)
