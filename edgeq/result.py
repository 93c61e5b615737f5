"""The bench result: one target x one artifact, as written by ``edgeq bench`` and the lab and read by the
report. This module is its only definition, for writing and for reading.

Schema 2 (this edgeq writes it) splits schema 1's ``artifact.model``, which was a source path when bench
wrote it and a LAB.yaml name when the lab did, into ``artifact.name`` (the model's name for people and for
baseline matching) and ``artifact.source_path``; and adds ``failure``, the typed failure (kind, host, argv,
exit code) that the lab and the report decide on. Schema 1 files (older nightly baselines) are still read:
``model`` is mapped onto the two fields.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgeq.errors import Failure

RESULT_SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)


class _Lenient(BaseModel):
    # Measurement blocks come from the device's runner; fields it adds within a schema must not break reading.
    model_config = ConfigDict(extra="allow")


def model_name(model: str) -> str:
    """A model's name for people: a source path's file name without suffix, else the name as given."""
    if "/" in model or "\\" in model or model.endswith((".keras", ".h5", ".onnx")):
        return PurePath(model.replace("\\", "/").rstrip("/")).stem or model
    return model


class ResultArtifact(_Lenient):
    id: str | None = Field(default=None, description="None when the artifact was never built")
    name: str | None = Field(default=None, description="the model's name (file stem, or the LAB.yaml name)")
    source_path: str | None = Field(default=None, description="the FP32 source the artifact was converted from")
    format: str | None = None
    precision: str | None = None
    profile: str | None = None
    size_bytes: int | None = None
    source_sha256: str | None = None
    validation_status: str | None = None
    path: str | None = Field(default=None, description="the artifact directory on the controller")

    @property
    def display_name(self) -> str:
        return self.name or (model_name(self.source_path) if self.source_path else "?")


class LatencyStats(_Lenient):
    p50: float
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None
    mean: float | None = None
    std: float | None = None
    cv: float | None = None
    min: float | None = None
    max: float | None = None
    count: int | None = None  # every timed inference; the statistics above are over all of them
    samples_every: int = 1  # ``samples`` holds every k-th of the ``count`` samples, in time order
    samples: list[float] = Field(default_factory=list)


class Agreement(_Lenient):
    top1_agreement: float | None = None
    cosine_similarity: float | None = None
    max_abs_error: float | None = None


class OutputAgreement(_Lenient):
    cosine_mean: float | None = None
    cosine_min: float | None = None
    nmse: float | None = None
    max_abs_error: float | None = None


class AccuracyStats(_Lenient):
    samples: int | None = None
    top1: float | None = None
    top5: float | None = None
    top1_reference: float | None = None
    top1_drop: float | None = None
    agreement: Agreement | None = None
    outputs: dict[str, OutputAgreement] | None = None  # every artifact output against the source's, by name
    metrics: dict[str, dict[str, float]] | None = None  # --metric results (edgeq.taskmetrics), by metric name


class MemoryStats(_Lenient):
    baseline_rss: float | None = None
    after_load_rss: float | None = None
    peak_rss: float | None = None
    model_load_delta: float | None = None


class PowerInfo(_Lenient):
    available: bool = False
    sensor: str | None = None
    reason: str | None = None
    idle_w: float | None = None
    avg_w: float | None = None
    active_w: float | None = None


class RuntimeInfo(_Lenient):
    name: str | None = None
    version: str | None = None
    execution: Any = None


class BenchResult(_Lenient):
    """One bench result. ``status: failed`` results carry ``failure`` (and ``error``, its message) and no
    measurement; they are written too, so reports show every target x artifact that was attempted."""

    schema_version: int = RESULT_SCHEMA_VERSION
    target: str
    status: Literal["ok", "failed"]
    error: str | None = None
    hint: str | None = None
    failure: Failure | None = None
    started_at: str | None = None
    duration_s: float | None = None
    artifact: ResultArtifact
    env: dict[str, Any] = Field(default_factory=dict)
    runtime: RuntimeInfo | None = None
    settings: dict[str, Any] = Field(default_factory=dict)
    load_ms: float | None = None
    first_inference_ms: float | None = None
    latency_ms: LatencyStats | None = None
    throughput_ips: float | None = None
    accuracy: AccuracyStats | None = None
    memory_mb: MemoryStats | None = None
    power: PowerInfo | None = None
    energy_j_per_inference: float | None = None
    timed_wall_s: float | None = None
    runner_traceback: list[str] | None = None  # the device-side traceback, line by line

    @model_validator(mode="before")
    @classmethod
    def _upgrade_schema_1(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("schema_version") != 1:
            return data
        data = dict(data)
        artifact = dict(data.get("artifact") or {})
        model = artifact.pop("model", None)
        if isinstance(model, str):
            artifact.setdefault("name", model_name(model))
            if model_name(model) != model:  # a path (bench wrote it), not a lab name
                artifact.setdefault("source_path", model)
        data["artifact"] = artifact
        return data

    @field_validator("env", "settings", mode="before")
    @classmethod
    def _none_is_empty(cls, value):
        # A failed run has no environment: bench writes null.
        return {} if value is None else value

    @model_validator(mode="after")
    def _failed_says_why(self) -> BenchResult:
        # Schema 1 said why only in words: its kind is unknown, and is not guessed.
        if self.status == "failed" and self.failure is None and self.schema_version >= 2:
            raise ValueError("a failed result needs a 'failure'")
        return self

    def fail(self, failure: Failure) -> None:
        """Mark this result failed with ``failure`` (measurements taken so far are kept)."""
        self.status, self.failure, self.error, self.hint = "failed", failure, failure.message, failure.hint

    def to_json_dict(self) -> dict:
        return self.model_dump(mode="json")
