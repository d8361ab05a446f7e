"""Human-readable report of a run (the machine-readable one is report.json)."""

from __future__ import annotations

import html
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
    measured = "not measured" if g.get("measured") is None else f"{g['measured']:.6g}"
    limit = "-" if g.get("limit") is None else f"{g['limit']:.6g}"
    return f"{status} {g['gate']}: measured {measured}, limit {limit}{reason}"


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
            f"- `{_md(k)}`: `{_md(v)}`" + (f" (SHA-256 `{sha[k]}`)" if k in sha else "") for k, v in report["artifacts"].items()
        ]
    if report.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {_md(w)}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"
