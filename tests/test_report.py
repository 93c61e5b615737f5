"""edgeq report: loading, the five renderers and the CLI, on synthetic result files with known properties."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq.cli import cli
from edgeq.errors import ReportError
from edgeq.report import EXIT_REGRESSION, create_report, load_results, render, write_reports
from edgeq.report.svg import pareto_front
from edgeq.report.synthetic import synthetic_latency_run, synthetic_result

NASTY = '<script>alert("x")</script> & <img src=x onerror=alert(1)>'


def write(directory: Path, data: dict, name: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (name or f"{data['target']}__{data['artifact']['id']}.json")
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> dict:
    """A run and a baseline with known answers.

    Targets: ``local`` (no sensor) with tflite-int8 (20 % slower than baseline), onnx-fp32 (unchanged),
    openvino-fp16 (gate failed at conversion); ``rpi`` (energy sensor, emulated) with tflite-int8 and onnx-fp32;
    ``dead`` whose run failed with a nasty error message.
    """
    root = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(42)
    current, baseline = root / "current", root / "baseline"
    specs = [  # target, fmt, precision, median ms, top1, energy J, slowdown, gate
        ("local", "tflite", "int8", 1.0, 0.950, None, 0.20, "passed"),
        ("local", "onnx", "fp32", 2.5, 0.970, None, 0.0, "passed"),
        ("local", "openvino", "fp16", 1.8, 0.900, None, 0.0, "failed"),
        ("rpi", "tflite", "int8", 9.0, 0.945, 0.004, 0.0, "passed"),
        ("rpi", "onnx", "fp32", 30.0, 0.970, 0.012, 0.0, "passed"),
    ]
    for target, fmt, precision, median, top1, energy, slowdown, gate in specs:
        artifact_id = f"{fmt}{precision}".ljust(16, "0")
        common = dict(target=target, fmt=fmt, precision=precision, artifact_id=artifact_id, top1=top1,
                      energy_j=energy, validation_status=gate, emulated=target == "rpi")
        write(baseline, synthetic_result(samples=synthetic_latency_run(rng, 300, median_ms=median), **common))
        write(current, synthetic_result(
            samples=synthetic_latency_run(rng, 300, median_ms=median, slowdown=slowdown), **common))
    write(current, synthetic_result(target="dead", status="failed", error=f"ssh failed: {NASTY}",
                                    artifact_id="tflitefailed0000"))
    write(current, {"schema_version": 1, "kind": "edgeq-report", "rows": []}, "report.json")  # skipped
    report = create_report([current], [baseline])
    return {"root": root, "current": current, "baseline": baseline, "report": report}


def parse_html(text: str) -> ET.Element:
    assert text.startswith("<!DOCTYPE html>")
    return ET.fromstring(text[len("<!DOCTYPE html>"):])


def classes(element: ET.Element) -> set[str]:
    return set((element.get("class") or "").split())


def find_class(root: ET.Element, tag: str, css: str) -> list[ET.Element]:
    return [e for e in root.iter(tag) if css in classes(e)]


def test_report_model_knows_the_answers(lab):
    report = lab["report"]
    assert len(report.rows) == 6
    regressed = [(row.target, row.label, v.metric) for row in report.rows for v in row.regressions]
    assert regressed == [("local", "digits-tflite-int8", "latency")]
    counts = report.counts()
    assert counts["failed_runs"] == 1 and counts["gate_failures"] == 1 and counts["emulated"] == 2
    assert not report.passed and report.exit_code == EXIT_REGRESSION
    assert report.headline().startswith("FAIL: 1 regression(s), 1 failed run(s), 1 accuracy-gate failure(s)")


def test_html_is_self_contained_and_has_the_table_and_plots(lab):
    report = lab["report"]
    text = render(report, "html")
    root = parse_html(text)
    # No network: nothing is loaded from anywhere, no script at all.
    assert not list(root.iter("script")) and not list(root.iter("link"))
    assert "http://" not in text and "https://" not in text
    rows = find_class(root, "tr", "result")
    assert len(rows) == 6
    first_cells = [[("".join(td.itertext())) for td in tr.findall("td")] for tr in rows]
    assert [cells[1] for cells in first_cells] == ["dead", "local", "local", "local", "rpi", "rpi"]
    by_label = {(cells[1], cells[3], cells[4], cells[5]): tr for cells, tr in zip(first_cells, rows, strict=True)}
    assert "regressed" in classes(by_label[("local", "digits", "tflite", "int8")])
    assert "gate" in classes(by_label[("local", "digits", "openvino", "fp16")])
    assert "failed" in classes(rows[0])
    # Energy without a sensor is said, never 0.
    local_onnx = "".join(by_label[("local", "digits", "onnx", "fp32")].itertext())
    assert "no sensor: profile has no power sensor" in local_onnx
    ok_rows = [row for row in report.rows if row.status == "ok"]
    assert len(find_class(root, "g", "latency-box")) == len(ok_rows) == 5
    assert len(find_class(root, "g", "regressed")) == 1
    assert len(find_class(root, "path", "baseline-marker")) == 5
    points = find_class(root, "circle", "point")
    assert len(points) == 5
    expected_front = pareto_front([(row.record.result.latency_ms.p50, row.record.result.accuracy.top1)
                                   for row in ok_rows])
    assert len(find_class(root, "circle", "pareto")) == len(expected_front) >= 2
    assert len(find_class(root, "polyline", "pareto-front")) == 1
    assert len(find_class(root, "rect", "energy-bar")) == 2
    assert len(find_class(root, "text", "no-sensor")) == 3
    assert root.find(".//*[@id='emulated']") is not None
    assert "latency under emulation is meaningless" in text
    assert root.find(".//*[@id='verdict']").text.startswith("FAIL")


def test_html_escapes_everything_from_results(tmp_path):
    write(tmp_path, synthetic_result(target=NASTY, model=NASTY, samples=np.full(20, 1.0), energy_j=None), "a.json")
    write(tmp_path, synthetic_result(target="x", status="failed", error=NASTY), "b.json")
    text = render(create_report([tmp_path]), "html")
    root = parse_html(text)  # well-formed despite the markup in the data
    assert not list(root.iter("script")) and not list(root.iter("img"))
    assert not [e for e in root.iter() if "onerror" in e.attrib]
    assert "&lt;script&gt;" in text
    assert NASTY in "".join(root.itertext())


def test_pareto_front_keeps_only_undominated_points():
    points = [(1.0, 0.90), (2.0, 0.95), (3.0, 0.93), (4.0, 0.97), (1.5, 0.89)]
    assert sorted(pareto_front(points)) == [0, 1, 3]


def test_markdown_summary(lab):
    text = render(lab["report"], "markdown")
    lines = text.splitlines()
    assert lines[0].startswith("### edgeq report: FAIL")
    table = [line for line in lines if line.startswith("| ") and "target" not in line]
    assert len(table) == 6
    assert any("🔺 regressed" in line and "**lat +" in line for line in table)
    assert "latency under emulation is meaningless" in text
    assert "<script>" not in text  # the failed run's error is in the problems list, defused
    assert "local digits-tflite-int8: latency regressed" in text
    assert len(text) < 4000  # fits a PR comment comfortably


def test_csv_and_json_round_trip(lab, tmp_path):
    written = write_reports(lab["report"], csv=tmp_path / "r.csv", json=tmp_path / "r.json")
    assert set(written) == {"csv", "json"}
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["kind"] == "edgeq-report" and data["status"] == "fail"
    with open(tmp_path / "r.csv", newline="", encoding="utf-8") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert len(csv_rows) == len(data["rows"]) == 6
    for csv_row, json_row in zip(csv_rows, data["rows"], strict=True):
        verdicts = json_row.pop("verdicts")
        assert list(csv_row) == list(json_row)
        for key, value in json_row.items():
            if isinstance(value, float):
                assert float(csv_row[key]) == value, key
            else:
                assert csv_row[key] == ("" if value is None else str(value)), key
        assert len(verdicts) == (3 if json_row["status"] == "ok" else 0)
    regressed = [r for r in data["rows"] if r["latency_verdict"] == "regressed"]
    assert [(r["target"], r["format"]) for r in regressed] == [("local", "tflite")]
    assert 0.15 < regressed[0]["latency_change"] < 0.25
    # A JSON report inside a results directory is not mistaken for a result.
    assert (lab["current"] / "report.json").exists()
    assert len(load_results([lab["current"]]).records) == 6


# The structure of the Jenkins xunit plugin's junit-10.xsd (the schema CI systems read): allowed attributes,
# required attributes and allowed children per element.
JUNIT_SCHEMA = {
    "testsuites": ({"name", "time", "tests", "failures", "errors"}, set(), {"testsuite"}),
    "testsuite": ({"name", "tests", "failures", "errors", "group", "time", "skipped", "timestamp", "hostname",
                   "id", "package", "file", "log", "url"}, {"name", "tests", "failures", "errors"},
                  {"testsuite", "properties", "testcase", "system-out", "system-err"}),
    "properties": (set(), set(), {"property"}),
    "property": ({"name", "value"}, {"name", "value"}, set()),
    "testcase": ({"name", "time", "classname", "group"}, {"name"},
                 {"skipped", "error", "failure", "system-out", "system-err"}),
    "failure": ({"type", "message"}, set(), set()),
    "error": ({"type", "message"}, set(), set()),
    "skipped": ({"type", "message"}, set(), set()),
    "system-out": (set(), set(), set()),
    "system-err": (set(), set(), set()),
}
SUREFIRE_TIME = re.compile(r"^(([0-9]{0,3},)*[0-9]{3}|[0-9]{0,3})*(\.[0-9]*)?$")


def check_junit_schema(element: ET.Element) -> None:
    allowed, required, children = JUNIT_SCHEMA[element.tag]
    assert set(element.attrib) <= allowed, (element.tag, set(element.attrib) - allowed)
    assert required <= set(element.attrib), (element.tag, required - set(element.attrib))
    if element.tag in ("testsuites", "testsuite") and "time" in element.attrib:
        assert SUREFIRE_TIME.match(element.get("time")), element.get("time")
    for child in element:
        assert child.tag in children, (element.tag, child.tag)
        check_junit_schema(child)


def test_junit_is_valid_and_counts_match(lab):
    root = ET.fromstring(render(lab["report"], "junit").split("\n", 1)[1])
    assert root.tag == "testsuites"
    check_junit_schema(root)
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == ["edgeq.dead", "edgeq.local", "edgeq.rpi"]
    for suite in suites:
        cases = suite.findall("testcase")
        assert int(suite.get("tests")) == len(cases)
        assert int(suite.get("failures")) == sum(c.find("failure") is not None for c in cases)
        assert int(suite.get("errors")) == sum(c.find("error") is not None for c in cases)
        assert int(suite.get("skipped")) == 0
        assert float(suite.get("time")) >= 0
        assert all(c.get("classname") == suite.get("name") for c in cases)
    assert int(root.get("tests")) == 6 and int(root.get("failures")) == 3 and int(root.get("errors")) == 0
    cases = {(c.get("classname"), c.get("name")): c for c in root.iter("testcase")}
    assert cases[("edgeq.local", "digits-tflite-int8")].find("failure").get("type") == "regression"
    assert cases[("edgeq.local", "digits-openvino-fp16")].find("failure").get("type") == "accuracy-gate"
    assert cases[("edgeq.dead", "digits-tflite-int8")].find("failure").get("type") == "run-failed"
    assert cases[("edgeq.rpi", "digits-onnx-fp32")].find("failure") is None


def test_clean_run_passes_with_exit_zero(tmp_path):
    rng = np.random.default_rng(1)
    for directory in ("base", "cur"):
        write(tmp_path / directory, synthetic_result(samples=synthetic_latency_run(rng, 200)))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "cur"), "--baseline", str(tmp_path / "base"),
                                      "--html", str(out / "r.html"), "--junit", str(out / "j.xml")])
    assert result.exit_code == 0, result.output
    assert "PASS: no regressions or failures in 1 result(s)" in result.stderr
    assert (out / "r.html").is_file() and (out / "j.xml").is_file()


def test_cli_exits_non_zero_and_names_the_regression(lab, tmp_path):
    result = CliRunner().invoke(cli, ["report", str(lab["current"]), "--baseline", str(lab["baseline"]),
                                      "--markdown", str(tmp_path / "r.md")])
    assert result.exit_code == EXIT_REGRESSION
    assert "local digits-tflite-int8: latency regressed" in result.stderr
    assert "FAIL" in result.stderr.splitlines()[-1]
    assert (tmp_path / "r.md").read_text().startswith("### edgeq report: FAIL")


def test_cli_prints_markdown_to_stdout_without_outputs(lab):
    result = CliRunner().invoke(cli, ["report", str(lab["current"])])
    assert result.exit_code == EXIT_REGRESSION  # a failed run and a gate failure, even without a baseline
    assert result.stdout.startswith("### edgeq report: FAIL")
    assert "(no baseline)" in result.stdout


def test_min_effect_option_changes_the_verdict(lab, tmp_path):
    result = CliRunner().invoke(cli, ["report", str(lab["current"] / "local__tfliteint8000000.json"),
                                      "--baseline", str(lab["baseline"]), "--min-effect", "0.5",
                                      "--json", str(tmp_path / "report.json")])
    assert result.exit_code == 0, result.stderr


def test_writing_to_a_device_node_writes_through_it(tmp_path):
    """``--json /dev/stdout`` style outputs: the node must stay a node (an atomic rename would replace it)."""
    import stat

    from edgeq.files import write_text_atomic

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        write_text_atomic(fifo, '{"ok": true}')
        assert os.read(reader, 100) == b'{"ok": true}'
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_missing_path_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "nope.json")])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {tmp_path / 'nope.json'}: no such file or directory"
    assert "Traceback" not in result.output


def test_directory_without_results_is_an_error(tmp_path):
    write(tmp_path, {"not": "a result"}, "other.json")
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == f"error: {tmp_path}: no result files found (searched *.json recursively)"
    with pytest.raises(ReportError):
        load_results([])


@pytest.mark.parametrize("content, message", [
    ("{ truncated", "not valid JSON (line 1 column 3"),
    (json.dumps(synthetic_result() | {"schema_version": 7}), "schema_version 7 is not supported (this edgeq reads 1 and 2)"),
    (json.dumps({k: v for k, v in synthetic_result().items() if k != "artifact"}), "artifact: Field required"),
    (json.dumps([1, 2]), "not a result file (top level is list"),
])
def test_broken_result_file_is_one_line_and_a_failed_row(tmp_path, content, message):
    good = write(tmp_path / "results", synthetic_result(samples=np.full(20, 1.0)))
    bad = tmp_path / "results" / "local__broken.json"
    bad.write_text(content, encoding="utf-8")
    out = tmp_path / "j.xml"
    result = CliRunner().invoke(cli, ["report", str(good), str(bad), "--junit", str(out)])
    assert result.exit_code == EXIT_REGRESSION
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {bad}: {message}")
    assert "Traceback" not in result.output
    junit = ET.parse(out).getroot()
    check_junit_schema(junit)
    assert junit.get("tests") == "2" and junit.get("errors") == "1"
    assert junit.find(".//testcase/error").get("type") == "unreadable-result"


def test_unwritable_output_is_a_report_error(lab, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(cli, ["report", str(lab["current"]), "--html", str(blocker / "r.html")])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {blocker / 'r.html'}: cannot write the html report")


def test_results_without_samples_still_compare_by_median(tmp_path):
    base, cur = synthetic_result(samples=np.full(30, 1.0)), synthetic_result(samples=np.full(30, 1.3))
    base["latency_ms"]["samples"] = []
    cur["latency_ms"]["samples"] = []
    write(tmp_path / "b", base)
    write(tmp_path / "c", cur)
    report = create_report([tmp_path / "c"], [tmp_path / "b"])
    verdict = report.rows[0].verdict("latency")
    assert verdict.status == "regressed" and "no samples" in verdict.detail
    assert io.StringIO(render(report, "html")).read().count('class="latency-box regressed"') == 1


def test_report_files_are_readable_by_others_like_any_file_written_under_the_umask(tmp_path):
    from edgeq.files import write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "report.html", "<html/>")
    finally:
        os.umask(old)
    assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o644


# What each runtime's session records as ``execution`` (shapes as edgeq's runner writes them).
EXECUTIONS = {
    "openvino": ({"device": "CPU", "precision": "fp32", "inference_precision_requested": "f32",
                  "inference_precision": "f32", "execution_devices": ["CPU"],
                  "layer_precisions": {"runtime": {"f32": 9, "u8": 4}, "output": {"f32": 13}}},
                 "CPU f32 (layers f32 9 u8 4)"),
    "onnx": ({"providers_used": ["CPUExecutionProvider"], "precision": "fp32"}, "CPUExecutionProvider"),
    "tflite": ({"delegate": {"name": "xnnpack", "delegate_nodes": 2, "nodes": 9}, "precision": "int8"},
               "xnnpack (2/9 nodes)"),
}


def test_every_row_shows_what_ran(tmp_path):
    from edgeq.report.model import what_ran

    for fmt, (execution, shown) in EXECUTIONS.items():
        assert what_ran(execution) == shown
        result = synthetic_result(target=f"t-{fmt}", fmt=fmt, samples=np.full(20, 1.0), energy_j=None)
        result["runtime"]["execution"] = execution
        write(tmp_path, result, f"{fmt}.json")
    assert what_ran({"delegate": {"name": "none", "delegate_nodes": 0, "nodes": 5}}) == "builtin kernels (no delegate)"
    assert what_ran(None) is None and what_ran({"threads": 2}) is None
    report = create_report([tmp_path])
    markdown, html = render(report, "markdown"), render(report, "html")
    for _, shown in EXECUTIONS.values():
        assert f"| {shown} |" in markdown and shown in html
    assert {row.flat()["ran"] for row in report.rows} == {shown for _, shown in EXECUTIONS.values()}


def _as_schema_1(result: dict, model: str) -> dict:
    """The same result as edgeq wrote it before schema 2: one ``artifact.model`` field, no ``failure``."""
    old = json.loads(json.dumps(result))
    old["schema_version"] = 1
    old.pop("failure")
    artifact = old["artifact"]
    artifact.pop("name"), artifact.pop("source_path")
    artifact["model"] = model
    return old


def test_schema_1_baselines_still_match_their_schema_2_results(tmp_path):
    """Nightly baselines written before schema 2 keep working: bench's ``model`` (a source path) and the lab's
    (a LAB.yaml name) both become ``artifact.name``; the path also becomes ``source_path``."""
    rng = np.random.default_rng(7)
    current = synthetic_result(samples=synthetic_latency_run(rng, 200, median_ms=1.0, slowdown=0.3))
    baseline = _as_schema_1(synthetic_result(samples=synthetic_latency_run(rng, 200, median_ms=1.0)),
                            "/old/checkout/models/digits.keras")
    lab_named = _as_schema_1(synthetic_result(target="rpi", samples=np.full(50, 2.0)), "digits")
    failed_v1 = _as_schema_1(synthetic_result(target="dead", status="failed", error="dead: refused"), "digits")
    write(tmp_path / "cur", current)
    write(tmp_path / "base", baseline)
    for data in (lab_named, failed_v1):
        write(tmp_path / "old", data)
    loaded = load_results([tmp_path / "base", tmp_path / "old"])
    assert not loaded.broken
    by_target = {r.target: r.result for r in loaded.records}
    assert by_target["local"].artifact.name == "digits"
    assert by_target["local"].artifact.source_path == "/old/checkout/models/digits.keras"
    assert by_target["rpi"].artifact.name == "digits" and by_target["rpi"].artifact.source_path is None
    assert by_target["dead"].failure is None and by_target["dead"].error == "dead: refused"  # kind not guessed
    report = create_report([tmp_path / "cur"], [tmp_path / "base"])
    (row,) = report.rows
    assert row.baseline is not None and [v.metric for v in row.regressions] == ["latency"]


def test_a_failed_row_says_its_kind(tmp_path):
    write(tmp_path, synthetic_result(target="dead", status="failed", error="dead: connection refused",
                                     failure_kind="connect"))
    report = create_report([tmp_path])
    (row,) = report.rows
    assert row.flat()["failure_kind"] == "connect"
    assert report.problem_lines() == ["dead digits-tflite-int8: run failed (connect): dead: connection refused"]


def test_a_schema_2_failed_result_without_its_failure_is_broken(tmp_path):
    data = synthetic_result(target="dead", status="failed", error="dead: refused")
    data.pop("failure")
    write(tmp_path, data)
    (broken,) = load_results([tmp_path]).broken
    assert "a failed result needs a 'failure'" in broken.error
