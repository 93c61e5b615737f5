"""Inputs whose samples are whole tensors (``edgeq.device.feeds``): an LSTM state whose batch is its second
axis, and a scalar sample rate, as silero-vad takes them. A silero-shaped model built here (its LSTMs in the
branches of an If on the sample rate, weights as Constant nodes inside them) goes through data loading,
convert, validation and bench, locally and over sshd; then the real silero-vad model from its wheel."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeq.bench import bench
from edgeq.convert import convert
from edgeq.data import InputSpec, load_dataset
from edgeq.device.feeds import run_samples, whole_inputs
from edgeq.errors import ConversionError, DataError
from edgeq.profiles import load_profile
from edgeq.targets import load_inventory, local_target, resolve_targets
from edgeq.taskmetrics import parse_metric
from tests.stateful_fixtures import FEATURES, HIDDEN, RATE

pytestmark = pytest.mark.slow

PROFILE = "x86-avx2"
QUICK = {"warmup": 2, "runs": 10, "min_seconds": 0, "idle_seconds": 0}


SPECS = [InputSpec("input", [None, FEATURES]), InputSpec("state", [2, None, HIDDEN]),
         InputSpec("sr", [], "int64")]


def test_whole_tensor_samples_are_read_and_fed_as_they_are(stateful, tmp_path):
    dataset = load_dataset(stateful["eval"], SPECS, role="eval")
    assert dataset.whole == {"state", "sr"}  # input is batched: [N, 16] for [batch, 16]
    one = dataset.batch(4)
    assert one["input"].shape == (1, FEATURES) and one["state"].shape == (2, 1, HIDDEN)
    assert one["sr"].shape == () and one["sr"].dtype == np.int64 and int(one["sr"]) == RATE
    # Outputs of one-sample calls are stacked on a new first axis, not concatenated along the batch.
    outputs = run_samples(lambda feed: [feed["state"] * 2], dataset.inputs, dataset.whole)
    assert outputs[0].shape == (60, 2, 1, HIDDEN)
    np.testing.assert_array_equal(outputs[0], dataset.inputs["state"] * 2)
    assert whole_inputs({"x": np.zeros((5, 3))}, {"x": 2}) == frozenset()  # batched: same rank as the input


def test_a_state_of_neither_form_is_a_one_line_error(stateful, tmp_path):
    bad = tmp_path / "bad.npz"
    arrays = dict(stateful["eval_arrays"], state=np.zeros((60, HIDDEN), np.float32))
    np.savez(bad, **arrays)
    with pytest.raises(DataError) as caught:
        load_dataset(bad, SPECS, role="eval")
    assert str(caught.value).startswith(f"{bad}: array for input 'state' has shape [60, 8], the model expects "
                                        "[N, ?, 8] (batched) or [N, 2, ?, 8] (a whole tensor per sample)")


@pytest.mark.parametrize(("fmt", "precision"), [("onnx", "fp32"), ("onnx", "dynamic"), ("openvino", "fp32")])
def test_stateful_model_converts_and_validates_every_output(stateful, tmp_path, fmt, precision):
    manifest = convert(stateful["model"], load_profile(PROFILE), tmp_path / "out", format=fmt, precision=precision,
                       eval_path=stateful["eval"], metrics=["nmse"])
    # The outputs keep the source's names (OpenVINO's compiled output also carries the If body's tensor name).
    assert [t.source_name or t.name for t in manifest.outputs] == ["output", "stateN"]
    per_output = manifest.validation.outputs
    assert set(per_output) == {"output", "stateN"}
    exact = precision == "fp32"
    assert per_output["stateN"].nmse < (1e-10 if exact else 0.01), per_output
    assert manifest.validation.samples == 60
    if (fmt, precision) == ("onnx", "dynamic"):
        # The LSTMs sit in If branches: quantized only because the subgraphs are; no Conv here to keep out.
        assert manifest.options["quantized_ops"]["DynamicQuantizeLSTM"] == 2
        assert "Conv" not in manifest.options["dynamic_op_types"]


def test_openvino_weight_compression_that_fails_is_one_line(stateful, tmp_path):
    """NNCF 3.4 cannot compress the weights of LSTMs inside If branches (silero-vad's If-free OpenVINO export
    can be: see benchmarks/bench_silero_vad.py); the failure is one line with where to go instead."""
    with pytest.raises(ConversionError) as caught:
        convert(stateful["model"], load_profile(PROFILE), tmp_path / "out", format="openvino", precision="dynamic")
    assert "cannot convert to openvino dynamic: NNCF's weight compression failed" in caught.value.message
    assert "\n" not in caught.value.message and "--format onnx --precision dynamic" in caught.value.hint
    assert not (tmp_path / "out").exists()


def test_static_int8_that_quantizes_nothing_is_refused(stateful, tmp_path):
    with pytest.raises(ConversionError) as caught:
        convert(stateful["model"], load_profile(PROFILE), tmp_path / "out", format="onnx", precision="int8",
                calibration=stateful["calib"])
    assert "onnx int8: no op was quantized" in str(caught.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.sshd
def test_bench_feeds_whole_state_locally_and_over_sshd(stateful, trusted_inventory, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQ_LOCAL_WORKDIR", str(tmp_path / "local-device"))
    artifact = tmp_path / "artifact"
    convert(stateful["model"], load_profile(PROFILE), artifact, format="onnx", precision="fp32")
    (device,) = resolve_targets(load_inventory(trusted_inventory.path), "dev-0")
    for target, where in ((local_target(), "local"), (device, "remote")):
        result = bench(artifact, target, eval_path=stateful["eval"], output_dir=tmp_path / where,
                       metrics=[parse_metric("nmse")], **QUICK)
        accuracy = json.loads(result.path.read_text())["accuracy"]
        assert accuracy["samples"] == 60
        # The device ran every step with its own state tensor: FP32 agrees with the reference exactly.
        for name in ("output", "stateN"):
            assert accuracy["outputs"][name]["nmse"] < 1e-10, (where, accuracy["outputs"])
        assert accuracy["metrics"]["nmse"]["max"] < 1e-10


def test_real_silero_vad_dynamic_int8_keeps_the_decisions(tmp_path):
    """silero-vad 6.2.3 from its wheel (offline): ONNX dynamic INT8 quantizes its LSTM inside the If on the
    sample rate, keeps the Convs float, and keeps the speech decisions on the example's stream."""
    pytest.importorskip("silero_vad")
    from examples.silero_vad import data as silero
    from examples.silero_vad.metrics import vad

    paths = silero.write(tmp_path / "data", eval_seconds=3.0, calibration_seconds=3.0)
    manifest = convert(silero.model_path(), load_profile(PROFILE), tmp_path / "dynamic", format="onnx",
                       precision="dynamic", eval_path=paths["eval"],
                       metrics=["examples/silero_vad/metrics.py:vad"])
    assert manifest.options["quantized_ops"].get("DynamicQuantizeLSTM", 0) >= 1
    assert "ConvInteger" not in manifest.options["quantized_ops"]
    measured = manifest.validation.metrics["examples/silero_vad/metrics.py:vad"]
    assert measured["decision_agreement"] >= 0.98 and measured["mean_abs_error"] < 0.01, measured
    assert manifest.validation.samples == 93  # 3 s at 16 kHz in 512-sample windows
    # The metric is the example's own function, run on the controller: the same numbers from the manifest's
    # per-output view would need the references, so check its fields instead.
    assert set(measured) == set(vad({"output": np.zeros(2)}, {"output": np.zeros(2)}, {}, None))


