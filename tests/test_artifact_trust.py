"""Nothing an artifact, a manifest or a device sends back runs code on the controller or spoils other results.

Against real parts: real sshd devices on loopback (whose "device python" is a real interpreter wrapped the way
a broken or hostile device would answer), the real runner, real artifacts built from the digits CNN.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from edgeq.bench import bench, bench_fleet
from edgeq.cli import cli
from edgeq.errors import ManifestError
from edgeq.manifest import code_files, verify_artifact
from edgeq.targets import load_inventory, local_target, resolve_targets
from tests.sshd_fixtures import make_synthetic_artifact
from tests.test_bench_support import device_pyz, hand_artifacts, release_dir, run_argv  # noqa: F401 - fixture

QUICK_KW = {"warmup": 1, "runs": 5, "min_seconds": 0, "idle_seconds": 0}


def _marker_module(marker: Path) -> bytes:
    return f"open({str(marker)!r}, 'w').write('ran')\nraise SystemExit('imported from the artifact')\n".encode()


def test_code_files_are_named():
    assert code_files(["model.onnx", "json.py", "numpy/__init__.py", "numpy/core.bin", "x.pth", "a/b.so.1",
                       "model.bin", "__pycache__/x.bin"]) == ["json.py", "numpy/__init__.py", "numpy/core.bin",
                                                               "x.pth", "a/b.so.1", "__pycache__/x.bin"]
    assert code_files(["model.xml", "model.bin", "sub/weights.npz"]) == []


@pytest.mark.sshd
@pytest.mark.parametrize("planted", ["json.py", "numpy/__init__.py"])
def test_an_artifact_holding_code_is_refused_by_deploy_and_bench(planted, trusted_inventory, tmp_path):
    marker = tmp_path / "ran"
    artifact = make_synthetic_artifact(tmp_path / "artifact", {"model.tflite": b"\0" * 64,
                                                               planted: _marker_module(marker)})
    # The manifest lists it with its right hash and the id matches: only the code check stops it.
    with pytest.raises(ManifestError, match="holds code"):
        verify_artifact(artifact)
    for argv in (["deploy", str(artifact), "--target", "dev-0"],
                 ["bench", str(artifact), "--target", "dev-0", "-o", str(tmp_path / "results")]):
        result = CliRunner().invoke(cli, [*argv, "-i", str(trusted_inventory.path)])
        assert result.exit_code == 1, result.output
        assert f"holds code ({planted})" in result.output and "Traceback" not in result.output
    assert not (trusted_inventory.workdirs["dev-0"] / "releases").exists()
    assert not marker.exists()


def test_a_manifest_path_outside_the_artifact_is_refused(tmp_path):
    artifact = make_synthetic_artifact(tmp_path / "artifact", {"model.tflite": b"\0" * 64})
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["files"][0]["path"] = "../model.tflite"
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"files\.0\.path: .*must be relative"):
        verify_artifact(artifact)


@pytest.mark.sshd
def test_the_runner_imports_nothing_from_its_release(hand_artifacts, trusted_inventory, tmp_path):  # noqa: F811
    """Modules planted in a release on the device are never imported by a bench."""
    target = resolve_targets(load_inventory(trusted_inventory.path), "dev-0")[0]
    first = bench(hand_artifacts["onnx"], target, output_dir=tmp_path / "r1", **QUICK_KW).result.to_json_dict()
    assert first["status"] == "ok", first["error"]
    release = trusted_inventory.workdirs["dev-0"] / "releases" / first["artifact"]["id"]
    marker = tmp_path / "ran"
    (release / "json.py").write_bytes(_marker_module(marker))
    (release / "numpy").mkdir()
    (release / "numpy" / "__init__.py").write_bytes(_marker_module(marker))
    again = bench(hand_artifacts["onnx"], target, output_dir=tmp_path / "r2", **QUICK_KW).result.to_json_dict()
    assert again["status"] == "ok", again["error"]
    assert not marker.exists()


def test_a_device_package_started_without_isolation_imports_nothing_beside_it(hand_artifacts, tmp_path):  # noqa: F811
    """Started without -I (by hand, or an older launcher), the zipapp puts only itself on sys.path: modules
    planted beside it in bin/ or in the release are never imported."""
    release = release_dir(hand_artifacts["onnx"], tmp_path)
    pyz = device_pyz(tmp_path / "bin")
    marker = tmp_path / "ran"
    for directory in (release, pyz.parent):
        (directory / "json.py").write_bytes(_marker_module(marker))
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"request_version": 1, "release_dir": str(release), "warmup": 0, "runs": 2,
                                   "min_seconds": 0, "power": {"enabled": False}}))
    proc = subprocess.run(run_argv(pyz, request, tmp_path / "r.json", isolated=False), capture_output=True,
                          text=True, timeout=120, cwd=release)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "ok"
    assert not marker.exists()


def _with_source_hash(artifact: Path, tmp_path: Path, sha256: str) -> Path:
    copy = tmp_path / "artifact"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["source"]["sha256"] = sha256
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_bench_loads_only_the_source_the_artifact_came_from(hand_artifacts, digits, tmp_path, monkeypatch):  # noqa: F811
    """A source whose hash is not the manifest's (retrained, or a crafted manifest naming another model) is
    never loaded: the result says there is no reference, and why."""
    import edgeq.convert.source as source_module

    loaded = []
    real_load = source_module.load_source
    monkeypatch.setattr(source_module, "load_source", lambda path: loaded.append(path) or real_load(path))
    monkeypatch.setenv("EDGEQ_LOCAL_WORKDIR", str(tmp_path / "local"))
    artifact = _with_source_hash(hand_artifacts["onnx"], tmp_path, "f" * 64)
    result = bench(artifact, local_target(), eval_path=digits["eval"], output_dir=tmp_path / "r",
                   **QUICK_KW).result.to_json_dict()
    assert result["status"] == "ok", result["error"]
    accuracy = result["accuracy"]
    assert accuracy["top1"] > 0.7 and accuracy["top1_reference"] is None and accuracy["agreement"] is None
    assert "is not the one this artifact was converted from" in accuracy["reference"]
    assert loaded == []
    # With the right hash the same source is the reference.
    good = bench(hand_artifacts["onnx"], local_target(), eval_path=digits["eval"], output_dir=tmp_path / "r2",
                 **QUICK_KW).result.to_json_dict()
    assert good["accuracy"]["top1_reference"] is not None and len(loaded) == 1


# A device python that runs the real device step, then spoils the bench result the way a broken or hostile device would.
_SPOILER = r"""#!/bin/sh
case " $* " in
  *".pyz bench "*) ;;  # the bench op itself (not the lock op, whose holder text says "edgeq bench")
  *) exec "{python}" "$@";;
