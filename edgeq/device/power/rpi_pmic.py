"""Raspberry Pi 5 PMIC rails through ``vcgencmd pmic_read_adc``."""

import re

from .base import PowerSource, PowerUnavailable, run_command


class RpiPmicSource(PowerSource):
    """Raspberry Pi 5 PMIC: ``vcgencmd pmic_read_adc`` lists ``<rail>_A current(n)=..A`` and
    ``<rail>_V volt(n)=..V``; power is the sum of V*I over rails present with both."""

    sensor = "rpi-pmic"

    def __init__(self, command=None, rails=None):
        self.argv = list(command or ["vcgencmd", "pmic_read_adc"])
        self.rails = list(rails or [])
        readings = self._parse(run_command(self.argv))
        paired = sorted(set(readings["A"]) & set(readings["V"]))
        if not paired:
            raise PowerUnavailable("%s printed no rail with both current and voltage" % " ".join(self.argv))
        if self.rails:
            missing = [r for r in self.rails if r not in paired]
            if missing:
                raise PowerUnavailable("PMIC rail(s) %s not found (available: %s)"
                                       % (", ".join(missing), ", ".join(paired)))
        self.used = self.rails or paired

    @staticmethod
    def _parse(text):
        readings = {"A": {}, "V": {}}
        for line in text.splitlines():
            m = re.match(r"^\s*(\S+)_([AV])\s+\w+\(\d+\)=\s*([-+0-9.eE]+)\s*[AV]?\s*$", line)
            if m:
                readings[m.group(2)][m.group(1)] = float(m.group(3))
        return readings

    def read(self):
        readings = self._parse(run_command(self.argv))
        try:
            return sum(readings["A"][r] * readings["V"][r] for r in self.used), None
        except KeyError as exc:
            raise PowerUnavailable("PMIC rail %s vanished from %s" % (exc, " ".join(self.argv))) from exc

    def describe(self):
        return {"rails": list(self.used), "command": self.argv}
