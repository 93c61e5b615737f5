"""The controller side of ``edgeq bench``: request up, runner runs on the device, result down.

``bench(artifact_dir, target, ...)`` benchmarks one artifact on one target and writes
``RESULTS_DIR/<target>__<artifact-id>.json`` (schema in docs/ARCHITECTURE.md, "Results");
``bench_fleet`` does the same for many targets in parallel, keeping every target's result;
``failed_result`` builds the result of a (target, artifact) that measured nothing.
"""

from edgeq.bench.core import (
    RESULT_SCHEMA_VERSION,
    BenchSettings,
    EvalData,
    bench,
    bench_fleet,
    compute_accuracy,
    failed_result,
    load_eval,
    result_path,
)

__all__ = ["RESULT_SCHEMA_VERSION", "BenchSettings", "EvalData", "bench", "bench_fleet", "compute_accuracy",
           "failed_result", "load_eval", "result_path"]
