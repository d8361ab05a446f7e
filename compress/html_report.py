"""The human reports as self-contained HTML files: inline CSS and inline SVG charts drawn with
matplotlib (Agg backend, imported only when a report is rendered), no scripts, no external
requests (a page opens the same on an air-gapped machine).

``render_html`` is the report of one pipeline run; ``render_tune_html`` the report of a
``compress tune`` search (the size/accuracy trade-off of every candidate).
"""

from __future__ import annotations

import html
import io
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from compress.report import format_gate_distance, format_gate_value, gate_line, stage_table, stage_table_note

if TYPE_CHECKING:
    from matplotlib.transforms import Bbox

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1d2330;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #dde2ea;padding-bottom:.3rem}
.meta{color:#5b6575;font-size:.9rem}.badge{display:inline-block;padding:.25rem .7rem;border-radius:1rem;font-weight:600;color:#fff}
.pass{background:#1f8f4e}.fail{background:#c62f2f}
.headline{font-size:1.35rem;font-weight:600;margin:.8rem 0;padding:.6rem 1rem;background:#f4f6f9;border-left:4px solid #3b6fd8}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}th,td{padding:.3rem .6rem;border-bottom:1px solid #e6e9ef;text-align:right}
th{background:#f4f6f9}td:first-child,th:first-child{text-align:left}
ul.gates{list-style:none;padding:0}ul.gates li{margin:.2rem 0;font-family:ui-monospace,monospace;font-size:.85rem}
li.ok::before{content:"\\2713  ";color:#1f8f4e}li.bad::before{content:"\\2717  ";color:#c62f2f}
.charts{display:flex;flex-wrap:wrap;gap:1.5rem}.chart{flex:1 1 480px}.chart svg{max-width:100%;height:auto}
tr.chosen td{background:#eaf6ee;font-weight:600}
"""

PALETTE = ["#3b6fd8", "#e07b28", "#1f8f4e", "#9b4fd1", "#c62f2f", "#2aa7b8"]
WIDTH_IN, DPI = 5.4, 96


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} GB"


# ----------------------------------------------------------------------------- matplotlib plumbing


def _pyplot():
    """matplotlib's pyplot on the Agg backend (no display, no GUI toolkit), imported lazily."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _figure(height_in: float = 3.2, left_in: float = 0.75, bottom_in: float = 0.5, width_in: float = WIDTH_IN):
    """A figure with fixed margins (in inches): no layout pass, so the label placement below
    measures the final geometry and nothing is drawn twice (reports are rendered on every run)."""
    plt = _pyplot()
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(width_in, height_in), dpi=DPI)
    fig.subplots_adjust(
        left=left_in / width_in, right=1 - 0.15 / width_in, bottom=bottom_in / height_in, top=1 - 0.12 / height_in
    )
    return fig, ax


_RC = {
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e6e9ef",
    "grid.linewidth": 0.8,
    "axes.edgecolor": "#9aa6b8",
    "svg.fonttype": "none",
    "svg.hashsalt": "compress",  # text stays text; ids are stable across runs
}


def _svg(fig, label: str) -> str:
    """The figure as an inline ``<svg>`` element: no XML prolog, no metadata, no external links."""
    plt = _pyplot()
    buf = io.StringIO()
    with plt.rc_context(_RC):
        fig.savefig(buf, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.DOTALL)
    text = text.replace(' xmlns:xlink="http://www.w3.org/1999/xlink"', "").replace("xlink:href", "href")
    return text.replace("<svg ", f'<svg role="img" aria-label="{_esc(label)}" ', 1)


def _merge_labels(
    points: Sequence[tuple[str, float, float]], ax, min_px: float = 14.0
) -> list[tuple[str, float, float]]:
    """Points that land (nearly) on the same spot share one label ("compress, export")."""
    merged: list[tuple[list[str], float, float, tuple[float, float]]] = []
    for name, x, y in points:
        px = ax.transData.transform((x, y))
        for group in merged:
            if math.dist(group[3], px) < min_px:
                group[0].append(name)
                break
        else:
            merged.append(([name], x, y, tuple(px)))
    return [(", ".join(names), x, y) for names, x, y, _ in merged]


def _place_labels(ax, labelled: Sequence[tuple[str, float, float, str]]) -> None:
    """Annotate points with offsets chosen so labels avoid each other and stay inside the axes."""
    renderer = ax.figure.canvas.get_renderer()
    axbox = ax.get_window_extent(renderer)
    placed: list[Bbox] = []
    offsets = [(6, 6), (6, -12), (-6, 6), (-6, -12), (6, 16), (-6, 16), (6, -22), (-6, -22), (10, 26), (10, -32)]
    for text, x, y, color in labelled:
        for dx, dy in offsets:
            ann = ax.annotate(
                text,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                color=color,
                fontsize=8,
                ha="left" if dx > 0 else "right",
                va="bottom" if dy > 0 else "top",
            )
            box = ann.get_window_extent(renderer)
            inside = axbox.x0 <= box.x0 and box.x1 <= axbox.x1 and axbox.y0 <= box.y0 and box.y1 <= axbox.y1
            if inside and not any(box.overlaps(b) for b in placed):
                placed.append(box)
                break
            ann.remove()
        else:
            ann = ax.annotate(text, (x, y), xytext=(6, 6), textcoords="offset points", color=color, fontsize=8)
            placed.append(ann.get_window_extent(renderer))


def _log_ticks(lo: float, hi: float, max_ticks: int = 6) -> list[float]:
    """The densest 1-2-5-style set of log ticks inside [lo, hi] with at most ``max_ticks`` ticks
    (a log axis over less than a decade otherwise gets a single tick, or a crowd)."""
    best: list[float] = []
    for subs in ((1,), (1, 3), (1, 2, 5), (1, 1.5, 2, 3, 5, 7), (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8)):
        ticks = [m * 10**e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in subs]
        ticks = [t for t in ticks if lo <= t <= hi]
        if len(ticks) <= max_ticks and len(ticks) >= len(best):
            best = ticks
    if len(best) < 2:  # a very narrow range: evenly spaced round values
        import numpy as np

        best = [float(f"{v:.2g}") for v in np.geomspace(lo, hi, 4)[1:-1]]
    return best


def _log_size_axis(ax, values: Sequence[float]) -> None:
    """Log-scaled byte axis with readable ticks, however narrow the range."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    lo, hi = min(values) / 1.25, max(values) * 1.25
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.xaxis.set_major_locator(FixedLocator(_log_ticks(lo, hi)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt_bytes(v)))
    ax.xaxis.set_minor_locator(NullLocator())


def _metric_axis(ax, metric: str) -> None:
    from matplotlib.ticker import FuncFormatter

    if metric in ("accuracy", "agreement"):
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.1%}"))
    ax.set_ylabel(metric)


# ----------------------------------------------------------------------------- charts


def scatter_svg(points: Sequence[tuple[str, float, float]], x_label: str, y_label: str) -> str:
    """Stages as labelled points joined in pipeline order: metric against size (log scale)."""
    if not points:
        return "<p>nothing measured</p>"
    fig, ax = _figure()
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    ax.plot(xs, ys, color="#9aa6b8", linestyle="--", linewidth=1, zorder=1)
    for i, (_, x, y) in enumerate(points):
        ax.scatter([x], [y], s=36, color=PALETTE[i % len(PALETTE)], zorder=3)
    _log_size_axis(ax, xs)
    pad = max((max(ys) - min(ys)) * 0.2, 0.004)
    ax.set_ylim(min(ys) - pad, max(ys) + pad)
    _metric_axis(ax, y_label)
    ax.set_xlabel(f"{x_label} (log scale)")
    colors = {name: PALETTE[i % len(PALETTE)] for i, (name, _, _) in enumerate(points)}
    merged = _merge_labels(points, ax)
    _place_labels(ax, [(t, x, y, colors[t.split(", ")[0]]) for t, x, y in merged])
    return _svg(fig, f"{y_label} against {x_label}")


def histogram_svg(samples: Sequence[float], bins: int = 30) -> str:
    """Latency distribution with p50 / p90 / p99 marks. The axis ends at a robust upper bound
    (upper quartile + 3 IQR, at least the p90), so one slow run cannot squeeze the body;
    slower runs are counted in the axis label and a p99 beyond the axis is named in the legend."""
    if not samples:
        return "<p>no latency measured (add an export stage)</p>"
    import numpy as np

    s = np.sort(np.asarray(samples, dtype=float))
    p25, p50, p75, p90, p99 = (float(np.percentile(s, q)) for q in (25, 50, 75, 90, 99))
    lo = float(s[0])
    hi = min(float(s[-1]), max(p75 + 3 * (p75 - p25), p90 * 1.02))
    hi = hi if hi > lo else lo + max(lo * 0.01, 1e-6)
    shown = s[s <= hi]
    fig, ax = _figure(2.8)
    ax.hist(shown, bins=bins, range=(lo, hi), color="#2aa7b8", edgecolor="white", linewidth=0.5)
    for v, name, color, style in (
        (p50, "p50", "#1f8f4e", "-"),
        (p90, "p90", "#e07b28", "--"),
        (p99, "p99", "#c62f2f", ":"),
    ):
        if v <= hi:
            ax.axvline(v, color=color, linestyle=style, linewidth=1.6, label=f"{name} {v:.3f} ms")
        else:
            ax.plot([], [], color=color, linestyle=style, label=f"{name} {v:.3f} ms (beyond the axis)")
    ax.set_xlim(lo - (hi - lo) * 0.02, hi + (hi - lo) * 0.02)
    ax.legend(loc="upper right", frameon=True, framealpha=0.95, fontsize=8)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.45)  # head room: the legend sits above the bars
    slower = len(s) - len(shown)
    note = f"; {slower} slower (up to {s[-1]:.3f} ms) not drawn" if slower else ""
    ax.set_xlabel(f"latency of one sample (ms), {len(s)} runs{note}")
    ax.set_ylabel("runs")
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return _svg(fig, "latency histogram")


def hbar_svg(
    items: Sequence[tuple[str, float]], max_value: float, fmt: str, color: str = "#3b6fd8", x_label: str = ""
) -> str:
    """Horizontal bars, one per layer, value written at the end of each bar."""
    if not items:
        return "<p>no layers</p>"
    names = [n[-32:] for n, _ in items][::-1]
    fig, ax = _figure(0.75 + 0.28 * len(items), left_in=0.25 + 0.065 * max(len(n) for n in names))
    values = [v for _, v in items][::-1]
    bars = ax.barh(names, values, color=color, height=0.6)
    ax.set_xlim(0, max_value * 1.15)
    for bar, v in zip(bars, values):
        ax.text(
            bar.get_width() + max_value * 0.01,
            bar.get_y() + bar.get_height() / 2,
            fmt.format(v),
            va="center",
            fontsize=8,
        )
    ax.grid(axis="y", visible=False)
    ax.set_xlabel(x_label)
    return _svg(fig, x_label or "per layer")


def tradeoff_svg(report: dict[str, Any]) -> str:
    """Every candidate of a search: objective against fidelity, the Pareto front (no candidate is
    both smaller and more faithful), the uniform-bits baselines, the gate and the chosen point."""
    objective = report["objective"]
    cands = [c for c in report["candidates"] if c.get("error") is None and objective in c["metrics"]]
    metric = "accuracy" if all("accuracy" in c["metrics"] for c in cands) else "cosine"
    cands = [c for c in cands if metric in c["metrics"]]
    if not cands:
        return "<p>no candidate was measured</p>"
    fig, ax = _figure(4.2, width_in=9.0)
    xs = [c["metrics"][objective] for c in cands]
    ys = [c["metrics"][metric] for c in cands]
    search = [c for c in cands if c["kind"] != "baseline"]
    for passed, marker_face, label in ((True, "#3b6fd8", "candidate (passes)"), (False, "none", "candidate (fails)")):
        group = [c for c in search if c["passed"] == passed]
        if group:
            ax.scatter(
                [c["metrics"][objective] for c in group],
                [c["metrics"][metric] for c in group],
                s=28,
                facecolors=marker_face,
                edgecolors="#3b6fd8",
                label=label,
                zorder=3,
            )
    base = [c for c in cands if c["kind"] == "baseline"]
    if base:
        ax.scatter(
            [c["metrics"][objective] for c in base],
            [c["metrics"][metric] for c in base],
            marker="s",
            s=34,
            facecolors=["#e07b28" if c["passed"] else "none" for c in base],
            edgecolors="#e07b28",
            label="uniform bits",
            zorder=4,
        )
    front = _pareto(cands, objective, metric)
    if len(front) > 1:
        ax.step(
            [c["metrics"][objective] for c in front],
            [c["metrics"][metric] for c in front],
            where="post",
            color="#1f8f4e",
            linewidth=1.2,
            label="Pareto front",
            zorder=2,
        )
    limit = _metric_limit(report, metric, cands)
    if limit is not None:
        ax.axhline(
            limit, color="#c62f2f", linestyle="--", linewidth=1, label=f"gate: {metric} ≥ {_fmt_metric(limit, metric)}"
        )
    chosen = report.get("chosen")
    if chosen and objective in chosen["metrics"]:
        ax.scatter(
            [chosen["metrics"][objective]],
            [chosen["metrics"][metric]],
            marker="*",
            s=220,
            color="#c62f2f",
            edgecolors="white",
            linewidths=0.8,
            label="chosen",
            zorder=5,
        )
    if objective == "latency":
        ax.set_xlabel("onnxruntime p50 latency (ms)")
    else:
        _log_size_axis(ax, xs)
        ax.set_xlabel(f"{'packed weights' if objective == 'packed_size' else 'ONNX file'} (log scale)")
    lo = min(ys + ([limit] if limit is not None else []))
    hi = max(ys)
    pad = max((hi - lo) * 0.12, 0.002)
    ax.set_ylim(lo - pad, hi + pad)
    _metric_axis(ax, metric)
    labels = _merge_labels([(_bits_label(c), c["metrics"][objective], c["metrics"][metric]) for c in base], ax)
    _place_labels(ax, [(t, x, y, "#b35d16") for t, x, y in labels])
    ax.legend(loc="lower right", fontsize=7.5, framealpha=0.95)
    return _svg(fig, f"{metric} against {objective} for every candidate")


def _pareto(cands: list[dict], objective: str, metric: str) -> list[dict]:
    """Candidates no other beats on both objective (lower) and metric (higher), by objective."""
    front, best = [], -math.inf
    for c in sorted(cands, key=lambda c: (c["metrics"][objective], -c["metrics"][metric])):
        if c["metrics"][metric] > best:
            front.append(c)
            best = c["metrics"][metric]
    return front


def _metric_limit(report: dict, metric: str, cands: list[dict]) -> float | None:
    gates = report.get("gates", {})
    limits = []
    if metric == "accuracy":
        if gates.get("min_accuracy") is not None:
            limits.append(gates["min_accuracy"])
        if gates.get("max_accuracy_drop") is not None and cands and "input_accuracy" in cands[0]["metrics"]:
            limits.append(cands[0]["metrics"]["input_accuracy"] - gates["max_accuracy_drop"])
    elif gates.get("min_cosine") is not None:
        limits.append(gates["min_cosine"])
    return max(limits) if limits else None


def _fmt_metric(v: float, metric: str) -> str:
    return f"{v:.2%}" if metric in ("accuracy", "agreement") else f"{v:.4f}"


def _bits_label(c: dict) -> str:
    ints = {b for b in c["layer_bits"].values() if b != "float"}
    return f"{ints.pop()}-bit" if len(ints) == 1 else "mixed"


# ----------------------------------------------------------------------------- pages


def headline(stages: list[dict[str, Any]]) -> str:
    """One line: size before -> after (ratio), accuracy (or cosine) change, latency."""
    first, final = stages[0], stages[-1]
    size0 = first.get("size_bytes")
    size1 = final.get("final_size_bytes", final.get("size_bytes"))
    parts = []
    if size0 and size1:
        parts.append(f"{_fmt_bytes(size0)} → {_fmt_bytes(size1)} ({size0 / size1:.1f}×)")
    if "accuracy" in first and "accuracy" in final:
        delta = (final["accuracy"] - first["accuracy"]) * 100
        parts.append(f"{delta:+.1f} pt accuracy".replace("-", "−"))
    elif "cosine" in final:
        parts.append(f"cosine {final['cosine']:.4f}")
    latency = next((r for r in reversed(stages) if r.get("latency_p50_ms") is not None), None)
    if latency is not None:
        float_ms = (latency.get("metrics") or {}).get("float_latency_p50_ms")
        if float_ms:
            parts.append(f"{float_ms / latency['latency_p50_ms']:.1f}× faster than float")
        else:
            parts.append(f"p50 {latency['latency_p50_ms']:.3f} ms")
    return ", ".join(parts)


def _gate_html(g: dict[str, Any]) -> str:
    return f'<li class="{"ok" if g["passed"] else "bad"}">{_esc(gate_line(g))}</li>'


def _table(rows: list[list[str]], classes: Sequence[str] | None = None) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in rows[0])
    body = "".join(
        f"<tr{f' class={chr(34)}{classes[i]}{chr(34)}' if classes and classes[i] else ''}>"
        + "".join(f"<td>{_esc(c)}</td>" for c in r)
        + "</tr>"
        for i, r in enumerate(rows[1:])
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: dict[str, Any]) -> str:
    stages = report["stages"]
    metric = "accuracy" if all("accuracy" in s for s in stages) else "cosine"
    # a non-finite measurement is null in report.json: no point for it
    points = [
        (s["stage"], s.get("final_size_bytes") or s["size_bytes"], s[metric])
        for s in stages
        if s.get(metric) is not None
    ]
    layers = report.get("layers", [])
    samples: list[float] = next(
        (
            s["metrics"].get("latency_ms_samples", [])
            for s in reversed(stages)
            if "metrics" in s and "latency_ms_samples" in s.get("metrics", {})
        ),
        [],
    )
    checks, seen = [], set()
    for g in report["gates"] + report.get("checks", []):
        line = gate_line(g)
        if line not in seen:
            seen.add(line)
            checks.append(_gate_html(g))
    passed = report["passed"]
    artifacts = "".join(
        f"<li><code>{_esc(k)}</code>: <code>{_esc(v)}</code></li>" for k, v in report["artifacts"].items()
    )
    layer_rows = [["layer", "shape", "params", "nonzeros", "sparsity", "bits"]] + [
        [
            row["name"],
            "x".join(map(str, row["shape"])),
            f"{row['parameters']:,}",
            f"{row['nonzeros']:,}",
            f"{row['sparsity']:.1%}",
            str(row["bits"]),
        ]
        for row in layers
    ]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>compress report: {_esc(report["recipe"])}</title><style>{CSS}</style></head>
<body>
<h1>compress report: {_esc(report["recipe"])} <span class="badge {"pass" if passed else "fail"}">{"PASSED" if passed else "FAILED"}</span></h1>
<p class="headline">{_esc(headline(stages))}</p>
<p class="meta">Model <code>{_esc(report["model"])}</code> ({_esc(report["model_kind"])}) · compress {_esc(report["compress_version"])} ·
{report["wall_seconds"]:.1f} s · torch {_esc(report["environment"]["torch"])} · {_esc(report["environment"]["platform"])}</p>
<h2>Gates and checks</h2>
<ul class="gates">{"".join(checks) or "<li>no gates configured</li>"}</ul>
<h2>Stages</h2>
{_table(stage_table(stages))}
{f'<p class="meta">{_esc(note)}</p>' if (note := stage_table_note(stages)) else ""}
<div class="charts">
<div class="chart"><h2>{metric.capitalize()} against size</h2>{scatter_svg(points, "size", metric)}</div>
<div class="chart"><h2>Latency distribution (onnxruntime)</h2>{histogram_svg(samples)}</div>
<div class="chart"><h2>Sparsity per layer</h2>{hbar_svg([(row["name"], row["sparsity"]) for row in layers], 1.0, "{:.1%}", color="#e07b28", x_label="share of weights that are zero")}</div>
<div class="chart"><h2>Bits per weight, per layer</h2>{hbar_svg([(row["name"], float(row["bits"])) for row in layers], 32.0, "{:g}", color="#9b4fd1", x_label="stored bits per weight")}</div>
</div>
<h2>Layers of the final model</h2>
{_table(layer_rows)}
<h2>Artifacts</h2>
<ul>{artifacts}</ul>
</body></html>
"""


def tune_headline(report: dict[str, Any]) -> str:
    """The search in one line: the chosen model against the input and the best uniform baseline."""
    chosen, objective = report.get("chosen"), report["objective"]
    if not chosen:
        best = report.get("best")
        return (
            f"no candidate passes; best: candidate {best['id']} ({best['variant']})" if best else "no candidate was run"
        )
    m = chosen["metrics"]
    unit = (lambda v: f"{v:.3f} ms") if objective == "latency" else _fmt_bytes
    parts = []
    if objective != "latency" and m.get("input_size"):
        parts.append(f"{_fmt_bytes(m['input_size'])} → {unit(m[objective])} ({m['input_size'] / m[objective]:.1f}×)")
    else:
        parts.append(f"{objective} {unit(m[objective])}")
    if "accuracy" in m and "input_accuracy" in m:
        parts.append(f"{(m['accuracy'] - m['input_accuracy']) * 100:+.1f} pt accuracy".replace("-", "−"))
    elif "cosine" in m:
        parts.append(f"cosine {m['cosine']:.4f}")
    base = report.get("smallest_passing_baseline")
    if chosen["kind"] == "baseline":
        parts.append(f"a uniform width ({_bits_label(chosen)}) is the best found")
    elif base and objective in base["metrics"]:
        b = base["metrics"][objective]
        parts.append(
            f"{b / m[objective]:.2f}× smaller than the best uniform ({_bits_label(base)}, {unit(b)})"
            if objective != "latency"
            else f"{b / m[objective]:.2f}× faster than the best uniform ({unit(b)})"
        )
    return ", ".join(parts)


def render_tune_html(report: dict[str, Any]) -> str:
    """The report of ``compress tune``: headline, trade-off chart, candidates, per-layer choices."""
    objective = report["objective"]
    passed = report["passed"]
    chosen = report.get("chosen")
    best = report.get("best")
    gates = "".join(_gate_html(g) for g in (best or {}).get("gates", []))
    missed = ""
    if not passed and report.get("missed_gates"):
        missed = (
            "<h2>Gates the best candidate misses</h2><ul class='gates'>"
            + "".join(
                f"<li class='bad'>{_esc(g['gate'])}: measured {_esc(format_gate_value(g['gate'], g['measured']))}, limit "
                f"{_esc(format_gate_value(g['gate'], g['limit']))}, missed by {_esc(format_gate_distance(g['gate'], abs(g['missed_by'])) if g.get('missed_by') is not None else 'n/a')}</li>"
                for g in report["missed_gates"]
            )
            + "</ul>"
        )
    metric_keys = [
        k for k in ("accuracy", "cosine", "agreement") if any(k in c["metrics"] for c in report["candidates"])
    ]
    rows = [["#", "kind", "variant", "bits per layer", objective, *metric_keys, "result", "time (s)"]]
    classes = []
    for c in report["candidates"]:
        val = c["metrics"].get(objective)
        shown = "-" if val is None else (f"{val:.3f} ms" if objective == "latency" else _fmt_bytes(val))
        result = (
            "error"
            if c.get("error")
            else "pass"
            if c["passed"]
            else "fail: " + ", ".join(f["gate"] for f in c["failures"])
        )
        rows.append(
            [
                str(c["id"]),
                c["kind"],
                c["variant"],
                " ".join(str(b) for b in c["layer_bits"].values()),
                shown,
                *[_fmt_metric(c["metrics"][k], k) if k in c["metrics"] else "-" for k in metric_keys],
                result,
                f"{c['seconds']:.1f}",
            ]
        )
        classes.append("chosen" if chosen and c["id"] == chosen["id"] else "")
    widths = sorted(
        {w for layer in report.get("layers", []) for w in layer["sensitivity"]},
        key=lambda w: (w == "float", int(w) if w != "float" else 0),
    )
    layer_rows = [["layer", "chosen", *[f"{w}-bit" if w != "float" else "float" for w in widths], "bytes (chosen)"]]
    for layer in report.get("layers", []):
        layer_rows.append(
            [
                layer["layer"],
                str(layer["bits"]),
                *[f"{layer['sensitivity'][w]:.2e}" if w in layer["sensitivity"] else "-" for w in widths],
                _fmt_bytes(layer["bytes"].get(str(layer["bits"]), float("nan"))),
            ]
        )
    tuned = report.get("tuned_run") or {}
    repro = ""
    if tuned:
        repro = (
            "<p>Re-running the written recipe reproduced the candidate's metrics exactly.</p>"
            if tuned.get("reproduced")
            else f"<p>Re-running the written recipe did <b>not</b> reproduce the candidate: {_esc(tuned.get('differences') or tuned.get('error'))}</p>"
        )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>compress tune: {_esc(report["recipe"])}</title><style>{CSS}</style></head>
<body>
<h1>compress tune: {_esc(report["recipe"])} <span class="badge {"pass" if passed else "fail"}">{"PASSED" if passed else "NOTHING PASSES"}</span></h1>
<p class="headline">{_esc(tune_headline(report))}</p>
<p class="meta">objective: minimise {_esc(objective)} · sensitivity: {_esc(report["sensitivity_metric"])} ·
{report["candidates_run"]} candidates in {report["search_seconds"]:.1f} s · recipe: <code>{_esc(report.get("tuned_recipe") or "-")}</code></p>
{repro}
<h2>Gates ({"chosen" if passed else "best"} candidate)</h2>
<ul class="gates">{gates or "<li>no candidate measured</li>"}</ul>
{missed}
<div class="charts">
<div class="chart"><h2>Trade-off: every candidate</h2>{tradeoff_svg(report)}</div>
</div>
<h2>Per layer: {"chosen" if passed else "best candidate"}'s bits and sensitivity ({_esc(report["sensitivity_metric"])} of the output, that layer alone)</h2>
{_table(layer_rows)}
<h2>Candidates</h2>
{_table(rows, classes)}
</body></html>
"""
