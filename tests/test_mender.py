"""The Mender hand-off against the real tools: Debian's mender-artifact writes, signs and validates the artifact;
the real Mender client (mender-client 3.4, standalone mode) installs it, commits it and rolls it back, through
the edgeq-release update module.

The client reads its update modules from /usr/share/mender/modules/v3 and its fallback artifact name from
/etc/mender; each test gives it a device of its own by running it in a private mount namespace where both are
bind mounts of the test's directories (nothing of this machine's Mender setup is touched). Skips without the
tools, or without the right to make mount namespaces.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeq.cli import cli
from tests.sshd_fixtures import make_synthetic_artifact

pytestmark = pytest.mark.mender

DEVICE_TYPE = "edgeq-test"
# Runs the client with this test's modules and /etc/mender: sh -c SCRIPT sh MODULES ETC FALLBACK DATA ARGS...
_IN_NAMESPACE = ('mount --bind "$1" /usr/share/mender/modules/v3 && mount --bind "$2" /etc/mender && '
                 'fallback="$3" data="$4" && shift 4 && '
                 'exec mender -c /etc/mender/mender.conf -b "$fallback" -d "$data" --no-syslog "$@"')


@dataclass
class MenderDevice:
    root: Path
    workdir: Path

    def mender(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["unshare", "-m", "sh", "-c", _IN_NAMESPACE, "sh", str(self.root / "modules"),
                               str(self.root / "etc"), str(self.root / "fallback.conf"), str(self.root / "data"),
                               *args], capture_output=True, text=True, timeout=120)

    def install_module(self, module: Path) -> None:
        shutil.copy(module, self.root / "modules" / module.name)

    def current(self) -> str | None:
        link = self.workdir / "current"
        return os.readlink(link).split("/")[-1] if link.is_symlink() else None

    def history(self) -> list[str]:
        path = self.workdir / "releases" / ".history"
        return json.loads(path.read_text()) if path.exists() else []


def _configure(root: Path, verify_key: Path | None = None) -> None:
    config = {"DeviceTypeFile": str(root / "device_type")}
    if verify_key is not None:
        config["ArtifactVerifyKey"] = str(verify_key)
    (root / "etc" / "mender.conf").write_text(json.dumps(config))


@pytest.fixture
def device(tmp_path) -> MenderDevice:
    for tool in ("mender", "mender-artifact", "unshare", "openssl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install mender-client mender-artifact)")
    if not Path("/usr/share/mender/modules/v3").is_dir() or not Path("/etc/mender").is_dir():
        pytest.skip("the mender-client package's directories are missing")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here (needs root): {probe.stderr.strip()}")
    root = tmp_path / "mender-device"
    for sub in ("modules", "etc", "data"):
        (root / sub).mkdir(parents=True)
    (root / "etc" / "artifact_info").write_text("artifact_name=factory-image\n")
    (root / "device_type").write_text(f"device_type={DEVICE_TYPE}\n")
    (root / "fallback.conf").write_text("{}")
    _configure(root)
    return MenderDevice(root, tmp_path / "edgeq-workdir")


def _artifact(path: Path, size: int = 4096) -> Path:
    return make_synthetic_artifact(path, {"model.tflite": os.urandom(size), "extra/labels.txt": b"0\n1\n"})


def _package(artifact: Path, output: Path, workdir: Path, *extra: str):
    result = CliRunner().invoke(cli, ["package", str(artifact), "--mender", "--device-type", DEVICE_TYPE,
                                      "--workdir", str(workdir), "-o", str(output), *extra])
    assert result.exit_code == 0, result.output
    return result


def _keypair(directory: Path, name: str) -> tuple[Path, Path]:
    private, public = directory / f"{name}.pem", directory / f"{name}.pub.pem"
    subprocess.run(["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", str(private)],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "ec", "-in", str(private), "-pubout", "-out", str(public)], check=True,
                   capture_output=True)
    return private, public


def test_the_artifact_validates_and_its_signature_verifies(tmp_path):
    if shutil.which("mender-artifact") is None:
        pytest.skip("mender-artifact is not installed (apt-get install mender-artifact)")
    artifact = _artifact(tmp_path / "a1")
    private, public = _keypair(tmp_path, "signing")
    _, other = _keypair(tmp_path, "other")
    signed = tmp_path / "signed.mender"
    made = _package(artifact, signed, Path("/var/lib/edgeq"), "--key", str(private))
    assert "signed" in made.output and "update module:" in made.output
    unsigned = tmp_path / "unsigned.mender"
    assert "unsigned" in _package(artifact, unsigned, Path("/var/lib/edgeq")).output
    assert subprocess.run(["mender-artifact", "validate", str(unsigned)], capture_output=True).returncode == 0
    assert subprocess.run(["mender-artifact", "validate", "-k", str(public), str(signed)],
                          capture_output=True).returncode == 0
    wrong = subprocess.run(["mender-artifact", "validate", "-k", str(other), str(signed)], capture_output=True,
                           text=True)
    assert wrong.returncode != 0, "a signature checked out against another key"
    read = subprocess.run(["mender-artifact", "read", str(signed)], capture_output=True, text=True, check=True)
    manifest_id = json.loads((artifact / "manifest.json").read_text())["id"]
    assert "edgeq-release" in read.stdout and DEVICE_TYPE in read.stdout and manifest_id in read.stdout
    assert (tmp_path / "edgeq-release").stat().st_mode & 0o111


def test_bad_input_is_one_clear_line(tmp_path):
    artifact = _artifact(tmp_path / "a1")
    runner = CliRunner()
    cases = {
        ("--device-type", DEVICE_TYPE, "-o", str(tmp_path / "x.zip")): "the output must end in .mender",
        ("-o", str(tmp_path / "x.mender")): "needs at least one --device-type",
        ("--device-type", "bad type", "-o", str(tmp_path / "x.mender")): "device type 'bad type' is not a valid",
        ("--device-type", DEVICE_TYPE, "--key", str(tmp_path / "nokey.pem"), "-o", str(tmp_path / "x.mender")):
            "no such signing key file",
        ("--device-type", DEVICE_TYPE, "--workdir", "relative/dir", "-o", str(tmp_path / "x.mender")):
            "must be an absolute device path",
    }
    for args, expected in cases.items():
        result = runner.invoke(cli, ["package", str(artifact), "--mender", *args])
        assert result.exit_code == 1 and expected in result.output and "Traceback" not in result.output, \
            (args, result.output)
    assert not list(tmp_path.glob("*.mender")) and not list(tmp_path.glob(".*.partial"))
    no_format = runner.invoke(cli, ["package", str(artifact), "--device-type", DEVICE_TYPE, "-o",
                                    str(tmp_path / "x.mender")])
    assert no_format.exit_code == 2 and "--mender" in no_format.output


def test_the_real_client_installs_commits_and_rolls_back(device, tmp_path):
    first, second = _artifact(tmp_path / "a1"), _artifact(tmp_path / "a2")
    first_id = json.loads((first / "manifest.json").read_text())["id"]
    second_id = json.loads((second / "manifest.json").read_text())["id"]
    _package(first, tmp_path / "first.mender", device.workdir)
    _package(second, tmp_path / "second.mender", device.workdir)
    device.install_module(tmp_path / "edgeq-release")

    installed = device.mender("install", str(tmp_path / "first.mender"))
    assert installed.returncode == 0, installed.stderr
    assert device.current() == first_id
    committed = device.mender("commit")
    assert committed.returncode == 0, committed.stderr
    shown = device.mender("show-artifact")
    assert shown.stdout.strip() == f"edgeq-tflite-int8-{first_id}"
    release = device.workdir / "releases" / first_id
    assert (release / "model.tflite").read_bytes() == (first / "model.tflite").read_bytes()
    assert (release / "extra" / "labels.txt").read_bytes() == b"0\n1\n"

    assert device.mender("install", str(tmp_path / "second.mender")).returncode == 0
    assert device.current() == second_id and device.history() == [first_id, second_id]
    rolled = device.mender("rollback")
    assert rolled.returncode == 0, rolled.stderr
    assert device.current() == first_id and device.history() == [first_id]
    assert device.mender("show-artifact").stdout.strip() == f"edgeq-tflite-int8-{first_id}"
    assert device.mender("rollback").returncode == 2  # nothing in progress

    assert device.mender("install", str(tmp_path / "second.mender")).returncode == 0
    assert device.mender("commit").returncode == 0
    assert device.current() == second_id and device.history() == [first_id, second_id]


def test_the_client_refuses_an_artifact_not_signed_by_its_key(device, tmp_path):
    first, second = _artifact(tmp_path / "a1"), _artifact(tmp_path / "a2")
    private, public = _keypair(tmp_path, "fleet")
    other, _ = _keypair(tmp_path, "stranger")
    _configure(device.root, verify_key=public)
    _package(first, tmp_path / "first.mender", device.workdir, "--key", str(private))
    _package(second, tmp_path / "unsigned.mender", device.workdir)
    _package(second, tmp_path / "stranger.mender", device.workdir, "--key", str(other))
    device.install_module(tmp_path / "edgeq-release")
    assert device.mender("install", str(tmp_path / "first.mender")).returncode == 0
    assert device.mender("commit").returncode == 0
    first_id = device.current()
    for name, why in (("unsigned.mender", "expecting signed artifact, but no signature file found"),
                      ("stranger.mender", "invalid signature: signer: verification failed")):
        refused = device.mender("install", str(tmp_path / name))
        assert refused.returncode != 0 and why in refused.stderr, (name, refused.stderr[-400:])
        assert device.current() == first_id and device.history() == [first_id], name


def test_a_failed_install_leaves_the_old_release_active(device, tmp_path):
    """A device without room for the new release (a real small tmpfs), and one where an SSH deploy holds
    the lock: ArtifactInstall fails with one line in Mender's log, the client rolls back, the old release
    stays current, nothing half-written is left, and the next install goes through."""
    device.workdir.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(device.workdir)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        small, big = _artifact(tmp_path / "small"), _artifact(tmp_path / "big", size=3 << 20)
        _package(small, tmp_path / "small.mender", device.workdir)
        _package(big, tmp_path / "big.mender", device.workdir)
        device.install_module(tmp_path / "edgeq-release")
        assert device.mender("install", str(tmp_path / "small.mender")).returncode == 0
        assert device.mender("commit").returncode == 0
        small_id = device.current()

        full = device.mender("install", str(tmp_path / "big.mender"))
        assert full.returncode != 0
        assert "edgeq-release ArtifactInstall failed: not enough free space" in full.stderr, full.stderr
        assert device.current() == small_id and device.history() == [small_id]
        assert sorted(p.name for p in (device.workdir / "releases").iterdir()) == [".history", small_id]
        assert device.mender("show-artifact").stdout.strip().endswith(small_id)

        second = _artifact(tmp_path / "second")
        _package(second, tmp_path / "second.mender", device.workdir)
        with open(device.workdir / ".deploy.lock", "a+") as lock:
            lock.write("edgeq deploy on controller pid 1\ndevice pid 1\n")
            lock.flush()
            fcntl.flock(lock, fcntl.LOCK_EX)
            busy = device.mender("install", str(tmp_path / "second.mender"))
        assert busy.returncode != 0 and "deploy lock is held by edgeq deploy on controller" in busy.stderr
        assert device.current() == small_id
        assert device.mender("install", str(tmp_path / "second.mender")).returncode == 0
        assert device.current() != small_id
    finally:
        subprocess.run(["umount", "-l", str(device.workdir)], capture_output=True)
