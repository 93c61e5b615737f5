"""Manifest hashing/verification, .npz data matching and metrics, against known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeq.data import InputSpec, check_labels_range, load_dataset, subsample
from edgeq.errors import DataError, ManifestError
from edgeq.manifest import (
    Manifest,
    SourceInfo,
    TensorSpec,
    artifact_id,
    file_entries,
    read_manifest,
    sha256_file,
    verify_artifact,
    write_manifest,
)
from edgeq.metrics import agreement, top_k_accuracy


def _artifact(tmp_path, payload=b"model bytes"):
    directory = tmp_path / "art"
    directory.mkdir(parents=True)
    (directory / "model.tflite").write_bytes(payload)
    files = file_entries(directory)
    manifest = Manifest(
        id=artifact_id(files), format="tflite", precision="int8", model_file="model.tflite", files=files,
        source=SourceInfo(path="m.keras", sha256="0" * 64, kind="keras"),
        inputs=[TensorSpec(name="x", shape=[None, 8], dtype="int8", scale=0.5, zero_point=-3)],
        outputs=[TensorSpec(name="y", shape=[None, 10], dtype="int8", scale=0.1, zero_point=0)],
        profile={"name": "rpi4"}, tool_versions={"edgeq": "0"}, created_at="2026-01-01T00:00:00Z",
        conversion_seconds=1.0,
    )
    write_manifest(directory, manifest)
    return directory, manifest


def test_manifest_roundtrip_and_content_id(tmp_path):
    directory, manifest = _artifact(tmp_path)
    assert read_manifest(directory) == manifest
    assert verify_artifact(directory).id == manifest.id
    # The id depends on content only: the same bytes elsewhere give the same id, other bytes another.
    same, _ = _artifact(tmp_path / "again")
    other, _ = _artifact(tmp_path / "other", payload=b"other bytes")
    assert read_manifest(same).id == manifest.id
    assert read_manifest(other).id != manifest.id
    assert manifest.files[0].sha256 == sha256_file(directory / "model.tflite")


def test_tampered_artifact_is_rejected(tmp_path):
    directory, _ = _artifact(tmp_path)
    (directory / "model.tflite").write_bytes(b"model bytez")
    with pytest.raises(ManifestError, match="model.tflite: sha256 mismatch"):
        verify_artifact(directory)


def test_bad_manifests(tmp_path):
    with pytest.raises(ManifestError, match="no such directory"):
        read_manifest(tmp_path / "missing")
    with pytest.raises(ManifestError, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(ManifestError, match="schema_version 99 is not supported"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 1, "format": "tflite"}))
    with pytest.raises(ManifestError, match="manifest.json: "):
        read_manifest(tmp_path)


def test_dataset_single_input_takes_any_array_and_checks_shape(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((5, 8, 8, 1), np.float64), labels=np.arange(5))
    spec = InputSpec(name="serving_default_x:0", shape=[None, 8, 8, 1])
    data = load_dataset(path, [spec])
    assert data.inputs["serving_default_x:0"].dtype == np.float32
    assert data.samples == 5 and list(data.labels) == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match=r"has shape \[5, 8, 8, 1\], the model expects \[N, 4, 4, 1\]"):
        load_dataset(path, [InputSpec(name="x", shape=[None, 4, 4, 1])])
    with pytest.raises(DataError, match="label 4 is out of range: the model has 3 classes"):
        check_labels_range(data, 3)


def test_dataset_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_dataset(tmp_path / "none.npz", [InputSpec("x", [None, 2])])
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_dataset(junk, [InputSpec("x", [None, 2])])
    multi = tmp_path / "multi.npz"
    np.savez(multi, a=np.zeros((2, 2)), b=np.zeros((2, 2)))
    with pytest.raises(DataError, match=r"no array for model input\(s\) \['x'\]"):
        load_dataset(multi, [InputSpec("x", [None, 2])])
    text = tmp_path / "text.npz"
    np.savez(text, x=np.array([["a", "b"]]))
    with pytest.raises(DataError, match="dtype <U1"):
        load_dataset(text, [InputSpec("x", [None, 2])])


def test_subsample_is_deterministic(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.arange(1000, dtype=np.float32).reshape(1000, 1))
    data = load_dataset(path, [InputSpec("x", [None, 1])])
    a, b = subsample(data, 300), subsample(data, 300)
    assert a.samples == 300 and a.samples_available == 1000
    assert np.array_equal(a.inputs["x"], b.inputs["x"])
    assert subsample(data, 5000) is data


def test_metrics_known_answers():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.4, 0.35, 0.25]])
    labels = np.array([1, 1, 2, 1])
    assert top_k_accuracy(scores, labels, 1) == 0.5
    assert top_k_accuracy(scores, labels, 2) == 1.0
    assert top_k_accuracy(scores, labels, 3) == 1.0  # k = classes: trivially 1.0, documented
    with pytest.raises(ValueError, match="top-5 accuracy of scores with 3 classes"):
        top_k_accuracy(scores, labels, 5)
    same = agreement(scores, scores)
    assert same == {"top1_agreement": 1.0, "cosine_similarity": pytest.approx(1.0), "max_abs_error": 0.0}
    flipped = agreement(scores, scores[:, ::-1])
    assert flipped["top1_agreement"] == 0.25  # only row 0 keeps its arg-max when the classes are reversed
    orthogonal = agreement(np.array([[1.0, 0.0], [3.0, 4.0]]), np.array([[0.0, 1.0], [3.0, 4.0]]))
    assert orthogonal["cosine_similarity"] == pytest.approx(0.5)
    assert orthogonal["max_abs_error"] == 1.0
    assert agreement(np.zeros((1, 3)), np.zeros((1, 3)))["cosine_similarity"] == 1.0
