"""A silero-shaped model built here: ``input`` [batch, 16], ``state`` [2, batch, 8] (its batch on the second
axis) and a scalar ``sr``; its LSTMs in the branches of an If on the sample rate, their weights Constant nodes
inside them. Eval and calibration data are streams, each step with the FP32 state reached before it."""

from __future__ import annotations

import numpy as np
import pytest

HIDDEN, FEATURES, RATE = 8, 16, 16000


def _branch(name: str, rng) -> object:
    """One If branch: an LSTM step from ``state`` over ``x``, then a sigmoid head; weights are Constant nodes
    of the branch (as in silero-vad), the inputs outer-scope values."""
    from onnx import TensorProto, helper, numpy_helper

    def constant(value_name, array):
        return helper.make_node("Constant", [], [value_name], value=numpy_helper.from_array(array, value_name))

    weights = {"W": rng.normal(0, 0.4, (1, 4 * HIDDEN, FEATURES)), "R": rng.normal(0, 0.4, (1, 4 * HIDDEN, HIDDEN)),
               "B": rng.normal(0, 0.1, (1, 8 * HIDDEN)), "head": rng.normal(0, 0.8, (HIDDEN, 1))}
    nodes = [constant(f"{name}_{key}", value.astype(np.float32)) for key, value in weights.items()]
    nodes += [
        helper.make_node("LSTM", ["sequence", f"{name}_W", f"{name}_R", f"{name}_B", "", "h0", "c0"],
                         ["", f"{name}_h", f"{name}_c"], hidden_size=HIDDEN, name=f"{name}_lstm"),
        helper.make_node("Concat", [f"{name}_h", f"{name}_c"], [f"{name}_state"], axis=0),
        helper.make_node("Squeeze", [f"{name}_h", "zero"], [f"{name}_last"]),
        helper.make_node("MatMul", [f"{name}_last", f"{name}_head"], [f"{name}_logit"]),
        helper.make_node("Sigmoid", [f"{name}_logit"], [f"{name}_probability"]),
    ]
    return helper.make_graph(nodes, name, [], [
        helper.make_tensor_value_info(f"{name}_probability", TensorProto.FLOAT, None),
        helper.make_tensor_value_info(f"{name}_state", TensorProto.FLOAT, None)])


def write_stateful_model(path):
    """input [batch, 16], state [2, batch, 8], sr [] -> output [batch, 1], stateN [2, batch, 8]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Unsqueeze", ["input", "zero"], ["sequence"]),  # one time step: [1, batch, 16]
        helper.make_node("Split", ["state"], ["h0", "c0"], axis=0, num_outputs=2),
        helper.make_node("Equal", ["sr", "rate16k"], ["is16k"]),
        helper.make_node("If", ["is16k"], ["output", "stateN"], then_branch=_branch("k16", rng),
                         else_branch=_branch("k8", rng)),
    ]
    graph = helper.make_graph(
        nodes, "stateful",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", FEATURES]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", HIDDEN]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1]),
         helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", HIDDEN])],
        [numpy_helper.from_array(np.array([0], np.int64), "zero"),
         numpy_helper.from_array(np.array(RATE, np.int64), "rate16k")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def _stream(session, count: int, seed: int) -> dict[str, np.ndarray]:
    """``count`` steps of one stream, each with the FP32 state reached before it (as a device runs it)."""
    rng = np.random.default_rng(seed)
    state = np.zeros((2, 1, HIDDEN), np.float32)
    inputs, states = [], []
    for _ in range(count):
        x = rng.normal(0, 1, (1, FEATURES)).astype(np.float32)
        inputs.append(x[0])
        states.append(state)
        _, state = session.run(None, {"input": x, "state": state, "sr": np.array(RATE, np.int64)})
    return {"input": np.stack(inputs), "state": np.stack(states), "sr": np.full(count, RATE, np.int64)}


@pytest.fixture(scope="session")
def stateful(tmp_path_factory):
    import onnxruntime as ort

    root = tmp_path_factory.mktemp("stateful")
    paths = {"model": root / "stateful.onnx", "eval": root / "eval.npz", "calib": root / "calib.npz"}
    write_stateful_model(paths["model"])
    session = ort.InferenceSession(str(paths["model"]), providers=["CPUExecutionProvider"])
    paths["eval_arrays"] = _stream(session, 60, seed=1)
    np.savez(paths["eval"], **paths["eval_arrays"])
    np.savez(paths["calib"], **_stream(session, 120, seed=2))
    # The reference the test computes itself: one ORT call per step, the outputs stacked.
    arrays = paths["eval_arrays"]
    calls = [session.run(None, {"input": arrays["input"][i:i + 1], "state": arrays["state"][i],
                                "sr": arrays["sr"][i, ...]}) for i in range(len(arrays["sr"]))]
    paths["reference"] = {"output": np.stack([c[0] for c in calls]), "stateN": np.stack([c[1] for c in calls])}
    return paths
