"""Train a reference teacher from the zoo and save its state_dict (re-runnable, seeded).

    python scripts/train_teacher.py mnist1d_cnn recipes/models/mnist1d_cnn.pt

The shipped quickstart teacher was produced by exactly this command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from compress.data import builtin
from compress.metrics import evaluate
from compress.train import TrainConfig, fit
from compress.zoo import ZOO


def train(name: str, epochs: int, seed: int = 0) -> tuple[torch.nn.Module, float]:
    factory, _, source = ZOO[name]
    torch.manual_seed(seed)
    model = factory()
    x, y = (torch.as_tensor(a) for a in builtin(source, "train"))
    xt, yt = (torch.as_tensor(a) for a in builtin(source, "test"))
    cfg = TrainConfig(epochs=epochs, lr=1e-2, optimizer="adamw", weight_decay=0.0, batch_size=100, seed=seed)
    fit(model, x, y, cfg)
    return model, evaluate(model, xt, yt)["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(ZOO))
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, acc = train(args.name, args.epochs, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    meta = {"model": args.name, "epochs": args.epochs, "seed": args.seed, "test_accuracy": acc}
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{args.name}: test accuracy {acc:.4f} -> {args.out}")


if __name__ == "__main__":
    main()
