"""Power sources against controlled fakes: sysfs trees, commands and an NVML binding whose values a writer
thread changes while the runner measures; the energy is checked against the integral of what was written."""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from edgeq.device.bench import runner as device_runner
from tests.test_bench_support import hand_artifacts, release_dir  # noqa: F401 - fixture

INTERVAL_MS = 5


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Schedule(threading.Thread):
    """Writes a power level that steps up every ``step_s`` and logs (monotonic time, watts) per change, so
    the exact energy over any window is known."""

    def __init__(self, write, start_w=2.0, increment_w=0.5, step_s=0.05, top_w=12.0):
        super().__init__(daemon=True)
        self.write, self.level, self.increment, self.step, self.top = write, start_w, increment_w, step_s, top_w
        self.log: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self._set(start_w)

    def _set(self, watts: float) -> None:
        self.write(watts)
        self.log.append((time.monotonic(), watts))

    def run(self) -> None:
        while not self.stop.wait(self.step):
            self.level = self.level + self.increment if self.level + self.increment <= self.top else 2.0
            self._set(self.level)

    def energy(self, start: float, end: float) -> float:
        total = 0.0
        changes = self.log + [(float("inf"), 0.0)]
        for (t0, watts), (t1, _) in zip(changes, changes[1:], strict=False):
            lo, hi = max(t0, start), min(t1, end)
            if hi > lo:
                total += watts * (hi - lo)
        return total

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.join()


def bench_with_power(tmp_path: Path, artifact: Path, power: dict, min_seconds: float = 0.6) -> dict:
    release = release_dir(artifact, tmp_path)
    request = {"request_version": 1, "release_dir": str(release), "warmup": 2, "runs": 20,
               "min_seconds": min_seconds, "threads": 1,
               "power": {"interval_ms": INTERVAL_MS, "idle_seconds": 0.3, **power}}
    (tmp_path / "req.json").write_text(json.dumps(request))
    rc = device_runner.main(["--request", str(tmp_path / "req.json"), "--result", str(tmp_path / "res.json")])
    result = json.loads((tmp_path / "res.json").read_text())
    assert rc == 0, result.get("traceback")
    return result


def check_against_schedule(result: dict, schedule: Schedule, tolerance: float = 0.04) -> None:
    power = result["power"]
    assert power["available"] is True, power
    idle_window, timed_window = power["clock_windows"]["idle"], power["clock_windows"]["timed"]
    # Idle is read before the first inference and the warm-up, whose raised clocks would count as idle.
    warmup_window = power["clock_windows"]["warmup"]
    assert idle_window[1] <= warmup_window[0] <= warmup_window[1] <= timed_window[0]
    expected = schedule.energy(*timed_window)
    expected_idle_w = schedule.energy(*idle_window) / (idle_window[1] - idle_window[0])
    expected_avg_w = expected / (timed_window[1] - timed_window[0])
    count = result["latency_ms"]["count"]
    assert power["energy_j"] == pytest.approx(expected, rel=tolerance)
    assert result["energy_j_per_inference"] == pytest.approx(power["energy_j"] / count)
    assert result["energy_j_per_inference"] == pytest.approx(expected / count, rel=tolerance)
    assert power["idle_w"] == pytest.approx(expected_idle_w, rel=tolerance)
    assert power["avg_w"] == pytest.approx(expected_avg_w, rel=tolerance)
    assert power["active_w"] == pytest.approx(power["avg_w"] - power["idle_w"])
    assert power["samples"] >= 20 and power["sample_rate_hz"] > 20


def hwmon_tree(root: Path, rails: dict[str, int], mode: str) -> Path:
    """A fake INA3221 hwmon directory: labels per channel, and V (mV) x I (mA) or P (uW) files."""
    chip = root / "hwmon3"
    chip.mkdir(parents=True)
    (chip / "name").write_text("ina3221\n")
    for label, channel in rails.items():
        (chip / f"in{channel}_label").write_text(label + "\n")
        if mode == "vi":
            (chip / f"in{channel}_input").write_text("5000\n")
            (chip / f"curr{channel}_input").write_text("0\n")
        else:
            (chip / f"power{channel}_input").write_text("0\n")
    (root / "hwmon0").mkdir()
    (root / "hwmon0" / "name").write_text("acpitz\n")  # another chip that must be ignored
    return chip


