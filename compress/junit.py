"""JUnit XML for CI systems: every gate and check is a test case, a failed one a failure."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def write_junit(path: Path, suite: str, checks: list[dict[str, Any]], seconds: float = 0.0) -> Path:
    """Write ``checks`` (``{"gate", "measured", "limit", "passed"[, "reason"]}``) as one suite."""
    failures = [c for c in checks if not c["passed"]]
    root = ET.Element("testsuites", name="compress", tests=str(len(checks)), failures=str(len(failures)))
    ts = ET.SubElement(
        root, "testsuite", name=suite, tests=str(len(checks)), failures=str(len(failures)),
        errors="0", skipped="0", time=f"{seconds:.3f}",
    )
    for c in checks:
        case = ET.SubElement(ts, "testcase", classname=suite, name=c["gate"], time="0")
        measured, limit = c["measured"], c["limit"]
        text = f"measured {_num(measured)}, limit {_num(limit)}" + (f" ({c['reason']})" if c.get("reason") else "")
        if not c["passed"]:
            failure = ET.SubElement(case, "failure", message=f"{c['gate']}: {text}", type="GateFailure")
            failure.text = text
        else:
            ET.SubElement(case, "system-out").text = text
    import io

    from compress.artifacts import atomic_write_bytes

    buf = io.BytesIO()
    ET.ElementTree(root).write(buf, encoding="utf-8", xml_declaration=True)
    # a unique, exclusively created temp file: concurrent runs never share one
    return atomic_write_bytes(Path(path), buf.getvalue())


def _num(x: Any) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "not measured"
    return f"{x:.6g}" if isinstance(x, (int, float)) else str(x)
