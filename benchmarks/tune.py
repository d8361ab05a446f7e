"""compress tune against uniform bit widths, and its cost against one pipeline run.

    python benchmarks/tune.py              # quickstart CNN, max_accuracy_drop 0.01 (about 10 CPU-minutes on 2 cores... see README)
    python benchmarks/tune.py --minilm     # all-MiniLM-L6-v2, min_cosine 0.99 (needs recipes/models/minilm_state.pt)

Prints, for every uniform GPFQ bit width the search ran as a baseline and for the tuned model:
bits per layer, packed and ONNX size, accuracy (or cosine), pass/fail; then the tuned model's
size against the smallest passing uniform one, the search's wall and CPU time against one
`compress run` of the same recipe, and whether `compress run recipe.tuned.yaml` from a fresh
folder reproduces the tuned metrics exactly. CPU time (user + system of the child processes) is
printed next to wall time because this machine's cores are shared.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "quickstart": (
        ROOT / "recipes" / "quickstart.yaml",
        ROOT / "recipes" / "quickstart-tune.yaml",
        ROOT / "recipes" / "models" / "mnist1d_cnn.pt",
    ),
    "minilm": (
        ROOT / "recipes" / "minilm.yaml",
        ROOT / "recipes" / "minilm-tune.yaml",
        ROOT / "recipes" / "models" / "minilm_state.pt",
    ),
}
EXACT = ("accuracy", "agreement", "cosine", "packed_size", "onnx_size")


def timed(cmd: list[str]) -> tuple[int, float, float, str]:
    """Run ``cmd``; return (exit code, wall s, child CPU s, stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode not in (0, 1):
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.returncode, wall, cpu, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minilm", action="store_true", help="the MiniLM case instead of the quickstart CNN")
    parser.add_argument("--keep", type=Path, help="keep the output folders here")
    args = parser.parse_args()
    case = "minilm" if args.minilm else "quickstart"
    plain, tune_recipe, model = CASES[case]
    if not model.is_file():
        sys.exit(f"{model} is missing (MiniLM: python scripts/export_minilm.py {model})")
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-tune-"))
    exe = [sys.executable, "-m", "compress"]

    _, run_wall, run_cpu, _ = timed([*exe, "run", str(plain), str(model), "-o", str(work / "run"), "--force", "--json"])
    code, tune_wall, tune_cpu, _ = timed(
        [*exe, "tune", str(tune_recipe), str(model), "-o", str(work / "tune"), "--json"]
    )
    report = json.loads((work / "tune" / "search.json").read_text())
    objective = report["objective"]
    fidelity = (
        "accuracy" if "accuracy" in (report["candidates"][0]["metrics"] if report["candidates"] else {}) else "cosine"
    )

    rows = [["candidate", "bits per layer", "packed (B)", "ONNX (B)", fidelity, "passes"]]
    for c in report["candidates"]:
        if c["kind"] != "baseline" and c["id"] != (report["chosen"] or {}).get("id"):
            continue
        m = c["metrics"]
        name = f"uniform {next(iter(c['layer_bits'].values()))}-bit" if c["kind"] == "baseline" else "tuned"
        rows.append(
            [
                name,
                " ".join(map(str, c["layer_bits"].values())),
                f"{m.get('packed_size', 0):,.0f}",
                f"{m.get('onnx_size', 0):,.0f}",
                f"{m.get(fidelity, float('nan')):.4f}",
                "yes" if c["passed"] else "no",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"\n{case}: objective {objective}, gates {report['gates']}, {report['candidates_run']} candidates")
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))

    chosen, base = report["chosen"], report["smallest_passing_baseline"]
    if chosen and base:
        print(
            f"tuned {chosen['metrics'][objective]:,.0f} B vs smallest passing uniform ({base['variant']}, "
            f"{next(iter(base['layer_bits'].values()))}-bit) {base['metrics'][objective]:,.0f} B: "
            f"{chosen['metrics'][objective] / base['metrics'][objective]:.3f}x"
        )
    elif not chosen:
        print(
            f"nothing passes (exit {code}); best candidate {report['best']['id'] if report['best'] else None}, "
            f"missed: {report['missed_gates']}"
        )
    print(
        f"one `compress run`: {run_wall:.1f} s wall, {run_cpu:.1f} s CPU; `compress tune`: {tune_wall:.1f} s wall, "
        f"{tune_cpu:.1f} s CPU; ratio {tune_wall / run_wall:.1f}x wall, {tune_cpu / run_cpu:.1f}x CPU"
    )

    if chosen:
        _, _, _, out = timed(
            [*exe, "run", str(work / "tune" / "recipe.tuned.yaml"), str(model), "-o", str(work / "rerun"), "--json"]
        )
        final = json.loads(out)
        rows = final["stages"]
        again = {k: rows[-1][k] for k in ("accuracy", "agreement", "cosine") if k in rows[-1]}
        packed = [r["size_bytes"] for r in rows if r["stage"] == "compress"]
        if packed:
            again["packed_size"] = packed[-1]
        if "final_size_bytes" in rows[-1]:
            again["onnx_size"] = rows[-1]["final_size_bytes"]
        diff = {
            k: (chosen["metrics"][k], again[k]) for k in EXACT if k in again and again[k] != chosen["metrics"].get(k)
        }
        print(
            f"fresh `compress run recipe.tuned.yaml`: {'reproduces every metric exactly' if not diff else f'DIFFERS: {diff}'}"
        )
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