def test_ina3221_voltage_times_current(tmp_path, hand_artifacts):  # noqa: F811
    chip = hwmon_tree(tmp_path / "hwmon", {"VDD_IN": 1, "VDD_CPU_GPU_CV": 2}, "vi")
    atomic_write(chip / "curr2_input", "300\n")  # a sub-rail: must not be added to VDD_IN

    def write(watts):  # 5 V bus: I (mA) = P / 5 V
        atomic_write(chip / "curr1_input", f"{round(watts / 5.0 * 1000)}\n")

    with Schedule(write) as schedule:
        result = bench_with_power(tmp_path, hand_artifacts["onnx"], {"sensor": "ina3221", "path": str(tmp_path / "hwmon")})
    check_against_schedule(result, schedule)
    assert result["power"]["rails"] == ["VDD_IN"] and result["power"]["method"] == "trapezoid"
    assert result["power"]["active_w"] > 0.5  # the level keeps stepping up, so the timed window draws more


def test_ina3221_power_files_selected_rails_constant_5w(tmp_path, hand_artifacts):  # noqa: F811
    chip = hwmon_tree(tmp_path / "hwmon", {"VDD_IN": 1, "VDD_CPU": 2, "VDD_SOC": 3}, "power")
    atomic_write(chip / "power1_input", "9000000\n")
    atomic_write(chip / "power2_input", "3000000\n")
    atomic_write(chip / "power3_input", "2000000\n")
    result = bench_with_power(tmp_path, hand_artifacts["onnx"],
                              {"sensor": "ina3221", "path": str(tmp_path / "hwmon"), "rails": ["VDD_CPU", "VDD_SOC"]})
    power = result["power"]
    assert power["rails"] == ["VDD_CPU", "VDD_SOC"]
    assert power["avg_w"] == pytest.approx(5.0) and power["idle_w"] == pytest.approx(5.0)
    assert power["active_w"] == pytest.approx(0.0, abs=1e-9)
    # Constant 5 W: energy per inference = 5 W x timed window / inferences.
    assert result["energy_j_per_inference"] == pytest.approx(5.0 * power["window_s"] / result["latency_ms"]["count"])


def test_ina3221_legacy_iio_driver(tmp_path, hand_artifacts):  # noqa: F811
    device = tmp_path / "ina3221x" / "6-0040" / "iio:device0"
    device.mkdir(parents=True)
    for n, (name, mw) in enumerate([("POM_5V_IN", 4200), ("POM_5V_GPU", 700), ("POM_5V_CPU", 900)]):
        (device / f"rail_name_{n}").write_text(name + "\n")
        (device / f"in_power{n}_input").write_text(f"{mw}\n")
    result = bench_with_power(tmp_path, hand_artifacts["onnx"], {"sensor": "ina3221", "path": str(tmp_path / "ina3221x")},
                              min_seconds=0.2)
    assert result["power"]["rails"] == ["POM_5V_IN"] and result["power"]["avg_w"] == pytest.approx(4.2)