esac
params=$(mktemp); cat > "$params"
"{python}" "$@" < "$params"; rc=$?
result=$("{python}" -I -c 'import json,sys; print(json.load(open(sys.argv[1]))["result"])' "$params")
[ -f "$result" ] && "{python}" -I "{spoil}" "$result"
rm -f "$params"
exit $rc
"""
_SPOILS = {
    # NaN where a number belongs (json.dump(allow_nan=True) writes it bare).
    "nan": "import json,sys; p=sys.argv[1]; r=json.load(open(p)); r['load_ms']=float('nan'); "
           "json.dump(r, open(p, 'w'))",
    # An answer far larger than any result (the download is capped).
    "huge": "import sys; open(sys.argv[1], 'a').write(' ' * (40 << 20))",
    # Eval outputs with NaN in them.
    "nan-outputs": "import os,sys,numpy as np; p=os.path.join(os.path.dirname(sys.argv[1]), 'outputs.npz'); "
                   "d=dict(np.load(p)); d['output_0'][3, 0]=np.nan; np.savez(p, **d)",
}


@pytest.mark.sshd
@pytest.mark.parametrize("spoil", list(_SPOILS))
def test_bad_data_from_one_device_fails_that_device_alone(spoil, hand_artifacts, digits, trusted_inventory,  # noqa: F811
                                                         tmp_path):
    spoiler = tmp_path / "spoil.py"
    spoiler.write_text(_SPOILS[spoil])
    wrapper = tmp_path / "spoiling-python"
    wrapper.write_text(_SPOILER.format(python=sys.executable, spoil=spoiler))
    wrapper.chmod(0o755)
    data = yaml.safe_load(trusted_inventory.path.read_text())
    data["targets"]["dev-1"]["python"] = str(wrapper)
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(yaml.safe_dump(data))
    targets = resolve_targets(load_inventory(inventory), "fleet")[:2]
    runs = bench_fleet(hand_artifacts["onnx"], targets, eval_path=digits["eval"], output_dir=tmp_path / "r",
                       **QUICK_KW)
    results = [run.result.to_json_dict() for run in runs]
    assert results[0]["status"] == "ok", results[0]["error"]
    assert results[0]["accuracy"]["top1"] > 0.7
    bad = results[1]
    assert bad["status"] == "failed" and bad["accuracy"] is None
    # Latency was measured before the eval outputs came back; a spoiled result has none.
    assert (bad["latency_ms"] is None) == (spoil != "nan-outputs")
    assert bad["error"].startswith("dev-1 (") and "\n" not in bad["error"]
    assert bad["failure"]["kind"] == ("remote" if spoil == "huge" else "runner")
    expected = {"nan": "not valid JSON (non-finite number NaN)", "huge": "MiB",
                "nan-outputs": "holds NaN or infinite values on 1 of 450 eval samples"}[spoil]
    assert expected in bad["error"]
    # Both results were written as strict JSON; the report reads them.
    for run in runs:
        json.loads(run.path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in a result"))
    report = CliRunner().invoke(cli, ["report", str(tmp_path / "r"), "--markdown", str(tmp_path / "report.md")])
    assert report.exit_code == 3 and "Traceback" not in report.output, report.output

