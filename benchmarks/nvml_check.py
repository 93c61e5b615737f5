#!/usr/bin/env python3
"""Check the runner's ``nvml`` power source on a real NVIDIA GPU against a load this script creates.

Needs only the standard library, numpy, pynvml (or libnvidia-ml through ctypes) and PyTorch with CUDA;
it imports the device package (``edgeq/device``) by path (edgeq itself need not be installed). It samples idle power, then
power under ~10 s of fp16 matmuls, and prints idle W, loaded W, the samples and achieved sample rate, and
the energy from NVML's total-energy counter next to the trapezoid integral of the power readings.

    python benchmarks/nvml_check.py [--gpu 0] [--idle 5] [--load 10] [--interval-ms 20]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

DEVICE = Path(__file__).resolve().parent.parent / "edgeq" / "device"


def load_runner():
    """The device package's power modules, imported from the checkout as the zipapp's top-level package
    (edgeq itself need not be installed: the package imports nothing else from it)."""
    spec = importlib.util.spec_from_file_location("edgeq_device", DEVICE / "__init__.py",
                                                  submodule_search_locations=[str(DEVICE)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["edgeq_device"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("edgeq_device.power")


def matmul_load(seconds: float, size: int = 8192) -> int:
    """fp16 matmuls on the GPU for about ``seconds``; returns how many ran."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("PyTorch sees no CUDA device")
    a = torch.randn(size, size, device="cuda", dtype=torch.float16)
    b = torch.randn(size, size, device="cuda", dtype=torch.float16)
    torch.cuda.synchronize()
    count = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(10):
            a @ b
        count += 10
        torch.cuda.synchronize()
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--idle", type=float, default=5.0, help="idle sampling seconds")
    parser.add_argument("--load", type=float, default=10.0, help="matmul load seconds")
    parser.add_argument("--interval-ms", type=float, default=20.0)
    args = parser.parse_args()
    er = load_runner()
    import torch

    torch.zeros(1, device="cuda")  # create the CUDA context before idle sampling: it has its own draw
    torch.cuda.synchronize()
    try:
        source = er.open_power_source({"sensor": "nvml", "gpu_index": args.gpu})
    except er.PowerUnavailable as exc:
        raise SystemExit(f"nvml source unavailable: {exc}") from exc
    sampler = er.PowerSampler(source, args.interval_ms / 1000.0).start()
    idle_start = sampler.mark()
    time.sleep(args.idle)
    idle = sampler.window(idle_start, sampler.mark())
    load_start = sampler.mark()
    matmuls = matmul_load(args.load)
    loaded = sampler.window(load_start, sampler.mark())
    sampler.stop()
    source.close()
    flops = 2 * 8192**3 * matmuls

    print(f"GPU {args.gpu}: {source.gpu_name} via {source.binding}; energy counter: {source.has_counter}")
    print(f"{'phase':<7} {'seconds':>8} {'avg W':>8} {'min W':>8} {'max W':>8} {'samples':>8} {'rate Hz':>8} "
          f"{'counter J':>10} {'integrated J':>13} {'diff %':>7}")
    for name, window in (("idle", idle), ("loaded", loaded)):
        counter = window["energy_j"] if window["method"] == "counter" else None
        integrated = window.get("integrated_energy_j", window["energy_j"] if window["method"] == "trapezoid" else None)
        diff = (counter - integrated) / integrated * 100 if counter is not None and integrated else None
        rate = window["samples"] / window["duration_s"]
        print(f"{name:<7} {window['duration_s']:>8.2f} {window['avg_w']:>8.1f} {window.get('min_w', 0):>8.1f} "
              f"{window.get('max_w', 0):>8.1f} {window['samples']:>8d} {rate:>8.1f} "
              f"{'-' if counter is None else f'{counter:.1f}':>10} "
              f"{'-' if integrated is None else f'{integrated:.1f}':>13} {'-' if diff is None else f'{diff:+.1f}':>7}")
    print(f"load: {matmuls} fp16 matmuls 8192^3 ({flops / loaded['duration_s'] / 1e12:.0f} TFLOP/s); "
          f"active power above idle {loaded['avg_w'] - idle['avg_w']:.1f} W")


if __name__ == "__main__":
    main()
