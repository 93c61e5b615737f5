"""The voice-activity view of an artifact against FP32, as an edgeq user metric::

    edgeq convert MODEL ... --eval eval.npz --metric examples/silero_vad/metrics.py:vad \\
        --gate 'examples/silero_vad/metrics.py:vad.decision_agreement>=0.98'

Speech probability is the model's ``output``; a window counts as speech above ``THRESHOLD`` (silero-vad's
default). Cosine means nothing for one probability per window, hence a metric of its own.
"""

from __future__ import annotations

import numpy as np

THRESHOLD = 0.5


def vad(references, outputs, inputs, labels):
    """Agreement of the speech/non-speech decisions, and the probabilities' mean and largest absolute error."""
    reference = np.asarray(references["output"], np.float64).reshape(-1)
    artifact = np.asarray(outputs["output"], np.float64).reshape(-1)
    error = np.abs(reference - artifact)
    return {"decision_agreement": float(np.mean((reference > THRESHOLD) == (artifact > THRESHOLD))),
            "mean_abs_error": float(np.mean(error)), "max_abs_error": float(np.max(error)),
            "speech_share": float(np.mean(reference > THRESHOLD))}
