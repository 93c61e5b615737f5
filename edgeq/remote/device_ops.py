"""Device-side release operations, run as ``python3 -c BOOTSTRAP <this file, packed> OP`` with JSON on stdin.

Stdlib only, Python 3.6+ (f-strings, no walrus). Never imported on the device: the controller sends this
source as one argv element (zlib + base64, see ``edgeq.deploy.device_ops_argv``), quoted once like every
argument, and names travel as JSON on stdin, so no name is ever interpolated into shell code. Each operation prints one JSON object on stdout. Layout under WORKDIR:

    releases/<id>/          complete, verified releases
    releases/.tmp-<id>-*    uploads in progress (removed by the next deploy under the lock)
    releases/.history       JSON list of activated ids, oldest first (rollback walks it back)
    current -> releases/<id>
    .deploy.lock            flock(2) held by the deploy (or ``targets setup``) in progress
    venv -> venv-<token>    the venv made by ``edgeq targets setup`` (a new one is built beside it and the
                            link swapped only once pip succeeded)
    python                  the interpreter recorded by ``edgeq targets setup`` (WORKDIR/venv/bin/python)
"""

import errno
import fcntl
import hashlib
import json
import os
import platform
import shutil
import sys

TMP_PREFIX = ".tmp-"
HISTORY = ".history"
VENV_LINK = "venv"
VENV_PREFIX = "venv-"


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


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


