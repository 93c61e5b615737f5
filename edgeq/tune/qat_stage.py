"""Tune's stage Q (``tune --train``): quantization-aware training as a candidate source, for Keras and PyTorch
``.pt2`` models."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from edgeq.errors import EdgeqError
from edgeq.tune.candidates import Candidate

if TYPE_CHECKING:
    from edgeq.tune.search import _Search


def search_qat(search: _Search, fmts: list[str], train: Path, epochs: int) -> None:
    """Stage Q (``--train``): fine-tune the model once with simulated int8 rounding (edgeq.qat), then an int8
    candidate per format from the fine-tuned model, its learned scales kept."""
    from edgeq.convert.source import detect_kind
    from edgeq.qat.core import fine_tune, qat_formats

    built = qat_formats(detect_kind(search.model))
    qat_fmts = [f for f in fmts if f in built]
    if not qat_fmts or search.out_of_budget():
        if not qat_fmts:
            search.notes.append(f"QAT not tried: it builds {', '.join(built)}, none of {', '.join(fmts)}")
        return
    left_s = search.deadline - time.monotonic()
    if left_s < 30:  # a fine-tune that --max-time would cut off
        search.notes.append(f"QAT not tried: {max(0.0, left_s):.0f} s of --max-time left")
        return
    search.progress.step("QAT fine-tune")
    started = time.monotonic()
    try:
        training = fine_tune(search.model, train, search.root, search.profile, epochs=epochs,
                             calibration_samples=search.calibration_samples, timeout_s=left_s)
    except EdgeqError as exc:
        search.notes.append(f"QAT not tried: {exc.message}")
        return
    search.notes.append(f"QAT: {epochs} epochs on {train.name} in {time.monotonic() - started:.0f} s "
                        f"(final loss {training['loss'][-1]:.4g})")
    for fmt in qat_fmts:
        if search.try_candidate(Candidate(fmt, "int8", "qat", source_model=Path(training["qat_model"]))) is None:
            return
