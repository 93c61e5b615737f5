"""The layers hold (import-linter), the device package keeps its Python floor (vermin), its zipapp is
reproducible, and its protocol answers in one JSON line whatever it is given."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgeq.remote import device as remote_device

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_import_contracts_are_kept():
    proc = subprocess.run([str(BIN / "lint-imports")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_device_package_runs_on_python_3_8():
    proc = subprocess.run([str(BIN / "vermin"), "-t=3.8-", "--no-tips", "--violations", "--eval-annotations",
                           "edgeq/device"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_zipapp_is_reproducible_and_named_by_its_hash(tmp_path, monkeypatch):
    first = remote_device.device_package()
    remote_device.device_package.cache_clear()
    # Same sources, later mtimes: the same bytes.
    for path in remote_device.DEVICE_SOURCE.rglob("*.py"):
        path.touch()
    again = remote_device.device_package()
    assert again.data == first.data and again.name == f"edgeq-device-{first.sha256[:12]}.pyz"
    assert again.data.startswith(b"#!/usr/bin/env python3\n")
    # A changed source: another package, another name.
    copy = tmp_path / "device"
    subprocess.run(["cp", "-r", str(remote_device.DEVICE_SOURCE), str(copy)], check=True)
    (copy / "ops" / "runs.py").write_text((copy / "ops" / "runs.py").read_text() + "\n# changed\n")
    monkeypatch.setattr(remote_device, "DEVICE_SOURCE", copy)
    remote_device.device_package.cache_clear()
    try:
        assert remote_device.device_package().sha256 != first.sha256
    finally:
        monkeypatch.undo()
        remote_device.device_package.cache_clear()


@pytest.fixture(scope="module")
def pyz(tmp_path_factory) -> Path:
    package = remote_device.device_package()
    path = tmp_path_factory.mktemp("bin") / package.name
    path.write_bytes(package.data)
    return path


def _op(pyz: Path, *args: str, stdin: str = "{}") -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-I", "-S", str(pyz), *args], input=stdin, capture_output=True,
                          text=True, timeout=60)
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout + proc.stderr  # one JSON line, always
    return proc.returncode, json.loads(lines[0])


def test_selfcheck_names_the_archive_hash(pyz):
    package = remote_device.device_package()
    code, answer = _op(pyz, "selfcheck", stdin=json.dumps({"sha256": package.sha256}))
    assert code == 0 and answer["ok"] and answer["sha256"] == package.sha256
    code, answer = _op(pyz, "selfcheck", stdin=json.dumps({"sha256": "0" * 64}))
    assert code == 0 and not answer["ok"] and answer["sha256"] == package.sha256


def test_bad_requests_get_one_line_errors(pyz, tmp_path):
    code, answer = _op(pyz, "frobnicate")
    assert code == 2 and answer["error"] == "usage" and "unknown operation 'frobnicate'" in answer["message"]
    code, answer = _op(pyz, "inspect", stdin="{not json")
    assert code == 2 and answer["error"] == "usage" and "not JSON" in answer["message"]
    code, answer = _op(pyz, "inspect", stdin="{}")
    assert code == 4 and answer["error"] == "internal" and "KeyError" in answer["message"]
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, answer = _op(pyz, "prepare", stdin=json.dumps({"workdir": str(blocker / "w"), "tmp_name": ".tmp-x",
                                                          "need_bytes": 1}))
    assert code == 3 and answer["error"] == "os" and str(blocker) in answer["message"]


def test_short_ops_do_not_import_numpy(pyz, tmp_path):
    """-S (no site-packages) for the release ops: they need the stdlib only."""
    code, answer = _op(pyz, "inspect", stdin=json.dumps({"workdir": str(tmp_path)}))
    assert code == 0 and answer["current"] is None and answer["releases"] == []
