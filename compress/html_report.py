"""The human report as one self-contained HTML file: inline CSS and inline SVG charts,
no scripts, no external requests (it opens the same on an air-gapped machine)."""

from __future__ import annotations

import html
import math
from typing import Any, Sequence

from compress.report import gate_line, stage_table

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1d2330;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #dde2ea;padding-bottom:.3rem}
.meta{color:#5b6575;font-size:.9rem}.badge{display:inline-block;padding:.25rem .7rem;border-radius:1rem;font-weight:600;color:#fff}
.pass{background:#1f8f4e}.fail{background:#c62f2f}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}th,td{padding:.3rem .6rem;border-bottom:1px solid #e6e9ef;text-align:right}
th{background:#f4f6f9}td:first-child,th:first-child{text-align:left}
ul.gates{list-style:none;padding:0}ul.gates li{margin:.2rem 0;font-family:ui-monospace,monospace;font-size:.85rem}
li.ok::before{content:"\\2713  ";color:#1f8f4e}li.bad::before{content:"\\2717  ";color:#c62f2f}
.charts{display:flex;flex-wrap:wrap;gap:1.5rem}.chart{flex:1 1 480px}
svg text{font-family:system-ui,sans-serif;font-size:11px;fill:#1d2330}
"""

PALETTE = ["#3b6fd8", "#e07b28", "#1f8f4e", "#9b4fd1", "#c62f2f", "#2aa7b8"]


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def scatter_svg(points: Sequence[tuple[str, float, float]], x_label: str, y_label: str, width: int = 520, height: int = 300) -> str:
    """Labelled points joined in order (stages), log-scaled x (sizes span decades)."""
    if not points:
        return "<p>nothing measured</p>"
    left, right, top, bottom = 60, 90, 15, 40
    xs = [math.log10(max(p[1], 1)) for p in points]
    ys = [p[2] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 - x0 < 1e-9:
        x0, x1 = x0 - 0.5, x1 + 0.5
    pad = max((y1 - y0) * 0.15, 0.005)
    y0, y1 = y0 - pad, y1 + pad

    def px(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * (width - left - right)

    def py(v: float) -> float:
        return top + (y1 - v) / (y1 - y0) * (height - top - bottom)

    parts = [f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" aria-label="{_esc(y_label)} against {_esc(x_label)}">']
    parts.append(f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" fill="#fafbfc" stroke="#dde2ea"/>')
    for i in range(5):
        v = y0 + (y1 - y0) * i / 4
        parts.append(f'<text x="{left - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{v:.3f}</text>')
    for d in range(math.floor(x0), math.ceil(x1) + 1):
        if x0 - 1e-9 <= d <= x1 + 1e-9:
            parts.append(f'<text x="{px(d):.1f}" y="{height - bottom + 16}" text-anchor="middle">{_fmt_bytes(10**d)}</text>')
    path = " ".join(f"{'M' if i == 0 else 'L'}{px(x):.1f},{py(y):.1f}" for i, (x, y) in enumerate(zip(xs, ys)))
    parts.append(f'<path d="{path}" fill="none" stroke="#9aa6b8" stroke-dasharray="4 3"/>')
    placed: list[tuple[float, float]] = []
    for i, ((name, _, _), x, y) in enumerate(zip(points, xs, ys)):
        color = PALETTE[i % len(PALETTE)]
        cx, cy = px(x), py(y)
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="{color}"/>')
        # stages that land on the same spot (e.g. export after compress) get stacked labels
        ly = cy - 7
        while any(abs(ly - py_) < 12 and abs(cx - px_) < 60 for px_, py_ in placed):
            ly -= 12
        placed.append((cx, ly))
        parts.append(f'<text x="{cx + 7:.1f}" y="{ly:.1f}" fill="{color}">{_esc(name)}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle">{_esc(x_label)} (log scale)</text>')
    parts.append(f'<text x="14" y="{(top + height - bottom) / 2}" transform="rotate(-90 14 {(top + height - bottom) / 2})" text-anchor="middle">{_esc(y_label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def hbar_svg(items: Sequence[tuple[str, float]], max_value: float, fmt: str, width: int = 520, color: str = "#3b6fd8") -> str:
    """Horizontal bars, one per layer."""
    if not items:
        return "<p>no layers</p>"
    row, label_w = 20, 170
    height = row * len(items) + 10
    parts = [f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">']
    for i, (name, value) in enumerate(items):
        y = 5 + i * row
        w = 0 if max_value <= 0 else (width - label_w - 60) * min(value / max_value, 1)
        parts.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end">{_esc(name[-28:])}</text>')
        parts.append(f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{row - 6}" fill="{color}" rx="2"/>')
        parts.append(f'<text x="{label_w + w + 5:.1f}" y="{y + 13}">{fmt.format(value)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def histogram_svg(samples: Sequence[float], width: int = 520, height: int = 220, bins: int = 30) -> str:
    """Latency distribution with p50 / p90 / p99 marks."""
    if not samples:
        return "<p>no latency measured (add an export stage)</p>"
    s = sorted(samples)
    lo, hi = s[0], s[int(0.995 * (len(s) - 1))]  # clip the far tail so the body is visible
    hi = hi if hi > lo else lo + 1e-6
    counts = [0] * bins
    for v in s:
        counts[min(int((min(v, hi) - lo) / (hi - lo) * bins), bins - 1)] += 1
    left, right, top, bottom = 40, 20, 15, 35
    bw = (width - left - right) / bins
    cmax = max(counts)
    parts = [f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" aria-label="latency histogram">']
    for i, c in enumerate(counts):
        h = (height - top - bottom) * c / cmax
        parts.append(f'<rect x="{left + i * bw:.1f}" y="{height - bottom - h:.1f}" width="{bw - 1:.1f}" height="{h:.1f}" fill="#2aa7b8"/>')
    for k, (q, color) in enumerate(((0.5, "#1f8f4e"), (0.9, "#e07b28"), (0.99, "#c62f2f"))):
        v = s[int(q * (len(s) - 1))]
        x = left + (min(v, hi) - lo) / (hi - lo) * (width - left - right)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{height - bottom}" stroke="{color}" stroke-width="2"/>')
        anchor, dx = ("end", -4) if x > width * 0.7 else ("start", 4)
        parts.append(f'<text x="{x + dx:.1f}" y="{top + 10 + 13 * k}" fill="{color}" text-anchor="{anchor}">p{int(q * 100)} {v:.3f} ms</text>')
    parts.append(f'<text x="{left}" y="{height - bottom + 15}">{lo:.3f} ms</text>')
    parts.append(f'<text x="{width - right}" y="{height - bottom + 15}" text-anchor="end">{hi:.3f} ms</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 5}" text-anchor="middle">latency of one sample (ms), {len(s)} runs</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: dict[str, Any]) -> str:
    stages = report["stages"]
    metric = "accuracy" if all("accuracy" in s for s in stages) else "cosine"
    # a non-finite measurement is null in report.json: no point for it
    points = [(s["stage"], s.get("final_size_bytes") or s["size_bytes"], s[metric]) for s in stages if s.get(metric) is not None]
    layers = report.get("layers", [])
    samples = next(
        (s["metrics"].get("latency_ms_samples", []) for s in reversed(stages) if "metrics" in s and "latency_ms_samples" in s.get("metrics", {})),
        [],
    )
    checks, seen = [], set()
    for g in report["gates"] + report.get("checks", []):
        line = gate_line(g)
        if line not in seen:
            seen.add(line)
            checks.append(f'<li class="{"ok" if g["passed"] else "bad"}">{_esc(line)}</li>')
    passed = report["passed"]
    artifacts = "".join(f"<li><code>{_esc(k)}</code>: <code>{_esc(v)}</code></li>" for k, v in report["artifacts"].items())
    layer_rows = [["layer", "shape", "params", "nonzeros", "sparsity", "bits"]] + [
        [l["name"], "x".join(map(str, l["shape"])), f"{l['parameters']:,}", f"{l['nonzeros']:,}", f"{l['sparsity']:.1%}", str(l["bits"])]
        for l in layers
    ]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>compress report: {_esc(report['recipe'])}</title><style>{CSS}</style></head>
<body>
<h1>compress report: {_esc(report['recipe'])} <span class="badge {'pass' if passed else 'fail'}">{'PASSED' if passed else 'FAILED'}</span></h1>
<p class="meta">Model <code>{_esc(report['model'])}</code> ({_esc(report['model_kind'])}) · compress {_esc(report['compress_version'])} ·
{report['wall_seconds']:.1f} s · torch {_esc(report['environment']['torch'])} · {_esc(report['environment']['platform'])}</p>
<h2>Gates and checks</h2>
<ul class="gates">{''.join(checks) or '<li>no gates configured</li>'}</ul>
<h2>Stages</h2>
{_table(stage_table(stages))}
<div class="charts">
<div class="chart"><h2>{metric.capitalize()} against size</h2>{scatter_svg(points, 'size', metric)}</div>
<div class="chart"><h2>Latency distribution (onnxruntime)</h2>{histogram_svg(samples)}</div>
<div class="chart"><h2>Sparsity per layer</h2>{hbar_svg([(l['name'], l['sparsity']) for l in layers], 1.0, '{:.1%}', color='#e07b28')}</div>
<div class="chart"><h2>Bits per weight, per layer</h2>{hbar_svg([(l['name'], float(l['bits'])) for l in layers], 32.0, '{:g}', color='#9b4fd1')}</div>
</div>
<h2>Layers of the final model</h2>
{_table(layer_rows)}
<h2>Artifacts</h2>
<ul>{artifacts}</ul>
</body></html>
"""
