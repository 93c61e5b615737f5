"""Targets: where to run. An inventory of devices (``targets/*.yaml``) and groups of them.

```yaml
targets:
  jetson-01: {host: 10.0.0.31, user: ubuntu, port: 22, key: ~/.ssh/lab_ed25519, profile: jetson-orin-nano}
  rpi-01:    {host: rpi-01.lab, profile: rpi4}
groups:
  jetson: [jetson-01, jetson-02]
```

``host`` may be an alias from ``~/.ssh/config``; fields left out here (user, port, key) come from there,
as OpenSSH would resolve them, and fields given here win. ``local`` is a built-in target: this machine,
no SSH. An Ansible inventory (INI, or Ansible's YAML layout) is read too: see ``edgeq.ansible_inventory``.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Iterable
from pathlib import Path

from pydantic import Field, PrivateAttr, field_validator, model_validator

from edgeq.config import StrictModel, load_yaml_file, suggest, validate_model
from edgeq.errors import InventoryError

LOCAL_TARGET = "local"
DEFAULT_INVENTORY_DIR = "targets"


def _reject_control_chars(value: str, what: str) -> str:
    if "\0" in value or "\n" in value or "\r" in value:
        raise ValueError(f"{what} must not contain NUL or newline characters")
    return value


# Characters OpenSSH (ssh.c, 9.6: valid_hostname / valid_ruser) refuses in a host or user name given on the
# command line, because the name may be expanded (%h, %r) into a ProxyCommand run by a shell
# (CVE-2023-51385). edgeq applies the same rules to the inventory, to ProxyJump hops and to what
# ~/.ssh/config resolves, before any name is expanded into a command.
_HOST_FORBIDDEN = "'`\"$\\;&<>|(){}"
_USER_FORBIDDEN = "'`\";&<>|(){}"


def hostname_problem(value: str) -> str | None:
    """Why ``value`` is not a host name OpenSSH would accept (``valid_hostname``), or None when it is."""
    if not value:
        return "it is empty"
    if value.startswith("-"):
        return "it starts with '-'"
    for char in value:
        if char in _HOST_FORBIDDEN:
            return f"it contains {char!r}"
        if char.isspace() or ord(char) < 32 or ord(char) == 127:
            return f"it contains whitespace or a control character ({char!r})"
    return None


def user_problem(value: str) -> str | None:
    """Why ``value`` is not a user name OpenSSH would accept (``valid_ruser``), or None when it is."""
    if not value:
        return "it is empty"
    if value.startswith("-"):
        return "it starts with '-'"
    for index, char in enumerate(value):
        if char in _USER_FORBIDDEN:
            return f"it contains {char!r}"
        if char.isspace() and value[index + 1:index + 2] == "-":
            return "it contains whitespace followed by '-'"
    if value.endswith("\\"):
        return "it ends with a backslash"
    return None


def check_name(name: str, what: str) -> str:
    """A target or group name is used in file names (``RESULTS_DIR/<target>__<id>.json``) and on command
    lines: no path separators, not ``.``/``..``, no leading ``-``, no control characters."""
    _reject_control_chars(name, what)
    if not name or name in (".", ".."):
        raise ValueError(f"{what} must not be empty, '.' or '..'")
    if "/" in name or "\\" in name:
        raise ValueError(f"{what} must not contain '/' or '\\' (it becomes part of file names)")
    if name.startswith("-"):
        raise ValueError(f"{what} must not start with '-'")
    return name


class Target(StrictModel):
    """One device. ``name`` is filled in from the inventory key."""

    name: str = Field(default="", description="the inventory key (set by the loader)")
    host: str = Field(min_length=1, description="address or ~/.ssh/config alias")
    user: str | None = Field(default=None, description="login user (default: ssh config, else local user)")
    port: int | None = Field(default=None, ge=1, le=65535, description="default: ssh config, else 22")
    key: str | None = Field(default=None, description="private key file (default: ssh config, agent, ~/.ssh/id_*)")
    profile: str = Field(min_length=1, description="device profile name or path")
    workdir: str = Field(default="~/.edgeq", min_length=1, description="edgeq's directory on the device")
    python: str = Field(default="python3", min_length=1, description="interpreter on the device")
    local: bool = Field(default=False, description="run on this machine without SSH (built-in 'local')")
    known_hosts: str | None = Field(
        default=None,
        description="a known_hosts file read besides ~/.ssh/known_hosts, where 'targets trust' records this "
        "target's key (a relative path is relative to the inventory file)",
    )

    @field_validator("name", "host", "user", "key", "profile", "workdir", "python", "known_hosts")
    @classmethod
    def _no_control_chars(cls, value: str | None, info) -> str | None:
        return None if value is None else _reject_control_chars(value, info.field_name)

    @field_validator("host")
    @classmethod
    def _valid_host(cls, value: str) -> str:
        problem = hostname_problem(value)
        if problem:
            raise ValueError(f"host {value!r} is not a valid host name: {problem}")
        return value

    @field_validator("user")
    @classmethod
    def _valid_user(cls, value: str | None) -> str | None:
        problem = None if value is None else user_problem(value)
        if problem:
            raise ValueError(f"user {value!r} is not a valid user name: {problem}")
        return value

    @property
    def address(self) -> str:
        """``user@host:port`` for messages (only the parts that are set)."""
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return "this machine" if self.local else f"{user}{self.host}{port}"

    @property
    def label(self) -> str:
        """``name (address)`` for error messages."""
        return f"{self.name} ({self.address})" if self.name else self.address


class Inventory(StrictModel):
    """Targets by name and groups of target names."""

    targets: dict[str, Target] = Field(default_factory=dict)
    groups: dict[str, list[str]] = Field(default_factory=dict)
    known_hosts: str | None = Field(
        default=None, description="default 'known_hosts' for every target of this file (e.g. a lab's own)"
    )
    _sources: dict[str, str] = PrivateAttr(default_factory=dict)

    @property
    def sources(self) -> dict[str, str]:
        """Target or group name -> the inventory file that defines it."""
        return self._sources

    @field_validator("targets", "groups", mode="before")
    @classmethod
    def _safe_names(cls, value, info):
        if isinstance(value, dict):
            what = "target" if info.field_name == "targets" else "group"
            for name in value:
                check_name(str(name), f"{what} name {name!r}")
        return value

    @model_validator(mode="after")
    def _names(self) -> Inventory:
        for name, target in self.targets.items():
            if not target.name:
                target.name = name
        # Group members are checked by load_inventory, after every file is merged (groups may span files).
        return self


def inventory_files(path: str | Path | None = None) -> list[Path]:
    """The inventory file(s) to read: ``path``, else ``$EDGEQ_INVENTORY``, else ``targets/*.yaml`` in cwd."""
    if path is not None:
        return [Path(path).expanduser()]
    env = os.environ.get("EDGEQ_INVENTORY")
    if env:
        return [Path(env).expanduser()]
    directory = Path.cwd() / DEFAULT_INVENTORY_DIR
    if not directory.is_dir():
        return []
    return sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])


def load_inventory(path: str | Path | None = None) -> Inventory:
    """Load and merge the inventory; a name defined in two files is an error naming both."""
    from edgeq import ansible_inventory as ansible

    merged = Inventory()
    for file in inventory_files(path):
        if ansible.is_ini(file):
            if not file.is_file():
                raise InventoryError(f"{file}: no such inventory file")
            data = ansible.read_ansible_inventory(file)
        else:
            data = load_yaml_file(file, InventoryError)
            if data is None:
                data = {}
            elif ansible.is_ansible_yaml(data):
                data = ansible.read_ansible_inventory(file)
        inventory = validate_model(Inventory, data, str(file), InventoryError)
        for target in inventory.targets.values():
            known_hosts = target.known_hosts or inventory.known_hosts
            if known_hosts:
                path = Path(known_hosts).expanduser()
                target.known_hosts = str(path if path.is_absolute() else (file.parent / path).resolve())
        for kind, items in (("targets", inventory.targets), ("groups", inventory.groups)):
            for name, value in items.items():
                if name in merged.targets or name in merged.groups:
                    raise InventoryError(f"{file}: {kind}.{name}: already defined in {merged.sources[name]}")
                getattr(merged, kind)[name] = value
                merged.sources[name] = str(file)
    for name, members in merged.groups.items():
        for member in members:
            if member not in merged.targets and member != LOCAL_TARGET:
                raise InventoryError(f"{merged.sources[name]}: groups.{name}: unknown target '{member}'",
                                     hint=suggest(member, list(merged.targets)))
    return merged


def detect_local_profile() -> str:
    """The profile that fits this machine's CPU (see ``profile_for_cpu``)."""
    flags = ""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        for line in cpuinfo.splitlines():
            if line.lower().startswith(("flags", "features")):
                flags = line.split(":", 1)[1]
                break
    except OSError:
        pass
    return profile_for_cpu(platform.machine(), flags.split())


def profile_for_cpu(machine: str, flags: Iterable[str]) -> str:
    """The shipped profile for a CPU architecture and its /proc/cpuinfo flags: x86 with AMX, with AVX512-VNNI
    or with neither; Arm with dot-product instructions (Pi 5 class) or without (Pi 4 class)."""
    machine, words = machine.lower(), set(flags)
    if machine in ("x86_64", "amd64"):
        if "amx_tile" in words and ({"amx_int8", "amx_bf16"} & words):
            return "x86-amx"
        return "x86-avx512-vnni" if "avx512_vnni" in words else "x86-avx2"
    if machine in ("aarch64", "arm64"):
        return "rpi5" if "asimddp" in words else "rpi4"
    raise InventoryError(f"the built-in 'local' target does not know a profile for CPU architecture {machine!r}",
                         hint="define a target with an explicit profile in targets/*.yaml")


def local_target() -> Target:
    """The built-in ``local`` target: this machine, the controller's interpreter, no SSH."""
    workdir = os.environ.get("EDGEQ_LOCAL_WORKDIR") or str(Path.home() / ".edgeq" / "local")
    return Target(name=LOCAL_TARGET, host="localhost", profile=detect_local_profile(), workdir=workdir,
                  python=sys.executable, local=True)


def resolve_targets(inventory: Inventory, name: str) -> list[Target]:
    """The targets a ``--target`` value names: one target, a group's members (each once, in the group's
    order), or the built-in ``local``."""
    if name in inventory.targets:
        return [inventory.targets[name]]
    if name in inventory.groups:
        return [inventory.targets[member] if member in inventory.targets else local_target()
                for member in dict.fromkeys(inventory.groups[name])]
    if name == LOCAL_TARGET:
        return [local_target()]
    known = [*inventory.targets, *inventory.groups, LOCAL_TARGET]
    files = sorted(set(inventory.sources.values()))
    where = ", ".join(files) if files else "no inventory file found (targets/*.yaml, $EDGEQ_INVENTORY or -i)"
    hint = suggest(name, known) or f"known: {', '.join(known)}"
    raise InventoryError(f"unknown target or group '{name}' (inventory: {where})", hint=hint)
