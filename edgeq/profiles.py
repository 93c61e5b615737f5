"""Device profiles: what to build for one class of device.

A profile is a YAML file in ``device_profiles/`` (or any path). It says which
format and precision suit the device, how its runtime is configured, which
packages the device needs and which power sensor to read. It never holds hosts
or keys: those belong to targets.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from edgeq.config import StrictModel, load_yaml_file, suggest, validate_model
from edgeq.errors import ProfileError
from edgeq.names import PRECISIONS, Format, Precision, format_names

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable  # Python 3.11+; only an annotation here

__all__ = ["PRECISIONS", "Format", "Precision", "format_names", "DeviceProfile", "load_profile", "list_profiles"]

PowerSensor = Literal["ina3221", "rapl", "rpi-pmic", "nvml", "command", "none"]
CalibrationMethod = Literal["minmax", "entropy", "percentile"]


# The built-in profiles: the top-level ``device_profiles/`` folder, which the wheel ships as the package
# ``edgeq.device_profiles`` (a setuptools package-dir mapping), so importlib.resources finds them the same
# way from a wheel, an sdist or an editable checkout.
BUILTIN_PROFILES_PACKAGE = "edgeq.device_profiles"
# Directories of the user's own profiles, searched before the built-in ones (os.pathsep-separated).
PROFILE_PATH_ENV = "EDGEQ_PROFILE_PATH"


class PowerConfig(StrictModel):
    """Which power sensor the on-device runner samples, and how."""

    sensor: PowerSensor = "none"
    interval_ms: float = Field(default=20.0, gt=0, le=10_000, description="sampling period")
    idle_seconds: float = Field(default=2.0, ge=0, le=600, description="idle sampling before timed runs")
    command: list[str] | None = Field(default=None, description="argv printing watts (sensor: command)")
    rails: list[str] = Field(default_factory=list, description="rail labels to sum (ina3221), empty = total")
    path: str | None = Field(default=None, description="override of the sysfs root (rapl, ina3221)")
    gpu_index: int = Field(default=0, ge=0, description="NVML device index (sensor: nvml)")

    @model_validator(mode="after")
    def _command_needs_argv(self) -> PowerConfig:
        if self.sensor == "command" and not self.command:
            raise ValueError("sensor 'command' needs 'command', the argv of a program printing watts")
        return self


class DeviceProfile(StrictModel):
    """What to build for one class of device, and how its runtime is set up."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str
    arch: Literal["aarch64", "armv7l", "x86_64"]
    cpu: str = Field(description="CPU model and features, for people")
    format: Format
    precision: Precision
    tflite_quantized_io: Literal["int8", "uint8", "float32"] = Field(
        default="int8", description="input/output type of full-integer TFLite models"
    )
    calibration_method: CalibrationMethod = "minmax"
    onnx_reduce_range: bool = Field(
        default=False,
        description="7-bit INT8 weights for ONNX Runtime: x86 CPUs without VNNI, whose U8S8 kernels (vpmaddubsw) "
        "saturate int16 pair sums with full 8-bit weights",
    )
    openvino_overflow_fix: Literal["enable", "first_layer_only", "disable"] = Field(
        default="first_layer_only",
        description="NNCF's overflow fix for OpenVINO INT8: 'enable' gives every layer 7-bit weights, for x86 CPUs "
        "without VNNI (the same vpmaddubsw saturation); NNCF's default fixes only the first layer",
    )
    execution_providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        description="ONNX Runtime providers in order of preference; the runner falls back in order",
    )
    openvino_device: str = Field(default="CPU", description="OpenVINO device plugin")
    threads: int = Field(ge=1, le=512)
    runtime_packages: dict[Format, list[str]] = Field(
        description="pip requirements the device needs to run each format"
    )
    power: PowerConfig = Field(default_factory=PowerConfig)

    @model_validator(mode="after")
    def _preferred_format_has_packages(self) -> DeviceProfile:
        if self.format not in self.runtime_packages:
            raise ValueError(f"runtime_packages has no entry for the profile's own format '{self.format}'")
        return self


def user_profile_dirs() -> list[Path]:
    """The directories named in ``$EDGEQ_PROFILE_PATH``, in order (a missing one is an error: a typo there
    would otherwise silently fall back to a built-in profile of the same name)."""
    dirs = []
    for entry in os.environ.get(PROFILE_PATH_ENV, "").split(os.pathsep):
        if not entry:
            continue
        directory = Path(entry).expanduser()
        if not directory.is_dir():
            raise ProfileError(f"{PROFILE_PATH_ENV}: {directory} is not a directory",
                               hint=f"{PROFILE_PATH_ENV} lists directories of profile YAML files, "
                               f"separated by '{os.pathsep}'")
        dirs.append(directory)
    return dirs


def builtin_profiles() -> dict[str, Traversable]:
    """The profiles that ship with edgeq: name -> resource."""
    root = resources.files(BUILTIN_PROFILES_PACKAGE)
    return {entry.name[: -len(".yaml")]: entry for entry in sorted(root.iterdir(), key=lambda e: e.name)
            if entry.name.endswith(".yaml") and entry.is_file()}


def available_profiles() -> dict[str, Path | Traversable]:
    """Profile name -> file: the user's directories first (in order), then the built-in profiles."""
    found: dict[str, Path | Traversable] = {}
    for directory in user_profile_dirs():
        for path in sorted(directory.glob("*.yaml")):
            found.setdefault(path.stem, path)
    for name, resource in builtin_profiles().items():
        found.setdefault(name, resource)
    return found


def load_profile_file(path: Path | Traversable) -> DeviceProfile:
    """Load and strictly validate one profile file (a path, or a built-in profile's resource)."""
    if isinstance(path, Path):
        data = load_yaml_file(path, ProfileError)
        source = str(path)
    else:
        source = f"{BUILTIN_PROFILES_PACKAGE}/{path.name}"
        with resources.as_file(path) as real_path:
            data = load_yaml_file(real_path, ProfileError)
    return validate_model(DeviceProfile, data, source, ProfileError)


def load_profile(name_or_path: str) -> DeviceProfile:
    """Load a profile by name (``rpi4``) or by path (``./my.yaml``)."""
    looks_like_path = name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path
    if looks_like_path:
        return load_profile_file(Path(name_or_path).expanduser())
    profiles = available_profiles()
    if name_or_path not in profiles:
        hint = suggest(name_or_path, list(profiles)) or "see 'edgeq profiles list'"
        raise ProfileError(f"unknown device profile '{name_or_path}'", hint=hint)
    return load_profile_file(profiles[name_or_path])


def list_profiles() -> list[DeviceProfile]:
    """Every available profile, validated (an invalid file raises naming the file)."""
    return [load_profile_file(path) for path in available_profiles().values()]