def op_lock(params):
    """Hold an exclusive flock on WORKDIR/.deploy.lock until stdin closes (the controller ends or dies)."""
    workdir = params["workdir"]
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(os.path.join(workdir, ".deploy.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        holder = os.read(fd, 4096).decode("utf-8", "replace").strip()
        emit({"locked": False, "holder": holder})
        return
    os.ftruncate(fd, 0)
    os.write(fd, params.get("holder", "").encode("utf-8"))
    emit({"locked": True})
    sys.stdin.read()  # EOF when the channel closes, whatever the reason
    os.ftruncate(fd, 0)


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
    emit(result)


def remove_temps(workdir):
    """Delete leftovers of failed uploads (only ever called under the deploy lock)."""
    root = releases_dir(workdir)
    _, temps = release_listing(workdir)
    for name in temps:
        path = os.path.join(root, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    return temps


def op_cleanup(params):
    emit({"ok": True, "removed": remove_temps(params["workdir"])})


def op_prepare(params):
    """Remove leftover uploads, check free space, make a fresh temp dir with the artifact's subdirs."""
    workdir = params["workdir"]
    root = releases_dir(workdir)
    os.makedirs(root, exist_ok=True)
    temps = remove_temps(workdir)
    available = free_bytes(root)
    if available < params["need_bytes"]:
        emit({"ok": False, "error": "space", "free_bytes": available, "need_bytes": params["need_bytes"],
              "removed": temps})
        return
    tmp = os.path.join(root, params["tmp_name"])
    os.mkdir(tmp, 0o755)
    for sub in params.get("dirs", []):
        os.makedirs(os.path.join(tmp, sub), exist_ok=True)
    emit({"ok": True, "tmp": tmp, "removed": temps, "free_bytes": available})


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
            emit({"ok": False, "error": "verify", "problems": problems})
            return
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
        fsync_dir(root)
    if not verified:  # a release that was already there, maybe with refreshed files: check it whole
        problems = check_files(final, params["expected"])
        if problems:
            emit({"ok": False, "error": "verify", "problems": problems})
            return
    previous = current_id(workdir)
    if params.get("activate", True):
        if previous != release_id:
            swap_current(workdir, release_id)
        history = read_history(workdir)
        if not history or history[-1] != release_id:
            history.append(release_id)
            write_history(workdir, history)
    removed = prune(workdir, int(params.get("keep", 3)), also_keep=[release_id])
    emit({"ok": True, "previous": previous, "pruned": removed})


def release_problems(directory):
    """A release verifies against its own manifest.json (every listed file's sha256) and has the runner."""
    try:
        with open(os.path.join(directory, "manifest.json")) as handle:
            manifest = json.load(handle)
        expected = {entry["path"]: entry["sha256"] for entry in manifest["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return [{"path": "manifest.json", "problem": "missing or unreadable"}]
    problems = check_files(directory, expected)
    if not os.path.isfile(os.path.join(directory, "edgeq_runner.py")):
        problems.append({"path": "edgeq_runner.py", "problem": "missing"})
    return problems


def op_rollback(params):
    """Point ``current`` at the release active before it (walking the history back), verified first."""
    workdir = params["workdir"]
    history = read_history(workdir)
    current = current_id(workdir)
    if current is None:
        emit({"ok": False, "error": "no current release"})
        return
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
        emit({"ok": True, "previous": current, "current": candidate, "skipped": skipped})
        return
    emit({"ok": False, "error": "no previous release", "current": current, "skipped": skipped})


def record_python(workdir, python):
    """Record the interpreter edgeq runs the runner with (WORKDIR/python), atomically; returns the file."""
    path = os.path.join(workdir, "python")
    tmp = path + f".tmp-{os.getpid()}"
    with open(tmp, "w") as handle:
        handle.write(python + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def op_record_python(params):
    """Record the interpreter ``targets setup`` made (WORKDIR/python), atomically."""
    emit({"ok": True, "path": record_python(params["workdir"], params["python"])})


def _venv_name(name):
    if os.path.basename(name) != name or not name.startswith(VENV_PREFIX) or name.endswith(".wheelhouse"):
        raise OSError(errno.EINVAL, "not a venv build directory name", name)
    return name


def live_venv(workdir):
    """The name of the WORKDIR entry WORKDIR/venv links to (None when it is missing, a plain directory, or a
    link made by hand to somewhere else)."""
    try:
        name = os.readlink(os.path.join(workdir, VENV_LINK)).rstrip("/")
    except OSError:
        return None
    return name if name and "/" not in name else None


def op_venv_prepare(params):
    """Before a setup builds WORKDIR/<name>: remove venv builds (and their wheelhouses) a failed or killed
    setup left behind."""
    workdir = params["workdir"]
    os.makedirs(workdir, exist_ok=True)
    live = live_venv(workdir)
    removed = []
    for entry in sorted(os.listdir(workdir)):
        stale = (entry.startswith(VENV_PREFIX) and entry != live) or entry.startswith(".venv.old-")
        path = os.path.join(workdir, entry)
        if stale and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(entry)
    emit({"ok": True, "removed": removed})


def op_venv_switch(params):
    """Make the freshly built WORKDIR/<name> the venv: record it, swap the WORKDIR/venv link, drop the old one.

    The recorded interpreter is valid at every moment: first the build's own python is recorded, then the
    link moves by one rename(2), then the stable WORKDIR/venv/bin/python is recorded again.
    """
    workdir = params["workdir"]
    name = _venv_name(params["name"])
    record_python(workdir, os.path.join(workdir, name, "bin", "python"))
    link = os.path.join(workdir, VENV_LINK)
    old = live_venv(workdir)
    if os.path.lexists(link) and not os.path.islink(link):  # a plain venv dir from an older edgeq
        old = f".venv.old-{os.getpid()}"
        os.rename(link, os.path.join(workdir, old))
    tmp_link = os.path.join(workdir, f".venv.tmp-{os.getpid()}")
    if os.path.lexists(tmp_link):
        os.unlink(tmp_link)
    os.symlink(name, tmp_link)
    os.replace(tmp_link, link)
    fsync_dir(workdir)
    python = os.path.join(link, "bin", "python")
    record_python(workdir, python)
    ours = old and (old.startswith(VENV_PREFIX) or old.startswith(".venv.old-"))  # never a venv set up by hand
    if ours and old != name and os.path.isdir(os.path.join(workdir, old)):
        shutil.rmtree(os.path.join(workdir, old), ignore_errors=True)
    emit({"ok": True, "python": python, "removed": old if ours else None})


def op_venv_discard(params):
    """Remove a venv build that failed (never the live one)."""
    workdir = params["workdir"]
    name = _venv_name(params["name"])
    removed = name != live_venv(workdir) and os.path.isdir(os.path.join(workdir, name))
    if removed:
        shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
    emit({"ok": True, "removed": removed})


def op_read_python(params):
    """The recorded interpreter when it still exists and is executable, else null."""
    try:
        with open(os.path.join(params["workdir"], "python")) as handle:
            python = handle.read().strip()
    except OSError:
        python = None
    if python and not os.access(python, os.X_OK):
        python = None
    emit({"python": python})


def _import_check(modules):
    import importlib

    errors = []
    for module in modules:
        try:
            imported = importlib.import_module(module)
        except Exception as exc:  # any import failure means "not usable here"
            errors.append(f"{module}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            continue
        return {"ok": True, "module": module, "version": getattr(imported, "__version__", None)}
    return {"ok": False, "error": "; ".join(errors)}


def _power_sensors():
    import ctypes.util
    import glob

    found = []
    rapl = sorted(glob.glob("/sys/class/powercap/intel-rapl*/energy_uj"))
    if rapl:
        readable = [p for p in rapl if os.access(p, os.R_OK)]
        found.append({"sensor": "rapl", "paths": rapl, "readable": bool(readable)})
    ina = glob.glob("/sys/bus/i2c/drivers/ina3221*")
    for name_file in glob.glob("/sys/class/hwmon/hwmon*/name"):
        try:
            with open(name_file) as handle:
                if "ina3221" in handle.read():
                    ina.append(os.path.dirname(name_file))
        except OSError:
            pass
    if ina:
        found.append({"sensor": "ina3221", "paths": sorted(ina)})
    for tool, sensor in (("vcgencmd", "rpi-pmic"), ("nvidia-smi", "nvml")):
        path = shutil.which(tool)
        if path:
            found.append({"sensor": sensor, "paths": [path]})
    if ctypes.util.find_library("nvidia-ml") and not any(f["sensor"] == "nvml" for f in found):
        found.append({"sensor": "nvml", "paths": [ctypes.util.find_library("nvidia-ml")]})
    return found


def op_facts(params):
    """What ``targets check`` reports: arch, OS, Python, free disk, runtime import, power sensors."""
    os_name = platform.platform()
    try:
        with open("/etc/os-release") as handle:
            for line in handle:
                if line.startswith("PRETTY_NAME="):
                    os_name = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    emit({
        "arch": platform.machine(),
        "os": os_name,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "executable": sys.executable,
        "free_bytes": free_bytes(params["workdir"]),
        "runtime": _import_check(params.get("modules", [])) if params.get("modules") else None,
        "power_sensors": _power_sensors(),
    })


OPS = {"lock": op_lock, "inspect": op_inspect, "prepare": op_prepare, "cleanup": op_cleanup, "activate": op_activate,
       "rollback": op_rollback, "record_python": op_record_python, "read_python": op_read_python,
       "venv_prepare": op_venv_prepare, "venv_switch": op_venv_switch, "venv_discard": op_venv_discard,
       "facts": op_facts}


def main(argv):
    op = argv[1]
    # lock keeps stdin for its lifetime, so its parameters come as argv[2]; the others read stdin.
    params = json.loads(argv[2]) if len(argv) > 2 else json.loads(sys.stdin.read() or "{}")
    try:
        OPS[op](params)
    except OSError as exc:
        emit({"ok": False, "error": "os", "message": f"{exc.filename or op}: {exc.strerror or exc}",
              "errno": exc.errno})
        sys.exit(3)


if __name__ == "__main__":
    main(sys.argv)
