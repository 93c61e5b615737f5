"""Intel/AMD RAPL package energy counters under /sys/class/powercap."""

import os

from ..util import read_text
from .base import PowerSource, PowerUnavailable, read_number


class RaplSource(PowerSource):
    """Intel/AMD RAPL via powercap ``energy_uj`` counters, unwrapped with ``max_energy_range_uj``."""

    sensor = "rapl"
    DEFAULT_ROOT = "/sys/class/powercap"

    def __init__(self, root=None, rails=None):
        root = root or self.DEFAULT_ROOT
        if not os.path.isdir(root):
            raise PowerUnavailable("no powercap directory %s (RAPL not exposed by this kernel/CPU)" % root)
        zones = []
        for name in sorted(os.listdir(root)):
            zone = os.path.join(root, name)
            if not (name.startswith("intel-rapl:") or name.startswith("amd-rapl:")):
                continue
            if not os.path.isfile(os.path.join(zone, "energy_uj")):
                continue
            try:
                label = read_text(os.path.join(zone, "name"))
            except OSError:
                label = name
            zones.append((name, label, zone))
        if not zones:
            raise PowerUnavailable("no RAPL domains with energy_uj under %s" % root)
        if rails:
            chosen = [z for z in zones if z[1] in rails or z[0] in rails]
            missing = [r for r in rails if r not in [z[1] for z in zones] + [z[0] for z in zones]]
            if missing:
                raise PowerUnavailable("RAPL domain(s) %s not found under %s (available: %s)"
                                       % (", ".join(missing), root, ", ".join(sorted(set(z[1] for z in zones)))))
        else:
            # Top-level package domains only (intel-rapl:N): sub-zones (core, uncore, dram) are inside them.
            chosen = [z for z in zones if z[0].count(":") == 1 and z[1] != "psys"] or \
                [z for z in zones if z[0].count(":") == 1]
        self.domains = []
        for name, label, zone in chosen:
            max_range = None
            if os.path.exists(os.path.join(zone, "max_energy_range_uj")):
                max_range = read_number(os.path.join(zone, "max_energy_range_uj"))
            raw = read_number(os.path.join(zone, "energy_uj"))
            self.domains.append({"name": name, "label": label, "path": os.path.join(zone, "energy_uj"),
                                 "max": max_range, "last": raw, "total_uj": 0.0})

    def read(self):
        total = 0.0
        for domain in self.domains:
            raw = read_number(domain["path"])
            delta = raw - domain["last"]
            if delta < 0:
                if not domain["max"]:
                    raise PowerUnavailable("%s went backwards and max_energy_range_uj is unknown" % domain["path"])
                delta += domain["max"]  # the counter wrapped around
            domain["last"] = raw
            domain["total_uj"] += delta
            total += domain["total_uj"]
        return None, total / 1e6

    def describe(self):
        return {"domains": [d["label"] for d in self.domains]}
