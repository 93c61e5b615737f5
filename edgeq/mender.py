"""Hand a verified artifact to Mender, for fleets beyond SSH push: ``edgeq package ARTIFACT --mender``.

``package_mender`` writes a Mender module-image artifact of type ``edgeq-release`` with Debian's
``mender-artifact`` tool (signed with ``--key``). Its payload is the artifact's files, under flat names
(Mender payloads have no directories), and this controller's device package, ``edgeq-device.pyz``; its
meta-data (inside the signed header) maps each payload file to its path in the release and its sha256.

On the device the ``edgeq-release`` update module (``UPDATE_MODULE``, installed once per device image at
``/usr/share/mender/modules/v3/edgeq-release``) runs the install's states with that device package, which
makes the same checks as an SSH deploy (edgeq/device/ops/mender.py): deploy lock, sha256 of every file on
the device, fsync, rename, atomic ``current`` swap, history, and rollback to the release before.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from edgeq.deploy import check_artifact
from edgeq.errors import DeployError
from edgeq.remote.base import stderr_tail
from edgeq.remote.device import device_package

MODULE_NAME = "edgeq-release"
MODULE_DIR = "/usr/share/mender/modules/v3"
PAYLOAD_PACKAGE = "edgeq-device.pyz"
DEFAULT_WORKDIR = "/var/lib/edgeq"
WRITE_TIMEOUT_S = 600

# The update module. Mender calls it as MODULE STATE FILES; it answers the query states itself and hands the
# others to the device package the artifact carries (present from Download until Cleanup).
UPDATE_MODULE = """#!/bin/sh
# edgeq-release: Mender update module for edgeq releases (written by edgeq package --mender).
# Install at /usr/share/mender/modules/v3/edgeq-release, mode 755. Needs python3 (3.8+) on the device.
set -u
STATE="$1"
FILES="$2"
case "$STATE" in
    SupportsRollback) echo Yes; exit 0;;
    NeedsArtifactReboot) echo No; exit 0;;
esac
PACKAGE="$FILES/files/edgeq-device.pyz"
[ -f "$PACKAGE" ] || exit 0  # states after Cleanup, or before the payload arrived: nothing to do
exec "${EDGEQ_PYTHON:-python3}" -I "$PACKAGE" mender "$STATE" "$FILES"
"""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class MenderPackage:
    path: Path
    module: Path
    artifact_name: str
    release_id: str
    device_types: tuple[str, ...]
    signed: bool
    size_bytes: int


def mender_artifact_tool() -> str:
    """The ``mender-artifact`` executable, or a DeployError saying how to get it."""
    tool = shutil.which("mender-artifact")
    if tool is None:
        raise DeployError("mender-artifact is not installed (it writes and signs Mender artifacts)",
                          hint="apt-get install mender-artifact (Debian bookworm), or see docs.mender.io")
    return tool


def _check_name(what: str, value: str) -> str:
    if not _NAME.match(value):
        raise DeployError(f"{what} {value!r} is not a valid name",
                          hint="letters, digits, '.', '_' and '-', starting with a letter or digit")
    return value


def package_mender(artifact_dir: str | Path, output: str | Path, device_types: list[str], *,
                   key: str | Path | None = None, workdir: str = DEFAULT_WORKDIR, keep: int = 3,
                   artifact_name: str | None = None, allow_failed: bool = False) -> MenderPackage:
    """Write ``output`` (a .mender file) for ``artifact_dir``, and the update module beside it."""
    manifest, plan = check_artifact(artifact_dir, allow_failed=allow_failed)
    if not device_types:
        raise DeployError("a Mender artifact needs at least one --device-type",
                          hint="the value of device_type in the devices' /var/lib/mender/device_type")
    for device_type in device_types:
        _check_name("device type", device_type)
    name = _check_name("artifact name", artifact_name or f"edgeq-{manifest.format}-{manifest.precision}-{manifest.id}")
    if not PurePosixPath(workdir).is_absolute() or "\n" in workdir:
        raise DeployError(f"--workdir {workdir!r} must be an absolute device path")
    if keep < 1:
        raise DeployError(f"--keep {keep}: keep at least 1 release")
    key_path = Path(key) if key is not None else None
    if key_path is not None and not key_path.is_file():
        raise DeployError(f"{key_path}: no such signing key file", hint="a PEM private key (RSA or ECDSA)")
    output = Path(output)
    if output.suffix != ".mender":
        raise DeployError(f"{output}: the output must end in .mender")
    if not output.parent.is_dir():
        raise DeployError(f"{output.parent}: no such directory for the output")
    tool = mender_artifact_tool()
    with tempfile.TemporaryDirectory(prefix="edgeq-mender-") as scratch_dir:
        scratch = Path(scratch_dir)
        payload = scratch / "payload"
        payload.mkdir()
        entries = []
        for index, item in enumerate(plan):
            flat = f"{index:03d}-{PurePosixPath(item.rel).name}"
            shutil.copyfile(item.local, payload / flat)
            entries.append({"payload": flat, "path": item.rel, "sha256": item.sha256, "size": item.size})
        package = device_package()
        (payload / PAYLOAD_PACKAGE).write_bytes(package.data)
        meta = {"edgeq_release": 1, "release_id": manifest.id, "workdir": workdir.rstrip("/") or "/",
                "keep": keep, "files": entries, "device_package_sha256": package.sha256}
        (scratch / "meta-data.json").write_text(json.dumps(meta, indent=1))
        partial = output.with_name(f".{output.name}.partial")
        argv = [tool, "write", "module-image", "--type", MODULE_NAME, "--artifact-name", name,
                "--meta-data", str(scratch / "meta-data.json"), "--output-path", str(partial),
                "--provides", f"edgeq.release_id:{manifest.id}", "--compression", "gzip"]
        for device_type in device_types:
            argv += ["--device-type", device_type]
        for entry in [*entries, {"payload": PAYLOAD_PACKAGE}]:
            argv += ["--file", str(payload / entry["payload"])]
        if key_path is not None:
            argv += ["--key", str(key_path)]
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=WRITE_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            partial.unlink(missing_ok=True)
            raise DeployError(f"mender-artifact did not finish writing {output} in {WRITE_TIMEOUT_S}s") from exc
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            detail = stderr_tail(result.stderr or result.stdout) or f"exit code {result.returncode}"
            raise DeployError(f"mender-artifact could not write {output}: {detail}",
                              hint="check the signing key" if key_path else None)
        partial.replace(output)
    module = output.with_name(MODULE_NAME)
    module.write_text(UPDATE_MODULE)
    module.chmod(0o755)
    return MenderPackage(output, module, name, manifest.id, tuple(device_types), key_path is not None,
                         output.stat().st_size)
