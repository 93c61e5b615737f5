"""Hostile input files get one-line errors, never a traceback, and never run code or read outside their folder.

Data (.npz), YAML configs, Keras files with code in them and ONNX models whose external data points
elsewhere: each test builds the real file (tiny) and loads it the way edgeq does.
"""

from __future__ import annotations

import io
import os
import struct
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from numpy.lib import format as npy_format

from edgeq import data
from edgeq.cli import cli
from edgeq.config import load_yaml_file
from edgeq.data import InputSpec, load_dataset, read_npz
from edgeq.errors import ConversionError, DataError, EdgeqError, InventoryError, ProfileError

SPEC = [InputSpec(name="x", shape=[None, 4])]


def one_line(exc: EdgeqError, *fragments: str) -> None:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text, text
    for fragment in fragments:
        assert fragment in text, text


def npy_bytes(header: dict, payload: bytes = b"") -> bytes:
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, header)
    return buf.getvalue() + payload


def write_zip(path: Path, members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", method) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


# ---- .npz data files ---------------------------------------------------------------------------------

def test_npz_whose_header_claims_a_trillion_elements_is_refused_before_allocating(tmp_path):
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**12,)}
    path = write_zip(tmp_path / "bomb.npz", {"x.npy": npy_bytes(header, b"\0" * 16)}, zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 300
    with pytest.raises(DataError) as info:
        load_dataset(path, SPEC, role="calibration")
    one_line(info.value, str(path), "'x'", "[1000000000000]", "16 bytes")


def test_npz_declaring_more_than_the_cap_is_refused_before_decompressing(tmp_path, monkeypatch):
    # A real zip bomb in miniature: 4 MiB of zeros deflate to a few KiB; the cap is lowered to 1 MiB.
    monkeypatch.setattr(data, "MAX_DATA_BYTES", 2**20)
    zeros = np.zeros((2**18, 4), np.float32)
    buf = io.BytesIO()
    np.save(buf, zeros)
    path = write_zip(tmp_path / "big.npz", {"x.npy": buf.getvalue()}, zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 64 * 1024
    with pytest.raises(DataError) as info:
        read_npz(path)
    one_line(info.value, str(path), "'x'", "at least 4.0 MiB", "more than edgeq loads (1.0 MiB")
    assert info.value.hint and "fewer" in info.value.hint


def _patch_sizes(path: Path, size: int, crc: int) -> None:
    """Rewrite the one member's uncompressed size and CRC in its local header and the zip directory."""
    raw = bytearray(path.read_bytes())
    central = raw.rfind(b"PK\x01\x02")
    struct.pack_into("<I", raw, 14, crc)
    struct.pack_into("<I", raw, 22, size)
    struct.pack_into("<I", raw, central + 16, crc)
    struct.pack_into("<I", raw, central + 24, size)
    path.write_bytes(bytes(raw))


def test_npz_member_is_never_read_past_its_declared_size(tmp_path):
    # The zip directory says 144 bytes (header + 4 floats); the deflate stream holds 32 MiB more.
    header = npy_bytes({"descr": "<f4", "fortran_order": False, "shape": (4,)})
    head = header + np.arange(4, dtype=np.float32).tobytes()
    path = write_zip(tmp_path / "lying.npz", {"x.npy": head + b"\0" * (32 * 2**20)}, zipfile.ZIP_DEFLATED)
    _patch_sizes(path, len(head), zlib.crc32(head))
    tracemalloc.start()
    try:
        arrays = read_npz(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(arrays["x"], np.arange(4, dtype=np.float32))
    assert peak < 4 * 2**20, peak


def test_npz_member_whose_stream_ends_early_is_truncated(tmp_path):
    header = npy_bytes({"descr": "<f4", "fortran_order": False, "shape": (8,)})
    head = header + b"\0" * 8  # 8 of the 32 declared data bytes
    path = write_zip(tmp_path / "short.npz", {"x.npy": head}, zipfile.ZIP_DEFLATED)
    _patch_sizes(path, len(header) + 32, zlib.crc32(head))
    with pytest.raises(DataError) as info:
        read_npz(path)
    one_line(info.value, str(path), "'x'")


def test_npz_with_an_object_array_is_refused_by_its_header(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(DataError) as info:
        load_dataset(path, SPEC)
    one_line(info.value, str(path), "'x'", "Python objects")


def test_npz_member_that_is_not_npy_is_refused(tmp_path):
    good = io.BytesIO()
    np.save(good, np.zeros((3, 4), np.float32))
    path = write_zip(tmp_path / "extra.npz", {"x.npy": good.getvalue(), "run_me.py": b"print('hi')"})
    with pytest.raises(DataError) as info:
        load_dataset(path, SPEC)
    one_line(info.value, str(path), "'run_me.py'", "not a .npy array")


def test_plain_npy_given_as_npz_is_one_line(tmp_path):
    path = tmp_path / "plain.npz"
    with path.open("wb") as handle:
        np.save(handle, np.zeros((3, 4), np.float32))
    with pytest.raises(DataError) as info:
        load_dataset(path, SPEC)
    one_line(info.value, str(path), "not a readable .npz file")


def test_truncated_and_corrupt_npz_are_one_line(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, x=np.random.default_rng(0).random((50, 4), dtype=np.float32), labels=np.arange(50))
    raw = good.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(raw[: len(raw) // 2])
    corrupt = tmp_path / "corrupt.npz"  # one data byte flipped: the CRC no longer matches
    flipped = bytearray(raw)
    flipped[300] ^= 0xFF
    corrupt.write_bytes(bytes(flipped))
    bad_header = tmp_path / "bad_header.npz"
    write_zip(bad_header, {"x.npy": b"\x93NUMPY\x01\x00\x10\x00{'descr': 'zz'}\n"})
    for path in (truncated, corrupt, bad_header):
        with pytest.raises(DataError) as info:
            load_dataset(path, SPEC)
        one_line(info.value, str(path))


def test_valid_npz_reads_the_same_as_numpy(tmp_path):
    arrays = {"x": np.asfortranarray(np.random.default_rng(1).random((5, 4))), "big_endian": np.arange(6, dtype=">i4"),
              "empty": np.zeros((0, 3), np.float32), "labels": np.arange(5)}
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, **arrays)
        loaded = read_npz(path)
        assert loaded.keys() == arrays.keys()
        for key, expected in arrays.items():
            assert loaded[key].dtype == expected.dtype and loaded[key].shape == expected.shape
            np.testing.assert_array_equal(loaded[key], expected)


# ---- YAML config files -------------------------------------------------------------------------------

LAUGHS = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(9))

HOSTILE_YAML = {
    "deep-flow": ("[" * 10000, "nested more than 64 levels"),
    "deep-block": ("".join("  " * i + f"k{i}:\n" for i in range(200)) + "  " * 200 + "v\n", "line 65"),
    "billion-laughs": (LAUGHS, "aliases included"),
    "recursive-alias": ("a: &a [1, *a]\n", "refers to a node that contains it"),
    "huge-integer": ("threads: " + "9" * 100_000 + "\n", "not valid YAML"),
}


@pytest.mark.parametrize("case", list(HOSTILE_YAML))
def test_hostile_yaml_is_one_line_naming_the_file(tmp_path, case):
    text, fragment = HOSTILE_YAML[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    from edgeq.profiles import load_profile

    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    one_line(info.value, str(path), fragment)


def test_yaml_that_is_too_big_or_not_utf8_is_one_line(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_bytes(b"# padding\n" * (2 * 2**20))
    not_utf8 = tmp_path / "latin1.yaml"
    not_utf8.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(InventoryError) as info:
        load_yaml_file(big, InventoryError)
    one_line(info.value, str(big), "16 MiB")
    with pytest.raises(InventoryError) as info:
        load_yaml_file(not_utf8, InventoryError)
    one_line(info.value, str(not_utf8), "not UTF-8", "line 1")


def test_ordinary_yaml_with_anchors_and_merge_keys_still_loads(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("base: &b {user: pi, port: 22}\ntargets:\n  a: {<<: *b, host: a}\n  b: {<<: *b, host: b}\n"
                    + "deep: " + "[" * 60 + "]" * 60 + "\n")
    loaded = load_yaml_file(path, InventoryError)
    assert loaded["targets"]["b"] == {"user": "pi", "port": 22, "host": "b"}


def test_cli_reports_a_hostile_profile_in_one_line(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("[" * 10000)
    result = CliRunner().invoke(cli, ["convert", str(tmp_path / "m.onnx"), "--profile", str(path),
                                      "-o", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "nested more than 64 levels" in result.output


# ---- ONNX external data ------------------------------------------------------------------------------

def tiny_onnx(path: Path, location: str | None = None, in_constant: bool = False) -> Path:
    """y = x @ w; ``w`` (4x3) stored inline, or marked as external data at ``location``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "w")
    if location is not None:
        weight.ClearField("raw_data")
        weight.data_location = TensorProto.EXTERNAL
        entry = weight.external_data.add()
        entry.key, entry.value = "location", location
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    initializers = [weight]
    if in_constant:  # the tensor sits in a Constant node's attribute instead of the initializers
        nodes.insert(0, helper.make_node("Constant", [], ["w"], value=weight))
        initializers = []
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])], initializers)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture
def no_onnx_reads(monkeypatch):
    """Fail the test if onnx's checker or onnxruntime get to read the model (the check must come first)."""
    import onnx
    import onnxruntime

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was handed to onnx/onnxruntime before its external data was checked")

    monkeypatch.setattr(onnx.checker, "check_model", forbidden)
    monkeypatch.setattr(onnxruntime, "InferenceSession", forbidden)
    monkeypatch.setattr(onnx, "load_external_data_for_model", forbidden)


def _escapes(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"\0" * 48)
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    os.symlink(secret, models / "link.bin")
    os.symlink(tmp_path, models / "sub" / "up")
    os.link(secret, models / "hard.bin")
    return {
        "dotdot": (tiny_onnx(models / "a.onnx", "../../../../../../etc/passwd"), "points outside the model's folder"),
        "dotdot-secret": (tiny_onnx(models / "b.onnx", "../secret.txt"), "points outside the model's folder"),
        "absolute": (tiny_onnx(models / "c.onnx", str(secret)), "not a relative path"),
        "symlink-file": (tiny_onnx(models / "d.onnx", "link.bin"), "points outside the model's folder"),
        "symlink-dir": (tiny_onnx(models / "e.onnx", "sub/up/secret.txt"), "points outside the model's folder"),
        "hard-link": (tiny_onnx(models / "f.onnx", "hard.bin"), "hard links"),
        "missing": (tiny_onnx(models / "g.onnx", "nothere.bin"), "cannot be read"),
        "constant-attr": (tiny_onnx(models / "h.onnx", "../secret.txt", in_constant=True), "outside"),
    }


ESCAPES = ["dotdot", "dotdot-secret", "absolute", "symlink-file", "symlink-dir", "hard-link", "missing",
           "constant-attr"]


@pytest.mark.parametrize("case", ESCAPES)
def test_onnx_external_data_outside_the_model_folder_is_refused_before_loading(tmp_path, no_onnx_reads, case):
    from edgeq.convert.onnx_files import load_onnx_model
    from edgeq.convert.source import load_source

    model, fragment = _escapes(tmp_path)[case]
    for load in (load_source, load_onnx_model):
        with pytest.raises(ConversionError) as info:
            load(model)
        one_line(info.value, str(model), "tensor 'w'", fragment)


def test_convert_refuses_an_escaping_onnx_model_in_one_line(tmp_path):
    model = tiny_onnx(tmp_path / "models" / "m.onnx", "../../../../../../etc/passwd")
    result = CliRunner().invoke(cli, ["convert", str(model), "--profile", "x86-avx2", "--format", "onnx",
                                      "--precision", "fp32", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert f"{model}: tensor 'w': external data location" in result.output
    assert not (tmp_path / "out").exists()


def test_onnx_external_data_inside_the_folder_converts_and_is_hashed(tmp_path):
    import onnx

    from edgeq.convert import convert
    from edgeq.convert.source import load_source
    from edgeq.profiles import load_profile

    model = tmp_path / "m" / "model.onnx"
    model.parent.mkdir()
    onnx.save(onnx.load(str(tiny_onnx(tmp_path / "inline.onnx"))), str(model),
              save_as_external_data=True, location="weights.bin", size_threshold=0)
    source = load_source(model)
    np.testing.assert_allclose(source.run({"x": np.ones((1, 4), np.float32)})[0], [[18, 22, 26]])
    manifest = convert(model, load_profile("x86-avx2"), tmp_path / "out", format="onnx", precision="fp32")
    assert manifest.status == "ok" and [f.path for f in manifest.files] == ["model.onnx"]  # weights inline
    before = source.sha256
    weights = model.parent / "weights.bin"
    weights.write_bytes(weights.read_bytes()[::-1])  # same model file, other weights: another source hash
    assert load_source(model).sha256 != before


# ---- Keras files with code in them -------------------------------------------------------------------

def _lambda_model(tmp_path: Path, suffix: str) -> tuple[Path, Path]:
    """A tiny model whose Lambda layer writes ``marker`` when it runs; saved, then the marker removed."""
    import keras

    marker = tmp_path / "lambda-ran.txt"
    function = eval(f"lambda t: (open({str(marker)!r}, 'a').write('ran'), t)[1]")  # the payload: code saved into the model file
    inputs = keras.Input((4,), name="x")
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Lambda(function)(inputs)))
    path = tmp_path / f"lambda{suffix}"
    model.save(path)
    marker.unlink(missing_ok=True)
    return path, marker


@pytest.fixture
def unsafe_deserialization_enabled():
    """Some code in the process switched Keras' safe mode off globally (restored afterwards)."""
    import keras
    from keras.src.backend.common import global_state

    before = global_state.get_global_attribute("safe_mode_saving")
    keras.config.enable_unsafe_deserialization()
    yield
    global_state.set_global_attribute("safe_mode_saving", before)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keras_lambda_model_is_refused_and_its_code_never_runs(tmp_path, suffix):
    from edgeq.convert import convert
    from edgeq.profiles import load_profile

    path, marker = _lambda_model(tmp_path, suffix)
    with pytest.raises(ConversionError) as info:
        convert(path, load_profile("x86-avx2"), tmp_path / "out", format="onnx", precision="fp32")
    one_line(info.value, str(path), "refused", "Lambda", "safe mode")
    assert "safe_mode=False" not in str(info.value) and "Lambda" in (info.value.hint or "")
    assert not marker.exists()


@pytest.mark.slow
def test_keras_lambda_stays_refused_when_unsafe_deserialization_was_enabled(tmp_path,
                                                                            unsafe_deserialization_enabled):
    path, marker = _lambda_model(tmp_path, ".keras")
    result = CliRunner().invoke(cli, ["convert", str(path), "--profile", "x86-avx2", "--format", "onnx",
                                      "--precision", "fp32", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "refused" in result.output
    assert not marker.exists()
