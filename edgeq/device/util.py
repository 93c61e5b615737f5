"""Small helpers the device modules share: package versions, best-effort probes, sysfs reads."""


def package_version(dist_names):
    try:
        from importlib import metadata
    except ImportError:  # pragma: no cover - Python < 3.8
        return None
    for dist in dist_names:
        try:
            return metadata.version(dist)
        except Exception:
            continue
    return None


def safe(func, default=None):
    try:
        return func()
    except Exception:
        return default


def read_text(path):
    with open(path) as handle:
        return handle.read().strip()
