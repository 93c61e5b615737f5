"""Releases on a device: lock, space check, upload, on-device sha256 verify, atomic ``current`` swap,
keep the last K, rollback; and the same for a fleet over a bounded thread pool.

Device layout under the target's workdir (see ``edgeq/device/ops/releases.py`` for the device side)::

    releases/<artifact-id>/{model files, manifest.json}
    current -> releases/<artifact-id>
    bin/edgeq-device-<sha12>.pyz    the device package every step runs (``edgeq/remote/device.py``)

Whatever fails (lost connection, disk full, checksum mismatch, killed controller), ``current`` keeps
pointing at a complete, verified release: a release becomes visible only after every file's sha256
was checked on the device, and ``current`` moves by one rename(2). Leftovers of a failed upload are
removed by the next deploy under the device lock.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from edgeq.errors import DeployError, EdgeqError, Failure, RemoteCommandError, internal_failure
from edgeq.manifest import MANIFEST_NAME, Manifest, sha256_file, verify_artifact
from edgeq.remote import Transport, open_transport
from edgeq.remote.device import LockedDevice, device_lock, device_op, device_workdir
from edgeq.targets import Target

log = logging.getLogger(__name__)

SPACE_MARGIN = 1 << 20

# progress(bytes_done, bytes_total) over all files of one deploy
DeployProgress = Callable[[int, int], None]
STATUSES = ("deployed", "unchanged", "failed", "skipped")


@dataclass
class DeployOutcome:
    """What happened on one target."""

    target: Target
    status: str  # deployed | unchanged | failed | skipped (fleet stopped before this target)
    release_id: str | None
    seconds: float
    failure: Failure | None = None  # why it failed (status failed)
    message: str = ""  # what happened (deployed, unchanged) or why it was not tried (skipped)
    uploaded_bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.status in ("deployed", "unchanged")

    @property
    def error(self) -> str | None:
        """One line saying why this target did not get the release (None when it did)."""
        if self.failure is not None:
            return self.failure.message
        return self.message if self.status == "skipped" else None

    @property
    def hint(self) -> str | None:
        return self.failure.hint if self.failure is not None else None


@dataclass
class RollbackResult:
    """``current`` moved from one release to another on one target."""

    target: Target
    from_id: str
    to_id: str
    skipped: list[str] = field(default_factory=list)


@dataclass
class ReleaseFile:
    """One file of a release: where it is here, where it goes under the release dir, its sha256."""

    rel: str
    local: Path
    sha256: str
    size: int


# -- planning ------------------------------------------------------------------------------------------
def _check_relative_path(rel: str, artifact_dir: Path) -> str:
    path = PurePosixPath(rel)
    if (not rel or path.is_absolute() or ".." in path.parts or "\\" in rel
            or any(c in rel for c in "\0\n\r")):
        raise DeployError(f"{artifact_dir / MANIFEST_NAME}: files: unsafe path {rel!r} (must be relative, "
                          "without '..', NUL or newline)")
    return rel


def release_plan(artifact_dir: Path, manifest: Manifest) -> list[ReleaseFile]:
    """Every file of the release: the artifact's files and its manifest (the device package lives in bin/)."""
    plan = []
    for entry in manifest.files:
        rel = _check_relative_path(entry.path, artifact_dir)
        if rel == MANIFEST_NAME:
            raise DeployError(f"{artifact_dir / MANIFEST_NAME}: files: {rel!r} is a name edgeq reserves in releases")
        plan.append(ReleaseFile(rel, artifact_dir / rel, entry.sha256, entry.size))
    manifest_path = artifact_dir / MANIFEST_NAME
    plan.append(ReleaseFile(MANIFEST_NAME, manifest_path, sha256_file(manifest_path), manifest_path.stat().st_size))
    return plan


def check_artifact(artifact_dir: str | Path, allow_failed: bool = False) -> tuple[Manifest, list[ReleaseFile]]:
    """Verify the local artifact against its manifest (raises ManifestError / DeployError) and plan it."""
    artifact_dir = Path(artifact_dir)
    manifest = verify_artifact(artifact_dir)
    if manifest.status != "ok" and not allow_failed:
        raise DeployError(f"{artifact_dir}: the artifact failed its accuracy validation (manifest status 'failed')",
                          hint="re-convert it, or pass --allow-failed to deploy it anyway")
    return manifest, release_plan(artifact_dir, manifest)


