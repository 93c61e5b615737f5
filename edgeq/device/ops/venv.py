"""The runtime venv ``edgeq targets setup`` builds beside the releases, and the interpreter it records.

    venv -> venv-<token>    the venv made by ``edgeq targets setup`` (a new one is built beside it and the
                            link swapped only once pip succeeded)
    python                  the interpreter recorded by ``edgeq targets setup`` (WORKDIR/venv/bin/python)
"""

import errno
import os
import shutil

from .releases import fsync_dir

VENV_LINK = "venv"
VENV_PREFIX = "venv-"


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
    return {"ok": True, "path": record_python(params["workdir"], params["python"])}


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
    return {"ok": True, "removed": removed}


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
    return {"ok": True, "python": python, "removed": old if ours else None}


def op_venv_discard(params):
    """Remove a venv build that failed (never the live one)."""
    workdir = params["workdir"]
    name = _venv_name(params["name"])
    removed = name != live_venv(workdir) and os.path.isdir(os.path.join(workdir, name))
    if removed:
        shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
    return {"ok": True, "removed": removed}


def op_read_python(params):
    """The recorded interpreter when it still exists and is executable, else null."""
    try:
        with open(os.path.join(params["workdir"], "python")) as handle:
            python = handle.read().strip()
    except OSError:
        python = None
    if python and not os.access(python, os.X_OK):
        python = None
    return {"python": python}
