"""``targets check`` and ``targets setup``: what a device has, and a venv with its runtimes on it."""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from edgeq.device.runtimes import formats, runtime_module
from edgeq.errors import ConnectError, DeployError, EdgeqError, Failure, RemoteCommandError
from edgeq.profiles import DeviceProfile, load_profile
from edgeq.remote import open_transport
from edgeq.remote.device import LockedDevice, device_lock, device_op, device_python, device_workdir
from edgeq.targets import Target

SETUP_TIMEOUT = 1800.0


@dataclass
class TargetCheck:
    """What ``edgeq targets check`` found on one target (None where it could not be determined)."""

    target: Target
    reachable: bool = False
    host_key_trusted: bool | None = None  # None for the local target (no SSH)
    failure: Failure | None = None  # what stopped the check
    arch: str | None = None
    profile_arch: str | None = None
    os: str | None = None
    python: str | None = None
    python_path: str | None = None
    free_bytes: int | None = None
    runtime_format: str | None = None  # the profile's own format, the one deploy ships by default
    allowed_formats: list[str] = field(default_factory=list)  # the profile's runtime_packages, own format first
    # format -> {"ok": True, "module": ..., "version": ...} or {"ok": False, "error": ...}, for every format
    runtimes: dict[str, dict] = field(default_factory=dict)
    power_sensors: list[dict] = field(default_factory=list)

    @property
    def error(self) -> str | None:
        return self.failure.message if self.failure is not None else None

    @property
    def hint(self) -> str | None:
        return self.failure.hint if self.failure is not None else None

    @property
    def runtime(self) -> dict | None:
        """The profile's own format's runtime probe."""
        return self.runtimes.get(self.runtime_format) if self.runtime_format else None

    @property
    def installed_formats(self) -> list[str]:
        """The formats whose runtime imports on the device, in format order."""
        return [fmt for fmt, probe in self.runtimes.items() if probe.get("ok")]

    @property
    def missing_formats(self) -> list[str]:
        """The formats the profile allows whose runtime does not import on the device."""
        return [fmt for fmt in self.allowed_formats if not self.runtimes.get(fmt, {}).get("ok")]

    @property
    def ok(self) -> bool:
        """Reachable, trusted, the profile's arch, and every runtime the profile allows imports."""
        return (self.reachable and self.host_key_trusted is not False and self.failure is None
                and bool(self.runtimes) and not self.missing_formats and self.arch == self.profile_arch)


def _host_key_problem(exc: ConnectError) -> bool:
    import paramiko

    from edgeq.remote.ssh import UnknownHostKey

    return isinstance(exc.__cause__, (UnknownHostKey, paramiko.BadHostKeyException))


def check_target(target: Target) -> TargetCheck:
    """Connect and collect the facts ``targets check`` reports; problems go into ``error``, never raise."""
    check = TargetCheck(target)
    try:
        profile = load_profile(target.profile)
        check.profile_arch = profile.arch
        check.runtime_format = profile.format
        check.allowed_formats = allowed_formats(profile)
    except EdgeqError as exc:
        check.failure = exc.failure(target.name)
        return check
    try:
        transport = open_transport(target)
    except ConnectError as exc:
        if _host_key_problem(exc):
            check.reachable, check.host_key_trusted = True, False
        check.failure = exc.failure(target.name)
        return check
    check.reachable = True
    check.host_key_trusted = None if target.local else True
    try:
        with transport:
            workdir = device_workdir(transport, target)
            python = device_python(transport, target)
            # Every format edgeq knows, not only the profile's: check lists what is there.
            probes = {fmt: runtime_module(fmt).PROBE_MODULES for fmt in formats()}
            facts = device_op(transport, target, "facts", {"workdir": workdir, "runtimes": probes},
                              python=python, timeout=180)
    except EdgeqError as exc:
        check.failure = exc.failure(target.name)
        return check
    check.arch = facts.get("arch")
    check.os = facts.get("os")
    check.python = facts.get("python")
    check.python_path = facts.get("executable")
    check.free_bytes = facts.get("free_bytes")
    check.runtimes = facts.get("runtimes") or {}
    check.power_sensors = facts.get("power_sensors") or []
    return check


def allowed_formats(profile: DeviceProfile) -> list[str]:
    """The formats a profile's devices may run (its ``runtime_packages``), its own format first."""
    return [profile.format, *[f for f in profile.runtime_packages if f != profile.format]]


