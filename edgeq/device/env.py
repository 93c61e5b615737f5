"""The environment fingerprint of a run: hardware, clocks, temperatures, OS, software, emulation.

Every probe is best effort: a missing file is simply left out.
"""

import glob
import os
import platform
import re

from .power.base import run_command
from .util import read_text, safe

# ARM CPU part numbers (MIDR) for the cores edge boards use; /proc/cpuinfo on arm64 has no model name.
_ARM_PARTS = {"0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
              "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
              "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77", "0xd41": "Cortex-A78", "0xd42": "Cortex-A78AE",
              "0xd4b": "Cortex-A78C", "0xd44": "Cortex-X1", "0xd46": "Cortex-A510", "0xd47": "Cortex-A710",
              "0xd48": "Cortex-X2", "0xd4d": "Cortex-A715", "0xd80": "Cortex-A520", "0xd81": "Cortex-A720",
              "0x004": "Carmel (NVIDIA)"}


_X86_MARKERS = ("GenuineIntel", "AuthenticAMD", "HygonGenuine")


def _cpuinfo():
    try:
        with open("/proc/cpuinfo") as handle:
            return handle.read()
    except OSError:
        return ""


def _cpu_model(cpuinfo):
    fields = {}
    for line in cpuinfo.splitlines():
        if ":" in line:
            key, _, value = line.partition(":")
            fields.setdefault(key.strip().lower(), value.strip())
    for key in ("model name", "cpu model", "processor") if "model name" in fields else ("cpu model",):
        if fields.get(key) and not fields[key].isdigit():
            return fields[key]
    part = fields.get("cpu part")
    if part:
        return _ARM_PARTS.get(part.lower(), "ARM part %s" % part)
    return fields.get("hardware") or platform.processor() or None


def _board():
    for path in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model", "/sys/class/dmi/id/product_name"):
        value = safe(lambda p=path: read_text(p).rstrip("\x00"))
        if value:
            return value
    return None


def _governors():
    found = set()
    for path in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor"):
        value = safe(lambda p=path: read_text(p))
        if value:
            found.add(value)
    return ",".join(sorted(found)) if found else None


def _frequencies_mhz():
    freqs = {}
    for path in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq"):
        cpu = path.split("/")[5]
        value = safe(lambda p=path: float(read_text(p)) / 1000.0)
        if value is not None:
            freqs[cpu] = value
    if not freqs:
        return None
    ordered = [freqs[k] for k in sorted(freqs, key=lambda c: int(c[3:]))]
    return {"min": min(ordered), "max": max(ordered), "per_cpu": ordered}


def temperatures_c():
    """Thermal zone temperatures in Celsius keyed by zone type."""
    temps = {}
    for zone in sorted(glob.glob("/sys/class/thermal/thermal_zone*")):
        kind = safe(lambda z=zone: read_text(os.path.join(z, "type")), os.path.basename(zone))
        value = safe(lambda z=zone: float(read_text(os.path.join(z, "temp"))) / 1000.0)
        if value is not None:
            key = kind
            n = 1
            while key in temps:
                n += 1
                key = "%s#%d" % (kind, n)
            temps[key] = value
    return temps


_THROTTLE_BITS = {0: "under_voltage", 1: "arm_freq_capped", 2: "throttled", 3: "soft_temp_limit"}


def _throttling():
    state = {}
    text = safe(lambda: run_command(["vcgencmd", "get_throttled"], timeout=5.0))
    if text and "=" in text:
        raw = text.strip().split("=", 1)[1]
        value = safe(lambda: int(raw, 16))
        state["vcgencmd"] = raw
        if value is not None:
            state["now"] = [name for bit, name in _THROTTLE_BITS.items() if value & (1 << bit)]
            state["since_boot"] = [name for bit, name in _THROTTLE_BITS.items() if value & (1 << (bit + 16))]
    text = safe(lambda: run_command(["nvpmodel", "-q"], timeout=5.0))
    if text:
        for line in text.splitlines():
            if "Power Mode" in line:
                state["nvpmodel"] = line.split(":", 1)[-1].strip()
    return state or None


def _os_release():
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        text = safe(lambda p=path: read_text(p))
        if text:
            fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
            return fields.get("PRETTY_NAME", "").strip('"') or None
    return platform.platform()


def detect_emulation(machine=None, cpuinfo=None, binfmt_dir="/proc/sys/fs/binfmt_misc"):
    """(emulated, reason): an ARM userland running on an x86 CPU through qemu-user, where timings are
    those of the emulator, not of any real device."""
    machine = machine or platform.machine()
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    is_arm = machine.startswith(("aarch64", "arm"))
    if is_arm and any(marker in cpuinfo for marker in _X86_MARKERS):
        return True, "%s userland but /proc/cpuinfo shows an x86 CPU (qemu-user emulation)" % machine
    if is_arm and re.search(r"^flags\s*:.*\bsse\d?\b", cpuinfo, re.M):
        return True, "%s userland but /proc/cpuinfo lists x86 flags (qemu-user emulation)" % machine
    if is_arm:
        handler = os.path.join(binfmt_dir, "qemu-%s" % ("aarch64" if machine.startswith("aarch64") else "arm"))
        text = safe(lambda: read_text(handler))
        if text and text.startswith("enabled"):
            return True, "binfmt_misc handler %s is registered for this architecture" % handler
    if "QEMU" in (_cpu_model(cpuinfo) or ""):
        return True, "the CPU model is QEMU's (full-system emulation)"
    return False, None


def environment(runtime=None, runtime_version=None):
    """What the report needs to explain the numbers: hardware, clocks, temperatures, OS and software."""
    cpuinfo = _cpuinfo()
    emulated, why = detect_emulation(cpuinfo=cpuinfo)
    affinity = safe(lambda: len(os.sched_getaffinity(0)))
    return {
        "hostname": platform.node(), "arch": platform.machine(), "cpu_model": _cpu_model(cpuinfo),
        "board": _board(), "cpu_count": os.cpu_count(), "cpu_affinity": affinity,
        "governor": _governors(), "freq_mhz": _frequencies_mhz(), "temperatures_c": temperatures_c(),
        "throttling": _throttling(), "loadavg": safe(lambda: list(os.getloadavg())),
        "os": _os_release(), "kernel": platform.release(), "python": platform.python_version(),
        "numpy": safe(_numpy_version), "runtime": runtime, "runtime_version": runtime_version,
        "emulated": emulated, "emulation_reason": why,
    }


def _numpy_version():
    import numpy
    return numpy.__version__
