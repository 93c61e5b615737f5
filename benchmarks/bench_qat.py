#!/usr/bin/env python3
"""FP32 / PTQ / QAT on the constructed wide-range digits CNN (examples/qat/wide_range.py, or its PyTorch twin
wide_range_torch.py with --framework pytorch): top-1 on the held-out digits, size and host p50 latency (1 thread,
50 runs of one sample) per format, as `edgeq qat` measures them.

    .venv/bin/python benchmarks/bench_qat.py [--framework keras|pytorch] [--output demo-out/bench-qat]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _cpu() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("demo-out/bench-qat"))
    parser.add_argument("--profile", default="x86-avx2")
    parser.add_argument("--framework", choices=["keras", "pytorch"], default="keras")
    args = parser.parse_args()
    from edgeq.profiles import load_profile
    from edgeq.qat import qat, table_lines

    if args.framework == "pytorch":
        from examples.qat.wide_range_torch import build
    else:
        from examples.qat.wide_range import build

    shutil.rmtree(args.output, ignore_errors=True)
    paths = build(args.output / "data")
    result = qat(paths["model"], load_profile(args.profile), train=paths["train"], eval_path=paths["eval"],
                 output=args.output / "out")
    scheme = result.training.get("scheme", "tfmot quantize_model")
    print(f"host: {_cpu()}, profile {args.profile}; {args.framework} QAT ({scheme}): 3 epochs, Adam 1e-3, "
          f"activation ranges calibrated on 300 samples first; wall time {result.seconds:.1f} s")
    for line in table_lines(result):
        print(line)


if __name__ == "__main__":
    main()
