"""SavedModels from the wild that today's TensorFlow and tf2onnx do not take as they are (found on Basic Pitch's
pretrained model, examples/basic_pitch): optimizer slot variables in the object graph, and constants the
serving function captures by value. Real TensorFlow, real conversions, on a model built here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeq.profiles import load_profile

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def savedmodel_with_optimizer_slots(tmp_path_factory) -> dict[str, Path]:
    """A serving function with a variable and a captured constant (Basic Pitch's CQT kernels are such), and an
    optimizer child whose slot for that variable the object graph records, as TF 2.5-era Keras wrote it."""
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    rng = np.random.default_rng(0)

    class Optimizer(tf.Module):
        def __init__(self):
            super().__init__()
            self.iterations = tf.Variable(3, dtype=tf.int64)
            self.moment = tf.Variable(np.zeros((8, 4), np.float32))

    class Model(tf.Module):
        def __init__(self):
            super().__init__()
            self.kernel = tf.Variable(rng.normal(0, 0.5, (8, 4)).astype(np.float32))
            self.window = tf.constant(np.hanning(8).astype(np.float32))  # captured by value, not a variable
            self.optimizer = Optimizer()

        @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32, name="x")])
        def serve(self, x):
            return {"y": tf.nn.relu(tf.matmul(x * self.window, self.kernel))}

    directory = tmp_path_factory.mktemp("slots")
    path = directory / "slotted"
    model = Model()
    tf.saved_model.save(model, str(path), signatures={"serving_default": model.serve})
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((path / "saved_model.pb").read_bytes())
    nodes = proto.meta_graphs[0].object_graph_def.nodes

    def child(node, name):
        return next(ref.node_id for ref in node.children if ref.local_name == name)

    optimizer = child(nodes[0], "optimizer")
    slot = nodes[optimizer].slot_variables.add()
    slot.original_variable_node_id = child(nodes[0], "kernel")
    slot.slot_name = "m"
    slot.slot_variable_node_id = child(nodes[optimizer], "moment")
    (path / "saved_model.pb").write_bytes(proto.SerializeToString())
    x = rng.normal(0, 1, (40, 8)).astype(np.float32)
    np.savez(directory / "data.npz", x=x)
    return {"model": path, "data": directory / "data.npz"}


def test_the_fixture_has_what_newer_tensorflow_cannot_load(savedmodel_with_optimizer_slots):
    import tensorflow as tf

    with pytest.raises(AttributeError, match="add_slot"):
        tf.saved_model.load(str(savedmodel_with_optimizer_slots["model"]))


@pytest.mark.parametrize("fmt", ["tflite", "onnx", "openvino"])
def test_every_format_converts_it_exactly(savedmodel_with_optimizer_slots, tmp_path, monkeypatch, fmt):
    from edgeq.convert import convert
    from edgeq.convert.source import load_source

    monkeypatch.setenv("EDGEQ_CACHE_DIR", str(tmp_path / "cache"))
    paths = savedmodel_with_optimizer_slots
    source = load_source(paths["model"])
    assert source.path == paths["model"] and [i.name for i in source.inputs] == ["x"] and source.outputs == ["y"]
    copy = source.savedmodel_dir(tmp_path)
    assert copy.parent == tmp_path / "cache" / "savedmodel" and copy.name == source.sha256  # by content hash
    assert (paths["model"] / "saved_model.pb").read_bytes() != (copy / "saved_model.pb").read_bytes()  # untouched
    manifest = convert(paths["model"], load_profile("x86-avx2"), tmp_path / "artifact", format=fmt, precision="fp32",
                       eval_path=paths["data"])
    assert manifest.status == "ok" and manifest.source.sha256 == source.sha256  # the source's own hash
    assert manifest.validation.outputs["y"].cosine_mean > 0.99999, manifest.validation
    assert len(manifest.inputs) == 1  # ONNX: the captured constant did not become a model input


@pytest.fixture(scope="module")
def divide_model(tmp_path_factory) -> dict[str, Path]:
    """A divisor that is often 0.001: in INT8 it quantizes to its zero point, and TFLite's int8 DIV kernel
    refuses to run (Basic Pitch's normalisation fails this way)."""
    import tensorflow as tf

    rng = np.random.default_rng(0)

    class Divide(tf.Module):
        def __init__(self):
            super().__init__()
            self.weight = tf.Variable(rng.normal(0, 1, (8, 1)).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32, name="x")])
        def serve(self, x):
            return {"y": x / (tf.nn.relu(tf.matmul(x, self.weight)) + 0.001)}

    directory = tmp_path_factory.mktemp("divide")
    model = Divide()
    tf.saved_model.save(model, str(directory / "divide"), signatures={"serving_default": model.serve})
    np.savez(directory / "calib.npz", x=rng.normal(0, 1, (100, 8)).astype(np.float32))
    np.savez(directory / "eval.npz", x=rng.normal(0, 1, (50, 8)).astype(np.float32))
    return {"model": directory / "divide", "calibration": directory / "calib.npz", "eval": directory / "eval.npz"}


def test_an_int8_kernel_that_refuses_its_data_is_one_line(divide_model, tmp_path):
    from click.testing import CliRunner

    from edgeq.cli import cli

    result = CliRunner().invoke(cli, [
        "convert", str(divide_model["model"]), "--profile", "x86-avx2", "--format", "tflite", "--precision", "int8",
        "--calibration", str(divide_model["calibration"]), "--eval", str(divide_model["eval"]),
        "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {divide_model['model']}: the int8 artifact cannot run the eval data: tflite failed at "
                      "inference: tflite/kernels/div.cc:262 data[i] != zero_point was not true.Node number 2 (DIV) "
                      "failed to invoke."], result.output
    assert "hint: an INT8 kernel that refused its data" in result.output
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_tune_says_why_a_format_has_no_mixed_candidate_and_tries_16_bits(divide_model, tmp_path, tune_env):
    from edgeq.targets import local_target
    from edgeq.tune import Budget, tune

    result = tune(divide_model["model"], local_target(), load_profile("x86-avx2"),
                  calibration=divide_model["calibration"], eval_path=divide_model["eval"],
                  budget=Budget(min_cosine=0.9), output=tmp_path / "tuned", formats=["tflite"], runs=20,
                  min_seconds=0.05)
    full = [c for c in result.candidates if c.scheme == "int8"]
    assert full and all("(DIV) failed to invoke" in c.error for c in full), [c.to_json() for c in full]
    assert any(note.startswith("tflite: no full-INT8 candidate could be scored, so no mixed candidate (")
               for note in result.notes), result.notes
    assert [c.scheme for c in result.candidates if c.scheme in ("mixed", "a16")] == ["a16"]
    assert result.chosen is not None and result.chosen.passed  # a float candidate, whatever the a16 one gave
