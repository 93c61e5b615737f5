"""``edgeq qat``: fine-tune a Keras or PyTorch model with simulated INT8 rounding, then build its artifacts, and
show what it bought against post-training quantization (PTQ) of the same model.

Steps: the QAT step, which writes a model that carries its learned scales:
- Keras, in its own process (``edgeq.qat.worker``: Keras 3 -> tf_keras rebuild, tfmot ``quantize_model`` with
  activation ranges calibrated first, a short fine-tune), a SavedModel with FakeQuant ops;
- PyTorch ``.pt2``, in this process (``edgeq.qat.torch_qat``: torchao's PT2E QAT), a QDQ ONNX model.
Then for each format, that model through ``convert`` at int8 with its own scales (no calibration:
``edgeq.convert.prequantized``) and the float model through ordinary PTQ, both validated on the eval labels.
``DIR/qat.json`` and ``DIR/qat.md`` hold the table: FP32, PTQ and QAT top-1, size and host latency per format.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgeq.convert import convert
from edgeq.convert.source import detect_kind
from edgeq.data import read_npz
from edgeq.errors import EdgeqError, QatError
from edgeq.manifest import Manifest
from edgeq.profiles import DeviceProfile
from edgeq.qat.deps import require_qat_site

log = logging.getLogger(__name__)

QAT_FORMATS = ("tflite", "onnx", "openvino")  # what a QAT SavedModel becomes with its own scales
PYTORCH_QAT_FORMATS = ("onnx", "openvino")  # what a QAT QDQ ONNX model becomes (no TFLite from PyTorch)
RESULT_MARK = "EDGEQ-QAT-RESULT "
LATENCY_RUNS = 50


@dataclass
class Row:
    """One artifact in the table."""

    format: str
    scheme: str  # fp32 | ptq | qat
    top1: float | None
    size_bytes: int | None
    host_p50_ms: float | None
    directory: str | None = None
    error: str | None = None


@dataclass
class QatResult:
    model: str
    output: str
    fp32_top1: float | None
    training: dict
    rows: list[Row] = field(default_factory=list)
    seconds: float = 0.0

    def recovered(self, fmt: str) -> float | None:
        """Share of the PTQ top-1 loss that QAT won back for ``fmt`` (1.0: all of it; None: no PTQ loss)."""
        by = {row.scheme: row for row in self.rows if row.format == fmt}
        ptq, qat = by.get("ptq"), by.get("qat")
        if self.fp32_top1 is None or ptq is None or qat is None or ptq.top1 is None or qat.top1 is None:
            return None
        loss = self.fp32_top1 - ptq.top1
        return (qat.top1 - ptq.top1) / loss if loss > 0 else None

    def to_json(self) -> dict:
        data = asdict(self)
        data["recovered"] = {fmt: self.recovered(fmt) for fmt in dict.fromkeys(r.format for r in self.rows)}
        return data


def qat_formats(kind: str) -> tuple[str, ...]:
    """The formats QAT of a ``kind`` model builds with its learned scales."""
    return PYTORCH_QAT_FORMATS if kind == "pytorch" else QAT_FORMATS


def _check_model(model: Path) -> str:
    """The model's kind, after refusing (QatError) what QAT cannot take."""
    kind = detect_kind(model)
    if kind == "torchscript":
        raise QatError(f"{model}: QAT of a PyTorch model takes a .pt2 (torch.export.save): torchao's PT2E flow "
                       "prepares an exported graph, which a TorchScript file does not hold",
                       hint="export the model with torch.export.export and torch.export.save")
    if kind == "pytorch":
        from edgeq.qat.torch_qat import check_program

        check_program(model)
    elif kind != "keras":
        raise QatError(f"{model}: QAT takes a Keras (.keras/.h5) or PyTorch (.pt2) model, not a {kind} model",
                       hint="a SavedModel or ONNX model that is already quantized converts with --precision int8")
    return kind


def _check_inputs(model: Path, train: Path, eval_path: Path) -> tuple[str, dict, dict]:
    """(the model's input name, the train arrays, the eval arrays), after checking the model's kind and the data
    files (QatError naming the file)."""
    _check_model(model)
    data = {"train": read_npz(train), "eval": read_npz(eval_path)}
    for (role, arrays), path in zip(data.items(), (train, eval_path), strict=True):
        if "labels" not in arrays:
            raise QatError(f"{path}: the {role} data has no 'labels' (class ids): QAT trains and is scored on them")
    names = [name for name in data["train"] if name != "labels"]
    if len(names) != 1:
        raise QatError(f"{train}: expected one input array besides 'labels', found {names or 'none'}")
    return names[0], data["train"], data["eval"]


