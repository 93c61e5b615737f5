"""pytest fixtures for tests that need real sshd devices (see tests/lab/sshd.py).

- ``ssh_home``: a temporary HOME (monkeypatched) so tests never read or write the real ``~/.ssh``.
- ``sshd_device`` / ``sshd_fleet``: one / three real sshd processes on loopback (session scoped; their
  keys are NOT trusted by default: use ``trusted_inventory`` or ``trust_device``).
- ``trusted_inventory``: an inventory file for the fleet (targets dev-0..dev-2, group ``fleet``) plus a
  known_hosts in the temporary HOME that trusts them; each test gets fresh workdirs. Returns a
  ``FleetInventory`` (path, devices, workdirs). The device python is this interpreter (``sys.executable``)
  so runtimes installed in the project venv are importable on the "device".
- ``make_synthetic_artifact(dir, files)``: an artifact directory with a correct manifest for arbitrary
  bytes (for deploy tests that do not need a real model).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.lab.sshd import SshdDevice, start_sshd, trust_device, write_inventory


def make_synthetic_artifact(directory: Path, files: dict[str, bytes], model_file: str | None = None) -> Path:
    """An artifact dir holding ``files`` (relative path -> bytes) and a manifest that matches them."""
    from edgeq.manifest import Manifest, SourceInfo, TensorSpec, artifact_id, file_entries, write_manifest

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(data)
    entries = file_entries(directory)
    manifest = Manifest(
        id=artifact_id(entries), format="tflite", precision="int8", model_file=model_file or next(iter(files)),
        files=entries, source=SourceInfo(path="synthetic", sha256="0" * 64, kind="keras"),
        inputs=[TensorSpec(name="x", shape=[1, 4], dtype="float32")],
        outputs=[TensorSpec(name="y", shape=[1, 2], dtype="float32")],
        profile={"name": "x86-avx2"}, tool_versions={"edgeq": "test"},
        created_at="2024-01-01T00:00:00Z", conversion_seconds=0.0,
    )
    write_manifest(directory, manifest)
    return directory


@pytest.fixture
def ssh_home(tmp_path, monkeypatch) -> Path:
    """A fresh HOME with an empty ~/.ssh; edgeq's known_hosts and ssh config are read from here."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)  # never use the developer's agent keys
    monkeypatch.delenv("EDGEQ_INVENTORY", raising=False)
    return home


@pytest.fixture(scope="session")
def sshd_fleet(tmp_path_factory) -> list[SshdDevice]:
    """Three real sshd devices on loopback sharing one client key."""
    root = tmp_path_factory.mktemp("sshd")
    devices = []
    try:
        first = start_sshd(root / "dev-0")
        devices.append(first)
        for index in (1, 2):
            devices.append(start_sshd(root / f"dev-{index}", client_key=first.client_key))
        yield devices
    finally:
        for device in devices:
            device.stop()


@pytest.fixture(scope="session")
def sshd_device(sshd_fleet) -> SshdDevice:
    """One real sshd device (the fleet's first)."""
    return sshd_fleet[0]


@dataclass
class FleetInventory:
    path: Path
    devices: dict[str, SshdDevice]
    workdirs: dict[str, Path]
    home: Path


@pytest.fixture
def trusted_inventory(ssh_home, sshd_fleet, tmp_path) -> FleetInventory:
    """Inventory dev-0..dev-2 + group 'fleet', host keys trusted in the temporary HOME, fresh workdirs."""
    devices = {f"dev-{i}": dev for i, dev in enumerate(sshd_fleet)}
    workdir_root = tmp_path / "devices"
    path = write_inventory(tmp_path / "inventory.yaml", devices, profile="x86-avx2", python=sys.executable,
                           workdir_root=workdir_root, groups={"fleet": list(devices)})
    for device in sshd_fleet:
        trust_device(device, ssh_home / ".ssh" / "known_hosts")
    return FleetInventory(path, devices, {name: workdir_root / name for name in devices}, ssh_home)
