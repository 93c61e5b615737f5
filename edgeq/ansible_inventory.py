"""Ansible inventories as edgeq targets and groups: ``-i hosts.ini`` or an Ansible YAML inventory.

A lab that runs Ansible already lists its devices; edgeq reads that list instead of a second one. The file
is parsed by ansible-core's own ``ini`` and ``yaml`` inventory plugins (host ranges such as
``rpi-[01:20].lab``, ``:vars`` and ``:children`` sections, ``group_vars/`` and ``host_vars/`` beside the file),
never by an inventory script or plugin config, which would run code. Variables are merged as Ansible
merges them (group vars from ``all`` down to the host's own groups, then ``group_vars/``, then the host's
vars, then ``host_vars/``) and read as edgeq's target fields:

==================================  ======================
Ansible variable                    target field
==================================  ======================
``ansible_host`` (``ansible_ssh_host``)  host (default: the inventory hostname)
``ansible_user`` (``ansible_ssh_user``)  user
``ansible_port`` (``ansible_ssh_port``)  port
``ansible_ssh_private_key_file``    key
``edgeq_python``, else ``ansible_python_interpreter``  python
``edgeq_profile``                   profile (required)
``edgeq_workdir``, ``edgeq_known_hosts``  workdir, known_hosts
==================================  ======================

Every Ansible group but ``ungrouped`` becomes a group of the same name (``all`` too, unless a target has
that name). Other variables (passwords, become settings) are not read, kept or logged. A value that is a
Jinja template is refused: edgeq does not evaluate templates.

ansible-core is imported only in a child process (``python -m edgeq.ansible_inventory FILE``), which prints
the result as JSON: importing it patches interpreter globals (``sys.intern``), which broke torch's
compiler in the same process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgeq.errors import InventoryError, first_line

YAML_SUFFIXES = {".yaml", ".yml"}
# Target field -> the Ansible variables that set it, the first one present winning.
FIELDS = {
    "host": ("ansible_host", "ansible_ssh_host"),
    "user": ("ansible_user", "ansible_ssh_user"),
    "port": ("ansible_port", "ansible_ssh_port"),
    "key": ("ansible_ssh_private_key_file",),
    "python": ("edgeq_python", "ansible_python_interpreter"),
    "profile": ("edgeq_profile",),
    "workdir": ("edgeq_workdir",),
    "known_hosts": ("edgeq_known_hosts",),
}
# ansible_python_interpreter values that ask Ansible to find one: edgeq's default (python3) then applies.
_DISCOVER = {"auto", "auto_silent", "auto_legacy", "auto_legacy_silent"}
_SSH_CONNECTIONS = {"ssh", "smart", "paramiko", "paramiko_ssh", "ansible.builtin.ssh"}


def is_ini(path: Path) -> bool:
    """An inventory file that is not YAML (``hosts``, ``hosts.ini``) is read as Ansible INI."""
    return path.suffix.lower() not in YAML_SUFFIXES


def is_ansible_yaml(data: Any) -> bool:
    """True when parsed YAML is an Ansible inventory rather than an edgeq one: its top level is groups of
    ``hosts``, ``children`` and ``vars`` (an edgeq inventory has ``targets`` and ``groups``)."""
    if not isinstance(data, dict) or not data or {"targets", "groups", "known_hosts"} & set(data):
        return False
    return any(isinstance(v, dict) and {"hosts", "children", "vars"} & set(v) for v in data.values())


def _ansible():
    try:
        from ansible.inventory.data import InventoryData
        from ansible.inventory.helpers import get_group_vars
        from ansible.parsing.dataloader import DataLoader
        from ansible.plugins.loader import inventory_loader, vars_loader
        from ansible.utils.vars import combine_vars
    except ImportError as exc:
        raise InventoryError(f"reading an Ansible inventory needs ansible-core ({exc})",
                             hint="pip install 'edgeq[ansible]'") from exc
    return InventoryData, get_group_vars, DataLoader, inventory_loader, vars_loader, combine_vars


def read_ansible_inventory(path: Path) -> dict:
    """The edgeq inventory data (``{"targets": ..., "groups": ...}``) that the Ansible inventory at ``path``
    describes, for ``Inventory`` to validate; InventoryError naming the file and host on any problem."""
    child = subprocess.run([sys.executable, "-m", "edgeq.ansible_inventory", str(path.resolve())],
                           capture_output=True, text=True, timeout=120)
    try:
        answer = json.loads(child.stdout)
    except ValueError:
        raise InventoryError(f"{path}: reading the Ansible inventory failed: "
                             f"{first_line(child.stderr.strip() or f'exit status {child.returncode}')}") from None
    if "error" in answer:
        raise InventoryError(answer["error"], hint=answer.get("hint"))
    return answer


def _parse(path: Path) -> dict:
    InventoryData, get_group_vars, DataLoader, inventory_loader, vars_loader, combine_vars = _ansible()
    path = path.resolve()
    kind = "ini" if is_ini(path) else "yaml"
    data, loader = InventoryData(), DataLoader()
    try:
        inventory_loader.get(kind).parse(data, loader, str(path), cache=False)
        data.reconcile_inventory()
        files_vars = vars_loader.get("host_group_vars")
        targets = {}
        for name, host in data.hosts.items():
            groups = sorted(host.get_groups(), key=lambda g: (g.depth, g.priority, g.name))
            merged = get_group_vars(groups)
            for group in groups:
                merged = combine_vars(merged, files_vars.get_vars(loader, str(path.parent), [group]))
            merged = combine_vars(merged, host.get_vars())
            merged = combine_vars(merged, files_vars.get_vars(loader, str(path.parent), [host]))
            targets[str(name)] = _target_fields(path, str(name), merged)
        groups = {str(name): [str(h.name) for h in group.get_hosts()] for name, group in data.groups.items()
                  if name != "ungrouped" and not (name == "all" and "all" in targets)}
    except InventoryError:
        raise
    except Exception as exc:  # ansible raises AnsibleError and, on malformed input, plain errors
        raise InventoryError(f"{path}: not a readable Ansible {kind.upper()} inventory: {first_line(exc)}",
                             hint="check it with: ansible-inventory -i FILE --list") from exc
    return {"targets": targets, "groups": groups}


def _target_fields(path: Path, name: str, variables: dict) -> dict:
    connection = variables.get("ansible_connection")
    if connection is not None and str(connection) not in _SSH_CONNECTIONS:
        raise InventoryError(f"{path}: host {name}: ansible_connection={connection} is not SSH; edgeq reaches "
                             "devices over SSH", hint="use the built-in 'local' target for this machine")
    fields: dict[str, Any] = {}
    for field, names in FIELDS.items():
        for variable in names:
            if variable in variables and variables[variable] is not None:
                value = variables[variable]
                if isinstance(value, str) and ("{{" in value or "{%" in value):
                    raise InventoryError(f"{path}: host {name}: {variable} is a Jinja template ({value!r}); "
                                         "edgeq does not evaluate templates", hint="give the value itself")
                if field == "python" and variable == "ansible_python_interpreter" and str(value) in _DISCOVER:
                    continue
                fields[field] = int(value) if field == "port" and str(value).isdigit() else \
                    value if field == "port" else str(value)
                break
    fields.setdefault("host", name)
    if "profile" not in fields:
        raise InventoryError(f"{path}: host {name}: no edgeq_profile variable (the device profile, e.g. rpi4)",
                             hint="set edgeq_profile for the host or one of its groups (group_vars/ works too)")
    return fields


def main(argv: list[str]) -> int:
    """The child's side: parse one inventory, print the result or the error as one JSON object."""
    try:
        print(json.dumps(_parse(Path(argv[0]))))
    except InventoryError as exc:
        print(json.dumps({"error": str(exc), "hint": exc.hint}))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
