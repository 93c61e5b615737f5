"""JUnit XML: one test case per target x artifact, so CI systems show failures natively.

Layout (the common Jenkins/Surefire schema, junit-10.xsd of the Jenkins xunit plugin): ``<testsuites>``
(``tests``/``failures``/``errors``/``time``) with one ``<testsuite name="edgeq.<target>">`` per target, each
with ``tests``/``failures``/``errors``/``skipped``/``time``/``timestamp`` and the environment as properties; a ``<testcase
classname="edgeq.<target>" name="<model>-<format>-<precision>">`` per result. A failed run, an accuracy-gate
failure or a regression is a ``<failure>``; an unreadable result file is an ``<error>``.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from edgeq.report.model import Report, Row

_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _text(value) -> str:
    return _XML_INVALID.sub("\ufffd", str(value))


def _safe_name(value: str) -> str:
    # Dots separate packages in CI UIs: keep a target named "rpi4.lab" from becoming two levels.
    return re.sub(r"[^A-Za-z0-9_-]", "_", value)


def _case_names(rows: list[Row]) -> list[str]:
    """``model-format-precision``, with the artifact id appended where two rows of one target collide."""
    names = [row.label for row in rows]
    seen: dict[tuple[str, str], int] = {}
    for row, name in zip(rows, names, strict=True):
        seen[(row.target, name)] = seen.get((row.target, name), 0) + 1
    out = []
    for row, name in zip(rows, names, strict=True):
        if seen[(row.target, name)] > 1 and row.record is not None and row.record.result.artifact.id:
            name = f"{name}-{row.record.result.artifact.id}"
        out.append(name)
    return out


def _summary_line(row: Row) -> str:
    flat = row.flat()
    bits = []
    if flat["p50_ms"] is not None:
        p99 = "?" if flat["p99_ms"] is None else format(flat["p99_ms"], ".4g")
        bits.append(f"p50 {flat['p50_ms']:.4g} ms, p99 {p99} ms")
    if flat["top1"] is not None:
        bits.append(f"top-1 {flat['top1'] * 100:.2f}%")
    if flat["energy_mj"] is not None:
        bits.append(f"{flat['energy_mj']:.4g} mJ/inference")
    elif row.status == "ok":
        bits.append(row.energy_note())
    bits += [v.detail for v in row.verdicts if v.status != "not-compared"]
    return "; ".join(bits)


def render_junit(report: Report) -> str:
    """The report as a JUnit XML document."""
    root = ET.Element("testsuites", name=_text(report.title))
    names = _case_names(report.rows)
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    total_time = 0.0
    for target in report.targets():
        rows = [(row, name) for row, name in zip(report.rows, names, strict=True) if row.target == target]
        suite = ET.SubElement(root, "testsuite", name=f"edgeq.{_safe_name(target)}")
        env = next((row.record.result.env for row, _ in rows if row.record is not None), {})
        if env:
            properties = ET.SubElement(suite, "properties")
            for key, value in env.items():
                ET.SubElement(properties, "property", name=_text(f"env.{key}"), value=_text(value))
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        suite_time = 0.0
        for row, name in rows:
            duration = row.record.result.duration_s if row.record is not None else None
            duration = duration or 0.0
            case = ET.SubElement(suite, "testcase", classname=f"edgeq.{_safe_name(target)}", name=_text(name),
                                 time=f"{duration:.3f}")
            counts["tests"] += 1
            suite_time += duration
            problems = row.problems()
            if row.status == "broken":
                counts["errors"] += 1
                error = ET.SubElement(case, "error", message=_text(problems[0]), type="unreadable-result")
                error.text = _text(problems[0])
            elif problems:
                counts["failures"] += 1
                kind = ("run-failed" if row.status == "failed" else "regression" if row.regressions
                        else "accuracy-gate")
                failure = ET.SubElement(case, "failure", message=_text("; ".join(problems)), type=kind)
                failure.text = _text("\n".join(problems))
            summary = _summary_line(row)
            if summary:
                ET.SubElement(case, "system-out").text = _text(summary)
        suite.set("tests", str(counts["tests"]))
        suite.set("failures", str(counts["failures"]))
        suite.set("errors", str(counts["errors"]))
        suite.set("skipped", str(counts["skipped"]))
        suite.set("time", f"{suite_time:.3f}")
        suite.set("timestamp", report.generated_at.replace("+00:00", ""))
        for key in totals:
            totals[key] += counts[key]
        total_time += suite_time
    # The Jenkins/Surefire schema (junit-10.xsd) has no 'skipped' on <testsuites>; the suites carry it.
    for key in ("tests", "failures", "errors"):
        root.set(key, str(totals[key]))
    root.set("time", f"{total_time:.3f}")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
