"""The transcription view of an artifact against FP32, as an edgeq user metric::

    edgeq tune nmp ... --gate 'examples/basic_pitch/metrics.py:notes.frame_f1>=0.95'

A frame of a piano key is active where ``note`` exceeds ``FRAME_THRESHOLD``, and starts a note where ``onset``
exceeds ``ONSET_THRESHOLD`` (basic-pitch's own defaults for note events). The F1 scores compare the artifact's
active frames and onsets with FP32's: what a user of the transcription would see change. Cosine over the
probability maps, mostly near zero, weighs every silent key as much as a played one.
"""

from __future__ import annotations

import numpy as np

FRAME_THRESHOLD = 0.3
ONSET_THRESHOLD = 0.5


def _f1(reference: np.ndarray, artifact: np.ndarray) -> float:
    both = int(np.sum(reference & artifact))
    either = int(np.sum(reference)) + int(np.sum(artifact))
    return 1.0 if either == 0 else 2.0 * both / either


def notes(references, outputs, inputs, labels):
    """F1 of active frames and of onsets against FP32, and the note probabilities' mean absolute error."""
    note_ref, note_out = np.asarray(references["note"]), np.asarray(outputs["note"])
    onset_ref, onset_out = np.asarray(references["onset"]), np.asarray(outputs["onset"])
    return {"frame_f1": _f1(note_ref > FRAME_THRESHOLD, note_out > FRAME_THRESHOLD),
            "onset_f1": _f1(onset_ref > ONSET_THRESHOLD, onset_out > ONSET_THRESHOLD),
            "note_mean_abs_error": float(np.mean(np.abs(note_ref.astype(np.float64) - note_out))),
            "active_frames": float(np.mean(note_ref > FRAME_THRESHOLD))}
