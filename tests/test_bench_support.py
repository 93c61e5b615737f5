"""Helpers and fixtures for the runner and bench tests: tiny real artifacts built from the digits CNN.

Built by hand with the libraries (TFLite INT8 with int8 I/O, ONNX FP32 through tf2onnx, OpenVINO FP32 from
that ONNX) so the runner and bench tests do not depend on the converter; each takes about a second.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeq.manifest import (
    Manifest,
    SourceInfo,
    TensorSpec,
    artifact_id,
    file_entries,
    sha256_tree,
    write_manifest,
)
from edgeq.profiles import load_profile
from edgeq.remote.device import device_package

FORMATS = ("tflite", "onnx", "openvino")


def _convert(fmt: str, model_path: Path, calib_path: Path, out: Path) -> tuple[str, str]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    model = keras.models.load_model(model_path)
    spec = (tf.TensorSpec((None, 8, 8, 1), tf.float32, name="x"),)
    if fmt == "tflite":
        calib = np.load(calib_path)["x"]
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([calib[i : i + 1]] for i in range(100))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
        (out / "model.tflite").write_bytes(converter.convert())
        return "model.tflite", "int8"
    import tf2onnx

    @tf.function(input_signature=spec)
    def forward(x):
        return model(x)

    onnx_path = out / "model.onnx"
    tf2onnx.convert.from_function(forward, input_signature=spec, opset=17, output_path=str(onnx_path))
    if fmt == "onnx":
        return "model.onnx", "fp32"
    import openvino as ov

    ov.save_model(ov.convert_model(str(onnx_path)), str(out / "model.xml"))
    onnx_path.unlink()
    return "model.xml", "fp32"


def build_artifact(fmt: str, digits: dict, out: Path, profile: str = "x86-avx2") -> Path:
    """An artifact directory (model files + manifest.json) for ``fmt``, as the converter would write it."""
    from edgeq.device.runtimes import open_session

    out.mkdir(parents=True, exist_ok=True)
    model_file, precision = _convert(fmt, Path(digits["model"]), Path(digits["calib"]), out)
    session = open_session(out / model_file, fmt)

    def specs(tensors):
        return [TensorSpec(name=t["name"], shape=t["shape"], dtype=t["dtype"],
                           scale=t["quant"][0] if t["quant"] else None,
                           zero_point=t["quant"][1] if t["quant"] else None) for t in tensors]

    files = file_entries(out)
    manifest = Manifest(
        id=artifact_id(files), format=fmt, precision=precision, model_file=model_file, files=files,
        source=SourceInfo(path=str(digits["model"]), sha256=sha256_tree(Path(digits["model"])), kind="keras"),
        inputs=specs(session.inputs), outputs=specs(session.outputs),
        profile=load_profile(profile).model_dump(mode="json"), tool_versions={},
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(), conversion_seconds=0.0,
    )
    write_manifest(out, manifest)
    return out


def release_dir(artifact: Path, root: Path) -> Path:
    """What deploy puts on a device: the artifact's files (model files and manifest), in one directory."""
    import shutil

    target = root / artifact.name
    if not target.exists():
        shutil.copytree(artifact, target)
    return target


def device_pyz(directory: Path) -> Path:
    """The device package the controller ships (edgeq-device-<sha12>.pyz), written into ``directory``."""
    package = device_package()
    path = directory / package.name
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        path.write_bytes(package.data)
    return path


def run_argv(pyz: Path, request: Path, result: Path, *, isolated: bool = True) -> list[str]:
    """The device's ``run`` step: measure one request, write its result file."""
    return [sys.executable, *(["-I"] if isolated else []), str(pyz), "run", "--request", str(request),
            "--result", str(result)]


@pytest.fixture(scope="session")
def hand_artifacts(digits, tmp_path_factory) -> dict[str, Path]:
    """{format: artifact dir} for tflite (int8), onnx (fp32) and openvino (fp32)."""
    root = tmp_path_factory.mktemp("hand-artifacts")
    return {fmt: build_artifact(fmt, digits, root / fmt) for fmt in FORMATS}


def runner_python() -> str:
    return sys.executable


def build_two_head_artifact(digits: dict, out: Path, *, with_source_names: bool = True) -> Path:
    """An ONNX artifact of a two-output Keras model ([scores (10), aux (3)]) whose outputs come out in the
    other order ([aux, scores]), as a converter may reorder them; the manifest maps them back to the
    source's output names (``source_name``) unless ``with_source_names`` is False."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf
    import tf2onnx

    from edgeq.device.runtimes import open_session

    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1), name="x")
    features = keras.layers.Flatten()(inputs)
    scores = keras.layers.Dense(10, activation="softmax", name="scores")(features)
    aux = keras.layers.Dense(3, name="aux")(features)
    source = out.parent / f"{out.name}-source.keras"
    keras.Model(inputs, [scores, aux]).save(source)
    model = keras.models.load_model(source)

    @tf.function(input_signature=(tf.TensorSpec((None, 8, 8, 1), tf.float32, name="x"),))
    def forward(x):
        head_scores, head_aux = model(x)
        return head_aux, head_scores

    tf2onnx.convert.from_function(forward, input_signature=forward.input_signature, opset=17,
                                  output_path=str(out / "model.onnx"))
    session = open_session(out / "model.onnx", "onnx")
    assert [t["shape"][1] for t in session.outputs] == [3, 10]
    # load_source names a Keras model's outputs output_0, output_1... in the model's order: [scores, aux].
    source_names = {session.outputs[0]["name"]: "output_1", session.outputs[1]["name"]: "output_0"}

    def specs(tensors):
        return [TensorSpec(name=t["name"], shape=t["shape"], dtype=t["dtype"],
                           source_name=source_names.get(t["name"]) if with_source_names else None)
                for t in tensors]

    files = file_entries(out)
    manifest = Manifest(
        id=artifact_id(files), format="onnx", precision="fp32", model_file="model.onnx", files=files,
        source=SourceInfo(path=str(source), sha256=sha256_tree(source), kind="keras"),
        inputs=specs(session.inputs), outputs=specs(session.outputs),
        profile=load_profile("x86-avx2").model_dump(mode="json"), tool_versions={},
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(), conversion_seconds=0.0,
    )
    write_manifest(out, manifest)
    return out
