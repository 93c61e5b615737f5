"""NVIDIA GPU board power through NVML (pynvml when installed, else libnvidia-ml over ctypes)."""

from .base import PowerSource, PowerUnavailable


class _CtypesNvml(object):
    """The few NVML calls we need, through libnvidia-ml directly when pynvml is not installed."""

    def __init__(self):
        import ctypes
        self.ctypes = ctypes
        lib = None
        errors = []
        for name in ("libnvidia-ml.so.1", "libnvidia-ml.so", "nvml.dll"):
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError as exc:
                errors.append(str(exc))
        if lib is None:
            raise PowerUnavailable("NVML library not found (pynvml not installed; %s)" % "; ".join(errors))
        self.lib = lib
        self._check(getattr(lib, "nvmlInit_v2", None) or lib.nvmlInit, ())

    def _check(self, func, args):
        code = func(*args)
        if code != 0:
            err = self.lib.nvmlErrorString
            err.restype = self.ctypes.c_char_p
            raise PowerUnavailable("NVML call %s failed: %s" % (func.__name__, err(code).decode()))

    def handle(self, index):
        handle = self.ctypes.c_void_p()
        self._check(self.lib.nvmlDeviceGetHandleByIndex_v2, (self.ctypes.c_uint(index), self.ctypes.byref(handle)))
        return handle

    def name(self, handle):
        buf = self.ctypes.create_string_buffer(96)
        self._check(self.lib.nvmlDeviceGetName, (handle, buf, self.ctypes.c_uint(96)))
        return buf.value.decode()

    def power_mw(self, handle):
        value = self.ctypes.c_uint()
        self._check(self.lib.nvmlDeviceGetPowerUsage, (handle, self.ctypes.byref(value)))
        return value.value

    def energy_mj(self, handle):
        value = self.ctypes.c_ulonglong()
        self._check(self.lib.nvmlDeviceGetTotalEnergyConsumption, (handle, self.ctypes.byref(value)))
        return value.value

    def shutdown(self):
        self.lib.nvmlShutdown()


class _PynvmlAdapter(object):
    def __init__(self, pynvml):
        self.nv = pynvml
        try:
            pynvml.nvmlInit()
        except Exception as exc:
            raise PowerUnavailable("NVML init failed: %s" % exc) from exc

    def handle(self, index):
        return self.nv.nvmlDeviceGetHandleByIndex(index)

    def name(self, handle):
        name = self.nv.nvmlDeviceGetName(handle)
        return name.decode() if isinstance(name, bytes) else name

    def power_mw(self, handle):
        return self.nv.nvmlDeviceGetPowerUsage(handle)

    def energy_mj(self, handle):
        return self.nv.nvmlDeviceGetTotalEnergyConsumption(handle)

    def shutdown(self):
        self.nv.nvmlShutdown()


class NvmlSource(PowerSource):
    """NVIDIA GPU board power (mW) and, where supported (Volta+), the total energy counter (mJ)."""

    sensor = "nvml"

    def __init__(self, gpu_index=0):
        try:
            import pynvml
            self.api = _PynvmlAdapter(pynvml)
            self.binding = "pynvml"
        except ImportError:
            self.api = _CtypesNvml()
            self.binding = "ctypes"
        try:
            self.handle = self.api.handle(int(gpu_index))
            self.gpu_name = self.api.name(self.handle)
            self.api.power_mw(self.handle)
        except PowerUnavailable:
            raise
        except Exception as exc:
            raise PowerUnavailable("NVML cannot read GPU %s: %s" % (gpu_index, exc)) from exc
        try:
            self.api.energy_mj(self.handle)
            self.has_counter = True
        except Exception:
            self.has_counter = False  # pre-Volta GPUs: integrate the power readings instead

    def read(self):
        try:
            watts = self.api.power_mw(self.handle) / 1000.0
            joules = self.api.energy_mj(self.handle) / 1000.0 if self.has_counter else None
        except PowerUnavailable:
            raise
        except Exception as exc:
            raise PowerUnavailable("NVML read failed: %s" % exc) from exc
        return watts, joules

    def describe(self):
        return {"gpu": self.gpu_name, "gpu_index": self.gpu_index if hasattr(self, "gpu_index") else None,
                "binding": self.binding, "energy_counter": self.has_counter}

    def close(self):
        try:  # noqa: SIM105 - best effort on the way out
            self.api.shutdown()
        except Exception:
            pass
