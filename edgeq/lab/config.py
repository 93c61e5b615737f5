"""LAB.yaml: the strict schema of a device-lab run (see ``edgeq.lab``), read with paths made relative to it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from edgeq.config import StrictModel, load_yaml_file, validate_model
from edgeq.errors import EdgeqError
from edgeq.names import PRECISIONS, Format

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class LabError(EdgeqError):
    """A LAB.yaml is invalid, or a lab run cannot start."""


# -- LAB.yaml ------------------------------------------------------------------------------------------
class LabModel(StrictModel):
    """One source model and its data."""

    name: str = Field(pattern=_NAME, description="the model's name in reports")
    path: Path = Field(description="Keras file, SavedModel directory or ONNX file")
    calibration: Path | None = Field(default=None, description=".npz calibration data (int8)")
    eval: Path | None = Field(default=None, description=".npz eval data with labels (accuracy, gate)")
    input_shapes: dict[str, list[int]] | None = Field(
        default=None, description="convert's --input-shape per input name, e.g. {images: [1, 3, 640, 640]} "
                                  "(TorchScript sources need it)")

    @field_validator("input_shapes")
    @classmethod
    def _positive_dims(cls, shapes):
        for name, dims in (shapes or {}).items():
            if not dims or any(d < 1 for d in dims):
                raise ValueError(f"input_shapes.{name}: dims must be positive integers, got {dims}")
        return shapes


# ``auto``: not a precision but "what ``edgeq tune`` chooses for the profile".
AUTO = "auto"
LabPrecision = Literal[(*PRECISIONS, AUTO)]  # type: ignore[valid-type]  # Literal[tuple] is Literal of its members


class LabTune(StrictModel):
    """Limits of the tune behind ``precisions: [auto]`` (tune reruns only when what it used changed)."""

    max_time_s: float = Field(default=1200.0, gt=0, description="tune's --max-time, in seconds")
    max_candidates: int = Field(default=24, ge=1)
    runs: int = Field(default=100, ge=1, description="timed runs per candidate bench")


class LabBuild(StrictModel):
    """What to build: every profile x format x precision for every model."""

    profiles: list[str] | None = Field(default=None, min_length=1,
                                       description="default: the profiles of the run targets")
    formats: list[Format] | None = Field(default=None, min_length=1,
                                         description="with auto: the formats tune may choose from")
    precisions: list[LabPrecision] | None = Field(
        default=None, min_length=1,
        description="auto = the artifact `edgeq tune` chooses for each profile, measured on its first target")
    max_accuracy_drop: float | None = Field(default=None, ge=0, lt=1,
                                            description="conversion gate and tune budget: largest top-1 drop "
                                            "(0.01 = 1 point)")
    min_cosine: float | None = Field(default=None, gt=0, le=1,
                                     description="tune budget for eval data without labels (auto only)")
    calibration_samples: int = Field(default=300, ge=1)
    tune: LabTune = Field(default_factory=LabTune)

    @model_validator(mode="after")
    def _auto_has_one_budget(self) -> LabBuild:
        auto = AUTO in (self.precisions or [])
        if self.min_cosine is not None and not auto:
            raise ValueError("min_cosine is the budget of precisions: [auto]; this build has no auto")
        if auto and (self.max_accuracy_drop is None) == (self.min_cosine is None):
            raise ValueError("precisions: [auto] needs one budget: max_accuracy_drop (eval with labels) "
                             "or min_cosine")
        return self


class LabRun(StrictModel):
    """Where and how to bench."""

    targets: list[str] = Field(min_length=1, description="target or group names")
    warmup: int = Field(default=10, ge=0)
    runs: int = Field(default=200, ge=1)
    min_seconds: float = Field(default=2.0, ge=0)
    threads: int | None = Field(default=None, ge=1)
    power: Literal["auto", "off"] = Field(default="auto", description="sample the profile's power sensor")
    idle_seconds: float | None = Field(default=None, ge=0, description="override of the profile's idle sampling")
    keep_releases: int = Field(default=3, ge=1, description="releases kept on each device")
    parallel: int = Field(default=1, ge=1, description="targets benched at once (1: one device at a time)")


class LabHistory(StrictModel):
    dir: Path = Field(default=Path("lab-history"), description="one folder per run inside")
    keep: int = Field(default=30, ge=1, description="runs kept (older ones are deleted)")


class LabThresholds(StrictModel):
    min_effect: float = Field(default=0.05, ge=0)
    alpha: float = Field(default=0.05, gt=0, lt=1)
    max_top1_drop: float = Field(default=0.005, ge=0, le=1, description="against the baseline, absolute")
    max_energy_increase: float = Field(default=0.10, ge=0)


class LabConfig(StrictModel):
    """A LAB.yaml file."""

    name: str = "edgeq lab"
    models: list[LabModel] = Field(min_length=1)
    build: LabBuild = Field(default_factory=LabBuild)
    run: LabRun
    history: LabHistory = Field(default_factory=LabHistory)
    artifacts: Path = Field(default=Path(".edgeq-lab/artifacts"), description="artifact cache")
    baseline: list[Path] | None = Field(default=None, description="pinned baseline results (default: last run)")
    thresholds: LabThresholds = Field(default_factory=LabThresholds)

    @field_validator("baseline", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _unique_models(self) -> LabConfig:
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"models: duplicate name(s): {', '.join(duplicates)}")
        if AUTO in (self.build.precisions or []):
            for model in self.models:
                if model.calibration is None or model.eval is None:
                    raise ValueError(f"models.{model.name}: precisions: [auto] tunes it, which needs both "
                                     "calibration and eval data")
        return self

    def resolve_paths(self, base: Path) -> LabConfig:
        """Make every relative path relative to ``base`` (the LAB.yaml's directory)."""
        def fix(path: Path | None) -> Path | None:
            if path is None:
                return None
            path = path.expanduser()
            return path if path.is_absolute() else base / path

        for model in self.models:
            model.path, model.calibration, model.eval = fix(model.path), fix(model.calibration), fix(model.eval)
        self.history.dir = fix(self.history.dir)
        self.artifacts = fix(self.artifacts)
        if self.baseline:
            self.baseline = [fix(p) for p in self.baseline]
        return self


def load_lab(path: Path | str) -> LabConfig:
    """Read and strictly validate a LAB.yaml; relative paths become relative to its directory."""
    path = Path(path)
    data = load_yaml_file(path, LabError)
    config = validate_model(LabConfig, data, str(path), LabError)
    config.resolve_paths(path.resolve().parent)
    for model in config.models:
        for what, file in (("path", model.path), ("calibration", model.calibration), ("eval", model.eval)):
            if file is not None and not file.exists():
                raise LabError(f"{path}: models.{model.name}.{what}: {file} does not exist")
    return config
