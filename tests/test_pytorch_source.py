"""PyTorch input: a CNN trained on the digits in the test, saved as ``.pt2`` (torch.export) and TorchScript,
through ONNX and OpenVINO at every precision those formats build on any CPU, run by the real runtimes; and
the files edgeq refuses (state_dicts, pickled modules, pickled payloads) with one line each, running nothing."""

from __future__ import annotations

import contextlib
import json
import pickle
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq.cli import cli
from edgeq.convert import convert
from edgeq.device.runtimes import open_session
from edgeq.manifest import read_manifest
from edgeq.profiles import load_profile

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")

PROFILE = "x86-avx2"
# bf16 is left out: convert refuses it on CPUs without native bf16, so the case would depend on the host.
CASES = [("onnx", "fp32"), ("onnx", "fp16"), ("onnx", "int8"), ("onnx", "dynamic"),
         ("openvino", "fp32"), ("openvino", "fp16"), ("openvino", "int8"), ("openvino", "dynamic")]


@pytest.fixture(scope="module")
def torch_digits(tmp_path_factory):
    from examples.digits.train_torch import train

    root = tmp_path_factory.mktemp("torch-digits")
    info = train(root)
    x = np.load(info["eval"])["x"]
    scripted = torch.jit.trace(info["module"], torch.from_numpy(x[:1]))
    scripted.save(str(root / "digits.pt"))
    torch.save(info["module"].state_dict(), root / "state.pt")
    torch.save(info["module"], root / "module.pt")
    torch.save(info["module"].state_dict(), root / "weights.pth")
    torch.save(info["module"].state_dict(), root / "legacy.pt", _use_new_zipfile_serialization=False)
    info["torchscript"] = root / "digits.pt"
    return info


@pytest.mark.parametrize(("fmt", "precision"), CASES)
def test_pt2_through_every_format_and_precision(torch_digits, tmp_path, fmt, precision):
    assert torch_digits["accuracy"] > 0.9
    manifest = convert(torch_digits["model"], load_profile(PROFILE), tmp_path / "out", format=fmt,
                       precision=precision, calibration=torch_digits["calib"] if precision == "int8" else None,
                       eval_path=torch_digits["eval"], max_accuracy_drop=0.03)
    assert manifest.status == "ok" and manifest.source.kind == "pytorch"
    assert manifest.tool_versions["torch"].startswith("2.13.0")
    assert manifest.validation.top1_drop <= 0.03 and manifest.validation.cosine_similarity > 0.99
    assert manifest.validation.top1_reference == pytest.approx(torch_digits["accuracy"])  # FP32 ran in torch
    if fmt == "onnx":
        assert manifest.options["exported_by"] == "torch.onnx.export (dynamo)"
        assert manifest.inputs[0].shape == [None, 1, 8, 8]  # the exported program's free batch, kept
    else:
        assert manifest.inputs[0].shape == [1, 1, 8, 8]  # OpenVINO: the free batch frozen to 1
    # The artifact runs in its runtime and agrees with the PyTorch module it came from.
    data = np.load(torch_digits["eval"])
    session = open_session(tmp_path / "out" / manifest.model_file, fmt, precision=precision)
    got = session.run({session.inputs[0]["name"]: data["x"][:1]})[0]
    with torch.no_grad():
        want = torch_digits["module"](torch.from_numpy(data["x"][:1])).numpy()
    assert int(np.argmax(got)) == int(np.argmax(want))


