"""Releases under WORKDIR: the deploy lock, inspect, prepare, activate (verify, swap, prune), rollback.

Layout under WORKDIR:

    releases/<id>/          complete, verified releases (model files and manifest.json only)
    releases/.tmp-<id>-*    uploads in progress (removed by the next deploy under the lock)
    *.tmp-<pid>             single-file writes (history, current, venv, python) killed before their rename
                            (removed by the next deploy too); a verified upload is fsynced before its rename
    releases/.history       JSON list of activated ids, oldest first (rollback walks it back)
    current -> releases/<id>
    .deploy.lock            flock(2) held by the deploy (or ``targets setup``) in progress
    bin/edgeq-device-<sha12>.pyz   this package, one file per version
"""

import hashlib
import json
import os
import shutil

TMP_PREFIX = ".tmp-"
HISTORY = ".history"


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()


def free_bytes(path):
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    stats = os.statvfs(path or "/")
    return stats.f_bavail * stats.f_frsize


def releases_dir(workdir):
    return os.path.join(workdir, "releases")


def current_id(workdir):
    try:
        target = os.readlink(os.path.join(workdir, "current"))
    except OSError:
        return None
    return os.path.basename(target.rstrip("/"))


def read_history(workdir):
    try:
        with open(os.path.join(releases_dir(workdir), HISTORY)) as handle:
            history = json.load(handle)
        return [str(h) for h in history] if isinstance(history, list) else []
    except (OSError, ValueError):
        return []