def test_rapl_counter_with_wraparound(tmp_path, hand_artifacts):  # noqa: F811
    zone = tmp_path / "powercap" / "intel-rapl:0"
    (zone / "intel-rapl:0:0").mkdir(parents=True)
    (zone / "name").write_text("package-0\n")
    (zone / "max_energy_range_uj").write_text("1000000\n")  # wraps every 0.2 s at 5 W
    (zone / "intel-rapl:0:0" / "name").write_text("core\n")
    (zone / "intel-rapl:0:0" / "energy_uj").write_text("0\n")
    origin = time.monotonic()
    stop = threading.Event()
    wraps = []

    def counter():  # a package drawing exactly 5 W: energy_uj = 5e6 * t, modulo the range
        last = 0
        while not stop.is_set():
            value = int(5e6 * (time.monotonic() - origin)) % 1000000
            if value < last:
                wraps.append(value)
            last = value
            atomic_write(zone / "energy_uj", f"{value}\n")
            time.sleep(0.0005)

    atomic_write(zone / "energy_uj", "0\n")
    writer = threading.Thread(target=counter, daemon=True)
    writer.start()
    try:
        result = bench_with_power(tmp_path, hand_artifacts["onnx"], {"sensor": "rapl", "path": str(tmp_path / "powercap")})
    finally:
        stop.set()
        writer.join()
    power = result["power"]
    assert len(wraps) >= 3, "the counter must wrap during the run for this test to mean anything"
    assert power["method"] == "counter" and power["domains"] == ["package-0"]
    assert power["avg_w"] == pytest.approx(5.0, rel=0.03)
    assert power["idle_w"] == pytest.approx(5.0, rel=0.03)
    assert result["energy_j_per_inference"] == pytest.approx(5.0 * power["window_s"] / result["latency_ms"]["count"],
                                                            rel=0.03)


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


PMIC_TEMPLATE = """\
     3V7_WL_SW_A current(0)=0.00000000A
       3V3_SYS_A current(1)={sys_a:.8f}A
      1V1_SYS_A current(3)=0.17880360A
       VDD_CORE_A current(7)={core_a:.8f}A
     3V7_WL_SW_V volt(8)=3.74496600V
       3V3_SYS_V volt(9)=3.30000000V
      1V1_SYS_V volt(11)=1.10000000V
       VDD_CORE_V volt(15)=0.80000000V
        EXT5V_V volt(24)=5.12968000V
"""


def test_rpi_pmic_sums_volts_times_amps(tmp_path, hand_artifacts, monkeypatch):  # noqa: F811
    adc = tmp_path / "adc.txt"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "vcgencmd",
               f'#!/bin/sh\ncase "$1" in pmic_read_adc) cat {adc};; get_throttled) echo throttled=0x50005;; '
               '*) exit 1;; esac\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")

    def write(watts):  # VDD_CORE carries the schedule, 3V3_SYS a fixed 0.33 W; other rails are ignored
        atomic_write(adc, PMIC_TEMPLATE.format(sys_a=0.1, core_a=(watts - 0.33) / 0.8))

    with Schedule(write, start_w=2.0, step_s=0.1) as schedule:
        result = bench_with_power(tmp_path, hand_artifacts["onnx"],
                                  {"sensor": "rpi-pmic", "rails": ["3V3_SYS", "VDD_CORE"], "interval_ms": 20},
                                  min_seconds=1.0)
    check_against_schedule(result, schedule, tolerance=0.08)
    assert result["power"]["rails"] == ["3V3_SYS", "VDD_CORE"]
    throttling = result["env"]["throttling"]
    assert throttling["vcgencmd"] == "0x50005"
    assert throttling["now"] == ["under_voltage", "throttled"]
    assert throttling["since_boot"] == ["under_voltage", "throttled"]


def test_command_source(tmp_path, hand_artifacts):  # noqa: F811
    reading = tmp_path / "watts"
    script = executable(tmp_path / "meter", f"#!/bin/sh\ncat {reading}\n")

    def write(watts):
        atomic_write(reading, f"{watts:.3f} W\n")

    with Schedule(write, step_s=0.1) as schedule:
        result = bench_with_power(tmp_path, hand_artifacts["onnx"],
                                  {"sensor": "command", "command": [str(script)], "interval_ms": 10}, min_seconds=1.0)
    check_against_schedule(result, schedule, tolerance=0.08)
    assert result["power"]["command"] == [str(script)]