def test_constants_move_to_initializers_in_every_graph():
    """A Constant in the main graph and in both If branches: every one becomes an initializer of its own graph
    (rebuilding the main graph's node list once lost the branches' edits while counting them)."""
    from onnx import TensorProto, helper, numpy_helper

    from edgeq.convert.onnx_dynamic import _constants_as_initializers

    def constant(name, value):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, np.float32),
                                                                                      name))

    def branch(name):
        return helper.make_graph([constant(f"{name}_w", [[2.0]]), helper.make_node("MatMul", ["x", f"{name}_w"],
                                                                                   [f"{name}_y"])],
                                 name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, 1])])

    graph = helper.make_graph(
        [constant("threshold", 1.0), helper.make_node("Greater", ["flag", "threshold"], ["is_on"]),
         helper.make_node("If", ["is_on"], ["y"], then_branch=branch("on"), else_branch=branch("off"))],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1]),
              helper.make_tensor_value_info("flag", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])])
    moved = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert _constants_as_initializers(moved) == 3
    assert [n.op_type for n in moved.graph.node] == ["Greater", "If"]
    assert [t.name for t in moved.graph.initializer] == ["threshold"]
    bodies = {a.name: a.g for a in moved.graph.node[1].attribute}
    for name, body in (("then_branch", "on"), ("else_branch", "off")):
        assert [n.op_type for n in bodies[name].node] == ["MatMul"]
        assert [t.name for t in bodies[name].initializer] == [f"{body}_w"]
