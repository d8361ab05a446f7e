"""Distillation benchmark on MNIST-1D with the shipped CNN teacher.

    python benchmarks/distill.py [--scale 0.5] [--seeds 3]

Prints method x student x bits -> test accuracy, stored size (bytes at the stored bit width:
packed codes + scales/zero points/codebooks, float32 for the rest) and training time, with the
baselines: labels only + round-to-nearest, labels only with the same quantized-weight
training, uniform (untrained) points. One thread, seeds fixed. With ``--seeds N`` every arm
runs at training seeds 0..N-1 and the table gives the median accuracy and the min–max
range: the claims the acceptance tests check at one seed (to keep the suite short) are
judged here at the median of 3.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from statistics import median

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress.data import builtin  # noqa: E402
from compress.distill.born_again import born_again, ensemble_accuracy  # noqa: E402
from compress.distill.diffquant import allocate_bits, differentiable_quantize, layer_gradient_norms  # noqa: E402
from compress.distill.kd import distill, distillation_loss, reinitialize  # noqa: E402
from compress.distill.quantized import quantizable_layers, quantized_distill, rtn_bucket_quantize  # noqa: E402
from compress.distill.stage import storage_bytes  # noqa: E402
from compress.metrics import evaluate  # noqa: E402
from compress.train import TrainConfig, fit  # noqa: E402
from compress.zoo import mnist1d_cnn  # noqa: E402

HALF = {"channels": 16, "hidden": 64}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply every epoch count (e.g. 0.5 for a quick run)"
    )
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per arm (median reported)")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    torch.set_num_threads(1)
    runs = [arms(args.scale, seed) for seed in range(args.seeds)]
    print_table(runs, args.scale)


def arms(scale: float, seed: int) -> list[tuple]:
    """Every arm at one training seed: rows (method, student, bits, accuracy, size, seconds, note)."""
    print(f"seed {seed}", file=sys.stderr, flush=True)
    ep = lambda n: max(1, round(n * scale))  # noqa: E731
    train = dict(lr=1e-2, optimizer="adamw", batch_size=100, seed=seed)

    x, y = (torch.as_tensor(a) for a in builtin("mnist1d", "train"))
    xe, ye = (torch.as_tensor(a) for a in builtin("mnist1d", "test"))
    teacher = mnist1d_cnn()
    teacher.load_state_dict(torch.load(ROOT / "recipes/models/mnist1d_cnn.pt", weights_only=True))
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    rows: list[tuple] = []

    def acc(m) -> float:
        return evaluate(m, xe, ye)["accuracy"]

    def add(method: str, student: str, bits: str, model, quant, seconds: float, note: str = "") -> None:
        rows.append((method, student, bits, acc(model), storage_bytes(model, quant), seconds, note))
        print(f"  {method:<34} {student:<12} {bits:<6} {rows[-1][3]:.3f}", file=sys.stderr, flush=True)

    def half():
        torch.manual_seed(seed)
        return mnist1d_cnn(**HALF)

    add("teacher", "cnn 32/128", "32", teacher, {}, 0.0, "shipped, 60 epochs on labels")

    # --- float students --------------------------------------------------------------------
    s = half()
    r = fit(s, x, y, TrainConfig(epochs=ep(40), **train))
    add("labels only", "cnn 16/64", "32", s, {}, r["seconds"])
    t0 = time.perf_counter()
    q = rtn_bucket_quantize(s, 4)
    add("labels only + RTN (d=256)", "cnn 16/64", "4", s, q, r["seconds"] + time.perf_counter() - t0)
    s = half()
    r = distill(s, teacher, x, y, TrainConfig(epochs=ep(40), **train), 2.0, 0.7)
    add("kd T=2 a=0.7", "cnn 16/64", "32", s, {}, r["seconds"])
    s = half()
    r = distill(s, teacher, x, y, TrainConfig(epochs=ep(20), **train), 2.0, 0.7, mixup=1)
    add("kd T=2 a=0.7 +mixup", "cnn 16/64", "32", s, {}, r["seconds"])

    # --- quantized distillation (Polino) ---------------------------------------------------
    for bits in (4, 2):
        s = half()
        q, r = quantized_distill(s, None, x, y, TrainConfig(epochs=ep(40), **train), bits=bits, alpha=0.0)
        add("labels only, quantized training", "cnn 16/64", str(bits), s, q, r["seconds"])
        s = half()
        q, r = quantized_distill(s, teacher, x, y, TrainConfig(epochs=ep(40), **train), bits=bits)
        add("quantized distillation", "cnn 16/64", str(bits), s, q, r["seconds"])
        s = half()
        q, r = quantized_distill(s, teacher, x, y, TrainConfig(epochs=ep(20), **train), bits=bits, mixup=1)
        add("quantized distillation +mixup", "cnn 16/64", str(bits), s, q, r["seconds"])
    s = half()
    q, r = quantized_distill(
        s, teacher, x, y, TrainConfig(epochs=ep(20), **train), bits=4, rounding="stochastic", mixup=1
    )
    add("quantized distillation +mixup, stoch.", "cnn 16/64", "4", s, q, r["seconds"])

    # --- the 4-bit claim at twice the budget (3200 optimizer steps for every arm) ------------
    s = half()
    r = fit(s, x, y, TrainConfig(epochs=ep(80), **train))
    q = rtn_bucket_quantize(s, 4)
    add("labels only + RTN, 3200 steps", "cnn 16/64", "4", s, q, r["seconds"])
    s = half()
    q, r = quantized_distill(s, None, x, y, TrainConfig(epochs=ep(80), **train), bits=4, alpha=0.0)
    add("labels only, quant. training, 3200 st.", "cnn 16/64", "4", s, q, r["seconds"])
    s = half()
    q, r = quantized_distill(s, teacher, x, y, TrainConfig(epochs=ep(40), **train), bits=4, mixup=1)
    add("quantized distill. +mixup, 3200 steps", "cnn 16/64", "4", s, q, r["seconds"])

    # --- differentiable quantization on the teacher's weights ------------------------------
    layers = quantizable_layers(teacher)
    points_cfg = TrainConfig(epochs=ep(3), lr=1e-3, seed=seed)
    for bits in (2, 3):
        for label, init, learn in (
            ("uniform points (untrained)", "uniform", False),
            ("quantile points (untrained)", "quantiles", False),
            ("diff. quant., uniform init", "uniform", True),
            ("diff. quant., quantile init", "quantiles", True),
        ):
            s = copy.deepcopy(teacher)
            q, r = differentiable_quantize(
                s, teacher, x, y, points_cfg, {n: bits for n in layers}, points_init=init, learn_points=learn
            )
            add(label, "teacher", str(bits), s, q, r["seconds"])
    s = copy.deepcopy(teacher)
    loss_fn, _ = distillation_loss(2.0, 0.7)
    norms = layer_gradient_norms(s, teacher, x, y, layers, loss_fn)
    mods = dict(s.named_modules())
    layer_bits = allocate_bits(norms, {n: mods[n].weight.numel() for n in layers}, 3.0)
    q, r = differentiable_quantize(s, teacher, x, y, points_cfg, layer_bits)
    add("diff. quant., bits by grad norm", "teacher", "avg<=3", s, q, r["seconds"], str(list(layer_bits.values())))

    # --- born-again networks ----------------------------------------------------------------
    for variant in ("ban", "ban_l"):
        members, records = born_again(
            teacher,
            lambda k: reinitialize(teacher, 1000 * seed + k),
            x,
            y,
            TrainConfig(epochs=ep(30), **train),
            generations=2,
            variant=variant,
            eval_x=xe,
            eval_y=ye,
        )
        for m, rec in zip(members, records):
            add(f"born-again {variant} gen {rec['generation']}", "cnn 32/128", "32", m, {}, rec["seconds"])
        ens = ensemble_accuracy(members, xe, ye)
        size = 2 * storage_bytes(members[0], {})
        rows.append(
            (
                f"born-again {variant} ensemble (1+2)",
                "2 x cnn",
                "32",
                ens,
                size,
                sum(r["seconds"] for r in records),
                "not one ONNX model",
            )
        )

    return rows


def print_table(runs: list[list[tuple]], scale: float) -> None:
    """One row per arm: the median accuracy over the seeds (and its range), the first seed's
    size, the median training time."""
    n = len(runs)
    print(f"\nMNIST-1D test accuracy (1000 samples), epochs x{scale}, 1 thread, {n} seed(s): median\n")
    head = (
        f"| {'method':<38} | {'student':<10} | {'bits':<6} | {'accuracy':>8} | {'min-max':>11} "
        f"| {'size (B)':>9} | {'train (s)':>9} | note"
    )
    print(head)
    print("|" + "|".join("-" * (len(c) + 0) for c in head.split("|")[1:]))
    for i, (method, student, bits, _a, size, _sec, note) in enumerate(runs[0]):
        accs = sorted(run[i][3] for run in runs)
        secs = sorted(run[i][5] for run in runs)
        spread = f"{accs[0]:.3f}-{accs[-1]:.3f}" if n > 1 else ""
        print(
            f"| {method:<38} | {student:<10} | {bits:<6} | {median(accs):>8.3f} | {spread:>11} "
            f"| {size:>9} | {median(secs):>9.1f} | {note}"
        )


if __name__ == "__main__":
    main()
