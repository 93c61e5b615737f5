"""How data-file samples become model calls: the one rule the controller and the device share.

Every array in a calibration or eval file holds one entry per sample along its first axis. For each model
input, the entry is either

- one sample of a *batched* input: the array is ``[samples, *the input's dims after the batch]`` (images,
  token ids). Such samples are fed as a batch of one, or several stacked along the input's first axis; or
- the model's *whole* input tensor: the array is ``[samples, *every dim of the input]``. That is how an input
  whose batch is not its first axis (an LSTM state ``[2, batch, 128]``) or that has no batch at all (a
  scalar sample rate) is given. A model with such an input runs one sample per call, the arrays fed as they
  are, and each output is the stack of the calls' outputs (``[samples, *the output's dims]``), since its
  batch axis, if it has one, need not be the first either.

Which one an array is follows from its rank against the input's: the same rank is batched, one more is
whole; anything else is refused where the file is read (``edgeq.data``). Runtimes report an input of unknown
rank as they report a scalar (``[]``), so such an input's ``[samples]`` array is fed one 0-d value per call.
"""

import numpy as np


def whole_inputs(arrays, ranks):
    """Names of the arrays in ``arrays`` (name -> array) that hold whole input tensors, given ``ranks``
    (name -> the model input's rank)."""
    return frozenset(name for name, array in arrays.items()
                     if name in ranks and np.ndim(array) == ranks[name] + 1)


def spec_ranks(specs):
    """name -> rank from input specs: objects with ``name``/``shape`` or dicts with those keys."""
    ranks = {}
    for spec in specs:
        name, shape = (spec["name"], spec["shape"]) if isinstance(spec, dict) else (spec.name, spec.shape)
        ranks[name] = len(shape or ())
    return ranks


def one_sample(arrays, whole, index):
    """Sample ``index`` of every array: as it is for whole inputs, as a batch of one for the others.

    ``array[index, ...]`` keeps a scalar sample a 0-d array (runtimes refuse numpy scalars)."""
    return dict((name, array[index, ...] if name in whole else array[index:index + 1])
                for name, array in arrays.items())


def run_samples(run, arrays, whole, step=1):
    """Every output of ``run`` (a feed dict -> list of arrays) over all samples of ``arrays``.

    Without whole inputs the samples go ``step`` at a time and each output is concatenated along its first
    (batch) axis; with them, one at a time, each output stacked on a new first axis."""
    count = len(next(iter(arrays.values())))
    if whole:
        calls = [run(one_sample(arrays, whole, index)) for index in range(count)]
        return [np.stack([np.asarray(call[i]) for call in calls]) for i in range(len(calls[0]))]
    step = max(int(step), 1)
    calls = [run(dict((name, array[start:start + step]) for name, array in arrays.items()))
             for start in range(0, count, step)]
    return [np.concatenate([np.asarray(call[i]) for call in calls]) for i in range(len(calls[0]))]
