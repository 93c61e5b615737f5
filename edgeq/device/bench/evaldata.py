"""Eval inputs fed sample by sample; the outputs go back to the controller as one .npz."""

import os
import time

import numpy as np

from ..errors import RunnerError
from ..feeds import run_samples, spec_ranks, whole_inputs


def _load_eval(path, session, manifest):
    """Eval inputs keyed by the session's input names (labels never reach the device)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = dict((k, npz[k]) for k in npz.files)
    except Exception as exc:
        raise RunnerError("cannot read eval inputs %s: %s" % (path, exc)) from exc
    arrays.pop("labels", None)
    names = [spec["name"] for spec in session.inputs]
    manifest_names = [spec.get("name") for spec in manifest.get("inputs", [])]
    feed = {}
    for position, name in enumerate(names):
        if name in arrays:
            feed[name] = arrays[name]
        elif position < len(manifest_names) and manifest_names[position] in arrays:
            feed[name] = arrays[manifest_names[position]]
        elif len(names) == 1 and len(arrays) == 1:
            feed[name] = next(iter(arrays.values()))
        else:
            raise RunnerError("eval inputs %s have no array for model input '%s' (arrays: %s)"
                              % (path, name, ", ".join(sorted(arrays))))
    counts = set(len(a) for a in feed.values())
    if len(counts) != 1 or 0 in counts:
        raise RunnerError("eval inputs %s: arrays must hold the same, non-zero number of samples" % path)
    return feed


def _run_eval(session, feed, outputs_path):
    """Every eval sample, one call each (as the device serves them), outputs kept in ``outputs_path``."""
    count = len(next(iter(feed.values())))
    started = time.perf_counter()
    outputs = run_samples(session.run, feed, whole_inputs(feed, spec_ranks(session.inputs)), step=1)
    seconds = time.perf_counter() - started
    arrays = dict(("output_%d" % i, values) for i, values in enumerate(outputs))
    tmp = outputs_path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, outputs_path)
    return {"samples": count, "seconds": seconds, "outputs_file": os.path.basename(outputs_path),
            "output_names": [spec["name"] for spec in session.outputs]}
