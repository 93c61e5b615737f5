"""Deploy, re-deploy, rollback and the failure cases, against real sshd devices on loopback."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeq.cli import cli
from edgeq.deploy import deploy, deploy_fleet, rollback
from edgeq.remote.device import device_package
from edgeq.targets import load_inventory, resolve_targets
from tests.sshd_fixtures import make_synthetic_artifact

pytestmark = pytest.mark.sshd


@pytest.fixture
def artifact(tmp_path) -> Path:
    return make_synthetic_artifact(tmp_path / "art", {"model.tflite": os.urandom(4096),
                                                      "extra/labels.txt": b"0\n1\n"})


@pytest.fixture
def artifact2(tmp_path) -> Path:
    return make_synthetic_artifact(tmp_path / "art2", {"model.tflite": os.urandom(4096)})


def target(inv, name="dev-0"):
    return resolve_targets(load_inventory(inv.path), name)[0]


def current_of(workdir: Path) -> str | None:
    link = workdir / "current"
    return os.readlink(link).split("/")[-1] if link.is_symlink() else None


def mtimes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in directory.rglob("*")}


@contextlib.contextmanager
def tmpfs_at(directory: Path, size: str):
    """``directory`` as a tmpfs of ``size`` for the block (a small disk that fills); skips without mount rights."""
    directory.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def test_first_deploy_redeploy_and_rollback(trusted_inventory, artifact, artifact2):
    t = target(trusted_inventory)
    workdir = trusted_inventory.workdirs["dev-0"]
    first = deploy(artifact, t)
    assert first.status == "deployed", first.error
    release = workdir / "releases" / first.release_id
    assert current_of(workdir) == first.release_id
    assert (release / "model.tflite").read_bytes() == (artifact / "model.tflite").read_bytes()
    assert (release / "extra" / "labels.txt").read_bytes() == b"0\n1\n"
    assert (release / "manifest.json").read_bytes() == (artifact / "manifest.json").read_bytes()
    # Releases hold the artifact's files only; the device package is in bin/, once per version.
    assert {p.relative_to(release).as_posix() for p in release.rglob("*") if p.is_file()} == \
        {"model.tflite", "extra/labels.txt", "manifest.json"}
    package = device_package()
    assert [p.name for p in (workdir / "bin").iterdir()] == [package.name]
    assert (workdir / "bin" / package.name).read_bytes() == package.data

    before = mtimes(release)
    time.sleep(0.01)
    again = deploy(artifact, t)
    assert again.status == "unchanged" and again.uploaded_bytes == 0
    assert "nothing uploaded" in again.message
    assert mtimes(release) == before

    second = deploy(artifact2, t)
    assert second.status == "deployed" and current_of(workdir) == second.release_id

    back = rollback(t)
    assert (back.from_id, back.to_id) == (second.release_id, first.release_id)
    assert current_of(workdir) == first.release_id
    # Re-deploying the newer artifact re-activates its release without uploading.
    forward = deploy(artifact2, t)
    assert forward.status == "deployed" and forward.uploaded_bytes == 0
    assert current_of(workdir) == second.release_id


def history_of(workdir: Path) -> list[str]:
    import json

    path = workdir / "releases" / ".history"
    return json.loads(path.read_text()) if path.exists() else []


def test_deploy_without_activate_stores_a_verified_release_but_leaves_current(trusted_inventory, artifact, artifact2,
                                                                              tmp_path):
    t = target(trusted_inventory)
    workdir = trusted_inventory.workdirs["dev-0"]
    first = deploy(artifact, t)
    assert first.status == "deployed", first.error

    stored = deploy(artifact2, t, activate=False)
    assert stored.status == "deployed", stored.error
    assert stored.uploaded_bytes > 0 and "not activated" in stored.message
    release = workdir / "releases" / stored.release_id
    assert (release / "model.tflite").read_bytes() == (artifact2 / "model.tflite").read_bytes()
    assert current_of(workdir) == first.release_id
    assert history_of(workdir) == [first.release_id]

    before = mtimes(release)
    again = deploy(artifact2, t, activate=False)
    assert again.status == "unchanged" and again.uploaded_bytes == 0, again.message
    assert mtimes(release) == before
    assert current_of(workdir) == first.release_id

    third_art = make_synthetic_artifact(tmp_path / "a3", {"model.tflite": os.urandom(512)})
    # keep=1: pruning keeps the current release and the one just stored (an older stored-only one goes).
    stored_again = deploy(third_art, t, keep=1, activate=False)
    assert stored_again.status == "deployed", stored_again.error
    remaining = {p.name for p in (workdir / "releases").iterdir() if not p.name.startswith(".")}
    assert {first.release_id, stored_again.release_id} <= remaining
    assert current_of(workdir) == first.release_id

    activated = deploy(third_art, t)
    assert activated.status == "deployed" and activated.uploaded_bytes == 0
    assert current_of(workdir) == activated.release_id
    assert history_of(workdir) == [first.release_id, activated.release_id]


def test_half_present_release_is_not_counted_and_changed_manifest_is_refreshed(trusted_inventory, artifact):
    t = target(trusted_inventory)
    workdir = trusted_inventory.workdirs["dev-0"]
    first = deploy(artifact, t)
    release = workdir / "releases" / first.release_id
    (release / "model.tflite").unlink()
    repaired = deploy(artifact, t)
    assert repaired.status == "deployed" and repaired.uploaded_bytes > 0
    assert (release / "model.tflite").read_bytes() == (artifact / "model.tflite").read_bytes()

    # A different manifest on the device (damaged since): only that file is replaced.
    (release / "manifest.json").write_text("{}\n")
    model_mtime = (release / "model.tflite").stat().st_mtime_ns
    refreshed = deploy(artifact, t)
    assert refreshed.status == "deployed" and "manifest.json" in refreshed.message
    assert refreshed.uploaded_bytes == (artifact / "manifest.json").stat().st_size
    assert (release / "manifest.json").read_bytes() == (artifact / "manifest.json").read_bytes()
    assert (release / "model.tflite").stat().st_mtime_ns == model_mtime


def test_keep_prunes_old_releases_but_never_current_or_previous(trusted_inventory, tmp_path):
    t = target(trusted_inventory)
    workdir = trusted_inventory.workdirs["dev-0"]
    ids = []
    for index in range(4):
        art = make_synthetic_artifact(tmp_path / f"a{index}", {"model.tflite": os.urandom(64)})
        outcome = deploy(art, t, keep=2)
        assert outcome.status == "deployed", outcome.error
        ids.append(outcome.release_id)
    remaining = sorted(p.name for p in (workdir / "releases").iterdir() if not p.name.startswith("."))
    assert remaining == sorted(ids[-2:])
    assert rollback(t).to_id == ids[-2]
    # keep=1 still keeps the previous release so a rollback always has somewhere to go
    art = make_synthetic_artifact(tmp_path / "a5", {"model.tflite": os.urandom(64)})
    newest = deploy(art, t, keep=1)
    remaining = {p.name for p in (workdir / "releases").iterdir() if not p.name.startswith(".")}
    assert newest.release_id in remaining and ids[-2] in remaining


def test_unknown_host_key_is_refused_until_trusted(ssh_home, sshd_device, tmp_path, artifact):
    from tests.lab.sshd import write_inventory

    inv = write_inventory(tmp_path / "inv.yaml", {"fresh": sshd_device}, workdir_root=tmp_path / "wd")
    runner = CliRunner()
    result = runner.invoke(cli, ["deploy", str(artifact), "--target", "fresh", "-i", str(inv)])
    assert result.exit_code == 1
    assert "host key is not trusted" in result.output and "edgeq targets trust fresh" in result.output
    assert not (tmp_path / "wd" / "fresh").exists()  # nothing was done on the device

    trusted = runner.invoke(cli, ["targets", "trust", "fresh", "-i", str(inv)])
    assert trusted.exit_code == 0, trusted.output
    assert "SHA256:" in trusted.output
    line = (ssh_home / ".ssh" / "known_hosts").read_text().strip()
    assert line == sshd_device.known_hosts_line()
    # the same entry works for OpenSSH's own client
    probe = subprocess.run(["ssh", "-o", f"UserKnownHostsFile={ssh_home / '.ssh' / 'known_hosts'}",
                            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-i",
                            str(sshd_device.client_key), "-p", str(sshd_device.port),
                            f"{sshd_device.user}@{sshd_device.host}", "true"], capture_output=True, timeout=30)
    assert probe.returncode == 0, probe.stderr
    assert "already in" in runner.invoke(cli, ["targets", "trust", "fresh", "-i", str(inv)]).output


def test_changed_host_key_is_refused(ssh_home, sshd_device, tmp_path, artifact):
    from tests.lab.sshd import generate_key, write_inventory

    other = generate_key(tmp_path / "other_host_key")
    fake_line = f"[{sshd_device.host}]:{sshd_device.port} " + " ".join(
        other.with_suffix(".pub").read_text().split()[:2])
    (ssh_home / ".ssh" / "known_hosts").write_text(fake_line + "\n")
    inv = write_inventory(tmp_path / "inv.yaml", {"moved": sshd_device}, workdir_root=tmp_path / "wd")
    runner = CliRunner()
    result = runner.invoke(cli, ["deploy", str(artifact), "--target", "moved", "-i", str(inv)])
    assert result.exit_code == 1
    assert "host key has CHANGED" in result.output
    assert f"ssh-keygen -R '[{sshd_device.host}]:{sshd_device.port}'" in result.output
    assert not (tmp_path / "wd").exists()
    refused = runner.invoke(cli, ["targets", "trust", "moved", "-i", str(inv)])
    assert refused.exit_code == 1 and "not overwriting" in refused.output
    assert (ssh_home / ".ssh" / "known_hosts").read_text() == fake_line + "\n"


def test_key_of_another_type_is_refused(ssh_home, sshd_device, tmp_path, artifact):
    """known_hosts holds only an ecdsa key for the device, which now offers only ed25519: trust refuses to
    add it silently and connecting says which type is missing (OpenSSH warns loudly here too)."""
    from tests.lab.sshd import generate_key, write_inventory

    other = generate_key(tmp_path / "other_ecdsa_key", key_type="ecdsa")
    hk = f"[{sshd_device.host}]:{sshd_device.port}"
    ecdsa_line = f"{hk} " + " ".join(other.with_suffix(".pub").read_text().split()[:2])
    known_hosts = ssh_home / ".ssh" / "known_hosts"
    known_hosts.write_text(ecdsa_line + "\n")
    inv = write_inventory(tmp_path / "inv.yaml", {"rekeyed": sshd_device}, workdir_root=tmp_path / "wd")
    runner = CliRunner()
    refused = runner.invoke(cli, ["targets", "trust", "rekeyed", "-i", str(inv)])
    assert refused.exit_code == 1
    assert f"known_hosts has a ecdsa-sha2-nistp256 key for {hk}, but the device now offers only ssh-ed25519 " \
           "(SHA256:" in refused.output and "refusing" in refused.output
    assert f"ssh-keygen -R '{hk}'" in refused.output
    assert known_hosts.read_text() == ecdsa_line + "\n"

    result = runner.invoke(cli, ["deploy", str(artifact), "--target", "rekeyed", "-i", str(inv)])
    assert result.exit_code == 1
    assert f"known_hosts has no key of the offered type ssh-ed25519 for {hk}, only ecdsa-sha2-nistp256" \
        in result.output
    assert "no entry" not in result.output and f"ssh-keygen -R '{hk}'" in result.output
    assert not (tmp_path / "wd").exists()


def test_fleet_with_one_unreachable_device(trusted_inventory, artifact, tmp_path):
    import yaml

    from tests.lab.sshd import free_port

    data = yaml.safe_load(trusted_inventory.path.read_text())
    data["targets"]["dead"] = {**data["targets"]["dev-0"], "port": free_port(),
                               "workdir": str(tmp_path / "dead")}
    data["groups"]["fleet"] = ["dev-0", "dead", "dev-1", "dev-2"]
    trusted_inventory.path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(cli, ["deploy", str(artifact), "--target", "fleet", "-i",
                                      str(trusted_inventory.path), "--parallel", "4"])
    assert result.exit_code == 1
    assert "connection refused" in result.output and "dead" in result.output
    for name in ("dev-0", "dev-1", "dev-2"):
        assert current_of(trusted_inventory.workdirs[name]) is not None
    table_rows = [line for line in result.output.splitlines() if "dead" in line and "failed" in line]
    assert table_rows, result.output


def test_canary_failure_stops_the_rest(trusted_inventory, artifact):
    inv = load_inventory(trusted_inventory.path)
    broken = inv.targets["dev-0"].model_copy(update={"python": "/nonexistent/python"})
    targets = [broken, inv.targets["dev-1"], inv.targets["dev-2"]]
    outcomes = deploy_fleet(artifact, targets, canary=1)
    assert [o.status for o in outcomes] == ["failed", "skipped", "skipped"]
    assert "canary" in outcomes[1].error
    outcomes = deploy_fleet(artifact, targets, parallel=1, max_fail_percent=40)
    assert [o.status for o in outcomes] == ["failed", "skipped", "skipped"]
    outcomes = deploy_fleet(artifact, targets, parallel=1, max_fail_percent=50)
    assert [o.status for o in outcomes] == ["failed", "skipped", "skipped"]  # 1 of 1 failed = 100%
    outcomes = deploy_fleet(artifact, targets, parallel=3, max_fail_percent=50)
    assert [o.status for o in outcomes] == ["failed", "deployed", "deployed"]


def test_concurrent_deploys_to_one_device(trusted_inventory, tmp_path):
    t = target(trusted_inventory)
    workdir = trusted_inventory.workdirs["dev-0"]
    big = make_synthetic_artifact(tmp_path / "big", {"model.tflite": os.urandom(3 * 1024 * 1024)})
    small = make_synthetic_artifact(tmp_path / "small", {"model.tflite": os.urandom(100)})
    uploading, release = threading.Event(), threading.Event()

    def hold(done, total):
        uploading.set()
        release.wait(30)

    results = {}
    worker = threading.Thread(target=lambda: results.setdefault("first", deploy(big, t, progress=hold)))
    worker.start()
    assert uploading.wait(30)
    started = time.monotonic()
    second = deploy(small, t)
    assert time.monotonic() - started < 15
    release.set()
    worker.join(60)
    assert second.status == "failed"
    assert "another deploy is in progress" in second.error and "dev-0" in second.error
    assert results["first"].status == "deployed", results["first"].error
    assert current_of(workdir) == results["first"].release_id
    assert deploy(small, t).status == "deployed"


def test_connection_killed_mid_transfer(trusted_inventory, tmp_path, artifact):
    t = target(trusted_inventory)
    device = trusted_inventory.devices["dev-0"]
    workdir = trusted_inventory.workdirs["dev-0"]
    assert deploy(artifact, t).status == "deployed"
    before = current_of(workdir)
    big = make_synthetic_artifact(tmp_path / "big", {"model.tflite": os.urandom(8 * 1024 * 1024)})
    killed = []

    def kill_once(done, total):
        if not killed and done > 1024 * 1024:
            killed.append(device.kill_sessions())

    outcome = deploy(big, t, progress=kill_once)
    assert killed and killed[0] >= 1
    assert outcome.status == "failed"
    assert "dev-0" in outcome.error and "connection" in outcome.error
    assert current_of(workdir) == before
    assert any(p.name.startswith(".tmp-") for p in (workdir / "releases").iterdir())  # left behind...
    retry = deploy(big, t)
    assert retry.status == "deployed", retry.error
    assert current_of(workdir) == retry.release_id
    assert not any(p.name.startswith(".tmp-") for p in (workdir / "releases").iterdir())  # ...and cleaned


def test_disk_full_keeps_previous_release(trusted_inventory, tmp_path, artifact):
    t = target(trusted_inventory)
    workdir = trusted_inventory.workdirs["dev-0"]
    with tmpfs_at(workdir, "2m"):
        first = deploy(artifact, t)
        assert first.status == "deployed", first.error
        big = make_synthetic_artifact(tmp_path / "big", {"model.tflite": os.urandom(3 * 1024 * 1024)})
        result = CliRunner().invoke(cli, ["deploy", str(big), "--target", "dev-0", "-i",
                                          str(trusted_inventory.path)])
        assert result.exit_code == 1
        assert "not enough free space" in result.output and "dev-0" in result.output
        assert current_of(workdir) == first.release_id
        release = workdir / "releases" / first.release_id
        assert (release / "model.tflite").read_bytes() == (artifact / "model.tflite").read_bytes()

        # Space check passed, but the disk fills during the upload: the write error is reported and
        # the partial upload removed right away.
        filler = workdir / "filler"
        mid = make_synthetic_artifact(tmp_path / "mid", {"model.tflite": os.urandom(400 * 1024)})

        def fill_disk(done, total):
            if not filler.exists():
                subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)

        outcome = deploy(mid, t, progress=fill_disk)
        assert outcome.status == "failed"
        assert "dev-0" in outcome.error
        assert current_of(workdir) == first.release_id
        assert not any(p.name.startswith(".tmp-") for p in (workdir / "releases").iterdir())


def test_corrupted_upload_is_not_activated(trusted_inventory, artifact, artifact2):
    t = target(trusted_inventory)
    workdir = trusted_inventory.workdirs["dev-0"]
    first = deploy(artifact, t)
    assert first.status == "deployed"

    def corrupt(transport, tmp_dir):
        path = Path(tmp_dir) / "model.tflite"  # the "device" is this machine: flip one byte in place
        data = bytearray(path.read_bytes())
        data[100] ^= 0xFF
        path.write_bytes(bytes(data))

    outcome = deploy(artifact2, t, _after_upload=corrupt)
    assert outcome.status == "failed"
    assert "checksum verification on the device failed" in outcome.error
    assert "model.tflite (sha256 mismatch)" in outcome.error
    assert current_of(workdir) == first.release_id
    assert not (workdir / "releases" / outcome.release_id).exists()
    assert deploy(artifact2, t).status == "deployed"


def test_fresh_upload_is_hashed_once(tmp_path, monkeypatch, capsys):
    """The device op verifies a fresh upload once (in its temp dir) and renames it into place without hashing
    it again; a release that was already there (refreshed files) is still checked whole after the swap."""
    import hashlib

    from edgeq.device.ops import releases

    hashed: list[str] = []
    real_sha256 = releases.sha256
    monkeypatch.setattr(releases, "sha256", lambda path: hashed.append(path) or real_sha256(path))
    workdir = tmp_path / "w"
    files = {"model.tflite": os.urandom(2048), "manifest.json": b"{}", "labels.txt": b"0\n1\n"}
    expected = {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}

    def upload(name: str, only: list[str]) -> str:
        tmp = workdir / "releases" / name
        tmp.mkdir(parents=True)
        for rel in only:
            (tmp / rel).write_bytes(files[rel])
        return str(tmp)

    def activate(**params) -> dict:
        return releases.op_activate({"workdir": str(workdir), "release_id": "r1", "expected": expected, **params})

    assert activate(tmp=upload(".tmp-r1-a", list(files)), replace=None)["ok"]
    assert sorted(hashed) == sorted(str(workdir / "releases" / ".tmp-r1-a" / rel) for rel in files)
    assert os.readlink(workdir / "current") == "releases/r1"

    hashed.clear()
    answer = activate(tmp=upload(".tmp-r1-b", ["labels.txt"]), replace=["labels.txt"],
                      tmp_expected={"labels.txt": expected["labels.txt"]})
    assert answer["ok"] and len(hashed) == 1 + len(files)

    (workdir / "releases" / "r1" / "model.tflite").write_bytes(b"rotted")  # bad storage, between deploys
    hashed.clear()
    answer = activate(tmp=upload(".tmp-r1-c", ["manifest.json"]), replace=["manifest.json"],
                      tmp_expected={"manifest.json": expected["manifest.json"]})
    assert not answer["ok"] and answer["problems"] == [{"path": "model.tflite", "problem": "sha256 mismatch"}]


def test_shell_metacharacters_run_nothing(ssh_home, sshd_device, tmp_path):
    import yaml

    from tests.lab.sshd import trust_device

    trust_device(sshd_device)
    marker = tmp_path / "pwned"
    evil = f"x; touch {marker}; $(touch {marker}) `touch {marker}` 'q\" a"
    workdir = tmp_path / f"work dir {evil}"
    art = make_synthetic_artifact(tmp_path / f"art {evil}", {f"model {evil}.tflite": os.urandom(256)},
                                  model_file=f"model {evil}.tflite")
    inv = tmp_path / "inv.yaml"
    # Target names may not hold '/' (they become file names), so the name gets the path-free part.
    evil_name = "t x; touch pwned; $(touch pwned) `touch pwned` 'q\" a"
    inv.write_text(yaml.safe_dump({"targets": {evil_name: {
        "host": sshd_device.host, "port": sshd_device.port, "user": sshd_device.user,
        "key": str(sshd_device.client_key), "profile": "x86-avx2", "workdir": str(workdir),
        "python": "python3"}}}))
    t = resolve_targets(load_inventory(inv), evil_name)[0]
    outcome = deploy(art, t)
    assert outcome.status == "deployed", outcome.error
    release = workdir / "releases" / outcome.release_id
    assert (release / f"model {evil}.tflite").is_file()
    assert rollback_free(t)
    assert not marker.exists()
    assert not list(tmp_path.glob("pwned*"))


def rollback_free(t) -> bool:
    """Rollback with a single release fails cleanly (and runs nothing) rather than executing names."""
    from edgeq.errors import DeployError

    with pytest.raises(DeployError, match="no previous release"):
        rollback(t)
    return True


def test_newline_in_names_is_rejected(tmp_path):
    from edgeq.errors import InventoryError

    inv = tmp_path / "inv.yaml"
    inv.write_text('targets:\n  a: {host: h, profile: x86-avx2, workdir: "w\\nrm -rf /"}\n')
    with pytest.raises(InventoryError, match="workdir"):
        load_inventory(inv)


def test_local_target_deploy(tmp_path, monkeypatch, artifact):
    monkeypatch.setenv("EDGEQ_LOCAL_WORKDIR", str(tmp_path / "local"))
    result = CliRunner().invoke(cli, ["deploy", str(artifact), "--target", "local"])
    assert result.exit_code == 0, result.output
    assert "deployed" in result.output
    assert current_of(tmp_path / "local") is not None
    again = CliRunner().invoke(cli, ["deploy", str(artifact), "--target", "local"])
    assert again.exit_code == 0 and "unchanged" in again.output


def test_bad_artifact_is_refused_before_connecting(tmp_path, artifact):
    (artifact / "model.tflite").write_bytes(b"changed")
    result = CliRunner().invoke(cli, ["deploy", str(artifact), "--target", "local"])
    assert result.exit_code == 1
    assert "does not match its manifest" in result.output
    missing = CliRunner().invoke(cli, ["deploy", str(tmp_path / "nope"), "--target", "local"])
    assert missing.exit_code == 1 and "not an artifact directory" in missing.output


def test_killed_single_file_writes_are_cleaned_by_the_next_deploy(trusted_inventory, artifact, artifact2):
    """A process killed between writing <name>.tmp-<pid> and renaming it (history, the current and venv links,
    the interpreter record) leaves that temp behind; the next deploy removes it under the lock."""
    t = target(trusted_inventory)
    workdir = trusted_inventory.workdirs["dev-0"]
    assert deploy(artifact, t).status == "deployed"
    stale = [workdir / "releases" / ".history.tmp-99999", workdir / "python.tmp-99999"]
    for path in stale:
        path.write_text("half")
    os.symlink("releases/nowhere", workdir / ".current.tmp-99998")
    os.symlink("venv-old", workdir / ".venv.tmp-99998")
    stale += [workdir / ".current.tmp-99998", workdir / ".venv.tmp-99998"]
    second = deploy(artifact2, t)
    assert second.status == "deployed", second.error
    assert not [p for p in stale if os.path.lexists(p)]
    assert current_of(workdir) == second.release_id and history_of(workdir)[-1] == second.release_id


def test_a_verified_release_is_on_disk_before_it_is_activated(tmp_path, monkeypatch):
    """Every verified file is fsynced while still in its upload directory, then the directories, so a power
    cut after 'deployed' cannot leave ``current`` pointing at files still in the page cache. (The seam: os.fsync
    is recorded; a real power cut cannot be made here.)"""
    import hashlib

    from edgeq.device.ops import releases

    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(releases.os, "fsync", recording_fsync)
    workdir = tmp_path / "w"
    files = {"model.tflite": os.urandom(2048), "manifest.json": b"{}", "extra/labels.txt": b"0\n"}
    upload = workdir / "releases" / ".tmp-r1-a"
    for rel, data in files.items():
        (upload / rel).parent.mkdir(parents=True, exist_ok=True)
        (upload / rel).write_bytes(data)
    answer = releases.op_activate({"workdir": str(workdir), "release_id": "r1", "tmp": str(upload), "replace": None,
                                   "expected": {rel: hashlib.sha256(d).hexdigest() for rel, d in files.items()}})
    assert answer["ok"]
    for rel in files:  # each file synced at its upload path, i.e. before the rename into releases/r1
        assert str(upload / rel) in synced, synced
    assert str(upload / "extra") in synced and str(workdir / "releases") in synced and str(workdir) in synced
    assert synced.index(str(upload / "model.tflite")) < synced.index(str(workdir))  # data before the link swap


def test_a_device_full_of_kept_releases_takes_a_new_one(trusted_inventory, tmp_path):
    """Space is freed during prepare by pruning what the activation would prune anyway (never the current or
    the previous release), so a device full of kept releases still takes a new one with --keep 1."""
    t = target(trusted_inventory)
    workdir = trusted_inventory.workdirs["dev-0"]
    with tmpfs_at(workdir, "5m"):
        size = 1200 * 1024  # three of them fill 5 MiB to 1.4 MiB free; a fourth needs 1.2 + 1 MiB margin
        ids = []
        for name in ("a", "b", "c"):
            art = make_synthetic_artifact(tmp_path / name, {"model.tflite": os.urandom(size)})
            outcome = deploy(art, t, keep=3)
            assert outcome.status == "deployed", outcome.error
            ids.append(outcome.release_id)
        fourth = make_synthetic_artifact(tmp_path / "d", {"model.tflite": os.urandom(size)})
        outcome = deploy(fourth, t, keep=1)
        assert outcome.status == "deployed", outcome.error
        assert current_of(workdir) == outcome.release_id
        kept = sorted(p.name for p in (workdir / "releases").iterdir() if not p.name.startswith("."))
        assert kept == sorted([ids[2], outcome.release_id])  # the oldest went first; the previous one stays
        assert rollback(t).to_id == ids[2]


def test_a_reinstalled_device_is_rekeyed_by_its_pinned_fingerprint(ssh_home, sshd_device, tmp_path, artifact):
    """known_hosts holds the device's old key; only the fingerprint read on the device replaces it."""
    from tests.lab.sshd import generate_key, write_inventory

    old = generate_key(tmp_path / "old_host_key")
    host = f"[{sshd_device.host}]:{sshd_device.port}"
    other_host = "other.example ssh-ed25519 " + generate_key(tmp_path / "k2").with_suffix(".pub").read_text().split()[1]
    known_hosts = ssh_home / ".ssh" / "known_hosts"
    known_hosts.write_text(f"{other_host}\n{host} " + " ".join(old.with_suffix(".pub").read_text().split()[:2]) + "\n")
    inv = write_inventory(tmp_path / "inv.yaml", {"moved": sshd_device}, workdir_root=tmp_path / "wd")
    real = subprocess.run(["ssh-keygen", "-lf", str(sshd_device.host_key.with_suffix(".pub"))], capture_output=True,
                          text=True, check=True).stdout.split()[1]
    stale = subprocess.run(["ssh-keygen", "-lf", str(old.with_suffix(".pub"))], capture_output=True, text=True,
                           check=True).stdout.split()[1]
    runner = CliRunner()
    before = known_hosts.read_text()
    for wrong, expected in ((stale, f"no host key with the pinned fingerprint {stale}"),
                            ("SHA256:nope", "is not an OpenSSH SHA256 fingerprint")):
        refused = runner.invoke(cli, ["targets", "trust", "moved", "-i", str(inv), "--fingerprint", wrong])
        assert refused.exit_code == 1 and expected in refused.output and "Traceback" not in refused.output
        assert known_hosts.read_text() == before  # nothing recorded, nothing removed
    assert f"the device offers ssh-ed25519 {real}" in runner.invoke(
        cli, ["targets", "trust", "moved", "-i", str(inv), "--fingerprint", stale]).output
    pinned = runner.invoke(cli, ["targets", "trust", "moved", "-i", str(inv), "--fingerprint", real])
    assert pinned.exit_code == 0, pinned.output
    assert f"{real} (replaced 1 old entry in" in pinned.output
    lines = known_hosts.read_text().splitlines()
    assert lines[0] == other_host and len(lines) == 2 and lines[1] == f"{host} {sshd_device.host_key_line}"
    deployed = runner.invoke(cli, ["deploy", str(artifact), "--target", "moved", "-i", str(inv)])
    assert deployed.exit_code == 0, deployed.output


