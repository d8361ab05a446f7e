"""Pruning benchmark on MNIST-1D: every method through the real stage, then ONNX on onnxruntime.

Run: ``python benchmarks/prune.py [--model mnist1d_mlp|mnist1d_cnn] [--epochs 20] [--no-lottery]``

Prints one table: method x sparsity -> eval accuracy of the input, right after pruning
and after fine-tuning, parameters and nonzeros, ONNX size (raw and zstd-compressed: masks
only pay off compressed), and onnxruntime p50 latency of one sample on 1 thread. Then
magnitude masks and timing against ``torch.nn.utils.prune`` on the same weights.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.data import DataBundle, Split, builtin
from compress.metrics import evaluate
from compress.prune.config import LotteryConfig, MagnitudeConfig, VarianceConfig
from compress.prune.stage import apply
from compress.state import ModelState, StageContext
from compress.train import TrainConfig, fit
from compress.zoo import ZOO

FT = TrainConfig(epochs=3, lr=5e-4)


def data_bundle() -> DataBundle:
    x, y = (torch.as_tensor(a) for a in builtin("mnist1d", "train"))
    xt, yt = (torch.as_tensor(a) for a in builtin("mnist1d", "test"))
    return DataBundle(
        {
            "train": Split("train", x, y, 128, 0),
            "eval": Split("eval", xt, yt, 256, 0),
            "calibration": Split("calibration", x[:1024], None, 256, 0),
        }
    )


def onnx_numbers(module: torch.nn.Module, example: torch.Tensor, folder: Path, name: str) -> dict:
    import zstandard

    from compress.export.onnx_export import export_onnx
    from compress.runtime import measure_latency, ort_session

    path = folder / f"{name}.onnx"
    export_onnx(module, example, path, opset=18, exporter="legacy")
    raw = path.read_bytes()
    sess = ort_session(path, threads=1)
    lat = measure_latency(sess, example.numpy(), runs=200, warmup=20)
    return {
        "onnx_kb": len(raw) / 1024,
        "zst_kb": len(zstandard.ZstdCompressor(level=19).compress(raw)) / 1024,
        "p50_us": lat["latency_p50_ms"] * 1e3,
    }


def cases(lottery: bool) -> list[tuple[str, object]]:
    out = [("dense", None)]
    for s in (0.5, 0.8, 0.9):
        out.append((f"magnitude one-shot {s:.0%}", MagnitudeConfig(method="magnitude", amount=s, finetune=FT)))
    for s in (0.8, 0.9):
        out.append(
            (
                f"magnitude gradual {s:.0%}",
                MagnitudeConfig(method="magnitude", amount=s, schedule="gradual", finetune=FT),
            )
        )
    out.append(
        ("magnitude one-shot 80% all layers", MagnitudeConfig(method="magnitude", amount=0.8, skip=[], finetune=FT))
    )
    for s in (0.25, 0.5):
        out.append((f"variance {s:.0%} neurons", VarianceConfig(method="variance", amount=s, finetune=FT)))
    out.append(("variance 50% no fold", VarianceConfig(method="variance", amount=0.5, mean_fold=False, finetune=FT)))
    out.append(
        (
            "variance 50% pre-act var",
            VarianceConfig(method="variance", amount=0.5, statistic="pre_activation_variance", finetune=FT),
        )
    )
    out.append(
        ("variance 50% row norm", VarianceConfig(method="variance", amount=0.5, statistic="magnitude", finetune=FT))
    )
    out.append(
        ("variance 50% per-block ranking", VarianceConfig(method="variance", amount=0.5, scope="block", finetune=FT))
    )
    if lottery:
        out.append(
            (
                "lottery 5x20% rewind 20",
                LotteryConfig(
                    method="lottery",
                    rounds=5,
                    rate=0.2,
                    rewind_to=20,
                    control="random_reinit",
                    loss="ce",
                    train=TrainConfig(epochs=10, lr=3e-3),
                ),
            )
        )
    return out


def compare_with_torch_prune(model: torch.nn.Module, amount: float, repeat: int = 5) -> dict:
    import torch.nn.utils.prune as tprune

    from compress.prune.magnitude import magnitude_masks, select_weights

    names, _ = select_weights(model, [])
    params = dict(model.named_parameters())
    t0 = time.perf_counter()
    for _ in range(repeat):
        ours = magnitude_masks({n: params[n] for n in names}, amount, "global")
    t_ours = (time.perf_counter() - t0) / repeat
    t_theirs = 0.0
    for _ in range(repeat):
        m = copy.deepcopy(model)
        mods = dict(m.named_modules())
        pairs = [(mods[n.rsplit(".", 1)[0]], "weight") for n in names]
        t0 = time.perf_counter()
        tprune.global_unstructured(pairs, pruning_method=tprune.L1Unstructured, amount=amount)
        t_theirs += time.perf_counter() - t0
    theirs = {n: mm.weight_mask.bool() for n, (mm, _) in zip(names, pairs)}
    same = all(torch.equal(ours[n], theirs[n]) for n in names)
    return {
        "amount": amount,
        "identical": same,
        "ours_ms": 1e3 * t_ours,
        "torch_ms": 1e3 * t_theirs / repeat,
        "weights": sum(params[n].numel() for n in names),
    }


def run_cases(args: argparse.Namespace, data: DataBundle, seed: int) -> list[dict]:
    """Every method at one seed; the first row carries the dense model (for the mask comparison)."""
    print(f"seed {seed}", file=sys.stderr, flush=True)
    factory = ZOO[args.model][0]
    torch.manual_seed(seed)
    dense = factory()
    fit(dense, data["train"].x, data["train"].y, TrainConfig(epochs=args.epochs, lr=3e-3, seed=seed))
    dense.eval()
    reference = copy.deepcopy(dense)
    for p in reference.parameters():
        p.requires_grad_(False)
    example = data["eval"].x[:1]

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for label, cfg in cases(not args.no_lottery and args.model == "mnist1d_mlp"):
            state = ModelState(copy.deepcopy(dense), (1, 40))
            ctx = StageContext(
                data=data,
                out_dir=folder / label.replace(" ", "_"),
                device=torch.device("cpu"),
                reference=reference,
                seed=seed,
            )
            t0 = time.perf_counter()
            if cfg is not None:
                state = apply(state, cfg, ctx)
                m = ctx.metrics
            else:
                acc = evaluate(dense, data["eval"].x, data["eval"].y)["accuracy"]
                from compress.prune.stage import size_metrics

                m = {"accuracy_before": acc, "accuracy_after": acc, **size_metrics(dense)}
            seconds = time.perf_counter() - t0
            row = {
                "method": label,
                "acc_in": m["accuracy_before"],
                "acc_pruned": m.get("accuracy_pruned", m.get("ticket_accuracy")),
                "acc_final": m["accuracy_after"],
                "params": m["parameters"],
                "nonzeros": m["nonzeros"],
                "seconds": seconds,
                **onnx_numbers(state.module, example, folder, f"m{len(rows)}"),
            }
            if "blocks" in m:
                row["note"] = "hidden widths " + ", ".join(
                    f"{b['first']}->{b['second']}: {b['hidden_before']}->{b['hidden_after']}" for b in m["blocks"]
                )
            if "control" in m:
                row["note"] = (
                    f"dense retrained {m['dense_accuracy']:.3f}; random re-init {m['control']['accuracy']:.3f}"
                )
            elif label.startswith("lottery"):
                row["note"] = ""
            rows.append(row)
            print(f"  done: {label} ({seconds:.1f}s)", file=sys.stderr, flush=True)
    rows[0]["dense"] = dense
    return rows


def aggregate(rows: list[dict]) -> dict:
    """One method over the seeds: median of the accuracies and the time, the range of the final
    accuracy; the rest from the first seed."""
    out = dict(rows[0])
    for key in ("acc_in", "acc_pruned", "acc_final", "seconds"):
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = median(values) if values else None
    finals = sorted(r["acc_final"] for r in rows)
    out["range"] = f"{finals[0]:.3f}-{finals[-1]:.3f}" if len(rows) > 1 else ""
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mnist1d_mlp", choices=["mnist1d_mlp", "mnist1d_cnn"])
    ap.add_argument("--epochs", type=int, default=20, help="training epochs of the dense model")
    ap.add_argument("--no-lottery", action="store_true")
    ap.add_argument(
        "--seeds", type=int, default=1, help="seeds (dense training, pruning, fine-tuning); median reported"
    )
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error("--seeds must be at least 1")
    torch.set_num_threads(1)

    data = data_bundle()
    runs = [run_cases(args, data, seed) for seed in range(args.seeds)]
    rows = [aggregate([run[i] for run in runs]) for i in range(len(runs[0]))]
    dense = runs[0][0]["dense"]

    print(
        f"\nPruning on MNIST-1D, {args.model} trained {args.epochs} epochs; fine-tuning {FT.epochs} epochs "
        f"({args.seeds} seed(s): median accuracies, final-accuracy range) "
        f"(distillation from the dense model); 'pruned' = right after pruning (before fine-tuning)\n"
    )
    head = (
        f"| {'method':36} | {'acc in':>6} | {'pruned':>6} | {'final':>6} | {'params':>7} | {'nonzero':>7} "
        f"| {'final range':>11} | {'ONNX KB':>7} | {'zstd KB':>7} | {'ORT p50 us':>10} | {'s':>5} |"
    )
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    fmt = lambda v: "   n/a" if v is None else f"{v:6.3f}"  # noqa: E731
    for r in rows:
        print(
            f"| {r['method']:36} | {fmt(r['acc_in'])} | {fmt(r['acc_pruned'])} | {fmt(r['acc_final'])} "
            f"| {r['params']:7d} | {r['nonzeros']:7d} | {r['range']:>11} | {r['onnx_kb']:7.1f} | {r['zst_kb']:7.1f} "
            f"| {r['p50_us']:10.1f} | {r['seconds']:5.1f} |"
        )
    print()
    for r in rows:
        if r.get("note"):
            extra = "'pruned' column = the ticket (trained, masked); " if r["method"].startswith("lottery") else ""
            print(f"- {r['method']}: {extra}{r['note']}")

    print("\nMagnitude masks vs torch.nn.utils.prune.global_unstructured(L1Unstructured), all conv/linear weights:\n")
    print("| amount | weights | identical masks | ours ms | torch ms |")
    print("|--------|---------|-----------------|---------|----------|")
    for amount in (0.5, 0.8, 0.95):
        c = compare_with_torch_prune(dense, amount)
        print(
            f"| {amount:6.2f} | {c['weights']:7d} | {c['identical']!s:15} | {c['ours_ms']:7.2f} | {c['torch_ms']:8.2f} |"
        )


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
