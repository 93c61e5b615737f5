"""A model that full INT8 breaks and mixed precision fixes, built in the test: one channel of a hidden
activation is scaled 1000x (and scaled back in the next layer's weights), so its per-tensor activation
scale flattens every other channel to zero. Keeping that activation's producer and consumer in float
restores the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SENSITIVE_NODES = {"wide_range", "fc2"}  # the producer and the consumer of the wide-range activation


def write_sensitive_model(directory: Path) -> dict[str, Path]:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w0 = rng.normal(0, 0.4, (16, 16)).astype(np.float32)
    w1 = rng.normal(0, 0.5, (16, 32)).astype(np.float32)
    b1 = rng.normal(0, 0.1, (32,)).astype(np.float32)
    scale = np.ones(32, np.float32)
    scale[0] = 1000.0
    w2 = rng.normal(0, 0.5, (32, 10)).astype(np.float32)
    w2[0] /= 1000.0  # the float model is unchanged by the scaling; an int8 one is not
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["g0"], name="fc0"),  # an ordinary layer, int8-friendly
             helper.make_node("Relu", ["g0"], ["g"], name="relu0"),
             helper.make_node("MatMul", ["g", "W1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h"], name="fc1_bias"),
             helper.make_node("Relu", ["h"], ["r"], name="relu1"),
             helper.make_node("Mul", ["r", "scale"], ["m"], name="wide_range"),
             helper.make_node("MatMul", ["m", "W2"], ["logits"], name="fc2")]
    graph = helper.make_graph(
        nodes, "sensitive", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w0, "W0"), numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(b1, "b1"),
         numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(w2, "W2")])
    paths = _save_with_data(graph, directory / "sensitive.onnx", rng)
    paths["eval_unlabelled"] = directory / "eval-unlabelled.npz"
    np.savez(paths["eval_unlabelled"], x=np.load(paths["eval"])["x"])
    return paths


def _save_with_data(graph, model_path: Path, rng: np.random.Generator) -> dict[str, Path]:
    """Save ``graph`` (input ``x`` [N, 16]) as an opset-17 model, with 200 calibration and 300 labelled eval
    samples beside it; the labels are the FP32 model's own predictions, so FP32 is right on every sample."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    paths = {"model": model_path, "calibration": model_path.parent / "calib.npz",
             "eval": model_path.parent / "eval.npz"}
    onnx.save(model, str(model_path))
    np.savez(paths["calibration"], x=rng.normal(0, 1, (200, 16)).astype(np.float32))
    x = rng.normal(0, 1, (300, 16)).astype(np.float32)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    np.savez(paths["eval"], x=x, labels=np.argmax(session.run(None, {"x": x})[0], axis=1))
    return paths


@pytest.fixture(scope="session")
def sensitive_model(tmp_path_factory) -> dict[str, Path]:
    return write_sensitive_model(tmp_path_factory.mktemp("sensitive"))


def write_sensitive_keras_model(directory: Path) -> dict[str, Path]:
    """The same trap as a Keras model (TFLite builds from Keras or SavedModel only): fc1's first output
    channel and its bias are scaled 1000x and fc2's matching weights scaled back, so the float model is the
    same and an 8-bit activation of fc1 flattens every other channel. 16-bit activations hold the range."""
    import keras

    rng = np.random.default_rng(0)
    inputs = keras.Input((16,), name="x")
    hidden = keras.layers.Dense(16, activation="relu", name="fc0")(inputs)
    hidden = keras.layers.Dense(32, activation="relu", name="fc1")(hidden)
    model = keras.Model(inputs, keras.layers.Dense(10, name="fc2")(hidden))
    w0 = rng.normal(0, 0.4, (16, 16)).astype(np.float32)
    w1 = rng.normal(0, 0.5, (16, 32)).astype(np.float32)
    b1 = rng.normal(0, 0.1, (32,)).astype(np.float32)
    w2 = rng.normal(0, 0.5, (32, 10)).astype(np.float32)
    w1[:, 0] *= 1000.0
    b1[0] *= 1000.0
    w2[0] /= 1000.0
    model.get_layer("fc0").set_weights([w0, np.zeros(16, np.float32)])
    model.get_layer("fc1").set_weights([w1, b1])
    model.get_layer("fc2").set_weights([w2, np.zeros(10, np.float32)])
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"model": directory / "sensitive.keras", "calibration": directory / "calib.npz",
             "eval": directory / "eval.npz"}
    model.save(paths["model"])
    np.savez(paths["calibration"], x=rng.normal(0, 1, (200, 16)).astype(np.float32))
    x = rng.normal(0, 1, (300, 16)).astype(np.float32)
    np.savez(paths["eval"], x=x, labels=np.argmax(model.predict(x, verbose=0), axis=1))
    return paths


@pytest.fixture(scope="session")
def sensitive_keras_model(tmp_path_factory) -> dict[str, Path]:
    return write_sensitive_keras_model(tmp_path_factory.mktemp("sensitive-keras"))


@pytest.fixture
def tune_env(tmp_path, monkeypatch):
    """A local device workdir and a cache (FP32 outputs, calibration ranges) of this test's own."""
    monkeypatch.setenv("EDGEQ_LOCAL_WORKDIR", str(tmp_path / "local-device"))
    monkeypatch.setenv("EDGEQ_CACHE_DIR", str(tmp_path / "cache"))


DEEP_TRAP_LAYER = "fc_trap"  # the layer that reads the deep model's wide-range activation


def write_deep_sensitive_model(directory: Path, ordinary_layers: int = 9) -> dict[str, Path]:
    """The same trap in a model deeper than the shortlist (8 activations), so that keeping the whole shortlist
    float still leaves layers in INT8: mixed precision's bound is a candidate of its own."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    nodes, weights, current = [], {}, "x"

    def layer(name: str, weight: np.ndarray, relu: bool = True) -> None:
        nonlocal current
        weights[f"W_{name}"] = weight.astype(np.float32)
        nodes.append(helper.make_node("MatMul", [current, f"W_{name}"], [f"{name}_out"], name=name))
        current = f"{name}_out"
        if relu:
            nodes.append(helper.make_node("Relu", [current], [f"{name}_relu"], name=f"{name}_relu"))
            current = f"{name}_relu"

    for index in range(ordinary_layers):
        layer(f"fc{index}", rng.normal(0, 0.35, (16, 16)))
        if index == ordinary_layers // 3:
            scale = np.ones(16, np.float32)
            scale[0] = 1000.0
            weights["scale"] = scale
            nodes.append(helper.make_node("Mul", [current, "scale"], ["wide_out"], name="wide"))
            current = "wide_out"
            weight = rng.normal(0, 0.35, (16, 16))
            weight[0] /= 1000.0  # the float model is unchanged by the scaling
            layer("fc_trap", weight)
    layer("head", rng.normal(0, 0.5, (16, 10)), relu=False)
    graph = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(w, name) for name, w in weights.items()])
    return _save_with_data(graph, directory / "deep.onnx", rng)


@pytest.fixture(scope="session")
def deep_sensitive_model(tmp_path_factory) -> dict[str, Path]:
    return write_deep_sensitive_model(tmp_path_factory.mktemp("deep-sensitive"))
