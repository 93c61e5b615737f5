"""Task metrics named on the command line (``--metric``) and gates over them (``--gate``).

A metric compares the artifact's outputs with the FP32 source's on the eval samples and gives named numbers:

- ``top1``, ``top5``: accuracy against the eval labels, the FP32 figure and the drop;
- ``cosine`` (``mean``, ``min``), ``nmse`` (``max``): the worst output's figures (every output is compared
  with the source output of its name);
- ``embedding[=OUTPUT]``: cosine of mask-aware mean pooling of a token output (samples, tokens, features),
  the sentence-embedding view of a transformer's hidden states; the mask is the eval input
  ``attention_mask`` (or the one 0/1 integer input of shape (samples, tokens));
- ``MODULE:FUNCTION`` or ``path/to/file.py:FUNCTION``: the user's own, run here on the controller and called
  as ``FUNCTION(references=..., outputs=..., inputs=..., labels=...)`` (dicts of arrays by source name, labels
  or None); it returns a number or a dict of numbers.

A user metric is code the user named on this command line; the name is recorded in the manifest, but nothing
ever imports a metric because a manifest, an artifact or a device's reply names it.

A gate is ``METRIC[.FIELD]>=VALUE`` or ``<=``; without a field it reads the metric's headline number
(``HEADLINE`` below; ``value`` for a user metric that returns a number).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.errors import DataError
from edgeq.metrics import cosine_per_sample, output_agreement, per_sample, top_k_accuracy

#: The number a gate without a field reads, per built-in metric.
HEADLINE = {"top1": "top1_drop", "top5": "top5_drop", "cosine": "mean", "nmse": "max", "embedding": "cosine_mean"}
BUILTINS = tuple(HEADLINE)
_GATE = re.compile(r"^\s*(?P<metric>[^<>=\s]+?)(?:\.(?P<field>[A-Za-z_]\w*))?\s*(?P<op>>=|<=)\s*(?P<value>\S+)\s*$")


class MetricError(DataError):
    """A metric that cannot be computed on this data, or a user metric that failed or returned no number."""


@dataclass(frozen=True)
class MetricData:
    """What every metric sees: FP32 and artifact outputs and eval inputs by source name, labels or None."""

    references: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray]
    inputs: Mapping[str, np.ndarray]
    labels: np.ndarray | None
    scores: str | None = None  # the source output that holds the class scores (top1/top5)


@dataclass(frozen=True)
class Metric:
    """One ``--metric``: a built-in by name (``option``: embedding's output) or a user ``module:function``."""

    spec: str
    name: str
    option: str | None = None
    function: Callable | None = None

    def compute(self, data: MetricData) -> dict[str, float]:
        if self.function is not None:
            return _call_user(self, data)
        return _BUILTIN_FUNCTIONS[self.name](data, self.option)


@dataclass(frozen=True)
class Gate:
    """``metric.field op value``: passes when the measured number is on the right side of ``value``."""

    spec: str
    metric: str
    field: str | None
    op: str
    value: float

    def read(self, results: Mapping[str, Mapping[str, float]]) -> tuple[str, float]:
        """(field read, measured number); MetricError naming what is missing."""
        fields = results.get(self.metric)
        if fields is None:
            raise MetricError(f"--gate {self.spec}: metric '{self.metric}' was not computed")
        field = self.field or HEADLINE.get(self.metric) or ("value" if "value" in fields else None)
        if field is None or field not in fields:
            raise MetricError(f"--gate {self.spec}: metric '{self.metric}' has no field '{field or ''}'",
                              hint=f"its fields: {', '.join(sorted(fields))}")
        return field, fields[field]

    def passes(self, measured: float) -> bool:
        return measured >= self.value - 1e-12 if self.op == ">=" else measured <= self.value + 1e-12


def parse_gate(text: str) -> Gate:
    match = _GATE.match(text)
    if not match:
        raise MetricError(f"--gate '{text}': expected METRIC[.FIELD]>=VALUE or <=VALUE",
                          hint="e.g. --gate 'embedding.cosine_min>=0.98' or --gate 'top5<=0.01'")
    try:
        value = float(match["value"])
    except ValueError:
        raise MetricError(f"--gate '{text}': '{match['value']}' is not a number") from None
    if not math.isfinite(value):
        raise MetricError(f"--gate '{text}': the bound must be a finite number")
    return Gate(text.strip(), match["metric"], match["field"], match["op"], value)


def parse_metric(text: str) -> Metric:
    """A ``--metric`` value, resolved now (a user module is imported here, so a typo fails before any work)."""
    spec = text.strip()
    name, _, option = spec.partition("=")
    if name in BUILTINS:
        if option and name != "embedding":
            raise MetricError(f"--metric {spec}: only embedding takes an output (embedding=OUTPUT)")
        return Metric(spec, name, option or None)
    if ":" not in spec:
        raise MetricError(f"--metric {spec}: not a metric", hint=f"built-in: {', '.join(BUILTINS)}; "
                          "or MODULE:FUNCTION / path/to/file.py:FUNCTION for your own")
    return Metric(spec, spec, function=_load_user_function(spec))


def _load_user_function(spec: str) -> Callable:
    where, _, function_name = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise MetricError(f"--metric {spec}: {path} is not a file")
            module_spec = importlib.util.spec_from_file_location(f"edgeq_user_metric_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            # The console script's sys.path lacks the working directory, where a user's metrics module lives.
            added = "" not in sys.path and str(Path.cwd()) not in sys.path
            if added:
                sys.path.insert(0, str(Path.cwd()))
            try:
                module = importlib.import_module(where)
            finally:
                if added:
                    sys.path.remove(str(Path.cwd()))
    except MetricError:
        raise
    except Exception as exc:  # the user's module failed to import: say so in one line
        raise MetricError(f"--metric {spec}: cannot import {where}: {type(exc).__name__}: {exc}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise MetricError(f"--metric {spec}: {where} has no function '{function_name}'")
    return function


def check_labels(metrics: list[Metric], has_labels: bool, eval_path: object) -> None:
    """Before anything runs: top1 and top5 measure against labels, which ``eval_path`` must hold."""
    for metric in metrics:
        if metric.name in ("top1", "top5") and not has_labels:
            raise MetricError(f"{eval_path}: --metric {metric.name} needs labels in the eval data ('labels')",
                              hint="without labels use cosine, nmse or embedding")


def compute_metrics(metrics: list[Metric], data: MetricData) -> dict[str, dict[str, float]]:
    """Every metric's numbers, keyed by its name (a user metric's name is its spec); MetricError naming the
    metric that cannot be computed."""
    return {metric.name: metric.compute(data) for metric in metrics}


def metrics_for(metric_specs: list[str], gates: list[Gate]) -> list[Metric]:
    """The ``--metric`` values, plus each metric a gate reads that was not named (a gate implies its metric)."""
    metrics = [parse_metric(spec) for spec in metric_specs]
    named = {metric.name for metric in metrics}
    for gate in gates:
        if gate.metric not in named:
            metrics.append(parse_metric(gate.metric))
            named.add(gate.metric)
    return metrics


def check_gates(gates: list[Gate], results: Mapping[str, Mapping[str, float]]) -> str | None:
    """None when every gate passes, else a line naming the first that failed and what was measured."""
    for gate in gates:
        field, measured = gate.read(results)
        if not gate.passes(measured):
            return f"gate {gate.metric}.{field} {gate.op} {gate.value:g} failed: measured {measured:.6g}"
    return None


def _scores(data: MetricData, what: str) -> tuple[np.ndarray, np.ndarray]:
    name = data.scores or next(iter(data.references), None)
    if name is None or name not in data.outputs:
        raise MetricError(f"{what} needs the scores output, which the artifact does not give")
    return data.references[name], data.outputs[name]


def _top_k(data: MetricData, k: int) -> dict[str, float]:
    what = f"top{k}"
    if data.labels is None:
        raise MetricError(f"--metric {what} needs labels in the eval data ('labels')",
                          hint="without labels use cosine, nmse or embedding")
    reference, candidate = _scores(data, what)
    classes = int(np.prod(np.shape(reference)[1:]))
    if k >= classes:  # every label is in the top k: the figure would be 1.0 and measure nothing
        raise MetricError(f"--metric {what} on an output of {classes} classes measures nothing")
    ref, out = top_k_accuracy(reference, data.labels, k), top_k_accuracy(candidate, data.labels, k)
    return {what: out, f"{what}_reference": ref, f"{what}_drop": ref - out}


def _compared_outputs(data: MetricData) -> list[dict[str, float]]:
    compared = [output_agreement(data.references[name], data.outputs[name]) for name in data.references
                if name in data.outputs and np.shape(data.references[name]) == np.shape(data.outputs[name])]
    if not compared:
        raise MetricError("no artifact output matches a source output by name and shape: nothing to compare")
    return compared


def _cosine(data: MetricData) -> dict[str, float]:
    compared = _compared_outputs(data)
    return {"mean": min(c["cosine_mean"] for c in compared), "min": min(c["cosine_min"] for c in compared)}


def _nmse(data: MetricData) -> dict[str, float]:
    return {"max": max(c["nmse"] for c in _compared_outputs(data))}


def _token_output(data: MetricData, wanted: str | None) -> str:
    if wanted is not None:
        if wanted not in data.references or wanted not in data.outputs:
            raise MetricError(f"--metric embedding={wanted}: no output '{wanted}' in both models",
                              hint=f"outputs: {', '.join(data.references)}")
        return wanted
    ranked = [name for name in data.references if name in data.outputs and np.ndim(data.references[name]) == 3]
    if not ranked:
        raise MetricError("--metric embedding needs a token output of shape (samples, tokens, features)",
                          hint="a model that already pools gives a (samples, features) output: use --metric cosine")
    return ranked[0]


def mask_for(inputs: Mapping[str, np.ndarray], samples: int, tokens: int) -> np.ndarray | None:
    """The attention mask among the eval inputs: ``attention_mask``, else the only 0/1 integer input of shape
    (samples, tokens); None when there is none (every token then counts)."""
    candidates = ([inputs["attention_mask"]] if "attention_mask" in inputs else
                  [a for a in inputs.values() if np.issubdtype(np.asarray(a).dtype, np.integer)
                   and np.shape(a) == (samples, tokens) and np.isin(a, (0, 1)).all()])
    return np.asarray(candidates[0]) if len(candidates) == 1 else None


def mean_pooled(tokens: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """(samples, tokens, features) -> (samples, features): the mean over the tokens the mask keeps."""
    tokens = np.asarray(tokens, dtype=np.float64)
    weights = np.ones(tokens.shape[:2]) if mask is None else np.asarray(mask, dtype=np.float64)
    return (tokens * weights[..., None]).sum(axis=1) / np.maximum(weights.sum(axis=1, keepdims=True), 1e-9)


def _embedding(data: MetricData, option: str | None) -> dict[str, float]:
    name = _token_output(data, option)
    reference, candidate = data.references[name], data.outputs[name]
    if np.shape(reference) != np.shape(candidate):
        raise MetricError(f"--metric embedding: output '{name}' has shape {list(np.shape(candidate))} in the "
                          f"artifact but {list(np.shape(reference))} in the source")
    samples, tokens = np.shape(reference)[:2]
    mask = mask_for(data.inputs, samples, tokens)
    if mask is not None and mask.shape != (samples, tokens):
        raise MetricError(f"--metric embedding: attention_mask has shape {list(mask.shape)}, the output "
                          f"'{name}' has {samples} samples of {tokens} tokens")
    cosine = cosine_per_sample(*per_sample(mean_pooled(reference, mask), mean_pooled(candidate, mask)))
    return {"cosine_mean": float(np.mean(cosine)), "cosine_min": float(np.min(cosine)),
            "masked": float(mask is not None)}


def _call_user(metric: Metric, data: MetricData) -> dict[str, float]:
    try:
        value = metric.function(references=dict(data.references), outputs=dict(data.outputs),
                                inputs=dict(data.inputs), labels=data.labels)
    except Exception as exc:  # the user's code: one line saying where it failed
        raise MetricError(f"--metric {metric.spec} raised {type(exc).__name__}: {exc}") from None
    fields = value if isinstance(value, Mapping) else {"value": value}
    numbers = {}
    for key, number in fields.items():
        if not isinstance(key, str) or isinstance(number, bool) or not isinstance(number, (int, float, np.number)) \
                or not math.isfinite(float(number)):
            raise MetricError(f"--metric {metric.spec} returned {key!r}: {number!r}, not a finite number",
                              hint="return a number or a dict of str -> number")
        numbers[key] = float(number)
    if not numbers:
        raise MetricError(f"--metric {metric.spec} returned no numbers")
    return numbers


_BUILTIN_FUNCTIONS: dict[str, Callable[[MetricData, str | None], dict[str, float]]] = {
    "top1": lambda data, _: _top_k(data, 1), "top5": lambda data, _: _top_k(data, 5),
    "cosine": lambda data, _: _cosine(data), "nmse": lambda data, _: _nmse(data),
    "embedding": _embedding,
}
