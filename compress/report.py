"""Human-readable report of a run (the machine-readable one is report.json)."""

from __future__ import annotations

from typing import Any

COLUMNS = [
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
    ("cached", "cached", "{}"),
]


def format_cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def stage_table(rows: list[dict[str, Any]]) -> list[list[str]]:
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    return [[c[1] for c in cols]] + [[format_cell(r, c[0], c[2]) for c in cols] for r in rows]


def gate_line(g: dict[str, Any]) -> str:
    status = "PASS" if g["passed"] else "FAIL"
    reason = f" ({g['reason']})" if g.get("reason") else ""
    return f"{status} {g['gate']}: measured {g['measured']:.6g}, limit {g['limit']:.6g}{reason}"


def render_markdown(report: dict[str, Any]) -> str:
    table = stage_table(report["stages"])
    lines = [
        f"# compress report: {report['recipe']}",
        "",
        f"Model `{report['model']}` ({report['model_kind']}), compress {report['compress_version']}, "
        f"{report['wall_seconds']:.1f} s.",
        "",
        f"**Result: {'PASSED' if report['passed'] else 'FAILED'}**",
        "",
        "## Stages",
        "",
        "| " + " | ".join(table[0]) + " |",
        "|" + "|".join("---" for _ in table[0]) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in table[1:]]
    if report["gates"] or report.get("checks"):
        lines += ["", "## Gates and checks", ""]
        seen = set()
        for g in report["gates"] + report.get("checks", []):
            line = gate_line(g)
            if line not in seen:
                seen.add(line)
                lines.append(f"- {line}")
    if report["artifacts"]:
        lines += ["", "## Artifacts", ""] + [f"- `{k}`: `{v}`" for k, v in report["artifacts"].items()]
    return "\n".join(lines) + "\n"
