"""Inventory loading and the ``targets`` commands (list, check, trust, setup) against real sshd devices."""

from __future__ import annotations

import base64
import hashlib
import os
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeq.cli import cli
from edgeq.errors import InventoryError
from edgeq.targets import detect_local_profile, load_inventory, profile_for_cpu, resolve_targets


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_inventory_fields_groups_and_defaults(tmp_path):
    inv = write(tmp_path / "inv.yaml", """
targets:
  jetson-01: {host: 10.0.0.31, user: ubuntu, port: 2222, key: ~/.ssh/lab, profile: jetson-orin-nano}
  rpi-01: {host: rpi-01.lab, profile: rpi4}
groups:
  lab: [jetson-01, rpi-01, local]
""")
    inventory = load_inventory(inv)
    rpi = resolve_targets(inventory, "rpi-01")[0]
    assert (rpi.name, rpi.workdir, rpi.python, rpi.port, rpi.user) == ("rpi-01", "~/.edgeq", "python3", None, None)
    names = [t.name for t in resolve_targets(inventory, "lab")]
    assert names == ["jetson-01", "rpi-01", "local"]
    # A member listed twice is one device: benching or deploying it twice at once would collide.
    inv.write_text(inv.read_text().replace("[jetson-01, rpi-01, local]", "[rpi-01, jetson-01, rpi-01, local, local]"))
    names = [t.name for t in resolve_targets(load_inventory(inv), "lab")]
    assert names == ["rpi-01", "jetson-01", "local"]
    assert inventory.sources["jetson-01"] == str(inv)


@pytest.mark.parametrize("text, message", [
    ("targets:\n  a: {host: h, profile: rpi4, hots: x}\n", "targets.a.hots: unknown field"),
    ("targets:\n  a: {host: h}\n", "targets.a.profile: Field required"),
    ("targets:\n  a: {host: h, profile: rpi4, port: 70000}\n", "targets.a.port"),
    ("targets:\n  a: {host: h, profile: rpi4}\ngroups:\n  g: [a, b]\n", "groups.g: unknown target 'b'"),
    ("targets: [1, 2]\n", "targets: Input should be a valid dictionary"),
    ("targets:\n  a: {host: h, profile: rpi4\n", "not valid YAML"),
    ("targets:\n  ../evil: {host: h, profile: rpi4}\n", "targets: Value error, target name '../evil' must not contain '/'"),
    ("targets:\n  'a\\b': {host: h, profile: rpi4}\n", "target name 'a\\\\b' must not contain '/' or '\\'"),
    ("targets:\n  '..': {host: h, profile: rpi4}\n", "target name '..' must not be empty, '.' or '..'"),
    ("targets:\n  .: {host: h, profile: rpi4}\n", "target name '.' must not be empty"),
    ("targets:\n  -rf: {host: h, profile: rpi4}\n", "target name '-rf' must not start with '-'"),
    ("targets:\n  a: {host: h, profile: rpi4}\ngroups:\n  x/y: [a]\n", "groups: Value error, group name 'x/y'"),
    ("targets:\n  a: {host: h, profile: rpi4}\ngroups:\n  ..: [a]\n", "group name '..' must not be empty"),
])
def test_inventory_errors_name_file_and_field(tmp_path, text, message):
    inv = write(tmp_path / "bad.yaml", text)
    with pytest.raises(InventoryError) as info:
        load_inventory(inv)
    assert str(inv) in info.value.message and message in info.value.message


def test_inventory_discovery_merge_and_suggestions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EDGEQ_INVENTORY", raising=False)
    write(tmp_path / "targets" / "a.yaml", "targets:\n  rpi-01: {host: a, profile: rpi4}\n")
    write(tmp_path / "targets" / "b.yaml", "targets:\n  rpi-02: {host: b, profile: rpi4}\n"
                                           "groups:\n  pis: [rpi-01, rpi-02]\n")
    inventory = load_inventory()
    assert [t.name for t in resolve_targets(inventory, "pis")] == ["rpi-01", "rpi-02"]
    with pytest.raises(InventoryError) as info:
        resolve_targets(inventory, "rpi-1")
    assert "unknown target or group 'rpi-1'" in info.value.message and "rpi-01" in info.value.hint
    write(tmp_path / "targets" / "c.yaml", "targets:\n  rpi-01: {host: c, profile: rpi4}\n")
    with pytest.raises(InventoryError, match=r"c\.yaml: targets\.rpi-01: already defined in .*a\.yaml"):
        load_inventory()
    monkeypatch.setenv("EDGEQ_INVENTORY", str(write(tmp_path / "other.yaml", "targets: {}\n")))
    assert load_inventory().targets == {}
    with pytest.raises(InventoryError, match="file not found"):
        load_inventory(tmp_path / "missing.yaml")


