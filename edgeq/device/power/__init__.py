"""Power sensors, one module each; ``open_power_source`` picks one from a profile's ``power`` mapping.

A sensor's module is imported only when a profile names it, so adding a sensor is one module here and one
branch below.
"""

from .base import PowerSource, PowerUnavailable  # noqa: F401 - the package's interface
from .sampler import PowerSampler, summarize_power  # noqa: F401


def open_power_source(config):
    """The PowerSource for a profile's ``power`` mapping; raises PowerUnavailable with the reason."""
    config = config or {}
    sensor = config.get("sensor") or "none"
    rails = config.get("rails") or []
    path = config.get("path")
    if sensor == "none":
        raise PowerUnavailable("the device profile has no power sensor (power.sensor: none)")
    if sensor == "rapl":
        from .rapl import RaplSource
        return RaplSource(path, rails)
    if sensor == "ina3221":
        from .ina3221 import Ina3221Source
        return Ina3221Source(path, rails)
    if sensor == "rpi-pmic":
        from .rpi_pmic import RpiPmicSource
        return RpiPmicSource(config.get("command"), rails)
    if sensor == "command":
        from .command import CommandSource
        return CommandSource(config.get("command"))
    if sensor == "nvml":
        from .nvml import NvmlSource
        source = NvmlSource(config.get("gpu_index") or 0)
        source.gpu_index = config.get("gpu_index") or 0
        return source
    raise PowerUnavailable("unknown power sensor '%s'" % sensor)
