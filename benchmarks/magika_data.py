#!/usr/bin/env python3
"""Magika's content-type CNN (ONNX, shipped inside the ``magika`` wheel) with calibration and eval data built
from real files on this machine, as Magika itself feeds them: the first and last 1024 bytes of each file
(whitespace-stripped), padded with token 256, as one int32 row of 2048.

    .venv/bin/python benchmarks/magika_data.py OUT_DIR [--wheel magika-*.whl]

The model comes from an installed ``magika`` package, else from a wheel given with ``--wheel`` (``pip
download --no-deps magika``): nothing is fetched at run time. Eval ``labels`` are the FP32 model's own
predictions, so a "top-1 drop" here is the share of files whose predicted type changed.
"""

from __future__ import annotations

import argparse
import importlib.util
import zipfile
from pathlib import Path

import numpy as np

BEG, END, PAD = 1024, 1024, 256
MODEL_MEMBER = "magika/models/standard_v3_3/model.onnx"
ROOTS = ("/usr/share", "/usr/lib", "/usr/bin", "/etc", "/usr/include")


def model_path(out: Path, wheel: Path | None) -> Path:
    spec = importlib.util.find_spec("magika")
    if spec is not None and spec.submodule_search_locations:
        installed = Path(next(iter(spec.submodule_search_locations))) / "models" / "standard_v3_3" / "model.onnx"
        if installed.exists():
            return installed
    if wheel is None:
        raise SystemExit("magika is not installed: pass --wheel (pip download --no-deps magika)")
    target = out / "magika.onnx"
    with zipfile.ZipFile(wheel) as archive:
        target.write_bytes(archive.read(MODEL_MEMBER))
    return target


def features(path: Path) -> np.ndarray | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    data = data.strip()
    if len(data) < 8:
        return None
    beg = list(data[:BEG]) + [PAD] * max(0, BEG - len(data))
    end = [PAD] * max(0, END - len(data)) + list(data[-END:])
    return np.asarray(beg + end, dtype=np.int32)


def real_files(limit: int, seed: int = 0) -> list[Path]:
    """Up to ``limit`` regular files of this machine, spread over many types (sorted, then sampled)."""
    found: list[Path] = []
    for root in ROOTS:
        for path in sorted(Path(root).rglob("*")):
            if path.is_file() and not path.is_symlink() and 8 <= path.stat().st_size <= 64 * 2**20:
                found.append(path)
    rng = np.random.default_rng(seed)
    return [found[i] for i in rng.choice(len(found), size=min(limit, len(found)), replace=False)]


def build(out: Path, wheel: Path | None, calib_count: int = 300, eval_count: int = 600) -> dict[str, Path]:
    import onnxruntime as ort

    out.mkdir(parents=True, exist_ok=True)
    model = model_path(out, wheel)
    rows = [f for f in (features(p) for p in real_files(calib_count + eval_count)) if f is not None]
    x = np.stack(rows)
    calib, evaluation = x[:calib_count], x[calib_count:]
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    labels = np.argmax(session.run(None, {"bytes": evaluation})[0], axis=1)
    paths = {"model": model, "calibration": out / "magika-calib.npz", "eval": out / "magika-eval.npz"}
    np.savez(paths["calibration"], bytes=calib)
    np.savez(paths["eval"], bytes=evaluation, labels=labels)
    print(f"magika: {len(calib)} calibration and {len(evaluation)} eval files, "
          f"{len(set(labels.tolist()))} predicted types in eval; model {model}")
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--wheel", type=Path)
    args = parser.parse_args()
    build(args.out, args.wheel)