def test_local_target(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEQ_LOCAL_WORKDIR", str(tmp_path / "w"))
    local = resolve_targets(load_inventory(write(tmp_path / "i.yaml", "{}\n")), "local")[0]
    assert local.local and local.python == sys.executable and local.workdir == str(tmp_path / "w")
    assert local.profile == detect_local_profile()
    assert local.profile in {"x86-avx2", "x86-avx512-vnni", "x86-amx", "rpi4", "rpi5"}


@pytest.mark.parametrize(("machine", "flags", "profile"), [
    ("x86_64", "fpu avx2 fma", "x86-avx2"),
    ("x86_64", "avx2 avx512f avx512_vnni", "x86-avx512-vnni"),
    ("x86_64", "avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8", "x86-amx"),
    ("x86_64", "avx2 avx512_vnni amx_tile", "x86-avx512-vnni"),  # tiles without int8/bf16 units: not AMX to use
    ("aarch64", "fp asimd", "rpi4"),
    ("aarch64", "fp asimd asimddp", "rpi5"),
])
def test_local_profile_follows_cpu_flags(machine, flags, profile):
    assert profile_for_cpu(machine, flags.split()) == profile


def test_local_profile_for_unknown_arch_is_a_clear_error():
    with pytest.raises(InventoryError, match="does not know a profile for CPU architecture 'riscv64'"):
        profile_for_cpu("riscv64", [])


def test_shipped_inventories_are_valid(monkeypatch):
    repo = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(repo)
    monkeypatch.delenv("EDGEQ_INVENTORY", raising=False)
    inventory = load_inventory()
    assert [t.name for t in resolve_targets(inventory, "demo")] == ["local"]
    result = CliRunner().invoke(cli, ["targets", "list"])
    assert result.exit_code == 0 and "local" in result.output


@pytest.mark.sshd
def test_targets_list_and_check_on_sshd_devices(trusted_inventory):
    runner = CliRunner()
    listed = runner.invoke(cli, ["targets", "list", "-i", str(trusted_inventory.path)])
    assert listed.exit_code == 0 and "dev-2" in listed.output and "fleet" in listed.output
    checked = runner.invoke(cli, ["targets", "check", "dev-0", "-i", str(trusted_inventory.path)])
    assert checked.exit_code == 0, checked.output
    out = checked.output
    assert "reachable:        yes" in out and "host key trusted: yes" in out
    assert "arch:             x86_64" in out and f"{sys.version_info.major}.{sys.version_info.minor}" in out
    for fmt, module in (("onnx", "onnxruntime"), ("openvino", "openvino"), ("tflite", "ai_edge_litert")):
        assert f"{fmt + ' runtime:':<18}imports ({module}" in out  # every runtime the profile allows
    assert "power sensors:" in out and "free in workdir:" in out


@pytest.mark.sshd
def test_check_reports_untrusted_and_unreachable(ssh_home, sshd_device, tmp_path):
    from tests.lab.sshd import free_port, write_inventory

    inv = write_inventory(tmp_path / "inv.yaml", {"new": sshd_device})
    result = CliRunner().invoke(cli, ["targets", "check", "new", "-i", str(inv)])
    assert result.exit_code == 1
    assert "reachable:        yes" in result.output and "host key trusted: NO" in result.output
    assert "edgeq targets trust new" in result.output
    text = inv.read_text().replace(str(sshd_device.port), str(free_port()))
    inv.write_text(text)
    result = CliRunner().invoke(cli, ["targets", "check", "new", "-i", str(inv)])
    assert result.exit_code == 1 and "reachable:        no" in result.output


@pytest.mark.sshd
def test_trust_a_group(ssh_home, sshd_fleet, tmp_path):
    from tests.lab.sshd import write_inventory

    devices = {f"d{i}": dev for i, dev in enumerate(sshd_fleet)}
    inv = write_inventory(tmp_path / "inv.yaml", devices, groups={"all": list(devices)})
    result = CliRunner().invoke(cli, ["targets", "trust", "all", "-i", str(inv)])
    assert result.exit_code == 0, result.output
    lines = (ssh_home / ".ssh" / "known_hosts").read_text().splitlines()
    assert lines == [dev.known_hosts_line() for dev in sshd_fleet]
    assert result.output.count("SHA256:") == 3


def test_inventory_known_hosts_file_is_used_for_trust_and_connect(ssh_home, sshd_fleet, tmp_path):
    """A lab keeps its own known_hosts beside its inventory: trust writes there, connects read it, and the
    user's ~/.ssh/known_hosts is left alone."""
    import yaml

    from edgeq.remote import open_transport
    from edgeq.targets import load_inventory, resolve_targets
    from tests.lab.sshd import write_inventory

    device = sshd_fleet[0]
    (tmp_path / "lab").mkdir()
    inv = write_inventory(tmp_path / "lab" / "inv.yaml", {"d0": device})
    data = yaml.safe_load(inv.read_text())
    data["known_hosts"] = "lab_known_hosts"
    inv.write_text(yaml.safe_dump(data))
    (target,) = resolve_targets(load_inventory(inv), "d0")
    assert target.known_hosts == str((tmp_path / "lab" / "lab_known_hosts").resolve())

    result = CliRunner().invoke(cli, ["targets", "trust", "d0", "-i", str(inv)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "lab" / "lab_known_hosts").read_text().splitlines() == [device.known_hosts_line()]
    assert not (ssh_home / ".ssh" / "known_hosts").exists()
    with open_transport(target) as transport:
        assert transport.run(["echo", "hello"], timeout=30).stdout.strip() == "hello"


def build_wheel(directory: Path, name: str = "edgeq_tiny_runtime", version: str = "1.0") -> Path:
    """A minimal pure-Python wheel, written by hand (a wheel is a zip with dist-info metadata)."""
    files = {
        f"{name}/__init__.py": f"__version__ = '{version}'\nRUNTIME = 'tiny'\n".encode(),
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: edgeq-tests\nRoot-Is-Purelib: true\n"
                                             b"Tag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    files[f"{name}-{version}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    directory.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


def tiny_runtime_setup(trusted_inventory, tmp_path):
    """dev-0 with a profile allowing two formats whose runtimes are the hand-made ``edgeq_tiny_runtime`` and
    ``edgeq_other_runtime`` wheels, and a plain interpreter (no runtime imports there)."""
    import yaml

    profile = write(tmp_path / "tiny-profile.yaml", yaml.safe_dump({
        "name": "tiny", "description": "test profile", "arch": "x86_64", "cpu": "any", "format": "tflite",
        "precision": "int8", "threads": 1,
        "runtime_packages": {"tflite": ["edgeq_tiny_runtime"], "onnx": ["edgeq_other_runtime"]}}))
    data = yaml.safe_load(trusted_inventory.path.read_text())
    data["targets"]["dev-0"]["profile"] = str(profile)
    data["targets"]["dev-0"]["python"] = sys._base_executable  # a plain interpreter, as on a device
    trusted_inventory.path.write_text(yaml.safe_dump(data))
    return resolve_targets(load_inventory(trusted_inventory.path), "dev-0")[0]


@pytest.mark.sshd
def test_setup_from_a_wheelhouse_and_a_failed_setup_keeps_the_venv(trusted_inventory, tmp_path):
    """``targets setup --wheelhouse``: venv on the device, offline pip install, interpreter recorded.

    A setup whose pip fails leaves the previous venv and the recorded interpreter working and removes its
    build; a venv directory from an older edgeq is replaced."""
    from edgeq.remote import open_transport
    from edgeq.remote.device import device_python

    target = tiny_runtime_setup(trusted_inventory, tmp_path)
    workdir = trusted_inventory.workdirs["dev-0"]
    (workdir / "venv").mkdir(parents=True)  # as an older edgeq left it: a plain directory
    (workdir / "venv" / "marker").write_text("old")
    good = tmp_path / "good"
    build_wheel(good)
    build_wheel(good, name="edgeq_other_runtime")
    args = ["targets", "setup", "dev-0", "-i", str(trusted_inventory.path), "--wheelhouse"]
    first = CliRunner().invoke(cli, [*args, str(good)])
    assert first.exit_code == 0, first.output
    assert f"into {workdir / 'venv' / 'bin' / 'python'}" in first.output and "from wheelhouse" in first.output
    assert "runtimes for tflite, onnx: installed edgeq_tiny_runtime edgeq_other_runtime" in first.output

    def probe() -> str:
        with open_transport(target) as transport:
            python = device_python(transport, target)
            assert python == str(workdir / "venv" / "bin" / "python")
            return transport.run([python, "-c", "import edgeq_tiny_runtime as m, edgeq_other_runtime as o; "
                                  "print(m.__version__, o.__version__)"], timeout=60).stdout.strip()

    assert probe() == "1.0 1.0"
    live = os.readlink(workdir / "venv")
    assert not (workdir / "venv" / "marker").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = CliRunner().invoke(cli, [*args, str(empty)])
    assert refused.exit_code == 1 and "no .whl files" in refused.output

    other = tmp_path / "other"
    build_wheel(other, name="edgeq_other_runtime")  # lacks the tflite runtime the profile allows: pip fails
    failed = CliRunner().invoke(cli, [*args, str(other)])
    assert failed.exit_code == 1
    assert "edgeq_tiny_runtime" in failed.output and "previous venv" in failed.output
    assert probe() == "1.0 1.0"
    assert os.readlink(workdir / "venv") == live
    assert sorted(p.name for p in workdir.iterdir() if "venv" in p.name) == sorted(["venv", live])


@pytest.mark.sshd
def test_check_names_the_missing_runtimes_and_how_to_install_them(trusted_inventory, tmp_path):
    """A device whose interpreter lacks the profile's runtimes: check lists each format, exits 1, and says
    which are missing with the setup command as the hint."""
    tiny_runtime_setup(trusted_inventory, tmp_path)
    result = CliRunner().invoke(cli, ["targets", "check", "dev-0", "-i", str(trusted_inventory.path)])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert any(line.startswith("  tflite runtime:   does NOT import: ai_edge_litert") for line in lines)
    assert any(line.startswith("  onnx runtime:     does NOT import: onnxruntime") for line in lines)
    assert "  openvino runtime: not installed (profile " in result.output  # not in the profile: not an error
    assert "error: dev-0: runtime missing for tflite, onnx" in result.output
    assert "hint: install it with: edgeq targets setup dev-0" in result.output


def test_setup_installs_every_allowed_runtime_and_format_adds_one():
    """targets setup's package list: every format the profile allows, own format first, and --format adds
    one it does not list (with that runtime's own requirements); --only installs just the named ones."""
    from edgeq.device.runtimes import runtime_module
    from edgeq.devicecheck import setup_packages
    from edgeq.profiles import load_profile

    profile = load_profile("jetson-orin-nano")
    allowed = setup_packages(profile)
    assert list(allowed) == [profile.format, *[f for f in profile.runtime_packages if f != profile.format]]
    assert allowed == {fmt: profile.runtime_packages[fmt] for fmt in allowed}
    missing = next(fmt for fmt in ("onnx", "openvino", "tflite") if fmt not in profile.runtime_packages)
    added = setup_packages(profile, [missing, profile.format])
    assert list(added) == [*allowed, missing] and added[missing] == runtime_module(missing).PACKAGES
    assert setup_packages(profile, only_formats=["tflite"]) == {"tflite": profile.runtime_packages["tflite"]}


def test_rollback_cli_without_history(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQ_LOCAL_WORKDIR", str(tmp_path / "w"))
    result = CliRunner().invoke(cli, ["rollback", "--target", "local"])
    assert result.exit_code == 1 and "nothing is deployed" in result.output


def test_run_per_target_one_raises_many_report_each(capsys):
    """The CLI's per-target loop (trust, setup, rollback): one target's error propagates to the CLI's single
    handler; with several, each failure is printed with its hint, the rest still run, and the exit is 1."""
    from edgeq.cli.deploy import run_per_target
    from edgeq.errors import DeployError

    def action(name):
        if name.startswith("bad"):
            raise DeployError(f"{name}: broke", hint=f"fix {name}")
        return name.upper()

    done = []
    with pytest.raises(DeployError, match="bad-1: broke"):
        run_per_target(["bad-1"], action, lambda t, r: done.append(r))
    run_per_target(["ok-1"], action, lambda t, r: done.append((t, r)))
    assert done == [("ok-1", "OK-1")]
    with pytest.raises(SystemExit) as info:
        run_per_target(["bad-1", "ok-2", "bad-2", "ok-3"], action, lambda t, r: done.append((t, r)))
    assert info.value.code == 1
    assert done[1:] == [("ok-2", "OK-2"), ("ok-3", "OK-3")]
    assert capsys.readouterr().err.splitlines() == ["error: bad-1: broke", "hint: fix bad-1",
                                                    "error: bad-2: broke", "hint: fix bad-2"]

