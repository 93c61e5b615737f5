"""Calibration and evaluation data: ``.npz`` files keyed by model input name.

For a single-input model any single non-label array (conventionally ``x``) is
taken. ``labels`` holds class ids for classification. Every array's first axis
is the sample axis; each entry is one sample of a batched input, or the input's
whole tensor (a state whose batch is not its first axis, a scalar): see
``edgeq.device.feeds``, the rule the device shares.
"""

from __future__ import annotations

import logging
import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from edgeq.device.feeds import one_sample, spec_ranks, whole_inputs
from edgeq.errors import DataError
from edgeq.manifest import sha256_file

log = logging.getLogger(__name__)

LABELS_KEY = "labels"
MIN_CALIBRATION_SAMPLES = 100
# What one data file may declare in all (its arrays are loaded into memory), and how many arrays it may hold.
MAX_DATA_BYTES = 8 * 2**30
MAX_ARRAYS = 1024
_CHUNK = 16 * 2**20
_SAVE_HINT = "save it with numpy.savez(path, x=inputs, labels=class_ids)"


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
    whole: frozenset[str] = frozenset()  # inputs whose samples are whole tensors: run one sample per call

    @property
    def samples(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batch(self, index: int) -> dict[str, np.ndarray]:
        """One sample as the model takes it: a batch of one, whole tensors as they are."""
        return one_sample(self.inputs, self.whole, index)

    def head(self, count: int) -> Dataset:
        """The first ``count`` samples (labels too)."""
        return self.part(0, count)

    def part(self, start: int, stop: int | None = None) -> Dataset:
        """Samples ``start`` to ``stop`` (labels too)."""
        return self.taken(slice(start, stop))

    def taken(self, index) -> Dataset:
        """The samples at ``index`` (a slice or an array of sample indices), labels too."""
        return Dataset(path=self.path, sha256=self.sha256, inputs={k: v[index] for k, v in self.inputs.items()},
                       labels=None if self.labels is None else self.labels[index],
                       samples_available=self.samples_available, whole=self.whole)


def load_dataset(path: Path | str, inputs: list[InputSpec], role: str = "data") -> Dataset:
    """Load ``path`` and match its arrays to ``inputs``, checking shape and dtype; raise DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {role} file not found")
    arrays = read_npz(path)
    labels = arrays.pop(LABELS_KEY, None)
    matched = _match_inputs(path, arrays, inputs)
    counts = {name: len(arr) for name, arr in matched.items()}
    if len(set(counts.values())) != 1:
        raise DataError(f"{path}: arrays have different sample counts {counts}")
    count = next(iter(counts.values()))
    if count == 0:
        raise DataError(f"{path}: holds no samples")
    whole = whole_inputs(matched, spec_ranks(inputs))
    for spec in inputs:
        matched[spec.name] = _check_array(path, spec, matched[spec.name], spec.name in whole)
    if labels is not None:
        labels = _check_labels(path, labels, count)
    return Dataset(path=path, sha256=sha256_file(path), inputs=matched, labels=labels, samples_available=count,
                   whole=whole)


def read_npz(path: Path | str) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` file ``path``, keyed by name, read without trusting the file.

    Each member's ``.npy`` header is read first (no pickles, no object dtypes) and must declare exactly
    as many bytes as the zip directory says the member holds; the declared total is capped at
    ``MAX_DATA_BYTES``, and no member is read past its declared size (so a zip bomb cannot expand
    further). Anything else is a one-line DataError naming the file and the array.
    """
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({_one_line(exc)})", hint=_SAVE_HINT) from exc
    with archive:
        plan = _plan_members(path, archive)
        return {key: _read_member(path, archive, key, *entry) for key, entry in plan.items()}


def _plan_members(path: Path, archive: zipfile.ZipFile) -> dict[str, tuple]:
    """Check every member's name and header before anything is allocated.

    Returns key -> (info, header length, dtype, shape, order).
    """
    infos = archive.infolist()
    if len(infos) > MAX_ARRAYS:
        raise DataError(f"{path}: holds {len(infos)} members, more than the {MAX_ARRAYS} edgeq reads",
                        hint=_SAVE_HINT)
    plan: dict[str, tuple] = {}
    total = 0
    for info in infos:
        name = info.filename
        if info.is_dir() or not name.endswith(".npy"):
            raise DataError(f"{path}: member '{name}' is not a .npy array (a .npz holds only .npy members)",
                            hint=_SAVE_HINT)
        key = name[: -len(".npy")]
        if key in plan:
            raise DataError(f"{path}: array '{key}' appears twice in the file", hint=_SAVE_HINT)
        header, dtype, shape, fortran = _read_header(path, archive, info, key)
        declared = math.prod(shape) * dtype.itemsize
        if declared != info.file_size - header:
            raise DataError(f"{path}: array '{key}' declares shape {list(shape)} of {dtype} ({declared} bytes) "
                            f"but the file holds {max(info.file_size - header, 0)} bytes for it (corrupt or crafted)")
        total += declared
        if total > MAX_DATA_BYTES:
            raise DataError(f"{path}: the arrays declare at least {_size(total)}, "
                            f"more than edgeq loads ({_size(MAX_DATA_BYTES)}; array '{key}' is {_size(declared)})",
                            hint="calibration and eval need a few hundred to a few thousand samples: save fewer")
        plan[key] = (info, header, dtype, shape, "F" if fortran else "C")
    return plan


def _read_header(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, key: str):
    """(header length, dtype, shape, fortran_order) of one member, refusing object dtypes."""
    try:
        with archive.open(info) as stream:
            version = npy_format.read_magic(stream)
            if version == (1, 0):
                shape, fortran, dtype = npy_format.read_array_header_1_0(stream)
            elif version == (2, 0):
                shape, fortran, dtype = npy_format.read_array_header_2_0(stream)
            else:
                raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
            header = stream.tell()
    # Bad magic or header, an encrypted member or unknown compression, a truncated stream:
    except (ValueError, TypeError, SyntaxError, RecursionError, zipfile.BadZipFile, OSError, EOFError,
            RuntimeError, NotImplementedError, zlib.error) as exc:
        raise DataError(f"{path}: array '{key}' has no readable .npy header ({_one_line(exc)})",
                        hint=_SAVE_HINT) from exc
    if dtype.hasobject:
        raise DataError(f"{path}: array '{key}' has dtype {dtype} (Python objects), which edgeq never loads",
                        hint="save numeric arrays only (pickled objects could run code)")
    if dtype.shape != () or any(not isinstance(d, int) or d < 0 for d in shape):
        raise DataError(f"{path}: array '{key}' has an invalid header (shape {shape}, dtype {dtype})")
    return header, dtype, shape, fortran


def _read_member(path: Path, archive: zipfile.ZipFile, key: str, info: zipfile.ZipInfo, header: int,
                 dtype: np.dtype, shape: tuple[int, ...], order: str) -> np.ndarray:
    """Read exactly the declared bytes of one member into a new array (the stream stops at file_size)."""
    count = math.prod(shape)
    try:
        flat = np.empty(count, dtype=dtype)
    except MemoryError as exc:
        raise DataError(f"{path}: not enough memory to load array '{key}' "
                        f"({_size(count * dtype.itemsize)})") from exc
    target = memoryview(flat.view(np.uint8)) if flat.nbytes else memoryview(b"")
    try:
        with archive.open(info) as stream:
            stream.read(header)
            done = 0
            while done < len(target):  # in chunks: never more than the declared bytes, nor a second copy of them
                chunk = stream.read(min(_CHUNK, len(target) - done))
                if not chunk:
                    break
                target[done : done + len(chunk)] = chunk
                done += len(chunk)
            stream.read(1)  # reaching the end makes zipfile check the CRC
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError, zlib.error) as exc:
        raise DataError(f"{path}: array '{key}' is corrupt ({_one_line(exc)})", hint=_SAVE_HINT) from exc
    if done != len(target):
        raise DataError(f"{path}: array '{key}' is truncated ({done} of {len(target)} bytes)", hint=_SAVE_HINT)
    return flat.reshape(shape, order=order)


def _size(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] or type(exc).__name__


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


def _check_array(path: Path, spec: InputSpec, arr: np.ndarray, whole: bool) -> np.ndarray:
    """``arr`` checked against ``spec``: [N, *dims after the batch], or [N, *every dim] when ``whole``."""
    expected = list(spec.shape or []) if whole else spec.shape[1:] if spec.shape else []
    actual = list(arr.shape[1:])
    if len(actual) != len(expected) or any(e is not None and e > 0 and e != a for e, a in zip(expected, actual, strict=True)):
        def shown(dims):
            return "[" + ", ".join(["N", *("?" if d is None or d <= 0 else str(d) for d in dims)]) + "]"
        forms = shown(spec.shape[1:]) + (f" (batched) or {shown(spec.shape)} (a whole tensor per sample)"
                                         if spec.shape else "")
        raise DataError(f"{path}: array for input '{spec.name}' has shape {list(arr.shape)}, "
                        f"the model expects {forms}")
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
    return dataset.taken(np.sort(rng.choice(dataset.samples, size=limit, replace=False)))
