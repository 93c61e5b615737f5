"""``edgeq lab run LAB.yaml``: the nightly device-lab job as one command.

convert (or reuse) every (model, profile, format, precision) -> deploy and bench each artifact on every target
whose profile it was built for -> store the results in ``history/<YYYY-mm-ddTHH-MM-SS>/`` -> report against
the previous run (or a pinned baseline). One failing conversion or device loses no other results: each
failure becomes a ``failed`` result file of its own, and the report fails on it.

LAB.yaml (paths relative to the file)::

    name: nightly                       # report title (optional)
    models:
      - name: digits
        path: model.keras               # Keras file, SavedModel dir or ONNX file
        calibration: calib.npz          # needed for int8
        eval: eval.npz                  # accuracy on device + the conversion gate
    build:
      profiles: [x86-avx2]              # default: the profiles of the run targets
      formats: [tflite, onnx]           # default: each profile's own format
      precisions: [int8]                # default: each profile's own precision; auto: what `edgeq tune`
                                        #   chooses, tuned on the profile's first target, re-tuned only
                                        #   when the model, data, budget or profile change
      max_accuracy_drop: 0.01           # conversion gate and tune budget, absolute top-1 (0.01 = 1 point)
      # min_cosine: 0.99                # tune budget instead, for eval data without labels (auto only)
      # tune: {max_time_s: 1200, max_candidates: 24, runs: 100}
    run:
      targets: [local]                  # target or group names from the inventory
      warmup: 10
      runs: 200
      min_seconds: 2
    history: {dir: lab-history, keep: 30}

The package: ``config`` (LAB.yaml), ``builds`` (convert or reuse), ``tuned`` (``auto``: tune or reuse),
``history`` (run folders) and ``run`` (deploy, bench and report, one night).
"""

from edgeq.lab.builds import BuildOutcome, BuildSpec, build_artifact, plan_builds
from edgeq.lab.config import LabConfig, LabError, load_lab
from edgeq.lab.history import REPORT_FILES, RESULTS_SUBDIR, history_runs, previous_results, prune_history
from edgeq.lab.run import LabEvent, LabOutcome, run_lab

__all__ = ["REPORT_FILES", "RESULTS_SUBDIR", "BuildOutcome", "BuildSpec", "LabConfig", "LabError", "LabEvent",
           "LabOutcome", "build_artifact", "history_runs", "load_lab", "plan_builds", "previous_results",
           "prune_history", "run_lab"]
