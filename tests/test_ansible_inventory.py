"""Ansible inventories read as targets and groups (issue 14 part 6), parsed by ansible-core's own plugins."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeq.cli import cli
from edgeq.deploy import deploy
from edgeq.targets import load_inventory, resolve_targets
from tests.sshd_fixtures import make_synthetic_artifact

# find_spec, not importorskip: importing ansible here would patch this process's sys.intern (see below).
if importlib.util.find_spec("ansible") is None:
    pytest.skip("ansible-core is not installed (pip install 'edgeq[ansible]')", allow_module_level=True)

SECRET = "hunter2-not-for-logs"

INI = f"""\
[rpi]
rpi-[01:03].lab ansible_user=pi
jetson-01 ansible_host=10.0.0.31 ansible_port=2222 ansible_ssh_private_key_file=~/.ssh/lab_ed25519 \
edgeq_profile=jetson-orin-nano ansible_python_interpreter=/usr/bin/python3.10

[rpi:vars]
edgeq_profile=rpi4
edgeq_workdir=/var/lib/edgeq

[lab:children]
rpi

[all:vars]
ansible_become_pass={SECRET}
ansible_python_interpreter=auto_silent
"""

YAML = """\
all:
  vars: {edgeq_profile: rpi5}
  children:
    pis:
      hosts:
        pi-a: {ansible_host: 192.0.2.7, ansible_port: 2201}
        pi-b:
      vars: {ansible_user: pi}
    x86:
      hosts:
        box1: {edgeq_profile: x86-avx2, ansible_ssh_user: ops}
"""


def test_an_ini_inventory_with_ranges_children_and_vars_directories(tmp_path):
    inventory = tmp_path / "hosts.ini"
    inventory.write_text(INI)
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "group_vars" / "lab.yml").write_text("ansible_user: labuser\n")
    (tmp_path / "host_vars").mkdir()
    (tmp_path / "host_vars" / "rpi-02.lab.yml").write_text("ansible_port: 2200\nedgeq_python: /opt/venv/bin/python\n")
    loaded = load_inventory(inventory)
    targets = {name: t for name, t in loaded.targets.items()}
    assert sorted(targets) == ["jetson-01", "rpi-01.lab", "rpi-02.lab", "rpi-03.lab"]
    rpi1, rpi2, jetson = targets["rpi-01.lab"], targets["rpi-02.lab"], targets["jetson-01"]
    # The host's own inline vars beat group_vars/, which beat the file's group vars; host_vars/ beats all.
    assert (rpi1.host, rpi1.user, rpi1.port, rpi1.profile, rpi1.workdir, rpi1.python) == \
        ("rpi-01.lab", "pi", None, "rpi4", "/var/lib/edgeq", "python3")
    assert (rpi2.port, rpi2.python) == (2200, "/opt/venv/bin/python")
    assert (jetson.host, jetson.user, jetson.port, jetson.key, jetson.profile, jetson.python) == \
        ("10.0.0.31", "labuser", 2222, "~/.ssh/lab_ed25519", "jetson-orin-nano", "/usr/bin/python3.10")
    assert loaded.groups["rpi"] == loaded.groups["lab"] == loaded.groups["all"] == list(targets)
    assert [t.name for t in resolve_targets(loaded, "lab")] == list(targets)
    listed = CliRunner().invoke(cli, ["targets", "list", "-i", str(inventory)])
    assert listed.exit_code == 0 and "jetson-01" in listed.output and "rpi-03.lab" in listed.output, listed.output
    assert SECRET not in listed.output and SECRET not in repr(loaded)
    # ansible-core is imported in a child only: importing it patches sys.intern, which broke torch's compiler.
    assert "ansible" not in sys.modules and type(sys.intern).__name__ == "builtin_function_or_method"


def test_an_ansible_yaml_inventory(tmp_path):
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(YAML)
    loaded = load_inventory(inventory)
    assert {name: (t.host, t.user, t.port, t.profile) for name, t in loaded.targets.items()} == {
        "pi-a": ("192.0.2.7", "pi", 2201, "rpi5"), "pi-b": ("pi-b", "pi", None, "rpi5"),
        "box1": ("box1", "ops", None, "x86-avx2")}
    assert loaded.groups == {"all": ["pi-a", "pi-b", "box1"], "pis": ["pi-a", "pi-b"], "x86": ["box1"]}


@pytest.mark.parametrize("text, expected", [
    ("[lab]\nrpi-01 ansible_user=pi\n", "host rpi-01: no edgeq_profile variable"),
    ("[lab]\nrpi-01 edgeq_profile=rpi4 ansible_host='{{ lookup(\"pipe\", \"id\") }}'\n",
     "host rpi-01: ansible_host is a Jinja template"),
    ("[lab]\nrpi-01 edgeq_profile=rpi4 ansible_connection=docker\n",
     "host rpi-01: ansible_connection=docker is not SSH"),
    ("[lab\nrpi-01\n", "not a readable Ansible INI inventory"),
    ("[lab]\nrpi-01 edgeq_profile=rpi9\n", None),  # an unknown profile is found where it is used, by name
])
def test_a_bad_ansible_inventory_is_one_clear_line(tmp_path, text, expected):
    inventory = tmp_path / "hosts"
    inventory.write_text(text)
    result = CliRunner().invoke(cli, ["targets", "list", "-i", str(inventory)])
    if expected is None:
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert expected in result.output and str(inventory) in result.output, result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1


@pytest.mark.sshd
def test_deploy_to_a_device_of_an_ansible_inventory(ssh_home, sshd_fleet, tmp_path):
    """The lab's hosts.ini reaches a real sshd device: address, port, user and key all come from it."""
    from tests.lab.sshd import trust_device

    device = sshd_fleet[0]
    trust_device(device, ssh_home / ".ssh" / "known_hosts")
    workdir = tmp_path / "device-workdir"
    inventory = tmp_path / "hosts.ini"
    inventory.write_text(
        "[bench_lab]\n"
        f"pi-lab-1 ansible_host={device.host} ansible_port={device.port} ansible_user={device.user} "
        f"ansible_ssh_private_key_file={device.client_key} edgeq_workdir={workdir} edgeq_python={sys.executable}\n"
        "[bench_lab:vars]\nedgeq_profile=x86-avx2\n")
    artifact = make_synthetic_artifact(tmp_path / "art", {"model.tflite": os.urandom(2048)})
    target = resolve_targets(load_inventory(inventory), "bench_lab")[0]
    outcome = deploy(artifact, target)
    assert outcome.status == "deployed", outcome.error
    assert Path(os.readlink(workdir / "current")).name == outcome.release_id
