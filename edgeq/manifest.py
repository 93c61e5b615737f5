"""The artifact manifest: every artifact directory describes itself in ``manifest.json``.

An artifact is identified by the sha256 of its files (paths and contents), so the
same conversion twice gives the same id where the backend is deterministic.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic import ValidationError as PydanticValidationError

from edgeq.config import format_validation_error
from edgeq.errors import ManifestError
from edgeq.names import Format, Precision

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20


class _Record(BaseModel):
    # Manifests are written by edgeq and read back by newer versions: forbid typos, keep it strict.
    model_config = ConfigDict(extra="forbid")


class FileEntry(_Record):
    path: str = Field(description="relative to the artifact directory, '/'-separated")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _inside_the_artifact(cls, value: str) -> str:
        # The path is joined to a release directory on the device: it must stay inside it.
        parts = value.split("/")
        if not value or value.startswith("/") or "\\" in value or any(p in ("", ".", "..") for p in parts) \
                or any(ord(c) < 32 for c in value):
            raise ValueError(f"file path {value!r} must be relative, '/'-separated, without '.', '..' or "
                             "empty parts")
        return value


# Files a Python interpreter would import or execute. An artifact is model files and data only: one holding
# any of these (or a package directory) is refused at convert, deploy and bench, so nothing an artifact
# carries can become code on a device or on the controller.
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyw", ".pyz", ".pth", ".so", ".pyd", ".dylib", ".egg", ".whl")


def code_files(paths: list[str]) -> list[str]:
    """The artifact-relative paths that are code: importable files, and files in package directories."""
    packages = {p.rsplit("/", 1)[0] if "/" in p else "" for p in paths
                if p.rsplit("/", 1)[-1].startswith("__init__.")}
    return [p for p in paths if p.lower().endswith(CODE_SUFFIXES) or ".so." in p.rsplit("/", 1)[-1]
            or (p.rsplit("/", 1)[0] if "/" in p else "") in packages or "__pycache__" in p.split("/")]


def refuse_code(directory: Path, paths: list[str]) -> None:
    """ManifestError naming the files when an artifact holds code."""
    found = code_files(paths)
    if found:
        raise ManifestError(f"{directory}: the artifact holds code ({', '.join(found[:5])}"
                            + (f" and {len(found) - 5} more" if len(found) > 5 else "") + "); refusing it",
                            hint="an artifact is model files and manifest.json only; rebuild it with 'edgeq convert'")


class SourceInfo(_Record):
    path: str
    sha256: str = Field(description="of the file, or of the directory's files for a SavedModel")
    kind: Literal["keras", "savedmodel", "onnx", "pytorch", "torchscript"]


class CalibrationInfo(_Record):
    path: str
    sha256: str
    samples_available: int
    samples_used: int
    method: str = Field(description="e.g. minmax, entropy, percentile, tflite-representative-dataset")


class TensorSpec(_Record):
    name: str
    source_name: str | None = Field(default=None, description="the source model's name for this tensor")
    shape: list[int | None]
    dtype: str
    scale: float | list[float] | None = None
    zero_point: int | list[int] | None = None


class OutputAgreement(_Record):
    """How one output of the artifact follows the same output of the FP32 source, over the eval samples."""

    cosine_mean: float
    cosine_min: float
    nmse: float
    max_abs_error: float


class Validation(_Record):
    status: Literal["passed", "failed", "not-run"]
    message: str | None = None
    eval_path: str | None = None
    eval_sha256: str | None = None
    samples: int | None = None
    reference: str | None = Field(default=None, description="what the artifact was compared against")
    top1_reference: float | None = None
    top1: float | None = None
    top1_drop: float | None = None
    max_accuracy_drop: float | None = None
    min_cosine: float | None = None
    top1_agreement: float | None = None
    cosine_similarity: float | None = None
    max_abs_error: float | None = None
    outputs: dict[str, OutputAgreement] | None = Field(
        default=None, description="every output compared by its source name (the fields above: the scores output)")
    metrics: dict[str, dict[str, float]] | None = Field(
        default=None, description="--metric results by metric name (edgeq.taskmetrics), e.g. embedding, top5")
    gates: list[str] | None = Field(default=None, description="the --gate bounds checked (METRIC[.FIELD]>=VALUE)")
    execution: dict[str, Any] | None = Field(
        default=None, description="what the runtime ran during validation, as it reports it (precision pinned)")
    host_profile: str | None = Field(
        default=None, description="the CPU class that ran validation: a profile name, or x86-avx-vnni")
    host_caveat: str | None = Field(
        default=None, description="why the device's accuracy may differ from this host's figures, when it may")


class Manifest(_Record):
    schema_version: int = SCHEMA_VERSION
    id: str = Field(description="sha256 over the artifact's files, first 16 hex digits")
    status: Literal["ok", "failed"] = "ok"
    format: Format
    precision: Precision
    model_file: str = Field(description="the file a runtime loads (model.tflite, model.onnx, model.xml)")
    files: list[FileEntry]
    source: SourceInfo
    calibration: CalibrationInfo | None = None
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    profile: dict[str, Any]
    tool_versions: dict[str, str]
    created_at: str
    conversion_seconds: float
    options: dict[str, Any] = Field(default_factory=dict, description="conversion settings, for reuse checks")
    validation: Validation = Field(default_factory=lambda: Validation(status="not-run"))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(path: Path) -> str:
    """Hex sha256 of a file, or of a directory's files (relative paths and contents, sorted)."""
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        digest.update(sha256_file(file).encode() + b"\n")
    return digest.hexdigest()