def setup_packages(profile: DeviceProfile, extra_formats: Sequence[str] = (),
                   only_formats: Sequence[str] = ()) -> dict[str, list[str]]:
    """format -> pip requirements ``targets setup`` installs: every format the profile allows plus
    ``extra_formats``, or with ``only_formats`` just those (from the profile where it lists them, else the
    runtime's own ``PACKAGES``)."""
    wanted = dict.fromkeys([*only_formats] if only_formats else [*allowed_formats(profile), *extra_formats])
    return {fmt: list(profile.runtime_packages.get(fmt) or runtime_module(fmt).PACKAGES) for fmt in wanted}


@dataclass
class SetupResult:
    """What ``targets setup`` did on one target."""

    target: Target
    python: str
    formats: list[str]
    packages: list[str]
    source: str  # "index" or "wheelhouse"
    seconds: float


def setup_target(target: Target, wheelhouse: str | Path | None = None, system_site_packages: bool = False,
                 extra_formats: Sequence[str] = (), only_formats: Sequence[str] = (),
                 timeout: float = SETUP_TIMEOUT) -> SetupResult:
    """Create ``workdir/venv`` on the device, pip install the runtime packages of every format the profile
    allows (and of ``extra_formats``; or of ``only_formats``) in one pip call, and record the venv.

    Packages come from the device's package index, or, with ``wheelhouse``, from the ``.whl`` files of
    that local directory, uploaded and installed with ``--no-index`` (devices without internet).

    The new venv is built beside the old one (``workdir/venv-<token>``, under the device's deploy lock) and
    becomes ``workdir/venv`` (a symlink swapped by rename) only after pip succeeded; a failed setup removes
    its build and leaves the previous venv and the recorded interpreter as they were.
    """
    started = time.monotonic()
    profile = load_profile(target.profile)
    per_format = setup_packages(profile, extra_formats, only_formats)
    # One pip call resolves every runtime together: versions that conflict fail here, not at bench time.
    packages = list(dict.fromkeys(p for reqs in per_format.values() for p in reqs))
    wheels: list[Path] = []
    if wheelhouse is not None:
        wheelhouse = Path(wheelhouse)
        if not wheelhouse.is_dir():
            raise DeployError(f"{wheelhouse}: wheelhouse is not a directory")
        wheels = sorted(p for p in wheelhouse.iterdir() if p.suffix == ".whl" and p.is_file())
        if not wheels:
            raise DeployError(f"{wheelhouse}: no .whl files in the wheelhouse",
                              hint=f"fill it with: pip download --only-binary=:all: -d {wheelhouse} "
                                   + " ".join(packages) + " (with --platform/--python-version for the device)")
    with open_transport(target) as transport:
        workdir = device_workdir(transport, target)
        with device_lock(transport, target, workdir, purpose="targets setup") as device:
            device.op("venv_prepare", {"workdir": workdir}, timeout=300)
            name = f"venv-{secrets.token_hex(4)}"
            build = f"{workdir}/{name}"
            try:
                _build_venv(device, build, packages, wheels, system_site_packages, timeout)
                switched = device.op("venv_switch", {"workdir": workdir, "name": name}, timeout=300)
            except BaseException as exc:
                with suppress(EdgeqError):
                    device.op("venv_discard", {"workdir": workdir, "name": name}, timeout=300)
                if isinstance(exc, RemoteCommandError):
                    raise RemoteCommandError(f"{exc.message}; the device's previous venv and recorded "
                                             "interpreter are unchanged", hint=exc.hint) from exc
                raise
    return SetupResult(target, switched["python"], list(per_format), packages, "wheelhouse" if wheels else "index",
                       time.monotonic() - started)


def _build_venv(device: LockedDevice, build: str, packages: list[str], wheels: list[Path],
                system_site_packages: bool, timeout: float) -> None:
    """Make a venv at ``build`` on the device and pip install ``packages`` into it (raises on failure), under
    the lock: a controller that goes leaves no pip running."""
    transport = device.transport
    venv_argv = [device.target.python, "-m", "venv"]
    if system_site_packages:
        venv_argv.append("--system-site-packages")
    device.run([*venv_argv, build], timeout=600)
    pip = [f"{build}/bin/python", "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    if wheels:
        # Only this setup's wheels: a directory of its own, removed afterwards (a shared one would let pip
        # pick up wheels an earlier setup left there).
        remote_wheels = f"{build}.wheelhouse"
        device.run(["mkdir", "-p", remote_wheels], timeout=60)
        try:
            for wheel in wheels:
                transport.put(wheel, f"{remote_wheels}/{wheel.name}")
            device.run([*pip, "--no-index", "--find-links", remote_wheels, *packages], timeout=timeout)
        finally:
            with suppress(EdgeqError):
                device.run(["rm", "-rf", "--", remote_wheels], timeout=300)
    else:
        device.run([*pip, *packages], timeout=timeout)
