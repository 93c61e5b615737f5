"""--metric and --gate: each built-in metric against hand-computed values, user metrics (module:function and
file.py:function) and their failures, and a token-output model (ids + attention mask -> hidden states)
through convert and bench with the embedding metric and gates."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq.cli import cli
from edgeq.taskmetrics import (
    MetricData,
    MetricError,
    check_gates,
    compute_metrics,
    metrics_for,
    parse_gate,
    parse_metric,
)

PROFILE = "x86-avx2"
QUICK = ["--warmup", "2", "--runs", "10", "--min-seconds", "0", "--idle-seconds", "0"]


def _hand_pooled_cosine(reference, candidate, mask):
    cosines = []
    for ref, out, keep in zip(reference, candidate, mask, strict=True):
        a, b = ref[keep == 1].mean(axis=0), out[keep == 1].mean(axis=0)
        cosines.append(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
    return cosines


def test_embedding_pools_only_the_tokens_the_mask_keeps():
    rng = np.random.default_rng(1)
    reference = rng.normal(0, 1, (4, 5, 3))
    candidate = reference + rng.normal(0, 0.3, reference.shape)
    candidate[:, 3:] += 50  # padding positions differ wildly: a masked mean never sees them
    mask = np.array([[1, 1, 1, 0, 0]] * 4, dtype=np.int64)
    data = MetricData(references={"hidden": reference}, outputs={"hidden": candidate},
                      inputs={"input_ids": np.ones((4, 5), np.int64), "attention_mask": mask}, labels=None)
    got = compute_metrics([parse_metric("embedding")], data)["embedding"]
    expected = _hand_pooled_cosine(reference, candidate, mask)
    assert got["cosine_mean"] == pytest.approx(np.mean(expected)) and got["cosine_min"] == pytest.approx(min(expected))
    assert got["masked"] == 1.0
    # Without a mask every token counts, and the padding's error shows.
    unmasked = MetricData(references={"hidden": reference}, outputs={"hidden": candidate}, inputs={}, labels=None)
    assert compute_metrics([parse_metric("embedding=hidden")], unmasked)["embedding"]["cosine_mean"] < 0.9


def test_top5_cosine_and_nmse_known_answers():
    reference = np.tile(np.arange(10, dtype=float), (4, 1))  # class 9 first, then 8, 7, ...
    candidate = reference.copy()
    candidate[0] = reference[0][::-1]  # sample 0: the order reversed (top-5 is now classes 0-4)
    labels = np.array([9, 5, 9, 4])  # 5 is 5th in the reference; 4 is 6th
    data = MetricData(references={"scores": reference}, outputs={"scores": candidate}, inputs={}, labels=labels,
                      scores="scores")
    results = compute_metrics([parse_metric(m) for m in ("top1", "top5", "cosine", "nmse")], data)
    assert results["top5"] == {"top5": 0.5, "top5_reference": 0.75, "top5_drop": 0.25}
    assert results["top1"] == {"top1": 0.25, "top1_reference": 0.5, "top1_drop": 0.25}
    row = reference[0]
    cos0 = row @ row[::-1] / (row @ row)
    assert results["cosine"]["min"] == pytest.approx(cos0)
    assert results["cosine"]["mean"] == pytest.approx((cos0 + 3) / 4)
    assert results["nmse"]["max"] == pytest.approx(np.sum((row[::-1] - row) ** 2) / (4 * row @ row))


def test_gates_read_the_headline_or_a_field():
    results = {"embedding": {"cosine_mean": 0.99, "cosine_min": 0.95}, "top5": {"top5_drop": 0.02}}
    assert check_gates([parse_gate("embedding>=0.99"), parse_gate("top5 <= 0.02")], results) is None
    failure = check_gates([parse_gate("embedding.cosine_min>=0.96")], results)
    assert failure == "gate embedding.cosine_min >= 0.96 failed: measured 0.95"
    with pytest.raises(MetricError, match="has no field 'nope'"):
        check_gates([parse_gate("embedding.nope>=1")], results)
    with pytest.raises(MetricError, match="expected METRIC"):
        parse_gate("embedding > 0.9")
    with pytest.raises(MetricError, match="is not a number"):
        parse_gate("top5<=x")
    # A gate implies its metric; a user metric's name keeps its dots and colon.
    gate = parse_gate("mymod.sub:score.recall>=0.5")
    assert (gate.metric, gate.field) == ("mymod.sub:score", "recall")
    assert [m.name for m in metrics_for(["cosine"], [parse_gate("top5<=0.1")])] == ["cosine", "top5"]


def test_user_metrics_load_by_module_or_file_and_fail_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "team_metrics.py").write_text(textwrap.dedent("""
        import numpy as np

        def mean_abs(references, outputs, inputs, labels):
            return float(np.mean(np.abs(references["y"] - outputs["y"])))

        def both(references, outputs, inputs, labels):
            return {"n": len(labels), "sum_x": float(inputs["x"].sum())}

        def broken(**kwargs):
            raise KeyError("no such output")

        def not_a_number(**kwargs):
            return {"x": "high"}
    """))
    data = MetricData(references={"y": np.zeros((3, 2))}, outputs={"y": np.full((3, 2), 0.5)},
                      inputs={"x": np.ones((3, 2))}, labels=np.zeros(3, np.int64))
    monkeypatch.chdir(tmp_path)  # a module in the working directory imports by name, as from the CLI
    assert compute_metrics([parse_metric("team_metrics:mean_abs")], data) == {"team_metrics:mean_abs": {"value": 0.5}}
    file_spec = f"{tmp_path / 'team_metrics.py'}:both"
    assert compute_metrics([parse_metric(file_spec)], data)[file_spec] == {"n": 3.0, "sum_x": 6.0}
    with pytest.raises(MetricError, match=r"team_metrics:broken raised KeyError: 'no such output'"):
        compute_metrics([parse_metric("team_metrics:broken")], data)
    with pytest.raises(MetricError, match="returned 'x': 'high', not a finite number"):
        compute_metrics([parse_metric("team_metrics:not_a_number")], data)
    with pytest.raises(MetricError, match="has no function 'missing'"):
        parse_metric("team_metrics:missing")
    with pytest.raises(MetricError, match="cannot import no_such_module: ModuleNotFoundError"):
        parse_metric("no_such_module:f")
    with pytest.raises(MetricError, match="not a metric"):
        parse_metric("top3")


@pytest.fixture(scope="module")
def token_model(tmp_path_factory):
    """input_ids and attention_mask [N, T] int64 -> hidden [N, T, 6] (embedding lookup, then a MatMul), and
    eval data of padded sequences whose masks differ."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    table = rng.normal(0, 1, (50, 8)).astype(np.float32)
    weight = rng.normal(0, 1, (8, 6)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["looked_up"]),
             helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mask_f", "last"], ["mask_3d"]),
             helper.make_node("Mul", ["looked_up", "mask_3d"], ["masked"]),
             helper.make_node("MatMul", ["masked", "W"], ["hidden"])]
    graph = helper.make_graph(
        nodes, "tokens",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "T"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "T"])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["N", "T", 6])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(weight, "W"),
         numpy_helper.from_array(np.array([-1], np.int64), "last")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    root = tmp_path_factory.mktemp("tokens")
    paths = {"model": root / "tokens.onnx", "eval": root / "eval.npz"}
    onnx.save(model, str(paths["model"]))
    lengths = rng.integers(2, 12, 40)
    mask = (np.arange(12)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(1, 50, (40, 12)), 0)
    np.savez(paths["eval"], input_ids=ids, attention_mask=mask)
    return paths


