"""Calibration and evaluation data: ``.npz`` files keyed by model input name.

For a single-input model any single non-label array (conventionally ``x``) is
taken. ``labels`` holds class ids for classification. Every array's first axis
is the sample axis.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.errors import DataError
from edgeq.manifest import sha256_file

log = logging.getLogger(__name__)

LABELS_KEY = "labels"
MIN_CALIBRATION_SAMPLES = 100


@dataclass
class InputSpec:
    """What a model input expects (name, shape with None for free dims, numpy dtype name)."""

    name: str
    shape: list[int | None]
    dtype: str = "float32"


@dataclass
class Dataset:
    """Inputs keyed by model input name, optional labels, and where they came from."""

    path: Path
    sha256: str
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    samples_available: int

    @property
    def samples(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batch(self, index: int) -> dict[str, np.ndarray]:
        """One sample as a batch of one."""
        return {name: arr[index : index + 1] for name, arr in self.inputs.items()}


def load_dataset(path: Path | str, inputs: list[InputSpec], role: str = "data") -> Dataset:
    """Load ``path`` and match its arrays to ``inputs``, checking shape and dtype; raise DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {role} file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})",
                        hint="save it with numpy.savez(path, x=inputs, labels=class_ids)") from exc
    labels = arrays.pop(LABELS_KEY, None)
    matched = _match_inputs(path, arrays, inputs)
    counts = {name: len(arr) for name, arr in matched.items()}
    if len(set(counts.values())) != 1:
        raise DataError(f"{path}: arrays have different sample counts {counts}")
    count = next(iter(counts.values()))
    if count == 0:
        raise DataError(f"{path}: holds no samples")
    for spec in inputs:
        matched[spec.name] = _check_array(path, spec, matched[spec.name])
    if labels is not None:
        labels = _check_labels(path, labels, count)
    return Dataset(path=path, sha256=sha256_file(path), inputs=matched, labels=labels, samples_available=count)


def _match_inputs(path: Path, arrays: dict[str, np.ndarray], inputs: list[InputSpec]) -> dict[str, np.ndarray]:
    if len(inputs) == 1 and len(arrays) == 1:
        return {inputs[0].name: next(iter(arrays.values()))}
    names = [spec.name for spec in inputs]
    missing = [name for name in names if name not in arrays]
    if missing:
        raise DataError(
            f"{path}: no array for model input(s) {missing} (the file has {sorted(arrays) or 'no input arrays'})",
            hint=f"key the arrays by input name: numpy.savez(path, {', '.join(f'{n}=...' for n in names)})",
        )
    return {name: arrays[name] for name in names}


def _check_array(path: Path, spec: InputSpec, arr: np.ndarray) -> np.ndarray:
    expected = spec.shape[1:] if spec.shape else []
    actual = list(arr.shape[1:])
    if len(actual) != len(expected) or any(e is not None and e > 0 and e != a for e, a in zip(expected, actual, strict=True)):
        shown = ["N", *("?" if e is None or e <= 0 else e for e in expected)]
        raise DataError(f"{path}: array for input '{spec.name}' has shape {list(arr.shape)}, "
                        f"the model expects [{', '.join(map(str, shown))}]")
    want = np.dtype(spec.dtype)
    if arr.dtype == want:
        return arr
    if np.issubdtype(want, np.floating) and (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        return arr.astype(want)
    raise DataError(f"{path}: array for input '{spec.name}' has dtype {arr.dtype}, the model expects {want}")


def _check_labels(path: Path, labels: np.ndarray, count: int) -> np.ndarray:
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: 'labels' must be a 1-D array of integer class ids, "
                        f"got shape {list(labels.shape)} dtype {labels.dtype}")
    if len(labels) != count:
        raise DataError(f"{path}: 'labels' has {len(labels)} entries but the inputs have {count} samples")
    if labels.min() < 0:
        raise DataError(f"{path}: 'labels' has negative class id {int(labels.min())}")
    return labels.astype(np.int64)


def check_labels_range(dataset: Dataset, num_classes: int) -> None:
    """Raise DataError when a label is not a valid index into the model's ``num_classes`` outputs."""
    if dataset.labels is not None and int(dataset.labels.max()) >= num_classes:
        raise DataError(f"{dataset.path}: label {int(dataset.labels.max())} is out of range: "
                        f"the model has {num_classes} classes (ids 0..{num_classes - 1})")


def subsample(dataset: Dataset, limit: int, seed: int = 0) -> Dataset:
    """At most ``limit`` samples, chosen deterministically (same file + limit = same samples)."""
    if dataset.samples <= limit:
        return dataset
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(dataset.samples, size=limit, replace=False))
    return Dataset(
        path=dataset.path,
        sha256=dataset.sha256,
        inputs={name: arr[index] for name, arr in dataset.inputs.items()},
        labels=None if dataset.labels is None else dataset.labels[index],
        samples_available=dataset.samples_available,
    )
