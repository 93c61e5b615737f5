#!/usr/bin/env python3
"""all-MiniLM-L6-v2, static OpenVINO INT8 (NNCF, calibrated on half of the sentences, validated on the other
half): NNCF's default scheme against model_type TRANSFORMER (SmoothQuant), embedding cosine against FP32.
Accuracy only: no latency here (see bench_minilm.py for dynamic INT8 timings).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_minilm_static.py [--profile x86-avx2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="x86-avx2")
    args = parser.parse_args()
    from edgeq.convert import convert
    from edgeq.profiles import load_profile
    from examples.minilm.export import export

    with tempfile.TemporaryDirectory(prefix="edgeq-minilm-static-") as tmp:
        out = Path(tmp)
        paths = export(out, (32,))
        data = np.load(paths["eval32"])
        half = len(data["input_ids"]) // 2
        np.savez(out / "calib.npz", **{k: data[k][:half] for k in data.files})
        np.savez(out / "eval.npz", **{k: data[k][half:] for k in data.files})
        print(f"all-MiniLM-L6-v2, 32 tokens, profile {args.profile}: calibrated on {half} sentences, "
              f"validated on {len(data['input_ids']) - half}")
        print("| scheme | embedding cosine mean | min | convert s |")
        print("|---|---|---|---|")
        for name, settings in (("nncf default", {}), ("model_type TRANSFORMER (SmoothQuant)", {"transformer": True})):
            started = time.perf_counter()
            manifest = convert(paths["model"], load_profile(args.profile), out / name.split()[0], format="openvino",
                               precision="int8", calibration=out / "calib.npz", eval_path=out / "eval.npz",
                               **settings)
            (agreement,) = manifest.validation.outputs.values()
            print(f"| {name} | {agreement.cosine_mean:.4f} | {agreement.cosine_min:.4f} | "
                  f"{time.perf_counter() - started:.0f} |")


if __name__ == "__main__":
    main()
