"""Data sources, the shared training loop, evaluation and the quantized-tensor type."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.data import DataBundle, builtin, load_split
from compress.errors import DataError
from compress.metrics import compare_outputs, evaluate
from compress.qtensor import (
    CodebookTensor,
    UniformTensor,
    quantized_from_dict,
    signed_range,
)
from compress.recipe import DataSplitSpec
from compress.train import TrainConfig, fit, kd_loss
from compress.zoo import ZOO


def make_xy(n=50, d=64, seed=0):
    """A data callable for the 'callable' source."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.integers(0, 10, n)


def callable_source(split):
    return make_xy(30 if split == "test" else 50)


def test_builtin_sources_are_deterministic_and_sized():
    x, y = builtin("mnist1d", "train")
    assert x.shape == (4000, 40) and y.shape == (4000,) and set(np.unique(y)) == set(range(10))
    assert builtin("mnist1d", "test")[0].shape == (1000, 40)
    dx, _dy = builtin("digits", "train")
    assert dx.shape == (1437, 64) and dx.max() <= 1.0
    assert np.array_equal(builtin("digits", "test")[1], builtin("digits", "test")[1])


@pytest.mark.parametrize("fmt", ["npz", "pt"])
def test_file_sources(tmp_path, fmt):
    x, y = make_xy()
    if fmt == "npz":
        np.savez(tmp_path / "d.npz", x=x, y=y)
    else:
        torch.save({"x": torch.as_tensor(x), "y": torch.as_tensor(y)}, tmp_path / "d.pt")
    split = load_split("eval", DataSplitSpec(source="file", path=f"d.{fmt}"), tmp_path, (1, 64))
    assert torch.equal(split.x, torch.as_tensor(x)) and torch.equal(split.y, torch.as_tensor(y))


def test_unlabelled_file_and_subset(tmp_path):
    np.savez(tmp_path / "d.npz", x=make_xy(100)[0])
    split = load_split("calibration", DataSplitSpec(source="file", path="d.npz", samples=10), tmp_path, (1, 64))
    assert split.y is None and len(split) == 10


def test_callable_source():
    spec = DataSplitSpec(source="callable", fn=f"{__name__}:callable_source", split="test")
    assert len(load_split("eval", spec, Path("."), (1, 64))) == 30


@pytest.mark.parametrize(
    "content, message",
    [
        ({"y": np.zeros(3)}, "no array named 'x'"),
        ({"x": np.zeros((3, 64)), "y": np.zeros(4, np.int64)}, "3 samples but y has 4"),
        ({"x": np.zeros((3, 64)), "y": np.zeros(3, np.float32)}, "labels y must be integers"),
        ({"x": np.array(["a", "b"])}, "numeric array"),
    ],
)
def test_bad_data_files(tmp_path, content, message):
    np.savez(tmp_path / "d.npz", **content)
    with pytest.raises(DataError, match=message):
        load_split("eval", DataSplitSpec(source="file", path="d.npz"), tmp_path, (1, 64))


def test_bad_callable_reference():
    with pytest.raises(DataError, match="has no attribute 'nope'"):
        load_split("eval", DataSplitSpec(source="callable", fn=f"{__name__}:nope"), Path("."), None)


def test_bundle_names_missing_split():
    with pytest.raises(DataError, match="needs the data split 'train'"):
        DataBundle({})["train"]


def test_fit_learns_digits_and_is_seeded():
    x, y = (torch.as_tensor(a) for a in builtin("digits", "train"))
    xt, yt = (torch.as_tensor(a) for a in builtin("digits", "test"))
    accs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = ZOO["digits_mlp"][0](hidden=(32,))
        history = fit(model, x, y, TrainConfig(epochs=10, lr=5e-3, batch_size=64))
        accs.append(evaluate(model, xt, yt)["accuracy"])
    assert accs[0] > 0.9 and accs[0] == accs[1]
    assert history["steps"] == 10 * -(-len(x) // 64)


def test_fit_hooks_and_max_steps():
    x, y = (torch.as_tensor(a) for a in builtin("digits", "train"))
    model = ZOO["digits_mlp"][0](hidden=(16,))
    mask = torch.rand_like(model.net[0].weight) > 0.5
    calls = []

    def enforce():
        with torch.no_grad():
            model.net[0].weight.mul_(mask)
        calls.append(1)

    history = fit(model, x, y, TrainConfig(epochs=3), after_step=enforce, max_steps=7)
    assert history["steps"] == 7 and len(calls) == 7
    assert (model.net[0].weight[~mask] == 0).all()


def test_kd_loss_is_zero_when_student_equals_teacher():
    logits = torch.randn(8, 10)
    assert kd_loss(2.0, 1.0)(logits, None, logits).abs() < 1e-6
    assert kd_loss(2.0, 0.5)(logits, torch.zeros(8, dtype=torch.long), logits) > 0


def test_compare_outputs():
    ref = torch.randn(100, 10)
    m = compare_outputs(ref.clone(), ref)
    assert m["agreement"] == 1.0 and abs(m["cosine"] - 1) < 1e-12 and m["rel_error"] == 0
    assert compare_outputs(-ref, ref)["agreement"] < 0.5


def test_quantized_tensor_uniform_and_codebook():
    w = torch.randn(6, 8)
    scale = (w.abs().amax(1, keepdim=True) / 7).float()
    lo, hi = signed_range(4)
    codes = torch.clamp(torch.round(w / scale), lo, hi).to(torch.int8)
    qt = UniformTensor(codes=codes, bits=4, scale=scale)
    assert qt.granularity == "per_channel"
    assert (qt.dequantize() - w).abs().max() <= scale.max() / 2 + 1e-6
    grouped = UniformTensor(codes=codes, bits=4, scale=scale.repeat(1, 2))
    assert grouped.group_size == 4 and torch.equal(grouped.dequantize(), qt.dequantize())
    cb = CodebookTensor(
        codes=torch.randint(0, 4, (6, 8), dtype=torch.uint8), bits=2, codebook=torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    )
    assert set(cb.dequantize().unique().tolist()) <= {-1.0, 0.0, 0.5, 2.0}
    for t in (qt, grouped, cb):
        again = quantized_from_dict(t.to_dict())
        assert type(again) is type(t) and torch.equal(again.dequantize(), t.dequantize())
    with pytest.raises(dataclasses.FrozenInstanceError):
        qt.bits = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="unknown quantized tensor kind 'sparse'"):
        quantized_from_dict({**qt.to_dict(), "kind": "sparse"})
    with pytest.raises(ValueError, match="version 99"):
        quantized_from_dict({**qt.to_dict(), "version": 99})
    with pytest.raises(ValueError, match="fields"):
        quantized_from_dict({**qt.to_dict(), "codebook": torch.zeros(1, 4)})
    with pytest.raises(ValueError, match="scale shape"):
        UniformTensor(codes=codes, bits=4, scale=torch.ones(6, 3))
    with pytest.raises(ValueError, match="bits must be"):
        signed_range(9)