def file_entries(directory: Path, exclude: tuple[str, ...] = (MANIFEST_NAME,)) -> list[FileEntry]:
    """FileEntry for every file under ``directory`` except the manifest, sorted by path."""
    entries = []
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = file.relative_to(directory).as_posix()
        if rel in exclude:
            continue
        entries.append(FileEntry(path=rel, sha256=sha256_file(file), size=file.stat().st_size))
    return entries


def artifact_id(files: list[FileEntry]) -> str:
    """Content id of an artifact: sha256 over its (path, sha256) pairs, 16 hex digits."""
    digest = hashlib.sha256()
    for entry in sorted(files, key=lambda e: e.path):
        digest.update(f"{entry.path}\0{entry.sha256}\n".encode())
    return digest.hexdigest()[:16]


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` into ``directory`` (pretty, stable key order)."""
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    return path


def read_manifest(directory: Path) -> Manifest:
    """Read and validate an artifact directory's manifest."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise ManifestError(f"{directory}: not an artifact directory (no such directory)")
    if not path.is_file():
        raise ManifestError(f"{directory}: not an artifact directory (no {MANIFEST_NAME})",
                            hint="create one with 'edgeq convert'")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    if isinstance(data, dict) and data.get("schema_version") not in (None, SCHEMA_VERSION):
        raise ManifestError(f"{path}: schema_version {data.get('schema_version')} is not supported "
                            f"(this edgeq reads {SCHEMA_VERSION})", hint="upgrade edgeq")
    try:
        return Manifest.model_validate(data)
    except PydanticValidationError as exc:
        raise ManifestError(format_validation_error(exc, str(path))) from exc


def verify_artifact(directory: Path, manifest: Manifest | None = None) -> Manifest:
    """Check that every file listed in the manifest exists with its size and sha256, and that none is code
    (``refuse_code``); return the manifest."""
    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    refuse_code(directory, [entry.path for entry in manifest.files])
    problems = []
    for entry in manifest.files:
        file = directory / entry.path
        if not file.is_file():
            problems.append(f"{entry.path}: missing")
        elif file.stat().st_size != entry.size:
            problems.append(f"{entry.path}: size {file.stat().st_size} != {entry.size}")
        elif sha256_file(file) != entry.sha256:
            problems.append(f"{entry.path}: sha256 mismatch")
    if problems:
        raise ManifestError(f"{directory}: artifact does not match its manifest: " + "; ".join(problems))
    if artifact_id(manifest.files) != manifest.id:
        raise ManifestError(f"{directory}: manifest id {manifest.id} does not match its files")
    return manifest