# -- deploy --------------------------------------------------------------------------------------------
def deploy(artifact_dir: str | Path, target: Target, keep: int = 3, *, progress: DeployProgress | None = None,
           allow_failed: bool = False, activate: bool = True,
           _after_upload: Callable[[Transport, str], None] | None = None) -> DeployOutcome:
    """Deploy one artifact to one target and (unless ``activate=False``) make it the active release.

    With ``activate=False`` the release is uploaded into ``releases/<id>/`` and verified on the device
    exactly the same way, but ``current`` and the deploy history stay as they were (bench uses this, so
    benchmarking an artifact never makes it the device's active release); a release already complete on
    the device is ``unchanged`` and nothing is uploaded. Pruning never removes the current release, the
    one before it, or the release just deployed.

    Problems with the local artifact raise (ManifestError / DeployError); anything that goes wrong on or
    on the way to the device is returned as a ``failed`` outcome with a one-line error naming the host.
    ``_after_upload(transport, temp_dir)`` is a test seam called between upload and verification.
    """
    if keep < 1:
        raise DeployError(f"keep must be at least 1, got {keep}")
    manifest, plan = check_artifact(artifact_dir, allow_failed)
    return _deploy_planned(manifest, plan, target, keep, progress, _after_upload, activate)


def _deploy_planned(manifest: Manifest, plan: list[ReleaseFile], target: Target, keep: int,
                    progress: DeployProgress | None, after_upload, activate: bool = True) -> DeployOutcome:
    started = time.monotonic()
    try:
        with open_transport(target) as transport:
            status, message, uploaded = deploy_over(transport, target, manifest, plan, keep=keep, progress=progress,
                                                    activate=activate, _after_upload=after_upload)
    except EdgeqError as exc:
        log.info("deploy to %s failed: %s", target.name, exc)
        return DeployOutcome(target, "failed", manifest.id, time.monotonic() - started,
                             failure=exc.failure(target.name))
    return DeployOutcome(target, status, manifest.id, time.monotonic() - started, message=message,
                         uploaded_bytes=uploaded)


