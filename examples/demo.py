#!/usr/bin/env python3
"""The main job end to end on this machine's built-in ``local`` target (what ``make demo`` runs).

1. train a small CNN on scikit-learn's bundled digits (seconds, no download);
2. convert it to TFLite, ONNX and OpenVINO in INT8 and FP16 for this machine's profile,
   validating each artifact against the FP32 model on held-out data;
3. benchmark every artifact on ``local`` (latency, accuracy, memory, power where a sensor exists);
4. write ``demo-out/report.html`` (and Markdown) from the results;
5. ``edgeq tune``: every candidate the profile allows, scored on the host against FP32, the passing ones
   benchmarked on ``local``, the fastest within a 1-point top-1 budget kept (``demo-out/tune/tune.html``);
6. the same task as a PyTorch ``.pt2`` (``torch.export``), converted to ONNX and OpenVINO INT8 and benched.

Each step runs the real ``edgeq`` command, printed before it runs, so the demo doubles as a tutorial.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "demo-out"
FORMATS = ("tflite", "onnx", "openvino")
PRECISIONS = ("int8", "fp16")


def edgeq(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "edgeq", *args]
    print(f"\n$ edgeq {shlex.join(args)}", flush=True)
    result = subprocess.run(argv, cwd=REPO)
    if check and result.returncode != 0:
        sys.exit(f"demo: 'edgeq {args[0]}' failed with exit code {result.returncode}")
    return result


def main() -> None:
    sys.path.insert(0, str(REPO))
    from edgeq.targets import detect_local_profile
    from examples.digits.train import train

    if OUT.exists():
        shutil.rmtree(OUT)
    print("== 1. train the digits CNN", flush=True)
    data = train(OUT / "digits")
    print(f"FP32 Keras model: held-out top-1 {data['accuracy']:.4f}")

    profile = detect_local_profile()
    print(f"\n== 2. convert for this machine's profile: {profile}")
    artifacts = []
    for fmt in FORMATS:
        for precision in PRECISIONS:
            artifact = OUT / "artifacts" / f"digits-{fmt}-{precision}"
            edgeq("convert", str(data["model"]), "--profile", profile, "--format", fmt, "--precision", precision,
                  "--calibration", str(data["calib"]), "--eval", str(data["eval"]),
                  "--max-accuracy-drop", "0.01", "--output", str(artifact))
            artifacts.append(artifact)

    print("\n== conversion summary (validated on held-out digits against the FP32 source)")
    print(f"{'artifact':<24} {'size KiB':>9} {'top-1 fp32':>10} {'top-1':>7} {'drop':>7} {'agree':>7} {'cosine':>8}")
    for artifact in artifacts:
        manifest = json.loads((artifact / "manifest.json").read_text())
        v = manifest["validation"]
        size = sum(f["size"] for f in manifest["files"]) / 1024
        print(f"{artifact.name:<24} {size:9.1f} {v['top1_reference']:10.4f} {v['top1']:7.4f} "
              f"{v['top1_drop']:+7.4f} {v['top1_agreement']:7.4f} {v['cosine_similarity']:8.5f}")

    print("\n== 3. benchmark every artifact on the local target")
    results = OUT / "results"
    failed = False
    for artifact in artifacts:
        run = edgeq("bench", str(artifact), "--target", "local", "--eval", str(data["eval"]),
                    "--warmup", "20", "--runs", "300", "--min-seconds", "2", "--output", str(results), check=False)
        failed |= run.returncode != 0

    print("\n== 4. report")
    report = edgeq("report", str(results), "--html", str(OUT / "report.html"),
                   "--markdown", str(OUT / "report.md"), check=False)
    print(f"\nwrote {OUT / 'report.html'}")
    if failed or report.returncode != 0:
        sys.exit("demo: a benchmark or the report failed (see above)")

    print("\n== 5. tune: the fastest artifact on this machine within 1 point of FP32 top-1")
    edgeq("tune", str(data["model"]), "--target", "local", "--calibration", str(data["calib"]),
          "--eval", str(data["eval"]), "--max-accuracy-drop", "0.01", "--max-time", "10m", "--runs", "200",
          "--output", str(OUT / "tune"))
    print(f"\nwrote {OUT / 'tune' / 'tune.html'}")

    print("\n== 6. a PyTorch model: the same digits task as a .pt2 (torch.export), to ONNX and OpenVINO INT8")
    from examples.digits.train_torch import train as train_torch

    torch_data = train_torch(OUT / "digits-torch")
    print(f"FP32 PyTorch model: held-out top-1 {torch_data['accuracy']:.4f}")
    for fmt in ("onnx", "openvino"):
        artifact = OUT / "artifacts" / f"digits-torch-{fmt}-int8"
        edgeq("convert", str(torch_data["model"]), "--profile", profile, "--format", fmt, "--precision", "int8",
              "--calibration", str(torch_data["calib"]), "--eval", str(torch_data["eval"]),
              "--max-accuracy-drop", "0.01", "--output", str(artifact))
        if edgeq("bench", str(artifact), "--target", "local", "--eval", str(torch_data["eval"]), "--runs", "200",
                 "--output", str(OUT / "results-torch"), check=False).returncode != 0:
            sys.exit(f"demo: the bench of {artifact.name} failed (see above)")


if __name__ == "__main__":
    main()