def test_embedding_metric_and_gates_through_convert_and_bench(token_model, tmp_path, monkeypatch):
    import onnxruntime as ort

    monkeypatch.setenv("EDGEQ_LOCAL_WORKDIR", str(tmp_path / "device"))
    metric_file = tmp_path / "pool_metric.py"
    metric_file.write_text("def tokens(references, outputs, inputs, labels):\n"
                           "    return {'tokens': float(inputs['attention_mask'].sum())}\n")
    base = ["convert", str(token_model["model"]), "--profile", PROFILE, "--format", "onnx", "--precision", "dynamic",
            "--eval", str(token_model["eval"])]
    out = tmp_path / "dynamic"
    result = CliRunner().invoke(cli, [*base, "--metric", "embedding", "--metric", f"{metric_file}:tokens",
                                      "--gate", "embedding.cosine_min>=0.9", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "metric      embedding: cosine_mean" in result.output
    validation = json.loads((out / "manifest.json").read_text())["validation"]
    assert validation["gates"] == ["embedding.cosine_min>=0.9"]
    data = np.load(token_model["eval"])
    assert validation["metrics"][f"{metric_file}:tokens"] == {"tokens": float(data["attention_mask"].sum())}
    # Against the hand computation: both models run here, pooled over the unmasked tokens. A dynamic artifact
    # is validated one sample at a time, as the device runs it: in a batch, the whole tensor's range sets
    # each sample's activation scale, and the figures differ.
    feed = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
    reference = ort.InferenceSession(str(token_model["model"]), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    artifact = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    one_at_a_time = np.concatenate([artifact.run(None, {k: v[i : i + 1] for k, v in feed.items()})[0]
                                    for i in range(len(data["input_ids"]))])
    expected = _hand_pooled_cosine(reference, one_at_a_time, data["attention_mask"])
    got = validation["metrics"]["embedding"]
    assert got["cosine_mean"] == pytest.approx(np.mean(expected), abs=1e-6)
    assert got["cosine_min"] == pytest.approx(min(expected), abs=1e-6) and got["cosine_min"] < 1.0
    batched = _hand_pooled_cosine(reference, artifact.run(None, feed)[0], data["attention_mask"])
    assert abs(np.mean(batched) - got["cosine_mean"]) > 1e-6  # measured: 0.999919 batched, 0.999905 one by one

    # A gate the artifact misses: exit 1, one line naming the gate and what was measured, the artifact kept.
    strict = CliRunner().invoke(cli, [*base, "--gate", "embedding.cosine_min>=0.999999", "-o", str(tmp_path / "s")])
    assert strict.exit_code == 1 and "Traceback" not in strict.output, strict.output
    (line,) = [line for line in strict.output.splitlines() if line.startswith("error: ")]
    assert "gate embedding.cosine_min >= 0.999999 failed: measured 0.9" in line, line
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["status"] == "failed"

    # Bench computes the same metric on the device's outputs (the local target runs the same runtime).
    bench = CliRunner().invoke(cli, ["bench", str(out), "-t", "local", "--eval", str(token_model["eval"]),
                                     "--metric", "embedding", "-o", str(tmp_path / "results"), *QUICK])
    assert bench.exit_code == 0, bench.output
    assert "local: metric embedding: cosine_mean" in bench.output
    (result_file,) = (tmp_path / "results").glob("*.json")
    on_device = json.loads(result_file.read_text())["accuracy"]["metrics"]["embedding"]
    assert on_device["cosine_mean"] == pytest.approx(got["cosine_mean"], abs=1e-9)


def test_metric_and_gate_refusals_are_one_line(token_model, tmp_path):
    base = ["convert", str(token_model["model"]), "--profile", PROFILE, "--format", "onnx", "--precision", "fp32"]
    cases = [
        (["--eval", str(token_model["eval"]), "--metric", "top5"], "needs labels in the eval data"),
        (["--eval", str(token_model["eval"]), "--gate", "embedding>0.9"], "expected METRIC[.FIELD]>=VALUE"),
        (["--eval", str(token_model["eval"]), "--metric", "nosuch:f"], "cannot import nosuch"),
        (["--metric", "embedding"], "--metric and --gate need --eval"),
    ]
    for index, (extra, expected) in enumerate(cases):
        output = tmp_path / f"out{index}"
        result = CliRunner().invoke(cli, [*base, *extra, "-o", str(output)])
        assert result.exit_code in (1, 2) and "Traceback" not in result.output, result.output
        assert expected in result.output, (extra, result.output)
        assert not output.exists()  # refused before any work


def test_openvino_static_int8_as_a_transformer(token_model, tmp_path):
    """--transformer is NNCF's model_type TRANSFORMER (SmoothQuant), recorded; refused where it means nothing."""
    calibration = tmp_path / "calib.npz"
    data = np.load(token_model["eval"])
    np.savez(calibration, **{k: data[k] for k in data.files})
    base = ["convert", str(token_model["model"]), "--profile", PROFILE, "--precision", "int8",
            "--calibration", str(calibration), "--eval", str(token_model["eval"]), "--transformer"]
    result = CliRunner().invoke(cli, [*base, "--format", "openvino", "-o", str(tmp_path / "ov")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "ov" / "manifest.json").read_text())
    assert manifest["options"]["model_type"] == "transformer" and manifest["validation"]["status"] == "passed"
    refused = CliRunner().invoke(cli, [*base, "--format", "onnx", "-o", str(tmp_path / "onnx")])
    assert refused.exit_code == 1 and "onnx int8 does not take transformer" in refused.output, refused.output
