"""The ``edgeq-release`` Mender update module's states: ``python3 -I edgeq-device.pyz mender STATE FILES``.

Mender's client calls the update module (a shell script, ``edgeq.mender.UPDATE_MODULE``) as ``MODULE STATE
FILES`` for each state of an install; the script answers the query states itself and hands the others to
this code, which the artifact carries as its ``edgeq-device.pyz`` payload file. ``FILES/header/meta-data``
(signed with the artifact) says the release: its id, the device workdir, how many releases to keep, and
each payload file's path in the release and sha256.

The checks are those of an SSH deploy, by the same code (ops/releases.py): the device's deploy lock is
taken, every file's sha256 is checked on the device, the files are fsynced and renamed into
``releases/<id>``, ``current`` is swapped by rename(2) and the history appended. ``ArtifactRollback``
points ``current`` back at the release that was current before this install (verified first), or removes
it when there was none; it does nothing when the install never swapped ``current``. ``FILES/tmp``
carries what the install did to the later states.
"""

import fcntl
import json
import os
import shutil
import sys

from .locks import LOCK_FILES
from .releases import (
    check_files,
    current_id,
    fsync_dir,
    op_activate,
    op_prepare,
    read_history,
    release_problems,
    releases_dir,
    swap_current,
    write_history,
)

SPACE_MARGIN = 1 << 20
STATE_FILE = "edgeq-state.json"


class ModuleError(Exception):
    """One line for Mender's log; the state fails (exit 1) and Mender rolls back."""


def main(argv):
    if len(argv) != 2:
        sys.stderr.write("usage: edgeq-device mender STATE FILES\n")
        return 2
    state, files = argv
    handler = STATES.get(state)
    if state in QUERIES:
        sys.stdout.write(QUERIES[state] + "\n")
        return 0
    if handler is None:
        return 0  # Download, ArtifactVerifyReboot, ArtifactFailure, Cleanup, ...: nothing to do
    try:
        message = handler(files)
    except (ModuleError, OSError) as exc:
        sys.stderr.write("edgeq-release %s failed: %s\n" % (state, exc))
        return 1
    if message:
        sys.stdout.write("edgeq-release: %s\n" % message)
    return 0


def _meta(files):
    try:
        with open(os.path.join(files, "header", "meta-data")) as handle:
            meta = json.load(handle)
        entries = [(str(e["payload"]), str(e["path"]), str(e["sha256"]), int(e["size"])) for e in meta["files"]]
        release_id, workdir, keep = str(meta["release_id"]), str(meta["workdir"]), int(meta.get("keep", 3))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModuleError("the artifact's meta-data is not an edgeq release's: %s" % exc) from exc
    for _, rel, _, _ in entries:
        if rel.startswith("/") or ".." in rel.split("/"):
            raise ModuleError("meta-data names a file outside the release: %r" % rel)
    if not workdir.startswith("/") or "/" in release_id or release_id.startswith("."):
        raise ModuleError("meta-data has a bad workdir or release id")
    return release_id, workdir, keep, entries


class _DeployLock(object):
    """The device's exclusive deploy lock, as an SSH deploy takes it: an install never runs beside one."""

    def __init__(self, workdir):
        self.path = os.path.join(workdir, LOCK_FILES["deploy"])

    def __enter__(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(self.fd, 4096).decode("utf-8", "replace").strip().splitlines()
            os.close(self.fd)
            raise ModuleError("the device's deploy lock is held by %s"
                              % (holder[0] if holder else "another process")) from exc
        os.ftruncate(self.fd, 0)
        os.write(self.fd, ("mender install (edgeq-release)\ndevice pid %d\n" % os.getpid()).encode("utf-8"))
        return self

    def __exit__(self, *exc):
        os.ftruncate(self.fd, 0)
        os.close(self.fd)


def _save_state(files, state):
    path = os.path.join(files, "tmp", STATE_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as handle:
        json.dump(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(path + ".tmp", path)


def _load_state(files):
    try:
        with open(os.path.join(files, "tmp", STATE_FILE)) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def artifact_install(files):
    release_id, workdir, keep, entries = _meta(files)
    expected = {rel: digest for _, rel, digest, _ in entries}
    with _DeployLock(workdir):
        previous = current_id(workdir)
        # Saved before anything moves: a rollback after a crash at any later point knows what to go back to.
        _save_state(files, {"workdir": workdir, "release_id": release_id, "previous": previous})
        final = os.path.join(releases_dir(workdir), release_id)
        params = {"workdir": workdir, "release_id": release_id, "expected": expected, "keep": keep}
        if not (os.path.isdir(final) and not check_files(final, expected)):
            dirs = sorted({os.path.dirname(rel) for _, rel, _, _ in entries} - {""})
            prepared = op_prepare({"workdir": workdir, "tmp_name": ".tmp-%s-mender-%d" % (release_id, os.getpid()),
                                   "need_bytes": sum(size for _, _, _, size in entries) + SPACE_MARGIN,
                                   "dirs": dirs, "keep": keep, "also_keep": [release_id]})
            if not prepared["ok"]:
                raise ModuleError("not enough free space in %s: need %d bytes, %d free; current release unchanged"
                                  % (workdir, prepared["need_bytes"], prepared["free_bytes"]))
            for payload, rel, _, _ in entries:
                shutil.copyfile(os.path.join(files, "files", payload), os.path.join(prepared["tmp"], rel))
            params["tmp"] = prepared["tmp"]
        answer = op_activate(params)
    if not answer["ok"]:
        detail = ", ".join("%s (%s)" % (p["path"], p["problem"]) for p in answer.get("problems", []))
        raise ModuleError("checksum verification failed: %s; release not activated, current is still %s"
                          % (detail or answer.get("error"), previous or "unset"))
    return "release %s active (was %s)" % (release_id, previous or "unset")


def artifact_commit(files):
    state = _load_state(files)
    return "release %s committed" % state["release_id"] if state else None


def artifact_rollback(files):
    state = _load_state(files)
    if state is None:
        return "nothing was installed; nothing to roll back"
    workdir, release_id, previous = state["workdir"], state["release_id"], state["previous"]
    with _DeployLock(workdir):
        current = current_id(workdir)
        if current != release_id or previous == release_id:
            return "current is %s; this install did not change it" % (current or "unset")
        history = read_history(workdir)
        if history and history[-1] == release_id:
            history.pop()
        if previous is None:
            os.unlink(os.path.join(workdir, "current"))
            fsync_dir(workdir)
        else:
            problems = release_problems(os.path.join(releases_dir(workdir), previous))
            if problems:
                raise ModuleError("the previous release %s does not verify (%s); current left at %s"
                                  % (previous, ", ".join(p["path"] for p in problems), release_id))
            swap_current(workdir, previous)
        write_history(workdir, history)
    return "rolled back to %s" % (previous or "no release")


QUERIES = {"SupportsRollback": "Yes", "NeedsArtifactReboot": "No"}
STATES = {"ArtifactInstall": artifact_install, "ArtifactCommit": artifact_commit,
          "ArtifactRollback": artifact_rollback}
