"""``facts``: what ``edgeq targets check`` reports about a device."""

import os
import platform
import shutil
import sys

from .releases import free_bytes


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
    """What ``targets check`` reports: arch, OS, Python, free disk, power sensors, and for each format in
    ``runtimes`` ({format: [modules to try]}) whether its runtime imports."""
    os_name = platform.platform()
    try:
        with open("/etc/os-release") as handle:
            for line in handle:
                if line.startswith("PRETTY_NAME="):
                    os_name = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return {
        "arch": platform.machine(),
        "os": os_name,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "executable": sys.executable,
        "free_bytes": free_bytes(params["workdir"]),
        "runtimes": {fmt: _import_check(modules) for fmt, modules in (params.get("runtimes") or {}).items()},
        "power_sensors": _power_sensors(),
    }
