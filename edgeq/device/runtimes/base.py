"""What every runtime session shares: tensor specs, I/O (de)quantization, the one timed call."""

import numpy as np

from ..errors import InferenceFailed, RunnerError


def _quant_params(scale, zero_point):
    """Per-tensor (scale, zero_point) or None; per-channel I/O quantization is not used for I/O tensors."""
    scale = np.asarray(scale, dtype=np.float64).reshape(-1) if scale is not None else np.zeros(0)
    zero_point = np.asarray(zero_point, dtype=np.int64).reshape(-1) if zero_point is not None else np.zeros(0)
    if scale.size == 0 or float(scale[0]) == 0.0:
        return None
    return float(scale[0]), int(zero_point[0]) if zero_point.size else 0


def quantize(values, dtype, params):
    """float -> integer tensor with the artifact's own scale/zero-point (round half to even, saturating)."""
    scale, zero_point = params
    info = np.iinfo(dtype)
    q = np.round(np.asarray(values, dtype=np.float64) / scale) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(values, params):
    scale, zero_point = params
    return ((np.asarray(values, dtype=np.float64) - zero_point) * scale).astype(np.float32)


class Session:
    """One loaded model: ``inputs``/``outputs`` describe tensors, ``run`` maps float inputs to float outputs."""

    runtime = ""
    runtime_version = None

    def __init__(self):
        self.inputs = []  # [{name, shape, dtype, quant: (scale, zp) or None}]
        self.outputs = []
        self.execution = {}  # what actually ran: provider, device, delegate, threads

    def prepare(self, feed):
        """Convert float arrays keyed by input name into what the runtime takes (quantized where needed)."""
        prepared = {}
        for spec in self.inputs:
            if spec["name"] not in feed:
                raise RunnerError("no data for model input '%s'" % spec["name"])
            value = np.asarray(feed[spec["name"]])
            dtype = np.dtype(spec["dtype"])
            if spec.get("quant") and np.issubdtype(dtype, np.integer) and not np.issubdtype(value.dtype, np.integer):
                value = quantize(value, dtype, spec["quant"])
            else:
                value = value.astype(dtype, copy=False)
            # Not np.ascontiguousarray: it makes a 0-d array (a scalar input) 1-d. np.asarray: quantizing a 0-d
            # array gives a numpy scalar, which runtimes refuse.
            value = np.asarray(value)
            prepared[spec["name"]] = value if value.flags.c_contiguous else np.array(value, order="C")
        return prepared

    def run(self, feed):
        """Run on float inputs; returns float32 outputs (dequantized) in ``self.outputs`` order."""
        prepared = self.prepare(feed)
        try:
            raw = self.run_prepared(prepared)
        except RunnerError:
            raise
        except Exception as exc:  # each runtime raises its own type (RuntimeError, ORT's Fail, OpenVINO's)
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise InferenceFailed("%s failed at inference: %s" % (self.runtime, " ".join(lines)[:300])) from exc
        return [dequantize(r, spec["quant"]) if spec.get("quant") and np.issubdtype(r.dtype, np.integer)
                else np.asarray(r, dtype=np.float32) for r, spec in zip(raw, self.outputs)]

    def run_prepared(self, prepared):  # pragma: no cover - overridden
        raise NotImplementedError

    def bind(self, prepared):
        """A zero-argument callable doing exactly one runtime call on ``prepared`` inputs (what is timed).

        Everything that can be done once (quantizing, resizing, looking up methods) is done here, outside
        the timed region, so the timed call is what a hand-written loop over the runtime would do.
        """
        run_prepared = self.run_prepared
        return lambda: run_prepared(prepared)