def deploy_over(transport: Transport, target: Target, manifest: Manifest, plan: list[ReleaseFile], *,
                keep: int = 3, progress: DeployProgress | None = None, activate: bool = True,
                _after_upload=None) -> tuple[str, str, int]:
    """Deploy a checked artifact over an open connection, under the device lock; (status, message,
    uploaded bytes). Raises EdgeqError; ``deploy`` turns that into a failed outcome."""
    workdir = device_workdir(transport, target)
    with device_lock(transport, target, workdir) as device:
        return _deploy_locked(device, manifest, plan, keep, progress, _after_upload, activate)


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _deploy_locked(device: LockedDevice, manifest: Manifest, plan: list[ReleaseFile], keep: int,
                   progress: DeployProgress | None, after_upload, activate: bool = True) -> tuple[str, str, int]:
    transport, target, workdir = device.transport, device.target, device.workdir
    release_id = manifest.id
    expected = {f.rel: f.sha256 for f in plan}
    state = device.op("inspect", {"workdir": workdir, "release_id": release_id, "expected": expected})
    current = state.get("current")
    replace: list[str] | None = None
    upload = plan
    if state["release_exists"]:
        bad = {p["path"] for p in state["problems"]}
        if not bad:
            if current == release_id:
                return "unchanged", "already deployed and current; nothing uploaded", 0
            if not activate:
                return "unchanged", f"already on the device and verified; not activated (current is " \
                                    f"{current or 'unset'}); nothing uploaded", 0
            _activate(device, release_id, expected, keep, current)
            return "deployed", f"release already on the device, verified and activated (was {current}); " \
                               "nothing uploaded", 0
        if bad <= {MANIFEST_NAME}:
            # Same model files, a rewritten manifest: refresh just that file inside the release.
            replace = sorted(bad)
            upload = [f for f in plan if f.rel in bad]
        else:
            log.info("%s: release %s on the device is incomplete (%s); uploading it again",
                     target.name, release_id, ", ".join(sorted(bad)))
    need = sum(f.size for f in upload) + SPACE_MARGIN
    dirs = sorted({str(PurePosixPath(f.rel).parent) for f in upload} - {"."})
    tmp_name = f".tmp-{release_id}-{secrets.token_hex(4)}"
    prepared = device.op("prepare", {"workdir": workdir, "tmp_name": tmp_name, "need_bytes": need, "dirs": dirs,
                                     "keep": keep, "also_keep": [release_id]})
    if not prepared.get("ok"):
        raise DeployError(f"{target.label}: not enough free space in {workdir}: need {_mb(need)}, "
                          f"{_mb(prepared['free_bytes'])} free; nothing uploaded, current release unchanged",
                          hint="free space on the device or lower --keep")
    if prepared.get("pruned"):
        log.info("%s: pruned %s to make room", target.name, ", ".join(prepared["pruned"]))
    tmp = prepared["tmp"]
    total = sum(f.size for f in upload)
    done = 0
    try:
        for item in upload:
            base = done
            callback = (lambda d, _t, base=base: progress(base + d, total)) if progress else None
            transport.put(item.local, f"{tmp}/{item.rel}", progress=callback)
            done += item.size
    except RemoteCommandError:
        # The connection still works (e.g. disk full mid-write): remove the partial upload now.
        with suppress(EdgeqError):
            device.op("cleanup", {"workdir": workdir}, timeout=60)
        raise
    if after_upload is not None:
        after_upload(transport, tmp)
    params = {"workdir": workdir, "release_id": release_id, "tmp": tmp, "expected": expected, "keep": keep,
              "replace": replace, "activate": activate}
    if replace is not None:
        params["tmp_expected"] = {rel: expected[rel] for rel in replace}
    answer = device.op("activate", params)
    if not answer.get("ok"):
        raise _activation_error(target, answer, current)
    if replace is not None:
        what = " and ".join(replace)
        if current == release_id:
            return "deployed", f"release already current; refreshed {what}", done
        if not activate:
            return "deployed", f"release was on the device; refreshed {what}; not activated", done
        return "deployed", f"release was on the device; refreshed {what} and activated it", done
    if not activate and current != release_id:
        return "deployed", f"uploaded {len(upload)} files ({_mb(done)}), verified; not activated " \
                           f"(current is {current or 'unset'})", done
    return "deployed", f"uploaded {len(upload)} files ({_mb(done)}), verified, activated", done


def _activation_error(target: Target, answer: dict, current: str | None) -> DeployError:
    problems = answer.get("problems") or []
    detail = ", ".join(f"{p['path']} ({p['problem']})" for p in problems) or answer.get("error", "unknown")
    return DeployError(f"{target.label}: checksum verification on the device failed: {detail}; "
                       f"release not activated, current is still {current or 'unset'}",
                       hint="run the deploy again; if it repeats, check the device's storage")


def _activate(device: LockedDevice, release_id, expected, keep, current) -> None:
    answer = device.op("activate", {"workdir": device.workdir, "release_id": release_id, "expected": expected,
                                    "keep": keep})
    if not answer.get("ok"):
        raise _activation_error(device.target, answer, current)


# -- rollback ------------------------------------------------------------------------------------------
def rollback(target: Target) -> RollbackResult:
    """Point ``current`` back at the release that was active before it (verified on the device first)."""
    with open_transport(target) as transport:
        workdir = device_workdir(transport, target)
        with device_lock(transport, target, workdir) as device:
            answer = device.op("rollback", {"workdir": workdir})
    if not answer.get("ok"):
        if answer.get("error") == "no current release":
            raise DeployError(f"{target.label}: nothing is deployed in {target.workdir}; nothing to roll back")
        skipped = answer.get("skipped") or []
        note = f" (skipped missing or incomplete: {', '.join(skipped)})" if skipped else ""
        raise DeployError(f"{target.label}: no previous release to roll back to from {answer.get('current')}{note}")
    return RollbackResult(target, answer["previous"], answer["current"], answer.get("skipped") or [])


