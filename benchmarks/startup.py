"""Cold-start time of the CLI and of the quickstart run, per stage.

    python benchmarks/startup.py [--runs 5]

Prints a table: `compress --help` (target < 0.5 s) next to `python -c "import torch"`
(what any torch-importing CLI pays at start), `compress pack` / `unpack` of a 16-value
file (their fixed cost: they start without typer), then `compress run` on the quickstart
with each stage's wall time, fresh (no cache) and re-run (cached).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    py = sys.executable
    help_s = timed([py, "-m", "compress", "--help"], args.runs)
    torch_s = timed([py, "-c", "import torch"], args.runs)
    print(f"{'command':<40} {'median s':>9}")
    print(f"{'compress --help':<40} {help_s:>9.3f}   (target < 0.5 s)")
    label = 'python -c "import torch"'
    print(f"{label:<40} {torch_s:>9.3f}   ({torch_s / help_s:.1f}x the help)")
    with tempfile.TemporaryDirectory() as tmp:
        # pack/unpack start without typer (compress/commands/entry.py): their fixed cost
        import numpy as np
        from safetensors.numpy import save_file

        tiny = Path(tmp) / "tiny.safetensors"
        save_file({"w": np.zeros(16, np.float32)}, str(tiny))
        pack_s = timed([py, "-m", "compress", "pack", str(tiny), "--force"], args.runs)
        unpack_s = timed([py, "-m", "compress", "unpack", f"{tiny}.czip", str(tiny), "--force"], args.runs)
        print(f"{'compress pack (16-value file)':<40} {pack_s:>9.3f}   ({pack_s / help_s:.2f}x the help)")
        print(f"{'compress unpack (16-value file)':<40} {unpack_s:>9.3f}   ({unpack_s / help_s:.2f}x the help)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "qs"
        cmd = [
            py,
            "-m",
            "compress",
            "run",
            str(ROOT / "recipes/quickstart.yaml"),
            str(ROOT / "recipes/models/mnist1d_cnn.pt"),
            "-o",
            str(out),
            "--json",
        ]
        for label in ("fresh", "re-run (cached)"):
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode not in (0, 1):
                sys.exit(f"quickstart failed ({proc.returncode}): {proc.stderr}")
            report = json.loads(proc.stdout)
            print(f"{'compress run quickstart, ' + label:<40} {wall:>9.3f}")
            for s in report["stages"][1:]:
                print(f"{'  stage ' + s['stage']:<40} {s['seconds']:>9.3f}{'   cached' if s['cached'] else ''}")


if __name__ == "__main__":
    main()
