"""Hand-made inline SVG charts for the HTML report: no plotting library, no network, no script.

Each chart is a string of well-formed SVG. Chart elements carry classes that tests (and CSS) rely on:
``latency-box`` (one ``<g>`` per benchmarked row), ``point`` / ``pareto`` (accuracy vs latency),
``pareto-front`` (the polyline), ``energy-bar`` (one ``<rect>`` per row with energy) and ``no-sensor``
(one ``<text>`` per row without).
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass

import numpy as np

from edgeq.report.model import Row

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22"]
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")

WIDTH = 880
LABEL_WIDTH = 300
RIGHT_PAD = 90
ROW_HEIGHT = 22


def esc(value) -> str:
    """Text from results, safe inside HTML/SVG text and attribute values (and valid XML)."""
    return html.escape(_XML_INVALID.sub("\ufffd", str(value)), quote=True)


def target_colors(targets: list[str]) -> dict[str, str]:
    return {target: PALETTE[i % len(PALETTE)] for i, target in enumerate(targets)}


class Scale:
    """Maps a data interval onto pixels, linear or logarithmic, with readable ticks."""

    def __init__(self, low: float, high: float, start: float, end: float, log: bool = False):
        if log:
            low, high = max(low, 1e-9), max(high, 1e-9)
        if high <= low:
            pad = abs(low) * 0.1 or 1.0
            low, high = low - pad, high + pad
        self.low, self.high, self.start, self.end, self.log = low, high, start, end, log

    @classmethod
    def fit(cls, values: list[float], start: float, end: float, *, zero: bool = False) -> Scale:
        low, high = min(values), max(values)
        if zero:
            return cls(0.0, high * 1.08 if high > 0 else 1.0, start, end)
        log = low > 0 and high / low > 20
        if log:
            return cls(low / 1.3, high * 1.3, start, end, log=True)
        pad = (high - low) * 0.08 or abs(high) * 0.1 or 1.0
        return cls(max(0.0, low - pad) if low >= 0 else low - pad, high + pad, start, end)

    def __call__(self, value: float) -> float:
        if self.log:
            a, b, v = math.log10(self.low), math.log10(self.high), math.log10(max(value, 1e-9))
        else:
            a, b, v = self.low, self.high, value
        return self.start + (v - a) / (b - a) * (self.end - self.start)

    def ticks(self, count: int = 6) -> list[float]:
        if self.log:
            ticks = []
            for exponent in range(math.floor(math.log10(self.low)), math.ceil(math.log10(self.high)) + 1):
                for mantissa in (1, 2, 5):
                    value = mantissa * 10.0**exponent
                    if self.low <= value <= self.high:
                        ticks.append(value)
            return ticks
        raw = (self.high - self.low) / max(count - 1, 1)
        magnitude = 10.0 ** math.floor(math.log10(raw))
        step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
        first = math.ceil(self.low / step) * step
        return [first + i * step for i in range(int((self.high - first) / step + 1e-9) + 1)]


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def _svg(height: float, body: list[str], title: str) -> str:
    return (f'<svg class="chart" role="img" width="{WIDTH}" height="{height:.0f}" '
            f'viewBox="0 0 {WIDTH} {height:.0f}"><title>{esc(title)}</title>' + "".join(body) + "</svg>")


def _x_axis(scale: Scale, y: float, label: str) -> list[str]:
    parts = [f'<line class="axis" x1="{scale.start:.1f}" y1="{y:.1f}" x2="{scale.end:.1f}" y2="{y:.1f}"/>']
    for tick in scale.ticks():
        x = scale(tick)
        parts.append(f'<line class="grid" x1="{x:.1f}" y1="10" x2="{x:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick" x="{x:.1f}" y="{y + 14:.1f}" text-anchor="middle">{_fmt(tick)}</text>')
    parts.append(f'<text class="axis-label" x="{(scale.start + scale.end) / 2:.1f}" y="{y + 30:.1f}" '
                 f'text-anchor="middle">{esc(label)}{" (log scale)" if scale.log else ""}</text>')
    return parts


def _placeholder(message: str) -> str:
    return _svg(40, [f'<text class="empty" x="10" y="25">{esc(message)}</text>'], message)


def latency_chart(rows: list[Row], colors: dict[str, str]) -> str:
    """Box plot of per-inference latency, one box per benchmarked target x artifact.

    Box: quartiles; line: median; whiskers: 1st to 99th percentile; hollow diamond: the baseline's median.
    """
    boxes = []
    for row in rows:
        if row.record is None or not row.record.ok or row.record.result.latency_ms is None:
            continue
        samples = row.record.latency_samples()
        lat = row.record.result.latency_ms
        if len(samples):
            p1, q1, q2, q3, p99 = np.percentile(samples, [1, 25, 50, 75, 99])
        else:  # no samples kept: median and p99 only
            p1 = q1 = q2 = q3 = lat.p50
            p99 = lat.p99 if lat.p99 is not None else lat.p50
        base = None
        if row.baseline is not None and row.baseline.ok and row.baseline.result.latency_ms is not None:
            base_samples = row.baseline.latency_samples()
            base = float(np.median(base_samples)) if len(base_samples) else row.baseline.result.latency_ms.p50
        boxes.append((row, [float(v) for v in (p1, q1, q2, q3, p99)], base, len(samples)))
    if not boxes:
        return _placeholder("no latency measurements")
    values = [v for _, stats, base, _ in boxes for v in stats + ([base] if base else [])]
    top = 12
    axis_y = top + ROW_HEIGHT * len(boxes) + 4
    scale = Scale.fit(values, LABEL_WIDTH, WIDTH - RIGHT_PAD)
    body = _x_axis(scale, axis_y, "latency per inference (ms)")
    for i, (row, (p1, q1, q2, q3, p99), base, count) in enumerate(boxes):
        y = top + i * ROW_HEIGHT + ROW_HEIGHT / 2
        color = colors.get(row.target, PALETTE[0])
        regressed = row.verdict("latency") is not None and row.verdict("latency").regressed
        tooltip = (f"{row.target} {row.label}: median {q2:.4g} ms, quartiles {q1:.4g}-{q3:.4g} ms, "
                   f"p1-p99 {p1:.4g}-{p99:.4g} ms, {count} samples")
        if base is not None:
            tooltip += f", baseline median {base:.4g} ms"
        css = "latency-box regressed" if regressed else "latency-box"
        body.append(f'<g class="{css}"><title>{esc(tooltip)}</title>')
        body.append(f'<text class="row-label" x="{LABEL_WIDTH - 8}" y="{y + 4:.1f}" text-anchor="end">'
                    f'{esc(row.target)} · {esc(row.label)}</text>')
        body.append(f'<line class="whisker" x1="{scale(p1):.1f}" y1="{y:.1f}" x2="{scale(p99):.1f}" y2="{y:.1f}" '
                    f'stroke="{color}"/>')
        body.append(f'<rect class="box" x="{scale(q1):.1f}" y="{y - 7:.1f}" '
                    f'width="{max(scale(q3) - scale(q1), 1.5):.1f}" height="14" fill="{color}" '
                    f'fill-opacity="0.35" stroke="{color}"/>')
        body.append(f'<line class="median" x1="{scale(q2):.1f}" y1="{y - 8:.1f}" x2="{scale(q2):.1f}" '
                    f'y2="{y + 8:.1f}" stroke="{color}" stroke-width="2.5"/>')
        if base is not None:
            bx = scale(base)
            body.append(f'<path class="baseline-marker" d="M{bx:.1f},{y - 6:.1f} L{bx + 5:.1f},{y:.1f} '
                        f'L{bx:.1f},{y + 6:.1f} L{bx - 5:.1f},{y:.1f} Z"/>')
        body.append(f'<text class="value" x="{scale(p99) + 6:.1f}" y="{y + 4:.1f}">{q2:.3g} ms'
                    f'{" ▲" if regressed else ""}</text></g>')
    return _svg(axis_y + 40, body, "latency distribution per target and artifact")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both latency (lower) and accuracy (higher)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def accuracy_latency_chart(rows: list[Row], colors: dict[str, str]) -> str:
    """Top-1 accuracy against median latency; the Pareto front (fastest for its accuracy) is drawn and labelled."""
    points = []
    for row in rows:
        if row.record is None or not row.record.ok:
            continue
        result = row.record.result
        if result.latency_ms is None or result.accuracy is None or result.accuracy.top1 is None:
            continue
        points.append(ScatterPoint(f"{row.target} · {row.label}", result.latency_ms.p50, result.accuracy.top1 * 100.0,
                                   colors.get(row.target, PALETTE[0]), f"{row.target} {row.label}"))
    if not points:
        return _placeholder("no results with both accuracy and latency")
    return scatter_chart(points, "median latency (ms)", "top-1 accuracy (%)", "top-1 accuracy against median latency",
                         y_unit="top-1 ", y_suffix="%")


@dataclass
class ScatterPoint:
    label: str  # shown beside the point when it is on the Pareto front
    x: float  # lower is better (latency)
    y: float  # higher is better (accuracy, agreement)
    color: str
    tooltip: str
    highlight: bool = False  # drawn as a ring (the chosen point)


def scatter_chart(points: list[ScatterPoint], x_label: str, y_label: str, title: str, *, y_unit: str = "",
                  y_suffix: str = "") -> str:
    """y (higher better) against x (lower better); the Pareto front is drawn as a staircase and labelled."""
    height, left, bottom, top = 360, 70, 300, 14
    xs = Scale.fit([p.x for p in points], left, WIDTH - 40)
    ys = Scale.fit([p.y for p in points], bottom, top)
    body = _x_axis(xs, bottom, x_label)
    body.append(f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{bottom}"/>')
    for tick in ys.ticks(5):
        y = ys(tick)
        body.append(f'<line class="grid" x1="{left}" y1="{y:.1f}" x2="{WIDTH - 40}" y2="{y:.1f}"/>')
        body.append(f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(tick)}</text>')
    body.append(f'<text class="axis-label" x="16" y="{(top + bottom) / 2:.0f}" text-anchor="middle" '
                f'transform="rotate(-90 16 {(top + bottom) / 2:.0f})">{esc(y_label)}</text>')
    front = pareto_front([(p.x, p.y) for p in points])
    if len(front) > 1:
        # A staircase: between two front points the better y is only reached at the larger x.
        coords = []
        for a, b in zip(front, front[1:], strict=False):
            coords += [(xs(points[a].x), ys(points[a].y)), (xs(points[b].x), ys(points[a].y))]
        coords.append((xs(points[front[-1]].x), ys(points[front[-1]].y)))
        line = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
        # fill="none" on the element too: the chart must not turn into a filled wedge where the page's CSS
        # is missing (an SVG copied out of the report, a mail client stripping <style>).
        body.append(f'<polyline class="pareto-front" fill="none" stroke="#111" points="{line}"/>')
    front_set = set(front)
    for i, point in enumerate(points):
        on_front = i in front_set
        css = "point pareto" if on_front else "point"
        tooltip = (f"{point.tooltip}: {point.x:.4g} ms, {y_unit}{point.y:.4g}{y_suffix}"
                   f"{' (Pareto front)' if on_front else ''}")
        cx, cy = xs(point.x), ys(point.y)
        if point.highlight:
            body.append(f'<circle class="chosen" cx="{cx:.1f}" cy="{cy:.1f}" r="10" fill="none" '
                        f'stroke="#111" stroke-width="2"/>')
        body.append(f'<circle class="{css}" cx="{cx:.1f}" cy="{cy:.1f}" r="{6 if on_front else 4.5}" '
                    f'fill="{point.color}"><title>{esc(tooltip)}</title></circle>')
        if on_front or point.highlight:
            # Labels right of points in the left half, left of them in the right half: never cut off.
            anchor, dx = ("end", -8) if cx > WIDTH / 2 else ("start", 8)
            body.append(f'<text class="point-label" x="{cx + dx:.1f}" y="{cy - 7:.1f}" '
                        f'text-anchor="{anchor}">{esc(point.label)}</text>')
    return _svg(height, body, title)


def energy_chart(rows: list[Row], colors: dict[str, str]) -> str:
    """Energy per inference (mJ), one bar per benchmarked row; rows without a sensor say why instead of 0."""
    entries = [row for row in rows if row.record is not None and row.record.ok]
    if not entries:
        return _placeholder("no successful runs")
    values = [row.record.result.energy_j_per_inference * 1e3 for row in entries
              if row.record.result.energy_j_per_inference is not None]
    top = 12
    axis_y = top + ROW_HEIGHT * len(entries) + 4
    scale = Scale.fit(values or [1.0], LABEL_WIDTH, WIDTH - RIGHT_PAD, zero=True)
    body = _x_axis(scale, axis_y, "energy per inference (mJ)") if values else []
    for i, row in enumerate(entries):
        y = top + i * ROW_HEIGHT + ROW_HEIGHT / 2
        body.append(f'<text class="row-label" x="{LABEL_WIDTH - 8}" y="{y + 4:.1f}" text-anchor="end">'
                    f'{esc(row.target)} · {esc(row.label)}</text>')
        energy = row.record.result.energy_j_per_inference
        if energy is None:
            body.append(f'<text class="no-sensor" x="{LABEL_WIDTH + 4}" y="{y + 4:.1f}">{esc(row.energy_note())}</text>')
            continue
        mj = energy * 1e3
        color = colors.get(row.target, PALETTE[0])
        regressed = row.verdict("energy") is not None and row.verdict("energy").regressed
        per_joule = f", {1.0 / energy:.4g} inferences/J" if energy > 0 else ""
        body.append(f'<rect class="energy-bar{" regressed" if regressed else ""}" x="{scale.start:.1f}" '
                    f'y="{y - 7:.1f}" width="{max(scale(mj) - scale.start, 1.0):.1f}" height="14" fill="{color}">'
                    f'<title>{esc(f"{row.target} {row.label}: {mj:.4g} mJ per inference{per_joule}")}</title></rect>')
        body.append(f'<text class="value" x="{scale(mj) + 6:.1f}" y="{y + 4:.1f}">{mj:.3g} mJ</text>')
    return _svg(axis_y + (40 if values else 4), body, "energy per inference")
