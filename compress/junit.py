"""JUnit XML for CI systems: every gate and check is a test case, a failed one a failure."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def write_junit(
    path: Path,
    suite: str,
    checks: list[dict[str, Any]],
    seconds: float = 0.0,
    properties: dict[str, str] | None = None,
) -> Path:
    """Write ``checks`` (``{"gate", "measured", "limit", "passed"[, "reason"]}``) as one suite.

    ``properties`` (e.g. the bundle's SHA-256) become the suite's ``<properties>``.
    """
    failures = [c for c in checks if not c["passed"]]
    root = ET.Element("testsuites", name="compress", tests=str(len(checks)), failures=str(len(failures)))
    ts = ET.SubElement(
        root,
        "testsuite",
        name=suite,
        tests=str(len(checks)),
        failures=str(len(failures)),
        errors="0",
        skipped="0",
        time=f"{seconds:.3f}",
    )
    if properties:
        props = ET.SubElement(ts, "properties")
        for name, value in properties.items():
            ET.SubElement(props, "property", name=name, value=str(value))
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


def error_checks(message: str, exit_code: int) -> list[dict[str, Any]]:
    """One failed case for a run that stopped with an error (exit 2 or 3): CI then shows
    the message instead of an empty result."""
    kind = "bad input" if exit_code == 2 else "internal error"
    return [{"gate": "run", "measured": None, "limit": 0, "passed": False, "reason": f"{kind}: {message}"}]


def check_writable(path: Path) -> None:
    """Raise OSError unless ``path`` can be written later: its folder must exist already
    and be writable (checked before a run starts, so a typo fails fast, and a missing
    folder is never created, least of all as root)."""
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise IsADirectoryError(21, "is a directory", str(path))
    if not folder.is_dir():
        raise FileNotFoundError(2, "folder does not exist", str(folder))
    import os

    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PermissionError(13, "not writable", str(path if path.exists() else folder))


def _num(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "not measured"
    return f"{x:.6g}" if isinstance(x, (int, float)) else str(x)
