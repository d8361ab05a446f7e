"""Folding eval-mode BatchNorm into the convolution or Linear layer that feeds it.

Quantizers must see the weights that actually run. ONNX exporters fold ``Conv -> BatchNorm``
into one convolution themselves; quantizing the unfolded weight would then quantize a
weight that never runs (and the export could not find it). So BatchNorm is folded in
PyTorch first, as an explicit step: for ``y = BN(conv(x))`` with running statistics
``mu, var``, affine ``gamma, beta`` and ``eps``::

    s = gamma / sqrt(var + eps);   W' = W * s (per output channel);   b' = (b - mu) * s + beta

and the BatchNorm module is replaced by ``nn.Identity``. Which pairs were folded is kept in
``state.extras["batchnorm_folded"]``, so ``replay_folds`` can rebuild the folded
architecture when a cached stage state is reloaded onto a fresh copy of the base model.

Pairs are found by running the model once with hooks (a BatchNorm whose input tensor is the
output of a Conv/Linear called once), so this works for models torch.fx cannot trace.
Each fold is then verified numerically: if the model's output changes (the conv output
also fed something else, e.g. a residual branch), that fold is undone and reported.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

FOLDABLE_PRODUCERS = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
EXTRAS_KEY = "batchnorm_folded"


def find_pairs(module: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """``(producer, batchnorm)`` module names where the BatchNorm's input is exactly the
    output of a Conv/Linear layer, each called once in a forward pass on ``example``."""
    outputs: dict[int, str] = {}
    calls: dict[str, int] = {}
    bn_inputs: dict[str, int] = {}
    alive: list[torch.Tensor] = []  # held so that no tensor id is reused during the pass

    def producer_hook(name):
        def fn(_m, _inputs, output):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(output, torch.Tensor):
                outputs[id(output)] = name
                alive.append(output)

        return fn

    def bn_hook(name):
        def fn(_m, inputs):
            calls[name] = calls.get(name, 0) + 1
            if inputs and isinstance(inputs[0], torch.Tensor):
                bn_inputs[name] = id(inputs[0])
                alive.append(inputs[0])

        return fn

    handles = []
    for name, m in module.named_modules():
        if isinstance(m, FOLDABLE_PRODUCERS):
            handles.append(m.register_forward_hook(producer_hook(name)))
        elif isinstance(m, BATCHNORMS):
            handles.append(m.register_forward_pre_hook(bn_hook(name)))
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            module(example)
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    pairs = []
    for bn, tid in bn_inputs.items():
        producer = outputs.get(tid)
        if producer is not None and calls.get(producer) == 1 and calls.get(bn) == 1:
            pairs.append((producer, bn))
    return pairs


def unfoldable_batchnorms(module: nn.Module, pairs: list[tuple[str, str]]) -> list[str]:
    """BatchNorm modules that are not part of a foldable pair."""
    paired = {bn for _, bn in pairs}
    return [n for n, m in module.named_modules() if isinstance(m, BATCHNORMS) and n not in paired]


@torch.no_grad()
def fold_pair(module: nn.Module, producer: str, bn: str) -> None:
    """Fold BatchNorm ``bn`` (eval statistics) into ``producer`` and replace it by Identity."""
    layer = module.get_submodule(producer)
    norm = module.get_submodule(bn)
    if not isinstance(layer, FOLDABLE_PRODUCERS) or not isinstance(norm, BATCHNORMS):
        raise TypeError(f"cannot fold {bn} ({type(norm).__name__}) into {producer} ({type(layer).__name__})")
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError(f"{bn} has no running statistics (track_running_stats=False): cannot fold it")
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):  # weight (in, out / groups, *k)
        out = int(layer.weight.shape[1]) * layer.groups
    else:
        out = int(layer.weight.shape[0])
    if norm.num_features != out:
        raise ValueError(f"{bn} normalises {norm.num_features} channels but {producer} has {out} outputs")
    s = norm.running_var.double().add(norm.eps).rsqrt()
    if norm.weight is not None:
        s = s * norm.weight.double()
    shift = -norm.running_mean.double() * s
    if norm.bias is not None:
        shift = shift + norm.bias.double()
    kernel = [1] * (layer.weight.dim() - 2)
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        # output channel g * (out / groups) + j is column j of group g's rows
        cin, per_group = int(layer.weight.shape[0]), int(layer.weight.shape[1])
        groups = out // per_group
        per = s.reshape(groups, 1, per_group, *kernel).expand(groups, cin // groups, per_group, *kernel)
        w = layer.weight.double() * per.reshape(cin, per_group, *kernel)
    else:
        w = layer.weight.double() * s.reshape(-1, 1, *kernel)
    layer.weight.copy_(w.to(layer.weight.dtype))
    bias = shift if layer.bias is None else layer.bias.double() * s + shift
    if layer.bias is None:
        layer.bias = nn.Parameter(bias.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
    else:
        layer.bias.copy_(bias.to(layer.bias.dtype))
    _set_submodule(module, bn, nn.Identity())


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def fold_batchnorm(
    module: nn.Module, example: torch.Tensor, *, skip: set[str] | frozenset[str] = frozenset(), rtol: float = 1e-3
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Fold every foldable BatchNorm of ``module`` in place (eval statistics).

    Args:
        module: the model.
        example: a few real inputs: pairs are found on them and each fold is checked on them.
        skip: producer names that must not change (e.g. already quantized weights).
        rtol: a fold is kept only when the model's output stays within this relative error.

    Returns:
        ``folded`` (``[{"bn", "into"}]``, in the order applied) and ``left``
        (``[{"bn", "reason"}]``): BatchNorms that stay, with why.
    """
    pairs = find_pairs(module, example)
    folded: list[dict[str, str]] = []
    left = [
        {"bn": n, "reason": "its input is not the output of a Conv/Linear layer called once"}
        for n in unfoldable_batchnorms(module, pairs)
    ]
    if not pairs:
        return folded, left
    was_training = module.training
    module.eval()
    with torch.no_grad():
        reference = module(example).float()
    scale = reference.abs().max().clamp_min(1e-12)
    for producer, bn in pairs:
        if producer in skip:
            left.append({"bn": bn, "reason": f"{producer} is already quantized"})
            continue
        layer, norm = module.get_submodule(producer), module.get_submodule(bn)
        assert isinstance(layer, FOLDABLE_PRODUCERS)  # find_pairs pairs only these producers
        weight = layer.weight.detach().clone()
        bias = None if layer.bias is None else layer.bias.detach().clone()
        try:
            fold_pair(module, producer, bn)
        except ValueError as err:
            left.append({"bn": bn, "reason": str(err)})
            continue
        with torch.no_grad():
            rel_err = (module(example).float() - reference).abs().max() / scale
        if rel_err > rtol:
            # The producer's output also feeds something besides the BatchNorm: undo.
            with torch.no_grad():
                layer.weight.copy_(weight)
                if bias is None:
                    layer.bias = None
                else:
                    assert layer.bias is not None  # fold_pair only ever adds a bias
                    layer.bias.copy_(bias)
            _set_submodule(module, bn, norm)
            left.append(
                {
                    "bn": bn,
                    "reason": f"{producer}'s output is also used elsewhere (fold changed the output by {rel_err:.2g})",
                }
            )
            continue
        folded.append({"bn": bn, "into": producer})
    module.train(was_training)
    for f in folded:
        log.info("folded BatchNorm %s into %s", f["bn"], f["into"])
    return folded, left


def replay_folds(module: nn.Module, folded: list[dict[str, Any]]) -> None:
    """Give a fresh base model the folded architecture: each folded BatchNorm becomes
    Identity and its producer gets a bias (values come from the saved state_dict)."""
    for f in folded:
        layer = module.get_submodule(f["into"])
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype))
        _set_submodule(module, f["bn"], nn.Identity())