class FakeNvml(types.ModuleType):
    """A stand-in for the pynvml binding (no NVIDIA GPU here): power in mW and a total-energy counter in mJ
    that integrates exactly what was set."""

    def __init__(self, watts: float, counter: bool = True):
        super().__init__("pynvml")
        self.watts, self.counter, self._lock = watts, counter, threading.Lock()
        self._t, self._mj = time.monotonic(), 1_000_000.0

    def set(self, watts):
        with self._lock:
            now = time.monotonic()
            self._mj += self.watts * (now - self._t) * 1000.0
            self._t, self.watts = now, watts

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("gpu", index)

    def nvmlDeviceGetName(self, handle):
        return b"Fake GPU"

    def nvmlDeviceGetPowerUsage(self, handle):
        return int(round(self.watts * 1000))

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if not self.counter:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        with self._lock:
            return int(self._mj + self.watts * (time.monotonic() - self._t) * 1000.0)


@pytest.mark.parametrize("counter", [True, False], ids=["energy-counter", "power-only"])
def test_nvml_source(tmp_path, hand_artifacts, monkeypatch, counter):  # noqa: F811
    fake = FakeNvml(60.0, counter=counter)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with Schedule(fake.set, start_w=60.0, increment_w=5.0, step_s=0.05, top_w=120.0) as schedule:
        result = bench_with_power(tmp_path, hand_artifacts["onnx"], {"sensor": "nvml"})
    # The counter has 1 mJ resolution; integrating readings is accurate to a step's sampling delay.
    check_against_schedule(result, schedule, tolerance=0.03)
    power = result["power"]
    assert power["gpu"] == "Fake GPU" and power["binding"] == "pynvml" and power["energy_counter"] is counter
    assert power["method"] == ("counter" if counter else "trapezoid")
    if counter:
        assert power["integrated_energy_j"] == pytest.approx(power["energy_j"], rel=0.03)


@pytest.mark.parametrize("power, reason", [
    ({"sensor": "rapl", "path": "/nonexistent/powercap"}, "no powercap directory /nonexistent/powercap"),
    ({"sensor": "ina3221", "path": "/nonexistent/hwmon"}, "no INA3221 power rails found under /nonexistent/hwmon"),
    ({"sensor": "command", "command": ["false"]}, "false exited with 1"),
    ({"sensor": "command", "command": ["/nonexistent/meter"]}, "cannot run /nonexistent/meter"),
    ({"sensor": "rpi-pmic", "command": ["true"]}, "true printed no rail with both current and voltage"),
    ({"sensor": "none"}, "the device profile has no power sensor"),
])
def test_missing_sensor_is_reported_not_zero(tmp_path, hand_artifacts, power, reason):  # noqa: F811
    result = bench_with_power(tmp_path, hand_artifacts["onnx"], power, min_seconds=0)
    assert result["power"]["available"] is False and result["power"]["sensor"] == power["sensor"]
    assert result["power"]["reason"].startswith(reason)
    assert result["energy_j_per_inference"] is None
    assert result["latency_ms"]["count"] >= 20  # latency is still measured


def test_unknown_rail_lists_the_available_ones(tmp_path, hand_artifacts):  # noqa: F811
    hwmon_tree(tmp_path / "hwmon", {"VDD_IN": 1, "VDD_SOC": 2}, "power")
    result = bench_with_power(tmp_path, hand_artifacts["onnx"],
                              {"sensor": "ina3221", "path": str(tmp_path / "hwmon"), "rails": ["VDD_GPU"]}, min_seconds=0)
    assert result["power"] == {"available": False, "sensor": "ina3221",
                               "reason": "INA3221 rail(s) VDD_GPU not found (available: VDD_IN, VDD_SOC)"}


def test_nvml_without_a_driver_says_so(tmp_path, hand_artifacts, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "pynvml", None)  # the ctypes path, on a machine without libnvidia-ml
    result = bench_with_power(tmp_path, hand_artifacts["onnx"], {"sensor": "nvml"}, min_seconds=0)
    assert result["power"]["available"] is False
    assert result["power"]["reason"].startswith("NVML library not found")
