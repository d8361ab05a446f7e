"""Hostile recipes: how fast and in how much memory `compress check` refuses each.

Each case runs in a fresh process; the table shows the exit code, wall time and the
child's peak RSS (issue 13: exit 2 in under 2 s and under 200 MB).

    python benchmarks/hostile_recipes.py
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE = "version: 1\nmodel: {factory: compress.zoo:digits_mlp, input_shape: [1, 64]}\n"
BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")
)
CASES = {
    "alias bomb (10^9 values)": BOMB,
    "alias bomb in model.kwargs": "anchors:\n"
    + "".join(f"  {line}\n" for line in BOMB.splitlines())
    + BASE.replace("input_shape: [1, 64]}", "input_shape: [1, 64], kwargs: {junk: *i}}"),
    "600 nested flow mappings": "version: 1\nmodel: " + "{a: " * 600 + "1" + "}" * 600 + "\n",
    "600 nested block mappings": "version: 1\nx:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(600)),
    "50 MB recipe": BASE + "# " + "x" * (50 << 20) + "\n",
    "os:system factory": BASE.replace("compress.zoo:digits_mlp", "os:system"),
    "lr: .inf": BASE + "stages:\n  - finetune: {train: {lr: .inf}}\n",
}


def main() -> None:
    rows = [("case", "exit", "seconds", "peak RSS MB")]
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in CASES.items():
            path = Path(tmp) / "r.yaml"
            path.write_text(text)
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "compress", "check", str(path)], capture_output=True, check=False
            )
            seconds = time.perf_counter() - t0
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            rows.append((name, str(proc.returncode), f"{seconds:.2f}", f"{max(peak, before) / 1024:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
