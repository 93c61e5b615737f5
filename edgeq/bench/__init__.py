"""The controller side of ``edgeq bench``: request up, the device package runs it, result down.

``bench(artifact_dir, target, ...)`` benchmarks one artifact on one target, writes
``RESULTS_DIR/<target>__<artifact-id>.json`` (an ``edgeq.result.BenchResult``) and returns a ``BenchRun``
(the result and its path); ``bench_fleet`` does the same for many targets in parallel, keeping every
target's result; ``failed_result`` builds the result of a (target, artifact) that measured nothing.
"""

from edgeq.bench.core import BenchRun, bench, bench_fleet, failed_result, result_path
from edgeq.bench.evaldata import EvalData, compute_accuracy, load_eval
from edgeq.bench.on_device import BenchSettings
from edgeq.result import RESULT_SCHEMA_VERSION

__all__ = ["RESULT_SCHEMA_VERSION", "BenchRun", "BenchSettings", "EvalData", "bench", "bench_fleet",
           "compute_accuracy", "failed_result", "load_eval", "result_path"]