def write_history(workdir, history):
    path = os.path.join(releases_dir(workdir), HISTORY)
    tmp = path + f".tmp-{os.getpid()}"
    with open(tmp, "w") as handle:
        json.dump(history[-100:], handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def check_files(directory, expected):
    """Problems with ``directory`` against {relative path: sha256} (empty list = complete)."""
    problems = []
    for rel, digest in sorted(expected.items()):
        path = os.path.join(directory, rel)
        if not os.path.isfile(path) or os.path.islink(path):
            problems.append({"path": rel, "problem": "missing"})
        elif sha256(path) != digest:
            problems.append({"path": rel, "problem": "sha256 mismatch"})
    return problems


def release_listing(workdir):
    root = releases_dir(workdir)
    try:
        names = os.listdir(root)
    except OSError:
        return [], []
    releases = sorted(n for n in names if not n.startswith(".") and os.path.isdir(os.path.join(root, n)))
    temps = sorted(n for n in names if n.startswith(TMP_PREFIX))
    return releases, temps


def swap_current(workdir, release_id):
    """Point ``current`` at releases/<id> atomically: a new symlink, then rename(2) over the old one."""
    link = os.path.join(workdir, f".current.tmp-{os.getpid()}")
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(os.path.join("releases", release_id), link)
    os.replace(link, os.path.join(workdir, "current"))
    fsync_dir(workdir)


def fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prune(workdir, keep, also_keep=()):
    """Delete old releases beyond the newest ``keep``, never the current, the previous one or ``also_keep``."""
    releases, _ = release_listing(workdir)
    history = read_history(workdir)
    current = current_id(workdir)
    previous = None
    if current in history:
        earlier = [h for h in history[: len(history) - 1 - history[::-1].index(current)] if h != current]
        previous = earlier[-1] if earlier else None
    order = {}
    root = releases_dir(workdir)
    for name in releases:  # releases unknown to the history count as oldest, by mtime
        order[name] = (0, os.path.getmtime(os.path.join(root, name)))
    for position, name in enumerate(history):
        if name in order:
            order[name] = (1, position)
    newest_first = sorted(releases, key=lambda n: order[n], reverse=True)
    protected = set(newest_first[:keep]) | {current, previous} | set(also_keep)
    removed = []
    for name in newest_first:
        if name not in protected:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed.append(name)
    return removed


def op_inspect(params):
    """State of the device and of one release: current, history, complete or not, free space."""
    workdir = params["workdir"]
    release_id = params.get("release_id")
    releases, temps = release_listing(workdir)
    result = {"current": current_id(workdir), "history": read_history(workdir), "releases": releases,
              "temps": temps, "free_bytes": free_bytes(workdir), "release_exists": False, "problems": []}
    if release_id:
        directory = os.path.join(releases_dir(workdir), release_id)
        result["release_exists"] = os.path.isdir(directory)
        if result["release_exists"]:
            result["problems"] = check_files(directory, params["expected"])
    return result


# Temp names of single-file writes (history, the ``current`` and ``venv`` links, the interpreter record): each is
# ``<name>.tmp-<pid>``, renamed over ``<name>`` when done, left behind only by a process killed in between.
STALE_TEMPS = ((("releases",), ".history.tmp-"), ((), ".current.tmp-"), ((), ".venv.tmp-"), ((), "python.tmp-"))


def remove_stale_writes(workdir):
    """Delete the temp files of single-file writes killed before their rename (under the deploy lock, which
    every writer of these holds: deploy, rollback and setup)."""
    removed = []
    for parts, prefix in STALE_TEMPS:
        directory = os.path.join(workdir, *parts)
        try:
            names = [n for n in os.listdir(directory) if n.startswith(prefix)]
        except OSError:
            continue
        for name in names:
            path = os.path.join(directory, name)
            try:
                os.unlink(path)
                removed.append(os.path.join(*parts, name))
            except OSError:  # a directory by that name is not ours to delete
                pass
    return removed


def make_durable(directory):
    """fsync every file under ``directory``, then the directories bottom-up: a verified release survives a
    power cut right after its rename (rename orders nothing about the data in the page cache)."""
    for here, _dirs, files in os.walk(directory, topdown=False):
        for name in files:
            path = os.path.join(here, name)
            if os.path.isfile(path) and not os.path.islink(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(here)


def remove_temps(workdir):
    """Delete leftovers of failed uploads and killed writes (only ever called under the deploy lock)."""
    root = releases_dir(workdir)
    stale = remove_stale_writes(workdir)
    _, temps = release_listing(workdir)
    for name in temps:
        path = os.path.join(root, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    return temps + stale


def op_cleanup(params):
    return {"ok": True, "removed": remove_temps(params["workdir"])}


def op_prepare(params):
    """Remove leftover uploads, check free space, make a fresh temp dir with the artifact's subdirs.

    Short of space, it first prunes the releases the activation would prune anyway (beyond the newest
    ``keep - 1``, for the new one makes ``keep``; never the current or the previous release): otherwise a
    device full of kept releases could take no new one, even with ``--keep 1``.
    """
    workdir = params["workdir"]
    root = releases_dir(workdir)
    os.makedirs(root, exist_ok=True)
    temps = remove_temps(workdir)
    available = free_bytes(root)
    pruned = []
    if available < params["need_bytes"] and params.get("keep"):
        pruned = prune(workdir, max(int(params["keep"]) - 1, 0), also_keep=params.get("also_keep") or ())
        available = free_bytes(root)
    if available < params["need_bytes"]:
        return {"ok": False, "error": "space", "free_bytes": available, "need_bytes": params["need_bytes"],
                "removed": temps, "pruned": pruned}
    tmp = os.path.join(root, params["tmp_name"])
    os.mkdir(tmp, 0o755)
    for sub in params.get("dirs", []):
        os.makedirs(os.path.join(tmp, sub), exist_ok=True)
    return {"ok": True, "tmp": tmp, "removed": temps, "pruned": pruned, "free_bytes": available}


def op_activate(params):
    """Verify the upload (or the existing release), move it into place, swap ``current``, prune.

    With ``activate`` false the release is verified and moved into place but ``current`` and the history
    are left alone (a release stored for bench only); pruning still never removes it.
    """
    workdir = params["workdir"]
    release_id = params["release_id"]
    root = releases_dir(workdir)
    final = os.path.join(root, release_id)
    tmp = params.get("tmp")
    verified = False  # True once ``final`` is exactly the upload that check_files just verified
    if tmp:
        problems = check_files(tmp, params.get("tmp_expected") or params["expected"])
        if problems:
            shutil.rmtree(tmp, ignore_errors=True)
            return {"ok": False, "error": "verify", "problems": problems}
        make_durable(tmp)  # verified from the page cache: on disk before anything points at it
        for rel in params.get("replace") or []:  # single files refreshed inside an existing release
            os.replace(os.path.join(tmp, rel), os.path.join(final, rel))
        if params.get("replace") is None:
            if os.path.isdir(final):  # an incomplete release of the same id: set it aside, then replace
                broken = os.path.join(root, f"{TMP_PREFIX}{release_id}-broken-{os.getpid()}")
                os.rename(final, broken)
                os.rename(tmp, final)
                shutil.rmtree(broken, ignore_errors=True)
            else:
                os.rename(tmp, final)
            verified = True
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            for rel in params["replace"]:
                fsync_dir(os.path.dirname(os.path.join(final, rel)))
        fsync_dir(root)
    if not verified:  # a release that was already there, maybe with refreshed files: check it whole
        problems = check_files(final, params["expected"])
        if problems:
            return {"ok": False, "error": "verify", "problems": problems}
    previous = current_id(workdir)
    if params.get("activate", True):
        if previous != release_id:
            swap_current(workdir, release_id)
        history = read_history(workdir)
        if not history or history[-1] != release_id:
            history.append(release_id)
            write_history(workdir, history)
    removed = prune(workdir, int(params.get("keep", 3)), also_keep=[release_id])
    return {"ok": True, "previous": previous, "pruned": removed}


def release_problems(directory):
    """A release verifies against its own manifest.json (every listed file's sha256)."""
    try:
        with open(os.path.join(directory, "manifest.json")) as handle:
            manifest = json.load(handle)
        expected = {entry["path"]: entry["sha256"] for entry in manifest["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return [{"path": "manifest.json", "problem": "missing or unreadable"}]
    return check_files(directory, expected)


def op_rollback(params):
    """Point ``current`` at the release active before it (walking the history back), verified first."""
    workdir = params["workdir"]
    history = read_history(workdir)
    current = current_id(workdir)
    if current is None:
        return {"ok": False, "error": "no current release"}
    skipped = []
    cut = len(history) - 1 - history[::-1].index(current) if current in history else len(history)
    for index in range(cut - 1, -1, -1):
        candidate = history[index]
        if candidate == current:
            continue
        directory = os.path.join(releases_dir(workdir), candidate)
        if not os.path.isdir(directory) or release_problems(directory):
            skipped.append(candidate)
            continue
        swap_current(workdir, candidate)
        write_history(workdir, history[: index + 1])
        return {"ok": True, "previous": current, "current": candidate, "skipped": skipped}
    return {"ok": False, "error": "no previous release", "current": current, "skipped": skipped}