def test_torchscript_needs_input_shapes_then_converts(torch_digits, tmp_path):
    base = ["convert", str(torch_digits["torchscript"]), "--profile", PROFILE, "--eval", str(torch_digits["eval"])]
    missing = CliRunner().invoke(cli, [*base, "--format", "onnx", "--precision", "fp32", "-o", str(tmp_path / "a")])
    assert missing.exit_code == 1 and "Traceback" not in missing.output
    assert "a TorchScript file records no input shapes: give --input-shape for input 'input'" in missing.output
    assert not (tmp_path / "a").exists()
    for fmt, precision in (("onnx", "int8"), ("openvino", "int8")):
        out = tmp_path / f"{fmt}-{precision}"
        result = CliRunner().invoke(cli, [*base, "--format", fmt, "--precision", precision, "--calibration",
                                          str(torch_digits["calib"]), "--input-shape", "1x1x8x8", "-o", str(out)])
        assert result.exit_code == 0, result.output
        manifest = read_manifest(out)
        assert manifest.source.kind == "torchscript" and manifest.validation.top1_drop <= 0.03
        assert manifest.options["input_shapes"] == {"input": [1, 1, 8, 8]}


def _pt2_with(tmp_path, source, name, edit):
    """A copy of the .pt2 at ``source`` with its members rewritten by ``edit(name, bytes) -> bytes``."""
    target = tmp_path / name
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, edit(info.filename, src.read(info.filename)))
    return target


class _RunsCode:
    """Unpickling this creates ``marker``: what a hostile payload would do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_refused_files_run_nothing(torch_digits, tmp_path):
    marker = tmp_path / "ran"
    hostile = pickle.dumps(_RunsCode(marker))

    def pickled_weight(name, data):
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            next(iter(config["config"].values()))["use_pickle"] = True
            return json.dumps(config).encode()
        return hostile if name.endswith("/weights/weight_0") else data

    def hostile_sample_inputs(name, data):
        return hostile if "/sample_inputs/" in name else data

    root = torch_digits["model"].parent
    cases = [
        (root / "state.pt", "refused: a PyTorch state_dict or pickled module (torch.save) needs the model's class "
                            "code to load, and unpickling it runs code"),
        (root / "module.pt", "refused: a PyTorch state_dict or pickled module"),
        (root / "weights.pth", "refused: a PyTorch state_dict or pickled module"),
        (root / "legacy.pt", "refused: a PyTorch state_dict or pickled module"),
        (_pt2_with(tmp_path, torch_digits["model"], "pickled.pt2", pickled_weight),
         "refused: payload '0.weight' is pickled, and unpickling runs code"),
    ]
    not_zip = tmp_path / "text.pt2"
    not_zip.write_text("not a model")
    cases.append((not_zip, "not a .pt2 archive"))
    for path, message in cases:
        result = CliRunner().invoke(cli, ["convert", str(path), "--profile", PROFILE, "--format", "onnx",
                                          "--precision", "fp32", "-o", str(tmp_path / "out")])
        assert result.exit_code == 1 and "Traceback" not in result.output, (path, result.output)
        (line,) = [line for line in result.output.splitlines() if line.startswith("error: ")]
        assert message in line, line
    # Sample inputs are read by torch itself: forced weights_only, the hostile pickle fails instead of running.
    sample = _pt2_with(tmp_path, torch_digits["model"], "sample.pt2", hostile_sample_inputs)
    result = CliRunner().invoke(cli, ["convert", str(sample), "--profile", PROFILE, "--format", "onnx",
                                      "--precision", "fp32", "-o", str(tmp_path / "sample-out")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "cannot load the exported program (Weights only load failed" in result.output
    assert not marker.exists() and not (tmp_path / "out").exists()
    # The file is really hostile: torch's own loader, unguarded, runs the payload (here: creates the marker).
    with contextlib.suppress(Exception):  # what torch does after running it does not matter here
        torch.export.load(str(sample))
    assert marker.exists()


def test_tflite_from_pytorch_is_refused(torch_digits, tmp_path):
    result = CliRunner().invoke(cli, ["convert", str(torch_digits["model"]), "--profile", PROFILE, "--format",
                                      "tflite", "--precision", "fp32", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "tflite fp32 cannot be built from a pytorch model" in result.output
    assert "onnx/int8" in result.output  # the hint: what can be built from it
