#!/usr/bin/env python3
"""Benchmark: all-MiniLM-L6-v2 dynamic INT8 against FP32 on ONNX Runtime and OpenVINO, at sequence lengths 32
and 128: p50 latency (batch 1), embedding cosine against the FP32 PyTorch model, and size.

Every artifact is built by edgeq from one ``.pt2`` (examples/minilm/export.py) and opened through edgeq's own
runtime sessions (pinned precision, the same threads); rounds interleaved within each sequence length,
medians. Goal (issue 12): speedup >= 1.5x on ONNX Runtime with cosine >= 0.99.

    .venv/bin/python benchmarks/bench_minilm.py [--runs 300] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_convert import cpu_flags, cpu_model  # noqa: E402


def _feed(manifest, session, data: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
    by_name = {t.name: t.source_name or t.name for t in manifest.inputs}
    return {spec["name"]: data[by_name.get(spec["name"], spec["name"])][index : index + 1] for spec in session.inputs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    from edgeq.convert import convert
    from edgeq.device.runtimes import open_session
    from edgeq.profiles import load_profile
    from examples.minilm.export import PROFILE, export

    flags = cpu_flags()
    print(f"host: {cpu_model()}, {os.cpu_count()} cores, avx512_vnni={'avx512_vnni' in flags}, "
          f"amx={'amx_int8' in flags}; threads={args.threads}; profile {PROFILE}")
    work = Path(tempfile.mkdtemp(prefix="bench-minilm-"))
    paths = export(work, (32, 128), count=120)
    source_mb = paths["model"].stat().st_size / 1e6
    built = {}
    for fmt in ("onnx", "openvino"):
        for precision in ("fp32", "dynamic"):
            started = time.perf_counter()
            manifest = convert(paths["model"], load_profile(PROFILE), work / f"{fmt}-{precision}", format=fmt,
                               precision=precision, eval_path=paths["eval32"])
            built[(fmt, precision)] = manifest
            print(f"  built {fmt} {precision} in {time.perf_counter() - started:.0f}s", flush=True)

    from edgeq.convert.source import load_source

    source = load_source(paths["model"])
    print(f"\nall-MiniLM-L6-v2 sentence embedding (.pt2 {source_mb:.1f} MB), batch 1, median of {args.runs} runs "
          "in 10 interleaved rounds per sequence length; cosine over 120 padded sentences against FP32 PyTorch")
    print(f"{'runtime':<10}{'precision':<10}{'seq':>5}{'size MB':>9}{'p50 ms':>9}{'speedup':>9}{'cos mean':>10}"
          f"{'cos min':>9}")
    for seq in (32, 128):
        data = dict(np.load(paths[f"eval{seq}"]))
        reference = source.run(data)[0]
        sessions, outputs = {}, {}
        for key, manifest in built.items():
            session = open_session(work / f"{key[0]}-{key[1]}" / manifest.model_file, key[0], threads=args.threads,
                                   precision=key[1])
            sessions[key] = (session, session.bind(session.prepare(_feed(manifest, session, data, 0))))
            outputs[key] = np.concatenate([session.run(_feed(manifest, session, data, i))[0]
                                           for i in range(len(reference))])
        samples: dict = {key: [] for key in sessions}
        for _ in range(10):
            for key, (_, call) in sessions.items():
                for _ in range(max(1, args.runs // 10)):
                    started = time.perf_counter()
                    call()
                    samples[key].append((time.perf_counter() - started) * 1000)
        for key, manifest in built.items():
            p50 = statistics.median(samples[key])
            fp32 = statistics.median(samples[(key[0], "fp32")])
            out = outputs[key]
            cosine = np.sum(out * reference, 1) / np.linalg.norm(out, axis=1) / np.linalg.norm(reference, axis=1)
            size = sum(f.size for f in manifest.files) / 1e6
            print(f"{key[0]:<10}{key[1]:<10}{seq:>5}{size:>9.1f}{p50:>9.3f}{fp32 / p50:>8.2f}x{np.mean(cosine):>10.4f}"
                  f"{np.min(cosine):>9.4f}")


if __name__ == "__main__":
    main()
