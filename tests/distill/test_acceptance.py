"""Acceptance on MNIST-1D with the shipped CNN teacher (94.9%): the papers' claims, seeds fixed.

Budgets are the smallest at which the claims were measured to hold on this data set.
Only born-again runs at three seeds here: the other arms at three would triple the slowest
part of the suite, so their medians are reported by ``python benchmarks/distill.py --seeds 3``.
At those medians every claim below holds as asserted; quantized distillation's win over
label-only quantized training did not (a tie), so it is asserted as one.
"""

from __future__ import annotations

import pytest
import torch

from compress.metrics import evaluate
from compress.train import TrainConfig, fit

pytestmark = pytest.mark.slow

# The shipped teacher's recipe (scripts/train_teacher.py), at half its 60 epochs.
TRAIN = dict(lr=1e-2, optimizer="adamw", batch_size=100, seed=0)


def _acc(model, data) -> float:
    return evaluate(model, data.x_eval, data.y_eval)["accuracy"]


def test_born_again_generation_matches_teacher_and_ensemble_beats_generations(run_distill, teacher, mnist1d):
    """The claims at the median of 3 training seeds, at half the teacher's 60-epoch budget.

    Measured (2-core CPU): first generations 91.8 / 93.9 / 94.2% against the teacher's 94.9%,
    so at this budget a generation comes within 1.5 points, not level; the paper's "matches
    the teacher" needs the teacher's own budget (benchmarks/distill.py). The ensemble claim
    holds as stated.
    """
    firsts, ensemble_wins = [], []
    for seed in (0, 1, 2):
        _state, ctx, _ = run_distill(
            {
                "method": "born_again",
                "generations": 2,
                "variant": "ban",
                "select": "best",
                "train": {"epochs": 30, **TRAIN, "seed": seed},
            }
        )
        m = ctx.metrics
        accs = [g["accuracy"] for g in m["generations"]]
        assert m["student_accuracy"] == max(accs)
        firsts.append(accs[0])
        ensemble_wins.append(m["ensemble_accuracy"] - max(accs))
        teacher_accuracy = m["teacher_accuracy"]
    firsts.sort()
    ensemble_wins.sort()
    assert firsts[1] >= teacher_accuracy - 0.015, (firsts, teacher_accuracy)
    assert ensemble_wins[1] >= 0, ensemble_wins


def _half_width():
    from compress.zoo import mnist1d_cnn

    torch.manual_seed(0)
    return mnist1d_cnn(channels=16, hidden=64)


def test_quantized_distillation_4bit_half_width(mnist1d, teacher, one_thread):
    """Polino et al.: a 4-bit half-width student distilled while quantized stays within 2
    points of the teacher and beats the label-trained student rounded afterwards. It does not
    beat label-only quantized training on this data: at the median of 3 seeds the two tie
    (`python benchmarks/distill.py --seeds 3`, 3200 steps: 0.930 (0.930-0.943) against 0.932
    (0.919-0.943); RTN after training 0.881; teacher 0.949), so that comparison is checked to
    one point, not as a win."""
    from compress.distill.quantized import quantized_distill, rtn_bucket_quantize

    x, y = mnist1d.x, mnist1d.y
    teacher_acc = _acc(teacher, mnist1d)
    # every arm takes 3200 optimizer steps: KD sees the train split plus one mixup copy for
    # 40 epochs, the label-only arms the train split for 80 epochs
    kd = _half_width()
    quantized_distill(kd, teacher, x, y, TrainConfig(epochs=40, **TRAIN), bits=4, temperature=2, alpha=0.7, mixup=1)
    kd_acc = _acc(kd, mnist1d)
    labels_rtn = _half_width()
    fit(labels_rtn, x, y, TrainConfig(epochs=80, **TRAIN))
    rtn_bucket_quantize(labels_rtn, 4)
    labels_q = _half_width()
    quantized_distill(labels_q, None, x, y, TrainConfig(epochs=80, **TRAIN), bits=4, alpha=0.0)
    results = {
        "teacher": teacher_acc,
        "kd": kd_acc,
        "labels+rtn": _acc(labels_rtn, mnist1d),
        "labels+qtrain": _acc(labels_q, mnist1d),
    }
    assert kd_acc > results["labels+rtn"] + 0.02, results
    assert kd_acc >= results["labels+qtrain"] - 0.01, results
    assert kd_acc >= teacher_acc - 0.02, results


@pytest.mark.parametrize("bits", [2, 3])
def test_differentiable_quantization_beats_uniform_points(run_distill, bits):
    common = {"method": "differentiable_quantization", "student": "input", "bits": bits}
    _learned, ctx_l, _ = run_distill({**common, "points_init": "quantiles", "train": {"epochs": 3, "lr": 1e-3}})
    _uniform, ctx_u, _ = run_distill({**common, "points_init": "uniform", "learn_points": False})
    acc_l, acc_u = ctx_l.metrics["student_accuracy"], ctx_u.metrics["student_accuracy"]
    assert acc_l > acc_u, (acc_l, acc_u)
    assert ctx_l.metrics["student_size_bytes"] == ctx_u.metrics["student_size_bytes"]