def test_a_lock_left_by_a_vanished_controller_is_broken_by_targets_unlock(trusted_inventory, artifact):
    """A controller cut off by a partition leaves its session, and the lock process on the device, alive for
    hours. The busy error names the holder and the command; `targets unlock` stops only that lock process."""
    from edgeq.remote import open_transport
    from edgeq.remote.device import device_lock, device_workdir

    t = target(trusted_inventory)
    inventory = ["-i", str(trusted_inventory.path)]
    runner = CliRunner()
    idle = runner.invoke(cli, ["targets", "unlock", "dev-0", *inventory])
    assert idle.exit_code == 0 and "the deploy and bench locks in" in idle.output, idle.output
    vanished = open_transport(t)  # stands for the partitioned controller: its connection stays up, silent
    held = device_lock(vanished, t, device_workdir(vanished, t), purpose="deploy")
    held.__enter__()
    try:
        busy = deploy(artifact, t)
        assert busy.status == "failed" and "edgeq deploy on" in busy.error
        assert "edgeq targets unlock dev-0" in (busy.hint or "")
        broken = runner.invoke(cli, ["targets", "unlock", "dev-0", *inventory])
        assert broken.exit_code == 0, broken.output
        assert "broke the deploy lock held by edgeq deploy on" in broken.output and "device pid" in broken.output
        assert deploy(artifact, t).status == "deployed"
    finally:
        with contextlib.suppress(Exception):
            held.__exit__(None, None, None)
        vanished.close()


