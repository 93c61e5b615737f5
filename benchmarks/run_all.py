#!/usr/bin/env python3
"""Run every CPU benchmark in turn and print its tables (``make bench``).

Benchmarks print tables and assert nothing; run them on a quiet machine, since other load
shows up as noise. ``nvml_check.py`` needs an NVIDIA GPU and is run separately.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("bench_convert.py", "bench_harness.py", "bench_transfer.py", "bench_regression.py", "bench_tune.py",
           "bench_static_shapes.py", "bench_minilm.py", "bench_minilm_static.py", "bench_qat.py", "bench_silero_vad.py")


def main() -> int:
    failed = []
    for script in SCRIPTS:
        print(f"\n===== {script} =====", flush=True)
        if subprocess.run([sys.executable, str(HERE / script)]).returncode != 0:
            failed.append(script)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
