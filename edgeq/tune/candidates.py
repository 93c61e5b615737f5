"""Tune's candidates: one ordinary edgeq artifact each, described by its format, precision and scheme.

The stages, cheapest and fastest first (the issue's A-E):
- A ``int8``: full INT8 static, calibration methods one at a time (minmax, then percentile, then entropy
  where the format has them), keeping the best; and ``dynamic`` (int8 weights) where the format has it;
- B ``mixed``: INT8 with the most sensitive layers kept in float (formats whose backend can keep nodes float);
- C ``a16``: int8 weights with 16-bit activations (TFLite 16x8, ORT w8a16), when A and B missed the budget;
- D ``float16``: fp16, and bf16 where the host can validate it;
- E ``fp32``: always passes, the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeq.convert import capabilities
from edgeq.tune.budget import Score

# Q: quantization-aware training (tune --train), int8 artifacts of the fine-tuned model with its own scales.
STAGES = {"int8": "A", "dynamic": "A", "mixed": "B", "a16": "C", "qat": "Q", "fp16": "D", "bf16": "D", "fp32": "E"}
CALIBRATION_ORDER = ("minmax", "percentile", "entropy")


@dataclass
class Candidate:
    """One artifact tune built (or tried to), and what was measured on it."""

    format: str
    precision: str
    scheme: str  # int8 | dynamic | mixed | a16 | qat | fp16 | bf16 | fp32
    calibration_method: str | None = None
    float_nodes: tuple[str, ...] = ()  # asked for (ONNX), or as the backend chose them (OpenVINO accuracy control)
    settings: dict[str, Any] = field(default_factory=dict)  # further int8 settings (NNCF preset, bias correction)
    accuracy_control: bool = False  # the backend picks the float layers against the budget itself
    # Stage B by shortlist: a "single" (one layer float) ranks layers by its ``ranking``; a "set" (the k best
    # singles) was picked by those eval scores, so it is judged on the samples they were not measured on.
    leave_one_out: str | None = None  # "single" | "set" | "bound" (the whole shortlist float, tried first)
    source_model: Path | None = None  # built from this model instead of tune's (QAT's SavedModel)
    directory: Path | None = None
    artifact_id: str | None = None
    size_bytes: int | None = None
    seconds: float = 0.0  # build + host evaluation
    calibration_cache: str | None = None  # ORT's calibration ranges: "hit" (reused) or "stored" (computed)
    scored_on: str | None = None  # which eval samples ``score`` is on, when not all of them
    screen: Score | None = None  # on the screening subset, when there was one
    ranking: Score | None = None  # a single's score on the selection samples, which orders the layers
    score: Score | None = None  # on the whole eval set
    error: str | None = None  # why it could not be built or evaluated
    rejected_by: str | None = None  # "screen" when the subset already ruled it out
    bench: dict[str, Any] = field(default_factory=dict)  # p50/p90 ms, energy, status, result file
    pareto: bool = False
    chosen: bool = False
    index: int = 0  # its place in the search, which makes ``id`` unique

    @property
    def id(self) -> str:
        return f"{self.index:02d}-{self.name}"

    @property
    def stage(self) -> str:
        return STAGES[self.scheme]

    @property
    def name(self) -> str:
        parts = [self.format, self.scheme]
        if self.calibration_method and self.scheme in ("int8", "mixed", "a16"):
            parts.append(self.calibration_method)
        if self.settings.get("int8_op_types") == "weighted":
            parts.append("weighted")
        if self.settings.get("int8_preset") == "mixed":
            parts.append("asym")
        if self.settings.get("fast_bias_correction") is False:
            parts.append("fullbc")
        if self.settings.get("transformer"):
            parts.append("sq")
        if self.accuracy_control:
            parts.append("ac")
        elif self.float_nodes:
            parts.append(f"k{len(self.float_nodes)}")
        return "-".join(parts)

    @property
    def measured(self) -> Score | None:
        """The whole-set score, else the screening subset's (a candidate the screen ruled out has only that)."""
        return self.score or self.screen

    @property
    def passed(self) -> bool:
        return self.score is not None and self.score.passed

    @property
    def quantized(self) -> bool:
        return self.scheme in ("int8", "dynamic", "mixed", "a16", "qat")

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "stage": self.stage, "format": self.format, "precision": self.precision,
            "scheme": self.scheme, "calibration_method": self.calibration_method,
            "float_nodes": list(self.float_nodes), "settings": self.settings,
            "accuracy_control": self.accuracy_control,
            "source_model": str(self.source_model) if self.source_model else None, "artifact": str(self.directory) if self.directory else None,
            "artifact_id": self.artifact_id, "size_bytes": self.size_bytes, "seconds": round(self.seconds, 3),
            "calibration_cache": self.calibration_cache, "scored_on": self.scored_on,
            "screen": self.screen.to_json() if self.screen else None, "leave_one_out": self.leave_one_out,
            "ranking": self.ranking.to_json() if self.ranking else None,
            "host": self.score.to_json() if self.score else None, "passed": self.passed,
            "error": self.error, "rejected_by": self.rejected_by, "device": self.bench or None,
            "pareto": self.pareto, "chosen": self.chosen,
        }


def buildable(fmt: str, source_kind: str) -> dict[str, tuple[str, ...]]:
    """precision -> its calibration methods, for what ``fmt`` can build from a ``source_kind`` model."""
    return {c.precision: c.calibration_methods for c in capabilities() if c.format == fmt and source_kind in c.sources}


def calibration_methods(methods: tuple[str, ...]) -> list[str]:
    """The methods to try, in tune's order (cheapest, most often right first)."""
    return [m for m in CALIBRATION_ORDER if m in methods] or list(methods[:1])


ATTENTION_OPS = frozenset({"Attention", "MultiHeadAttention", "PackedAttention", "GroupQueryAttention"})


def looks_like_transformer(source) -> bool:
    """Whether SmoothQuant (NNCF model_type TRANSFORMER) is worth a candidate: token-id (int32/64) inputs, an
    ONNX graph with an attention op or a MatMul of two activations (attention scores; a layer's MatMul has a
    weight), or a Keras model with an attention layer. On a CNN or MLP it moves nothing that needs moving."""
    if any(spec.dtype in ("int32", "int64") for spec in source.inputs):  # token ids (uint8 is an image)
        return True
    if source.kind == "onnx":
        import onnx

        model = onnx.load(str(source.path), load_external_data=False)
        for graph in _graphs(model.graph):
            constants = {i.name for i in graph.initializer} | \
                {out for node in graph.node if node.op_type == "Constant" for out in node.output}
            for node in graph.node:
                if node.op_type in ATTENTION_OPS or (node.op_type in ("MatMul", "Einsum") and len(node.input) == 2
                                                     and not constants & set(node.input)):
                    return True
        return False
    keras_model = getattr(source, "_keras_model", None)
    if keras_model is not None:
        return any("Attention" in type(layer).__name__ for layer in _keras_layers(keras_model))
    return False


def _graphs(graph):
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                yield from _graphs(sub)


def _keras_layers(model):
    for layer in getattr(model, "layers", []):
        yield layer
        yield from _keras_layers(layer)
