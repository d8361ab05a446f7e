"""Born-again losses (BAN, BAN+L, CWTM, DKPP), generations and the ensemble."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compress.distill.born_again import SoftmaxEnsemble, ban_loss, born_again, ensemble_accuracy, permute_non_max


def test_dkpp_permutes_only_the_non_argmax_probabilities():
    g = torch.Generator().manual_seed(0)
    p = F.softmax(torch.randn(200, 10, generator=g) * 3, -1)
    q = permute_non_max(p, g)
    assert torch.equal(q.argmax(-1), p.argmax(-1))
    assert torch.equal(q.max(-1).values, p.max(-1).values)
    assert torch.equal(q.sort(-1).values, p.sort(-1).values)  # the same values per row
    assert (q != p).any(-1).float().mean() > 0.9  # and they moved


def test_ban_losses():
    g = torch.Generator().manual_seed(1)
    s, t, y = (
        torch.randn(32, 10, generator=g),
        torch.randn(32, 10, generator=g),
        torch.randint(0, 10, (32,), generator=g),
    )
    p = F.softmax(t, -1)
    ce_soft = -(p * F.log_softmax(s, -1)).sum(-1).mean()
    torch.testing.assert_close(ban_loss("ban")(s, y, t), ce_soft)
    torch.testing.assert_close(ban_loss("ban_l")(s, y, t), ce_soft + F.cross_entropy(s, y))
    w = p.max(-1).values / p.max(-1).values.sum()
    torch.testing.assert_close(ban_loss("cwtm")(s, y, t), (w * F.cross_entropy(s, y, reduction="none")).sum())
    # equally confident teacher: CWTM is plain cross-entropy
    flat = torch.zeros(32, 10)
    torch.testing.assert_close(ban_loss("cwtm")(s, y, flat), F.cross_entropy(s, y))
    # DKPP's target keeps the entropy of the teacher's distribution
    dk = ban_loss("dkpp")(t, y, t)
    assert dk >= -(p * p.log()).sum(-1).mean() - 1e-6
    with pytest.raises(ValueError, match="uses labels"):
        ban_loss("ban_l")(s, None, t)
    with pytest.raises(ValueError, match="not one of ban, ban_l, cwtm, dkpp"):
        ban_loss("bane")


def test_generations_and_ensemble(mnist1d, one_thread):
    from compress.distill.kd import reinitialize
    from compress.train import TrainConfig, fit
    from compress.zoo import mnist1d_mlp

    torch.manual_seed(0)
    teacher = mnist1d_mlp(hidden=(32,))
    x, y = mnist1d.x[:1000], mnist1d.y[:1000]
    fit(teacher, x, y, TrainConfig(epochs=2, lr=1e-2))
    before = [p.clone() for p in teacher.parameters()]
    members, records = born_again(
        teacher,
        lambda k: reinitialize(teacher, k),
        x,
        y,
        TrainConfig(epochs=1, lr=1e-2),
        generations=2,
        variant="ban_l",
        eval_x=mnist1d.x_eval,
        eval_y=mnist1d.y_eval,
    )
    assert [r["generation"] for r in records] == [1, 2] and len(members) == 2
    assert all(0 <= r["accuracy"] <= 1 for r in records)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))  # the teacher is untouched
    assert not torch.equal(members[0].net[0].weight, members[1].net[0].weight)
    ens = SoftmaxEnsemble(members)
    torch.testing.assert_close(ens(x[:5]).exp().sum(-1), torch.ones(5))
    assert 0 <= ensemble_accuracy(members, mnist1d.x_eval, mnist1d.y_eval) <= 1
