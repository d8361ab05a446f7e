"""Human-readable report of a run (the machine-readable one is report.json)."""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from typing import Any


def format_bytes(n: float) -> str:
    """A byte count for people: ``512 B``, ``87.3 MB``, ``1.52 GB`` (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} GB"


# (row key, column title, format string or function of the value)
COLUMNS: list[tuple[str, str, str | Callable[[Any], str]]] = [
    ("stage", "stage", "{}"),
    ("method", "method", "{}"),
    ("parameters", "params", "{:,}"),
    ("sparsity", "sparsity", "{:.1%}"),
    ("weight_bits", "bits", "{:g}"),
    ("size_bytes", "size (B)", "{:,}"),
    ("accuracy", "accuracy", "{:.2%}"),
    ("agreement", "agreement", "{:.2%}"),
    ("cosine", "cosine", "{:.5f}"),
    ("retrieval_agreement", "same NN", "{:.2%}"),
    ("latency_p50_ms", "p50 ms", "{:.3f}"),
    ("latency_vs_float", "x float", "{:.2f}"),
    ("latency_vs_float_b32", "x float b32", "{:.2f}"),
    ("seconds", "time (s)", "{:.2f}"),
    ("peak_rss_bytes", "peak RSS", format_bytes),
    ("cached", "cached", "{}"),
]


def format_cell(row: dict[str, Any], key: str, fmt: str | Callable[[Any], str]) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    try:
        return fmt(value) if callable(fmt) else fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def stage_table(rows: list[dict[str, Any]]) -> list[list[str]]:
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    return [[c[1] for c in cols]] + [[format_cell(r, c[0], c[2]) for c in cols] for r in rows]


_PEAK_METHODS = {
    "VmHWM": "exact (Linux VmHWM, reset per step)",
    "sampled": "sampled every 5 ms (a lower bound: the peak mark could not be reset here)",
    "ru_maxrss": "the process's peak so far (an upper bound: the peak mark could not be reset here)",
}


def stage_table_note(rows: list[dict[str, Any]]) -> str | None:
    """What the input row's time and the peak RSS column measure (None without peak RSS)."""
    methods = sorted({r["peak_rss_method"] for r in rows if r.get("peak_rss_bytes") is not None})
    if not methods:
        return None
    how = "; ".join(_PEAK_METHODS.get(m, m) for m in methods)
    return (
        "input: the load step (model file, data, the model's reference outputs). "
        f"peak RSS: the step's peak resident memory of this process, {how}."
    )


# How each gate's value reads, with its unit: fractions as points or percent, bytes, ms.
_GATE_UNITS = {
    "max_accuracy_drop": lambda v: f"{v * 100:.3g} pt",
    "min_accuracy": lambda v: f"{v:.2%}",
    "min_agreement": lambda v: f"{v:.2%}",
    "onnx_top1_agreement": lambda v: f"{v:.2%}",
    "onnx_parity_within_tolerance": lambda v: f"{v:.2%} of outputs",
    "min_cosine": lambda v: f"{v:.6g}",
    "max_size_bytes": lambda v: f"{v:,.0f} B",
    "max_latency_ms": lambda v: f"{v:.3g} ms",
}


def format_gate_value(gate: str, value: Any) -> str:
    """A gate's measured value or limit with its unit (``0.4 pt``, ``29,493 B``, ``0.027 ms``)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(v):  # not measured
        return "n/a"
    fmt = _GATE_UNITS.get(gate) or (lambda x: f"{x:.3g} ms" if gate.endswith("_ms") else f"{x:.6g}")
    return fmt(v)


def format_gate_distance(gate: str, distance: float) -> str:
    """How far a measured value is from its limit, with the gate's unit (fractions in points)."""
    if gate in ("max_accuracy_drop", "min_accuracy", "min_agreement", "onnx_top1_agreement"):
        return f"{distance * 100:.3g} pt"
    return format_gate_value(gate, distance)


def gate_line(g: dict[str, Any]) -> str:
    status = "PASS" if g["passed"] else "FAIL"
    reason = f" ({g['reason']})" if g.get("reason") else ""
    gate = g["gate"]
    measured = "not measured" if g.get("measured") is None else format_gate_value(gate, g["measured"])
    limit = "-" if g.get("limit") is None else format_gate_value(gate, g["limit"])
    return f"{status} {gate}: measured {measured}, limit {limit}{reason}"


def _md(text: Any) -> str:
    """Text from the recipe or the file system, safe inside Markdown: HTML is escaped (a
    Markdown viewer would render it) and table/code delimiters are neutralised."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("`", "'")


def render_markdown(report: dict[str, Any]) -> str:
    table = stage_table(report["stages"])
    lines = [
        f"# compress report: {_md(report['recipe'])}",
        "",
        (
            f"Model `{_md(report['model'])}` ({report['model_kind']}), compress {report['compress_version']}, "
            f"{report['wall_seconds']:.1f} s."
        ),
        "",
        f"**Result: {'PASSED' if report['passed'] else 'FAILED'}**",
        "",
        "## Stages",
        "",
        "| " + " | ".join(table[0]) + " |",
        "|" + "|".join("---" for _ in table[0]) + "|",
    ]
    lines += ["| " + " | ".join(_md(c) for c in r) + " |" for r in table[1:]]
    if note := stage_table_note(report["stages"]):
        lines += ["", _md(note)]
    from compress.coverage import coverage_line

    covered = [(r["stage"], r["metrics"]) for r in report["stages"] if (r.get("metrics") or {}).get("coverage")]
    if covered:
        lines += ["", "## Coverage", ""]
        for stage, metrics in covered:
            lines += [f"- {_md(note)}" for note in metrics.get("notes", [])]
            lines.append(f"- {_md(coverage_line(stage, metrics['coverage']))}")
    if report["gates"] or report.get("checks"):
        lines += ["", "## Gates and checks", ""]
        seen = set()
        for g in report["gates"] + report.get("checks", []):
            line = gate_line(g)
            if line not in seen:
                seen.add(line)
                lines.append(f"- {_md(line)}")
    if report["artifacts"]:
        sha = report.get("artifact_sha256", {})
        lines += ["", "## Artifacts", ""] + [
            f"- `{_md(k)}`: `{_md(v)}`" + (f" (SHA-256 `{sha[k]}`)" if k in sha else "")
            for k, v in report["artifacts"].items()
        ]
    if report.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {_md(w)}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"