def break_lock(target: Target) -> str:
    """Stop the processes that hold ``target``'s deploy and bench locks (left by a controller gone in a
    partition; each stops the step it runs first) and say whose they were; DeployError when a holder is not
    an edgeq lock process (it is not stopped)."""
    broken = []
    with open_transport(target) as transport:
        workdir = device_workdir(transport, target)
        for lock in ("deploy", "bench"):
            answer = device_op(transport, target, "break_lock", {"workdir": workdir, "lock": lock})
            if not answer.get("ok"):
                raise DeployError(f"{target.label}: the {lock} lock in {workdir} was not broken: "
                                  f"{answer.get('message')} (held by {answer.get('holder') or 'unknown'})")
            if answer.get("held"):
                broken.append(f"broke the {lock} lock held by {answer.get('holder') or 'unknown'} "
                              f"(device pid {answer['pid']})")
    if not broken:
        return f"{target.name}: the deploy and bench locks in {workdir} are not held; nothing to break"
    return f"{target.name}: " + "; ".join(broken)


# -- fleet ---------------------------------------------------------------------------------------------
def deploy_fleet(artifact_dir: str | Path, targets: list[Target], parallel: int = 8, canary: int = 0,
                 max_fail_percent: float | None = None, keep: int = 3, *,
                 progress: Callable[[Target, int, int], None] | None = None,
                 allow_failed: bool = False) -> list[DeployOutcome]:
    """Deploy to many targets over a bounded pool; one failing device never stops the others.

    With ``canary`` N, the first N targets go first and nothing else is tried if any of them fails.
    The rest go in batches of ``parallel``; after each batch, when the failed share of the targets tried
    so far exceeds ``max_fail_percent``, the remaining targets are ``skipped``. Outcomes follow the order
    of ``targets``.
    """
    if parallel < 1:
        raise DeployError(f"parallel must be at least 1, got {parallel}")
    if canary < 0:
        raise DeployError(f"canary must be 0 or more, got {canary}")
    if max_fail_percent is not None and not 0 <= max_fail_percent <= 100:
        raise DeployError(f"max-fail-percent must be between 0 and 100, got {max_fail_percent}")
    if keep < 1:
        raise DeployError(f"keep must be at least 1, got {keep}")
    manifest, plan = check_artifact(artifact_dir, allow_failed)
    unique: dict[str, Target] = {}
    for target in targets:
        unique.setdefault(target.name, target)
    ordered = list(unique.values())
    batches: list[list[Target]] = []
    rest = ordered
    if canary:
        batches.append(ordered[:canary])
        rest = ordered[canary:]
    batches += [rest[i:i + parallel] for i in range(0, len(rest), parallel)]

    outcomes: dict[str, DeployOutcome] = {}

    def one(target: Target) -> DeployOutcome:
        callback = (lambda done, total: progress(target, done, total)) if progress else None
        try:
            return _deploy_planned(manifest, plan, target, keep, callback, None)
        except Exception as exc:  # a bug on one device must not take the fleet down; report it as a failure
            log.exception("unexpected error deploying to %s", target.name)
            return DeployOutcome(target, "failed", manifest.id, 0.0, failure=internal_failure(exc, target.name))

    stop_reason = None
    with ThreadPoolExecutor(max_workers=min(parallel, max(1, len(ordered)))) as pool:
        for index, batch in enumerate(batches):
            if stop_reason:
                for target in batch:
                    outcomes[target.name] = DeployOutcome(target, "skipped", manifest.id, 0.0, message=stop_reason)
                continue
            for outcome in pool.map(one, batch):
                outcomes[outcome.target.name] = outcome
            tried = [o for o in outcomes.values() if o.status != "skipped"]
            failed = [o for o in tried if o.status == "failed"]
            if canary and index == 0 and failed:
                stop_reason = f"not attempted: {len(failed)} of {len(batch)} canary target(s) failed"
            elif max_fail_percent is not None and tried and 100.0 * len(failed) / len(tried) > max_fail_percent:
                stop_reason = (f"not attempted: {len(failed)} of {len(tried)} targets failed "
                               f"(> {max_fail_percent:g}%)")
    return [outcomes[t.name] for t in ordered]