def _run_worker(request: dict, timeout_s: float) -> dict:
    site = require_qat_site()
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    try:
        done = subprocess.run([sys.executable, "-m", "edgeq.qat.worker"], input=json.dumps(request), text=True,
                              capture_output=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise QatError(f"{request['model']}: the QAT fine-tune did not finish in {timeout_s:.0f} s",
                       hint="lower --epochs, or give fewer training samples") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise QatError(f"{request['model']}: the QAT process exited {done.returncode} without a result ({tail})")
    result = json.loads(lines[-1][len(RESULT_MARK):])
    if not result.get("ok"):
        if result.get("traceback"):
            log.debug("QAT worker traceback:\n%s", result["traceback"])
        raise QatError(f"{request['model']}: QAT failed: {result.get('error')}")
    return result


def check_train(model: Path, train: Path) -> str:
    """The model's input name, after checking that QAT can take ``model``, that ``train`` has its input and
    labels, and that the QAT packages for the model's framework are installed (QatError naming the file)."""
    if _check_model(model) == "pytorch":
        from edgeq.qat.torch_qat import pt2e_api

        pt2e_api()
    else:
        require_qat_site()
    return _check_inputs(model, train, train)[0]


def fine_tune(model: Path, train: Path, workdir: Path, profile: DeviceProfile, *, input_name: str | None = None,
              epochs: int = 3, lr: float = 1e-3, batch_size: int = 32, calibration_samples: int = 300,
              timeout_s: float = 3600.0) -> dict:
    """The QAT step alone: ``model`` fine-tuned on ``train`` with fake quantization; the training record, whose
    ``qat_model`` is the model it wrote in ``workdir`` (a SavedModel for Keras, QDQ ONNX for PyTorch), which
    ``convert`` takes at int8 with the learned scales. Also used by tune."""
    if input_name is None:
        input_name = check_train(model, train)
    workdir.mkdir(parents=True, exist_ok=True)
    if detect_kind(model) == "pytorch":
        from edgeq.qat.torch_qat import fine_tune_pt2

        target = workdir / "qat.onnx"
        training = fine_tune_pt2(model, read_npz(train), input_name, target, profile, epochs=epochs, lr=lr,
                                 batch_size=batch_size, calibration_samples=calibration_samples)
    else:
        target = workdir / "qat-savedmodel"
        training = _run_worker({"model": str(model.resolve()), "train": str(train.resolve()),
                                "input": input_name, "epochs": epochs, "lr": lr, "batch_size": batch_size,
                                "output": str(target), "calibration_samples": calibration_samples}, timeout_s)
    return {**training, "qat_model": str(target)}


def host_p50_ms(artifact: Path, manifest: Manifest, sample: np.ndarray, threads: int) -> float:
    """Median latency of one sample on this host (a quick figure for the table; bench measures devices)."""
    from edgeq.device.runtimes import open_session

    session = open_session(artifact / manifest.model_file, manifest.format, threads=threads,
                           precision=manifest.precision)
    feed = {session.inputs[0]["name"]: sample[None]}
    for _ in range(5):
        session.run(feed)
    times = []
    for _ in range(LATENCY_RUNS):
        started = time.perf_counter()
        session.run(feed)
        times.append((time.perf_counter() - started) * 1000)
    return float(np.median(times))


def _row(fmt: str, scheme: str, directory: Path, build, sample: np.ndarray, threads: int) -> Row:
    try:
        manifest = build()
    except EdgeqError as exc:  # one format failing is a row of the table, not the end of the run
        return Row(fmt, scheme, None, None, None, str(directory), error=exc.message)
    size = sum(entry.size for entry in manifest.files if entry.path == manifest.model_file or
               entry.path.startswith("model."))
    return Row(fmt, scheme, manifest.validation.top1, size, host_p50_ms(directory, manifest, sample, threads),
               str(directory))


def qat(model: Path | str, profile: DeviceProfile, *, train: Path | str, eval_path: Path | str, output: Path | str,
        formats: list[str] | None = None, epochs: int = 3, lr: float = 1e-3, batch_size: int = 32,
        calibration_samples: int = 300, timeout_s: float = 3600.0, threads: int = 1) -> QatResult:
    """Fine-tune ``model`` with QAT, build its int8 artifacts per format, and compare them with PTQ and FP32."""
    started = time.monotonic()
    model, train, eval_path, output = Path(model), Path(train), Path(eval_path), Path(output)
    if output.exists() and any(output.iterdir()):
        raise QatError(f"{output}: output directory is not empty", hint="give a new or empty directory")
    allowed = qat_formats(detect_kind(model)) if model.exists() else QAT_FORMATS
    formats = list(formats or allowed)
    unknown = [fmt for fmt in formats if fmt not in allowed]
    if unknown:
        raise QatError(f"QAT of {model.name} builds {', '.join(allowed)}, not {', '.join(unknown)}",
                       hint="TFLite from PyTorch is not built (litert-torch would downgrade the other backends)"
                       if "tflite" in unknown and allowed == PYTORCH_QAT_FORMATS else None)
    if epochs < 1 or lr <= 0 or batch_size < 1:
        raise QatError(f"--epochs, --lr and --batch-size must be positive (got {epochs}, {lr}, {batch_size})")
    input_name, train_arrays, eval_arrays = _check_inputs(model, train, eval_path)
    output.mkdir(parents=True, exist_ok=True)
    training = fine_tune(model, train, output, profile, input_name=input_name, epochs=epochs, lr=lr,
                         batch_size=batch_size, calibration_samples=calibration_samples, timeout_s=timeout_s)
    qat_model = Path(training["qat_model"])
    sample = eval_arrays[input_name][0]
    result = QatResult(str(model), str(output), None, training)
    with tempfile.TemporaryDirectory(prefix="edgeq-qat-") as scratch:
        calibration = Path(scratch) / "calib.npz"
        np.savez(calibration, **{input_name: train_arrays[input_name][:calibration_samples]})
        for fmt in formats:
            ptq_dir, qat_dir = output / f"ptq-{fmt}", output / f"qat-{fmt}"
            ptq = _row(fmt, "ptq", ptq_dir, lambda f=fmt, d=ptq_dir: convert(
                model, profile, d, format=f, precision="int8", calibration=calibration, eval_path=eval_path),
                sample, threads)
            if result.fp32_top1 is None and ptq.error is None:
                from edgeq.manifest import read_manifest

                result.fp32_top1 = read_manifest(ptq_dir).validation.top1_reference
            result.rows.append(ptq)
            result.rows.append(_row(fmt, "qat", qat_dir, lambda f=fmt, d=qat_dir: convert(
                qat_model, profile, d, format=f, precision="int8", eval_path=eval_path), sample, threads))
        fmt = "tflite" if "tflite" in formats else formats[0]
        fp32_dir = output / f"fp32-{fmt}"
        result.rows.insert(0, _row(fmt, "fp32", fp32_dir, lambda: convert(
            model, profile, fp32_dir, format=fmt, precision="fp32", eval_path=eval_path), sample, threads))
    result.seconds = time.monotonic() - started
    write_outputs(result)
    return result


def table_lines(result: QatResult) -> list[str]:
    lines = [f"edgeq qat {result.model}: {result.training.get('samples')} training samples, "
             f"{len(result.training.get('loss', []))} epochs in {result.training.get('seconds', 0):.1f} s; "
             f"FP32 top-1 {_pct(result.fp32_top1)}", "",
             "| format | scheme | top-1 | drop vs fp32 | size KiB | host p50 ms | note |",
             "|---|---|---|---|---|---|---|"]
    for row in result.rows:
        drop = None if row.top1 is None or result.fp32_top1 is None else (result.fp32_top1 - row.top1)
        note = row.error or ""
        if row.scheme == "qat" and result.recovered(row.format) is not None:
            note = f"recovers {result.recovered(row.format) * 100:.0f}% of the PTQ loss"
        lines.append(f"| {row.format} | {row.scheme} | {_pct(row.top1)} | "
                     f"{'-' if drop is None else f'{drop * 100:+.2f} pt'} | "
                     f"{'-' if row.size_bytes is None else f'{row.size_bytes / 1024:.1f}'} | "
                     f"{'-' if row.host_p50_ms is None else f'{row.host_p50_ms:.3f}'} | {note} |")
    return lines


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def write_outputs(result: QatResult) -> None:
    output = Path(result.output)
    (output / "qat.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    (output / "qat.md").write_text("\n".join(table_lines(result)) + "\n")