def test_a_lock_refused_while_its_holder_is_not_yet_named_waits_for_the_name(tmp_path):
    """A holder writes its name just after its flock (and empties the file just before it lets go): a refusal
    in that window read no name, and the busy error said "held by another process" (a flaky CI run). The
    refused ``lock`` op asks again a moment later and names the holder."""
    import fcntl

    from edgeq.device.ops.locks import op_lock

    path = tmp_path / ".deploy.lock"
    with open(path, "w") as holding:
        fcntl.flock(holding, fcntl.LOCK_EX)
        naming = threading.Timer(0.2, lambda: (holding.write("edgeq deploy on ctl pid 7\ndevice pid 4242\n"),
                                               holding.flush()))
        naming.start()
        answers = []
        op_lock({"workdir": str(tmp_path), "holder": "edgeq deploy on other"}, answers.append)
        naming.join()
    assert answers == [{"locked": False, "holder": "edgeq deploy on ctl pid 7", "pid": 4242}]


@pytest.mark.slow
def test_bench_holds_the_device_against_deploys_and_other_benches(trusted_inventory, make_artifact, artifact2,
                                                                   tmp_path):
    """While a bench runs, a deploy (which could swap or prune the release under it) and a second bench (which
    would share the CPUs) fail fast naming the bench; afterwards both go through."""
    from edgeq.bench import bench

    t = target(trusted_inventory)
    artifact = make_artifact("tflite", "fp32")  # a real model: the bench runs for its --min-seconds
    assert deploy(artifact, t).status == "deployed"  # on the device already: the bench uploads nothing
    benching, results = threading.Event(), {}

    def long_bench():
        benching.set()
        results["bench"] = bench(artifact, t, output_dir=tmp_path / "r1", warmup=0, runs=1, min_seconds=6,
                                 idle_seconds=0, power=False)

    worker = threading.Thread(target=long_bench)
    worker.start()
    assert benching.wait(10)
    lock_file = trusted_inventory.workdirs["dev-0"] / ".deploy.lock"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "edgeq bench" not in (lock_file.read_text() if lock_file.exists() else ""):
        time.sleep(0.05)  # until the bench holds its locks (the device's workdir is on this machine)
    busy = deploy(artifact2, t)
    assert busy.status == "failed" and "a bench is running on this device" in busy.error, (busy.status, busy.error)
    second = bench(artifact, t, output_dir=tmp_path / "r2", warmup=0, runs=1, min_seconds=0, idle_seconds=0,
                   power=False)
    assert not second.ok and "another bench is running on this device" in second.result.error
    worker.join(60)
    assert results["bench"].ok, results["bench"].result.error
    after = deploy(artifact2, t)
    assert after.status == "deployed" and current_of(trusted_inventory.workdirs["dev-0"]) == after.release_id
