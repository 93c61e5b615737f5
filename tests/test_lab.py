"""edgeq lab run: LAB.yaml validation, history, and small end-to-end runs on `local` and the sshd devices."""

from __future__ import annotations

import json
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from edgeq.cli import cli
from edgeq.lab import (
    LabError,
    history_runs,
    load_lab,
    plan_builds,
    previous_results,
    prune_history,
)
from edgeq.manifest import read_manifest
from edgeq.profiles import load_profile
from edgeq.report import EXIT_REGRESSION
from edgeq.targets import Target

FAST_RUN = {"warmup": 2, "runs": 10, "min_seconds": 0, "idle_seconds": 0.05}
# Latency of a 0.02 ms model on a shared, loaded 2-core machine moved by up to 14x between two identical
# runs here; these tests check the plumbing, so the latency margin is huge (1000x) and the regression case
# uses a doctored baseline far below it (the statistics are tested in tests/test_regression.py).
WIDE_MARGIN = {"min_effect": 1000.0}


def write_lab(path: Path, digits: dict, *, artifacts: Path, history: Path, targets: list[str],
              extra_models: list[dict] | None = None, thresholds: dict | None = None, keep: int = 5) -> Path:
    config = {
        "name": "lab test",
        "models": [{"name": "digits", "path": str(digits["model"]), "calibration": str(digits["calib"]),
                    "eval": str(digits["eval"])}] + (extra_models or []),
        "build": {"formats": ["tflite"], "precisions": ["int8"], "max_accuracy_drop": 0.05},
        "run": {"targets": targets, **FAST_RUN},
        "history": {"dir": str(history), "keep": keep},
        "artifacts": str(artifacts),
        "thresholds": thresholds or WIDE_MARGIN,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def results_of(run_dir: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((run_dir / "results").glob("*.json"))}


# -- LAB.yaml and helpers (no conversion) --------------------------------------------------------------
def minimal_lab(tmp_path: Path, **changes) -> Path:
    model = tmp_path / "model.keras"
    model.write_bytes(b"not really a model")
    config = {"models": [{"name": "m", "path": "model.keras"}], "run": {"targets": ["local"]}}
    config.update(changes)
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_lab_yaml_paths_are_relative_to_the_file(tmp_path):
    config = load_lab(minimal_lab(tmp_path))
    assert config.models[0].path == tmp_path / "model.keras"
    assert config.history.dir == tmp_path / "lab-history"
    assert config.run.runs == 200 and config.history.keep == 30


@pytest.mark.parametrize("changes, message", [
    ({"build": {"format": ["tflite"]}}, "build.format: unknown field"),
    ({"build": {"precisions": ["int4"]}}, "build.precisions.0: Input should be 'int8', 'fp16', 'bf16', 'fp32', 'dynamic' or 'auto'"),
    ({"run": {"targets": []}}, "run.targets: List should have at least 1 item"),
    ({"models": [{"name": "m", "path": "model.keras"}, {"name": "m", "path": "model.keras"}]},
     "duplicate name(s): m"),
    ({"models": [{"name": "m", "path": "missing.keras"}]}, "models.m.path: "),
    ({"build": {"precisions": ["auto"]}}, "build: Value error, precisions: [auto] needs one budget"),
    ({"build": {"precisions": ["int8"], "min_cosine": 0.99}}, "min_cosine is the budget of precisions: [auto]"),
    ({"models": [{"name": "m", "path": "model.keras", "input_shapes": {"x": [1, 0, 8]}}]},
     "models.0.input_shapes: Value error, input_shapes.x: dims must be positive integers, got [1, 0, 8]"),
    ({"build": {"precisions": ["auto"], "min_cosine": 0.99}},
     "models.m: precisions: [auto] tunes it, which needs both calibration and eval data"),
])
def test_bad_lab_yaml_is_a_one_line_error(tmp_path, changes, message):
    path = minimal_lab(tmp_path, **changes)
    result = CliRunner().invoke(cli, ["lab", "run", str(path)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith(f"error: {path}: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_missing_lab_file_and_unknown_target(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEQ_INVENTORY", raising=False)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["lab", "run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1 and "nope.yaml: file not found" in result.stderr
    path = minimal_lab(tmp_path, run={"targets": ["nowhere"]})
    result = CliRunner().invoke(cli, ["lab", "run", str(path)])
    assert result.exit_code == 1 and "unknown target or group 'nowhere'" in result.stderr
    assert not (tmp_path / "lab-history").exists()  # nothing started


def test_plan_uses_profile_defaults_and_refuses_targets_it_builds_nothing_for(tmp_path):
    config = load_lab(minimal_lab(tmp_path))
    targets = [Target(name="a", host="h", profile="x86-avx2"), Target(name="b", host="h", profile="rpi4")]
    specs, per_target = plan_builds(config, targets)
    expected = [(name, load_profile(name).format, load_profile(name).precision) for name in ("x86-avx2", "rpi4")]
    assert [(s.profile, s.format, s.precision) for s in specs] == expected
    assert [s.profile for s in per_target["b"]] == ["rpi4"]
    config.build.profiles = ["x86-avx2"]
    with pytest.raises(LabError, match=r"build.profiles does not include the profile of target\(s\) b \(rpi4\)"):
        plan_builds(config, targets)


def test_plan_of_auto_is_one_tuned_build_per_model_and_profile_measured_on_its_first_target(tmp_path):
    for name in ("calib.npz", "eval.npz"):
        (tmp_path / name).write_bytes(b"")  # planning reads neither
    config = load_lab(minimal_lab(
        tmp_path, models=[{"name": "m", "path": "model.keras", "calibration": "calib.npz", "eval": "eval.npz"}],
        build={"precisions": ["auto", "fp32"], "max_accuracy_drop": 0.01}))
    targets = [Target(name="a", host="h", profile="x86-avx2"), Target(name="b", host="h", profile="rpi4"),
               Target(name="c", host="h", profile="rpi4")]
    specs, per_target = plan_builds(config, targets)
    assert [(s.profile, s.format, s.precision, s.measure_on and s.measure_on.name) for s in specs] == [
        ("x86-avx2", "auto", "auto", "a"), ("x86-avx2", "onnx", "fp32", None),
        ("rpi4", "auto", "auto", "b"), ("rpi4", "tflite", "fp32", None)]
    assert [s.label for s in per_target["c"]] == ["m rpi4 auto/auto", "m rpi4 tflite/fp32"]
    config.build.profiles = ["x86-avx2", "rpi4", "rpi5"]
    with pytest.raises(LabError, match="no run target has profile 'rpi5'"):
        plan_builds(config, targets)


def test_history_helpers(tmp_path):
    for name in ("2024-01-01T00-00-00", "2024-01-02T00-00-00", "2024-01-02T00-00-00-2", "2024-01-03T00-00-00"):
        (tmp_path / name / "results").mkdir(parents=True)
    (tmp_path / "2024-01-02T00-00-00" / "results" / "x.json").write_text("{}")
    (tmp_path / "notes").mkdir()
    runs = [p.name for p in history_runs(tmp_path)]
    assert runs == ["2024-01-01T00-00-00", "2024-01-02T00-00-00", "2024-01-02T00-00-00-2", "2024-01-03T00-00-00"]
    # The newest earlier run with results (empty runs, e.g. one that crashed, are passed over).
    assert previous_results(tmp_path, tmp_path / "2024-01-03T00-00-00").parent.name == "2024-01-02T00-00-00"
    pinned = tmp_path / "2024-01-01T00-00-00" / "results"
    deleted = prune_history(tmp_path, keep=1, protect=[pinned])
    # A pinned baseline inside the history survives pruning; everything else old goes.
    assert [p.name for p in deleted] == ["2024-01-02T00-00-00", "2024-01-02T00-00-00-2"]
    assert pinned.is_dir() and (tmp_path / "2024-01-03T00-00-00").is_dir()
    assert (tmp_path / "notes").is_dir()


# -- end to end on local --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_runs(digits, tmp_path_factory):
    """Three lab runs on `local`: fresh, unchanged (artifact reused), and against a doctored baseline with a
    broken second model (conversion failure) to check failure isolation and exit codes."""
    root = tmp_path_factory.mktemp("lab-local")
    history, artifacts = root / "history", root / "artifacts"
    runner = CliRunner()
    runs = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEQ_LOCAL_WORKDIR", str(root / "device"))
        mp.delenv("EDGEQ_INVENTORY", raising=False)
        mp.chdir(root)
        lab = write_lab(root / "lab.yaml", digits, artifacts=artifacts, history=history, targets=["local"], keep=2)
        for _ in range(2):
            result = runner.invoke(cli, ["lab", "run", str(lab)])
            runs.append((result, history_runs(history)[-1]))
        # The third run prunes the first (history.keep = 2): keep a copy to look at.
        first_copy = root / "first-run"
        shutil.copytree(runs[0][1], first_copy)
        # A baseline 100000x faster than anything measured (ten samples without the spikes a loaded
        # machine shows): the next run must regress against it even with the 1000x margin.
        doctored = root / "doctored"
        doctored.mkdir()
        for name, data in results_of(runs[1][1]).items():
            fast = min(data["latency_ms"]["samples"]) * 1e-5
            data["latency_ms"]["samples"] = [fast * (1 + 0.001 * ((7 * k) % 10)) for k in range(10)]
            data["latency_ms"]["p50"] = fast
            (doctored / name).write_text(json.dumps(data))
        broken = root / "broken.keras"
        broken.write_bytes(b"this is not a keras file")
        lab3 = write_lab(root / "lab3.yaml", digits, artifacts=artifacts, history=history, targets=["local"],
                         keep=2, extra_models=[{"name": "broken", "path": str(broken),
                                                "calibration": str(digits["calib"])}])
        result = runner.invoke(cli, ["lab", "run", str(lab3), "--baseline", str(doctored)])
        runs.append((result, history_runs(history)[-1]))
    return {"runs": runs, "history": history, "artifacts": artifacts, "first_copy": first_copy}


@pytest.mark.slow
def test_local_first_run_converts_benches_and_reports(local_runs):
    result, run_dir = local_runs["runs"][0][0], local_runs["first_copy"]
    assert result.exit_code == 0, result.stderr
    assert "convert digits" in result.stderr and ": converted " in result.stderr
    assert "PASS: no regressions or failures in 1 result(s) (no baseline)" in result.stderr
    (name, data), = results_of(run_dir).items()
    assert data["status"] == "ok" and data["target"] == "local"
    assert data["artifact"]["name"] == "digits" and data["artifact"]["format"] == "tflite"
    assert len(data["latency_ms"]["samples"]) >= 10
    assert data["accuracy"]["top1"] > 0.8
    for file in ("report.html", "report.md", "report.csv", "report.json", "junit.xml"):
        assert (run_dir / file).is_file()
    html = (run_dir / "report.html").read_text()
    root = ET.fromstring(html[len("<!DOCTYPE html>"):])
    assert len([tr for tr in root.iter("tr") if "result" in (tr.get("class") or "")]) == 1
    assert len([g for g in root.iter("g") if "latency-box" in (g.get("class") or "")]) == 1


@pytest.mark.slow
def test_local_second_run_reuses_the_artifact_and_compares_with_the_first(local_runs):
    (first, first_dir), (second, second_dir) = local_runs["runs"][:2]
    assert second.exit_code == 0, second.stderr
    assert ": reused " in second.stderr and ": converted " not in second.stderr
    assert "unchanged" in second.stderr  # deploy found the release already active
    assert f"baseline: {first_dir / 'results'}" in second.stderr
    report = json.loads((second_dir / "report.json").read_text())
    (row,) = report["rows"]
    assert row["baseline_file"].startswith(str(first_dir))
    assert {v["metric"]: v["status"] for v in row["verdicts"]}["accuracy"] == "unchanged"
    assert row["latency_verdict"] in ("unchanged", "improved")
    assert (local_runs["history"] / "latest").resolve() == local_runs["runs"][-1][1].resolve()


@pytest.mark.slow
def test_local_regression_and_failed_conversion_fail_the_run_but_keep_results(local_runs):
    result, run_dir = local_runs["runs"][2]
    assert result.exit_code == EXIT_REGRESSION, result.stderr
    results = results_of(run_dir)
    statuses = sorted((d["artifact"]["name"], d["status"]) for d in results.values())
    assert statuses == [("broken", "failed"), ("digits", "ok")]
    broken = next(d for d in results.values() if d["artifact"]["name"] == "broken")
    assert broken["error"].startswith("not built: ") and broken["failure"]["kind"] == "artifact"
    assert "local digits-tflite-int8: latency regressed" in result.stderr
    junit = ET.parse(run_dir / "junit.xml").getroot()
    assert junit.get("tests") == "2" and junit.get("failures") == "2"
    types = {c.get("name"): c.find("failure").get("type") for c in junit.iter("testcase")}
    assert types == {"digits-tflite-int8": "regression", "broken-tflite-int8": "run-failed"}
    # history.keep = 2: the first run was deleted.
    assert [p.name for p in history_runs(local_runs["history"])] == [r[1].name for r in local_runs["runs"][1:]]


@pytest.mark.slow
def test_precision_auto_tunes_once_and_reuses_the_choice(digits, tmp_path, monkeypatch):
    """``precisions: [auto]``: the first run tunes on the target and benches the chosen artifact; the next
    run reuses the choice (nothing re-tuned) and compares with the first; a changed budget tunes again."""
    monkeypatch.setenv("EDGEQ_LOCAL_WORKDIR", str(tmp_path / "device"))
    monkeypatch.setenv("EDGEQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGEQ_INVENTORY", raising=False)
    lab = write_lab(tmp_path / "lab.yaml", digits, artifacts=tmp_path / "artifacts", history=tmp_path / "history",
                    targets=["local"])
    config = yaml.safe_load(lab.read_text())
    config["build"].update(precisions=["auto"], tune={"max_candidates": 4, "runs": 20})
    lab.write_text(yaml.safe_dump(config))
    runner = CliRunner()
    first = runner.invoke(cli, ["lab", "run", str(lab)])
    assert first.exit_code == 0, first.stderr
    (tune_dir,) = (tmp_path / "artifacts" / "digits").glob("*/auto-auto")
    tuned = json.loads((tune_dir / "tune.json").read_text())
    chosen = next(c for c in tuned["candidates"] if c["chosen"])
    assert chosen["passed"] and chosen["format"] == "tflite"
    assert f": tuned -> tflite/{chosen['precision']} " in first.stderr
    (data,) = results_of(history_runs(tmp_path / "history")[-1]).values()
    assert data["status"] == "ok" and data["artifact"]["name"] == "digits"
    assert (data["artifact"]["format"], data["artifact"]["precision"]) == ("tflite", chosen["precision"])
    assert data["artifact"]["id"] == read_manifest(tune_dir / "chosen").id

    tuned_at = (tune_dir / "tune.json").stat().st_mtime_ns
    second = runner.invoke(cli, ["lab", "run", str(lab)])
    assert second.exit_code == 0, second.stderr
    assert ": reused -> tflite/" in second.stderr and ": tuned" not in second.stderr
    assert (tune_dir / "tune.json").stat().st_mtime_ns == tuned_at
    (row,) = json.loads((history_runs(tmp_path / "history")[-1] / "report.json").read_text())["rows"]
    assert row["baseline_file"]  # matched the first night's result

    config["build"]["max_accuracy_drop"] = 0.04
    lab.write_text(yaml.safe_dump(config))
    third = runner.invoke(cli, ["lab", "run", str(lab)])
    assert third.exit_code == 0, third.stderr
    assert ": tuned -> tflite/" in third.stderr
    assert json.loads((tune_dir / "lab-tune-key.json").read_text())["budget"]["max_accuracy_drop"] == 0.04


# -- end to end on the sshd test devices ------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.sshd
def test_lab_on_sshd_devices_with_one_dead_device(digits, trusted_inventory, tmp_path):
    from tests.lab.sshd import free_port

    inventory = yaml.safe_load(trusted_inventory.path.read_text())
    alive = inventory["targets"]["dev-0"]
    inventory["targets"]["dead"] = {**alive, "port": free_port(), "workdir": str(tmp_path / "dead")}
    inventory["groups"]["lab"] = ["dev-0", "dev-1", "dead"]
    inventory_path = tmp_path / "inventory.yaml"
    inventory_path.write_text(yaml.safe_dump(inventory))
    history = tmp_path / "history"
    lab = write_lab(tmp_path / "lab.yaml", digits, artifacts=tmp_path / "artifacts", history=history,
                    targets=["lab"])
    runner = CliRunner()
    outcomes = []
    for _ in range(2):
        result = runner.invoke(cli, ["lab", "run", str(lab), "-i", str(inventory_path)])
        outcomes.append((result, history_runs(history)[-1]))

    for index, (result, run_dir) in enumerate(outcomes):
        assert result.exit_code == EXIT_REGRESSION, result.stderr  # the dead device fails every run
        results = {d["target"]: d for d in results_of(run_dir).values()}
        assert set(results) == {"dev-0", "dev-1", "dead"}
        assert results["dev-0"]["status"] == results["dev-1"]["status"] == "ok"
        assert results["dead"]["status"] == "failed"
        assert "connection refused" in results["dead"]["error"]
        assert results["dead"]["failure"]["kind"] == "connect" and results["dead"]["failure"]["host"] == "dead"
        assert results["dev-0"]["artifact"]["id"] == results["dead"]["artifact"]["id"]
        assert results["dev-0"]["env"]["emulated"] is False
        assert "dead digits-tflite-int8: run failed (connect): deploy failed:" in result.stderr
        if index == 1:
            assert ": reused " in result.stderr
            report = json.loads((run_dir / "report.json").read_text())
            compared = {r["target"]: r["latency_verdict"] for r in report["rows"]}
            assert compared["dev-0"] in ("unchanged", "improved") and compared["dev-1"] in ("unchanged", "improved")
    # The release is really on the devices, verified and active.
    for name in ("dev-0", "dev-1"):
        current = trusted_inventory.workdirs[name] / "current"
        assert current.is_symlink() and (current / "manifest.json").is_file()
    assert sys.executable  # the devices ran this interpreter (see trusted_inventory)


@pytest.mark.parametrize(("kind", "skipped"), [("connect", True), ("remote", False), ("runner", False),
                                               ("artifact", False), ("internal", False)])
def test_only_a_connect_failure_skips_the_target_for_the_rest_of_the_run(kind, skipped):
    """Decided on the kind, never on the words: a message that says "timed out" or "unreachable" does not
    skip a device whose command or runner failed, and a connect failure skips it whatever its words."""
    from edgeq.errors import Failure
    from edgeq.lab.run import _note_unreachable

    unreachable: dict = {}
    _note_unreachable(unreachable, "dev-1", Failure(kind=kind, message="dev-1: step timed out; unreachable?"))
    assert ("dev-1" in unreachable) is skipped
    if skipped:
        assert unreachable["dev-1"].kind == "connect"
        assert unreachable["dev-1"].message.startswith("skipped: dev-1 was unreachable earlier in this run")


@pytest.mark.slow
def test_model_input_shapes_reach_convert_and_decide_reuse(digits, tmp_path):
    """``models[].input_shapes`` is convert's --input-shape; an artifact built with other shapes is rebuilt."""
    from edgeq.lab.builds import BuildSpec, build_artifact

    def lab(shapes):
        model = {"name": "digits", "path": str(digits["model"]), "calibration": str(digits["calib"])}
        if shapes:
            model["input_shapes"] = shapes
        path = tmp_path / "lab.yaml"
        path.write_text(yaml.safe_dump({"models": [model], "run": {"targets": ["local"]},
                                        "artifacts": str(tmp_path / "artifacts")}))
        return load_lab(path)

    shaped = lab({"x": [1, 8, 8, 1]})
    spec = BuildSpec(shaped.models[0], "x86-avx2", "onnx", "fp32")
    first = build_artifact(spec, shaped)
    assert first.status == "converted", first
    options = read_manifest(first.artifact_dir).options
    assert options["input_shapes"] == {"x": [1, 8, 8, 1]} and options["input_shapes_from"] == "--input-shape"
    assert build_artifact(spec, shaped).status == "reused"
    plain = lab(None)
    again = build_artifact(BuildSpec(plain.models[0], "x86-avx2", "onnx", "fp32"), plain)
    assert again.status == "converted" and "input_shapes" not in read_manifest(again.artifact_dir).options
