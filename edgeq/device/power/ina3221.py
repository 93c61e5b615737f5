"""TI INA3221 rail monitors (Jetson boards) through hwmon or the older iio sysfs layout."""

import os
import re

from ..util import read_text
from .base import PowerSource, PowerUnavailable, read_number


class Ina3221Source(PowerSource):
    """INA3221 rails (Jetson): hwmon ``power*_input`` (uW) or ``in*_input`` (mV) x ``curr*_input`` (mA),
    or the older iio driver's ``in_power*_input`` (mW) with ``rail_name_*``."""

    sensor = "ina3221"
    DEFAULT_ROOTS = ("/sys/class/hwmon", "/sys/bus/i2c/drivers/ina3221x", "/sys/bus/i2c/drivers/ina3221")

    def __init__(self, root=None, rails=None):
        channels = []
        for directory in self._chip_dirs(root):
            channels.extend(self._channels(directory))
        where = root or " or ".join(self.DEFAULT_ROOTS)
        if not channels:
            raise PowerUnavailable("no INA3221 power rails found under %s" % where)
        labels = [c["label"] for c in channels]
        if rails:
            missing = [r for r in rails if r not in labels]
            if missing:
                raise PowerUnavailable("INA3221 rail(s) %s not found (available: %s)"
                                       % (", ".join(missing), ", ".join(labels)))
            chosen = [c for c in channels if c["label"] in rails]
        else:
            # The module input rail is the whole board; the others are parts of it and would double count.
            inputs = [c for c in channels if c["label"].upper() in ("VDD_IN", "POM_5V_IN", "VIN_SYS_5V0")]
            chosen = inputs[:1] or channels
        self.channels = chosen
        self.read()  # fail now, not in the sampling thread

    @staticmethod
    def _chip_dirs(root):
        roots = [root] if root else list(Ina3221Source.DEFAULT_ROOTS)
        found = []
        for base in roots:
            if not os.path.isdir(base):
                continue
            candidates = [base] + [os.path.join(base, n) for n in sorted(os.listdir(base))]
            for candidate in list(candidates):
                for sub in ("hwmon", "iio:device0", "iio_device"):
                    nested = os.path.join(candidate, sub)
                    if os.path.isdir(nested):
                        candidates.extend(os.path.join(nested, n) for n in sorted(os.listdir(nested))
                                          if n.startswith("hwmon"))
                        candidates.append(nested)
            for candidate in candidates:
                if not os.path.isdir(candidate):
                    continue
                name_file = os.path.join(candidate, "name")
                if os.path.isfile(name_file):
                    try:
                        if "ina3221" not in read_text(name_file).lower():
                            continue
                    except OSError:
                        continue
                elif not any(n.startswith("rail_name_") for n in os.listdir(candidate)):
                    continue
                if candidate not in found:
                    found.append(candidate)
        return found

    @staticmethod
    def _channels(directory):
        names = os.listdir(directory)
        channels = []
        for entry in sorted(names):
            m = re.match(r"^in(\d+)_label$", entry)
            if m:
                n = m.group(1)
                label = read_text(os.path.join(directory, entry))
                power = os.path.join(directory, "power%s_input" % n)
                volt = os.path.join(directory, "in%s_input" % n)
                curr = os.path.join(directory, "curr%s_input" % n)
                if os.path.exists(power):
                    channels.append({"label": label, "power_uw": power})
                elif os.path.exists(volt) and os.path.exists(curr):
                    channels.append({"label": label, "volt_mv": volt, "curr_ma": curr})
                continue
            m = re.match(r"^rail_name_(\d+)$", entry)
            if m:
                n = m.group(1)
                power = os.path.join(directory, "in_power%s_input" % n)
                if os.path.exists(power):
                    channels.append({"label": read_text(os.path.join(directory, entry)), "power_mw": power})
        if not channels:  # hwmon power without labels
            for entry in sorted(names):
                m = re.match(r"^power(\d+)_input$", entry)
                if m:
                    channels.append({"label": "power%s" % m.group(1), "power_uw": os.path.join(directory, entry)})
        return channels

    def read(self):
        watts = 0.0
        for channel in self.channels:
            if "power_uw" in channel:
                watts += read_number(channel["power_uw"]) / 1e6
            elif "power_mw" in channel:
                watts += read_number(channel["power_mw"]) / 1e3
            else:
                watts += read_number(channel["volt_mv"]) * read_number(channel["curr_ma"]) / 1e6
        return watts, None

    def describe(self):
        return {"rails": [c["label"] for c in self.channels]}
