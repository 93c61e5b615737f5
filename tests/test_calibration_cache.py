"""ONNX Runtime's calibration ranges kept by content hash (``onnx_int8.CalibrationCache``): a second conversion
of the same model and data reads them back and builds the same bytes; float nodes share them; a damaged cache
file is recomputed; a second tune computes none."""

from __future__ import annotations

import json

import pytest

from edgeq.convert import convert
from edgeq.profiles import load_profile
from edgeq.targets import local_target
from edgeq.tune import Budget, tune

pytestmark = pytest.mark.slow

PROFILE = "x86-avx2"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EDGEQ_LOCAL_WORKDIR", str(tmp_path / "local-device"))
    return tmp_path / "cache" / "calibration"


def _int8(paths, out, **kwargs):
    return convert(paths["model"], load_profile(PROFILE), out, format="onnx", precision="int8",
                   calibration=paths["calibration"], **kwargs)


def test_the_second_conversion_reads_the_ranges_back(sensitive_model, tmp_path, cache):
    first = _int8(sensitive_model, tmp_path / "first", calibration_method="entropy")
    assert first.options["calibration_cache"] == "stored"
    (stored,) = cache.glob("*.json")
    second = _int8(sensitive_model, tmp_path / "second", calibration_method="entropy")
    assert second.options["calibration_cache"] == "hit"
    assert (tmp_path / "first" / "model.onnx").read_bytes() == (tmp_path / "second" / "model.onnx").read_bytes()
    # Float nodes do not change what is calibrated: a mixed-precision candidate reads the same ranges.
    mixed = _int8(sensitive_model, tmp_path / "mixed", calibration_method="entropy", float_nodes=("fc2",))
    assert mixed.options["calibration_cache"] == "hit"
    # Another method is another set of ranges.
    assert _int8(sensitive_model, tmp_path / "minmax", calibration_method="minmax").options[
        "calibration_cache"] == "stored"
    assert len(list(cache.glob("*.json"))) == 2
    assert not list(cache.glob(".tmp-*"))  # written under a temporary name, then renamed
    # A damaged file is not trusted: it is recomputed and replaced.
    stored.write_text('{"calibration_method": "Entropy", "data": {"x": [')
    again = _int8(sensitive_model, tmp_path / "again", calibration_method="entropy")
    assert again.options["calibration_cache"] == "stored"
    assert (tmp_path / "again" / "model.onnx").read_bytes() == (tmp_path / "first" / "model.onnx").read_bytes()
    json.loads(stored.read_text())


def test_a_second_tune_computes_no_ranges(sensitive_model, tmp_path, cache):
    def run(output):
        return tune(sensitive_model["model"], local_target(), load_profile(PROFILE),
                    calibration=sensitive_model["calibration"], eval_path=sensitive_model["eval"],
                    budget=Budget(max_accuracy_drop=0.02), output=output, formats=["onnx"], runs=10,
                    min_seconds=0.02, max_candidates=8)

    first = run(tmp_path / "first")
    second = run(tmp_path / "second")
    calibrated = [c for c in first.candidates if c.precision == "int8"]
    assert calibrated and {c.calibration_cache for c in calibrated} <= {"stored", "hit"}
    # One computation per set of ranges (method, op types calibrated, activation bits); the rest, the mixed
    # candidates among them, already hit in the first tune.
    distinct = {(c.calibration_method, c.settings.get("int8_op_types"), c.settings.get("activation_bits"))
                for c in calibrated}
    assert sum(c.calibration_cache == "stored" for c in calibrated) == len(distinct) < len(calibrated)
    assert all(c.calibration_cache == "hit" for c in second.candidates if c.precision == "int8")
    assert any("0 computed" in note for note in second.notes), second.notes
    assert [c.id for c in second.candidates] == [c.id for c in first.candidates]  # the same search, reused ranges


def _two_identical_scales(path, kept: str, scale=1.0):
    """y = (x * s1) * s2 where s1 and s2 are equal constants, deduplicated to the one named ``kept`` (as
    tf2onnx and ORT's optimizer do, keeping whichever name they met first in that process)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    s = numpy_helper.from_array(np.full((4,), scale, np.float32), kept)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", kept], ["h"], name="mul1"), helper.make_node("Mul", ["h", kept], ["y"],
                                                                                      name="mul2")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], initializer=[s])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_the_cache_key_does_not_depend_on_which_of_two_equal_constants_kept_its_name(tmp_path):
    """The bug found on MobileNetV2 from Keras: a fresh model has many equal BatchNorm scales, the export kept a
    different one's name each run, and a tune never hit the cache ("stored -> stored")."""
    from edgeq.convert.onnx_int8 import model_digest

    block1 = model_digest(_two_identical_scales(tmp_path / "a.onnx", "block_1_bn/mul:0"))
    block2 = model_digest(_two_identical_scales(tmp_path / "b.onnx", "block_2_bn/mul:0"))
    other = model_digest(_two_identical_scales(tmp_path / "c.onnx", "block_1_bn/mul:0", scale=2.0))
    assert block1 == block2 != other
    assert (tmp_path / "a.onnx").read_bytes() != (tmp_path / "b.onnx").read_bytes()


def test_a_tensorflow_source_is_exported_to_onnx_once(sensitive_keras_model, tmp_path, cache):
    """tf2onnx does not export a model the same way twice (Basic Pitch: 233 and 234 nodes), so each candidate's
    own export shared no calibration ranges: the export is kept by content hash, every conversion reads it."""
    first = _int8(sensitive_keras_model, tmp_path / "first")
    second = _int8(sensitive_keras_model, tmp_path / "second")
    fp16 = convert(sensitive_keras_model["model"], load_profile(PROFILE), tmp_path / "fp16", format="onnx",
                   precision="fp16")
    assert (first.options["onnx_export_cache"], second.options["onnx_export_cache"],
            fp16.options["onnx_export_cache"]) == ("stored", "hit", "hit")
    assert (first.options["calibration_cache"], second.options["calibration_cache"]) == ("stored", "hit")
    assert (tmp_path / "first" / "model.onnx").read_bytes() == (tmp_path / "second" / "model.onnx").read_bytes()
    (kept,) = (cache.parent / "onnx-export").glob("*.onnx")
    kept.write_bytes(kept.read_bytes()[:100])  # a damaged entry is exported again, not used
    again = _int8(sensitive_keras_model, tmp_path / "again")
    assert again.options["onnx_export_cache"] == "stored" and again.options["calibration_cache"] == "hit"
    assert (tmp_path / "again" / "model.onnx").read_bytes() == (tmp_path / "first" / "model.onnx").read_bytes()
