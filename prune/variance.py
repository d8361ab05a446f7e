"""Variance-based structured pruning of MLP blocks (Berisha, Mehnert, Condurache, ICCV 2025).

For every MLP block ``y = W2 sigma(W1 x + b1) + b2``:

1. gather each hidden neuron's mean and variance *after* the nonlinearity over the
   calibration data (streaming: Chan et al.'s parallel update of Welford's moments per
   batch; for sequence inputs every token is a sample). Under ``--nproc N`` each process
   takes a contiguous share of the calibration batches and the per-process moments are
   merged with the same update, in float64, so every process prunes the same neurons as
   one process would;
2. pool the neurons of all blocks, rank them globally, remove the lowest ``amount``;
3. fold removed neurons' means into the next bias: ``b2' = b2 + W2[:, pruned] mu[pruned]``
   (a neuron that is constant on the data is thereby removed exactly);
4. delete rows of W1/b1 and columns of W2: the Linear modules are replaced by smaller ones,
   so the parameter count and the exported ONNX shrink.

Blocks are found by tracing (``torch.fx``; forward hooks on leaf modules when the model is
not symbolically traceable) or named in the recipe as pairs of module names.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import InputError

if TYPE_CHECKING:
    from compress.prune.config import VarianceConfig
    from compress.state import ModelState, StageContext

log = logging.getLogger(__name__)

STATISTICS = ("variance", "output_variance", "pre_activation_variance", "magnitude")
RANKING_SCOPES = ("global", "block")

ACTIVATION_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Mish,
    nn.Softplus,
    nn.Hardtanh,
)
ACTIVATION_FUNCTIONS = {
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.tanh,
    F.sigmoid,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.hardswish,
    F.hardsigmoid,
    F.mish,
    F.softplus,
    F.hardtanh,
    torch.relu,
    torch.tanh,
    torch.sigmoid,
}
ACTIVATION_METHODS = {"relu", "tanh", "sigmoid"}
# Between the activation and the second Linear (identity in eval mode).
PASSTHROUGH_MODULES = (nn.Dropout, nn.Identity)


@dataclass(frozen=True)
class MLPBlock:
    """``second(act(first(x)))``: the hidden neurons are ``first``'s outputs."""

    first: str
    second: str
    activation: str = "?"


@dataclass
class RunningMoments:
    """Per-feature mean and variance over a stream of batches (float64).

    Each batch's moments are merged with Chan et al.'s parallel update of Welford's
    algorithm, which stays accurate where sum-of-squares formulas cancel catastrophically.
    """

    n: int = 0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        """Add a batch; the last dimension is the feature axis, all others are samples.

        The moments live on ``x``'s device (float64), so statistics of a model on a GPU
        stay there."""
        x = x.detach().reshape(-1, x.shape[-1]).double()
        nb = x.shape[0]
        if nb == 0:
            return
        mb = x.mean(0)
        self.merge(nb, mb, ((x - mb) ** 2).sum(0))

    def merge(self, nb: int, mb: torch.Tensor, m2b: torch.Tensor) -> None:
        """Add the moments of ``nb`` other samples (their mean and sum of squared deviations)."""
        if nb == 0:
            return
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        assert self.mean is not None and self.m2 is not None  # set by the first non-empty batch
        n = self.n + nb
        delta = mb.to(self.mean.device) - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b.to(self.m2.device) + delta**2 * (self.n * nb / n)
        self.n = n

    @property
    def variance(self) -> torch.Tensor:
        """Population variance (divides by n)."""
        if self.n == 0 or self.m2 is None:
            raise ValueError("no samples seen")
        return self.m2 / self.n


@dataclass
class BlockStatistics:
    post: RunningMoments = field(default_factory=RunningMoments)  # after the nonlinearity
    pre: RunningMoments = field(default_factory=RunningMoments)  # before it


def merge_across_ranks(moments: list[RunningMoments], widths: list[int]) -> None:
    """Replace each rank's ``moments`` by the moments of all ranks' samples together.

    Every rank sends its ``(n, mean, m2)`` per statistic (float64, one gather for all of
    them) and merges the ranks' parts in rank order with Chan et al.'s update: the
    calibration data in its original order, and the same result on every rank. A no-op in
    one process.

    Args:
        moments: this rank's statistics, in the same order on every rank.
        widths: each statistic's number of features (a rank that saw no sample has no
            tensors to infer it from).
    """
    from compress.distributed import all_gather_tensor, rank_and_world

    if rank_and_world()[1] == 1:
        return
    device = next((m.mean.device for m in moments if m.mean is not None), torch.device("cpu"))
    parts = []
    for m, width in zip(moments, widths, strict=True):
        n = torch.tensor([float(m.n)], dtype=torch.float64, device=device)  # exact up to 2**53 samples
        if m.n == 0:
            parts += [n, torch.zeros(2 * width, dtype=torch.float64, device=device)]
        else:
            assert m.mean is not None and m.m2 is not None
            parts += [n, m.mean.to(device), m.m2.to(device)]
    gathered = all_gather_tensor(torch.cat(parts))
    for m, offset, width in zip(moments, _offsets(widths), widths, strict=True):
        m.n, m.mean, m.m2 = 0, None, None
        for buf in gathered:
            nb = int(buf[offset].item())
            mean, m2 = buf[offset + 1 : offset + 1 + width], buf[offset + 1 + width : offset + 1 + 2 * width]
            m.merge(nb, mean.clone(), m2.clone())


def _offsets(widths: list[int]) -> list[int]:
    out, at = [], 0
    for w in widths:
        out.append(at)
        at += 1 + 2 * w
    return out


# ---------------------------------------------------------------------------- finding blocks


def _is_activation_node(node: Any, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), ACTIVATION_MODULES)
    if node.op == "call_function":
        return node.target in ACTIVATION_FUNCTIONS
    if node.op == "call_method":
        return node.target in ACTIVATION_METHODS
    return False


def _is_linear_node(node: Any, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and isinstance(modules.get(node.target), nn.Linear)


def _describe(node: Any, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    return getattr(node.target, "__name__", str(node.target))


def _blocks_by_fx(module: nn.Module) -> list[MLPBlock]:
    import torch.fx

    gm = torch.fx.symbolic_trace(module)
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    blocks = []
    for node in gm.graph.nodes:
        if not _is_linear_node(node, modules) or calls[node.target] != 1:
            continue
        users = list(node.users)
        if len(users) != 1 or not _is_activation_node(users[0], modules):
            continue
        act = users[0]
        if any(isinstance(a, torch.fx.Node) and a is not node for a in act.all_input_nodes):
            continue  # e.g. an activation that mixes in another tensor
        cur = act
        while True:
            nxt = list(cur.users)
            if len(nxt) != 1:
                break
            u = nxt[0]
            if u.op == "call_module" and isinstance(modules.get(u.target), PASSTHROUGH_MODULES):
                cur = u
                continue
            if _is_linear_node(u, modules) and calls[u.target] == 1 and u.args[0] is cur:
                blocks.append(MLPBlock(node.target, u.target, _describe(act, modules)))
            break
    return blocks


def _is_activation_module(m: nn.Module) -> bool:
    # Also catches wrappers such as transformers' GELUActivation / NewGELUActivation.
    name = type(m).__name__
    return isinstance(m, ACTIVATION_MODULES) or name.endswith("Activation") or "GELU" in name


def _blocks_by_hooks(module: nn.Module, example_input: torch.Tensor) -> list[MLPBlock]:
    """Dataflow between leaf modules, seen by forward hooks on one example forward pass.

    Weaker than fx: a functional use of the first Linear's output elsewhere is invisible,
    so this is only the fallback for models ``torch.fx`` cannot trace.
    """
    records: list[tuple[str, nn.Module, list[int], int]] = []
    alive: list[torch.Tensor] = []  # keep tensors referenced so ids are not reused

    def hook(name):
        def fn(m, inputs, output):
            ins = [id(t) for t in inputs if isinstance(t, torch.Tensor)]
            alive.extend(t for t in inputs if isinstance(t, torch.Tensor))
            if isinstance(output, torch.Tensor):
                alive.append(output)
                records.append((name, m, ins, id(output)))

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in module.named_modules() if n and not list(m.children())]
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            module(example_input)
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    calls: dict[str, int] = {}
    for name, *_ in records:
        calls[name] = calls.get(name, 0) + 1
    consumers: dict[int, list[int]] = {}
    for i, (_, _, ins, _) in enumerate(records):
        for t in ins:
            consumers.setdefault(t, []).append(i)
    blocks = []
    for name, m, _, out in records:
        if not isinstance(m, nn.Linear) or calls[name] != 1:
            continue
        users = consumers.get(out, [])
        if len(users) != 1 or not _is_activation_module(records[users[0]][1]):
            continue
        act = records[users[0]]
        cur = act
        while True:
            nxt = consumers.get(cur[3], [])
            if len(nxt) != 1:
                break
            rec = records[nxt[0]]
            if isinstance(rec[1], PASSTHROUGH_MODULES):
                cur = rec
                continue
            if isinstance(rec[1], nn.Linear) and calls[rec[0]] == 1:
                blocks.append(MLPBlock(name, rec[0], type(act[1]).__name__))
            break
    return blocks


TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _transformer_ffn_blocks(module: nn.Module) -> list[MLPBlock]:
    """The feed-forward block (``linear1 -> activation -> dropout -> linear2``) of every
    PyTorch Transformer encoder/decoder layer: torch.fx treats those layers as leaves."""
    blocks = []
    for name, m in module.named_modules():
        if isinstance(m, TRANSFORMER_LAYERS):
            act = m.activation
            label = type(act).__name__ if isinstance(act, nn.Module) else getattr(act, "__name__", "activation")
            prefix = f"{name}." if name else ""
            blocks.append(MLPBlock(f"{prefix}linear1", f"{prefix}linear2", label))
    return blocks


class no_mha_fastpath:
    """PyTorch's fused Transformer fast path skips the submodule calls (and their hooks)."""

    def __enter__(self):
        self.before = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)

    def __exit__(self, *exc):
        torch.backends.mha.set_fastpath_enabled(self.before)


@torch.no_grad()
def sole_consumer(module: nn.Module, block: MLPBlock, example_input: torch.Tensor) -> bool:
    """Whether the block's second Linear is the only consumer of its hidden activation.

    Checked by perturbing the activation after it leaves ``first`` -> activation and
    undoing the perturbation where ``second`` receives it: the model's output changes
    only when something else (a residual add, a functional use) also reads the activation.
    """
    mods = dict(module.named_modules())
    first_out: list[torch.Tensor] = []
    delta: list[torch.Tensor] = []
    perturbed: list[torch.Tensor] = []
    g = torch.Generator().manual_seed(0)

    def after_first(_m, _i, out):
        first_out.append(out)

    def perturb(_m, inputs, out):
        if first_out and inputs and inputs[0] is first_out[-1] and not delta:
            d = torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)
            delta.append(d)
            perturbed.append(out + d)
            return perturbed[-1]
        return None

    def undo(_m, args):
        if delta and perturbed and args[0].shape == perturbed[-1].shape and torch.equal(args[0], perturbed[-1]):
            return (args[0] - delta[-1],)
        return None

    acts = [m for m in mods.values() if _is_activation_module(m)]
    was_training = module.training
    module.eval()
    handles = []
    try:
        reference = module(example_input)
        handles = [
            mods[block.first].register_forward_hook(after_first),
            mods[block.second].register_forward_pre_hook(undo),
        ]
        handles += [a.register_forward_hook(perturb) for a in acts]
        out = module(example_input)
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    if not delta:
        return False  # the activation was not seen as a module call: cannot vouch for it
    # Models may return tuples or output objects (a dict subclass): compare every tensor in them.
    pairs = list(zip(_tensors_of(out), _tensors_of(reference), strict=True))
    if not pairs:
        return False
    for got, ref in pairs:
        scale = ref.abs().max().clamp_min(1e-12)
        if not bool(((got - ref).abs().max() / scale) < 1e-4):
            return False
    return True


def _tensors_of(out: object) -> list[torch.Tensor]:
    """The floating-point tensors in a model output (a tensor, a tuple/list or a mapping)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors_of(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors_of(v)]
    return []


def find_mlp_blocks(
    module: nn.Module, example_input: torch.Tensor | None = None, skipped: list[dict] | None = None
) -> list[MLPBlock]:
    """Every ``Linear -> activation [-> Dropout] -> Linear`` block of ``module``, the
    feed-forward blocks of Transformer encoder/decoder layers included.

    Uses ``torch.fx`` (exact dataflow); when the model cannot be symbolically traced,
    forward hooks on one pass over ``example_input``, and each block found so is kept only
    when its second Linear is the sole consumer of the hidden activation (``sole_consumer``:
    a residual add would otherwise see removed neurons). Blocks left out that way are
    appended to ``skipped`` (``{"first", "second", "reason"}``) and logged.

    Raises:
        ValueError: the model cannot be traced and no example input was given.
    """
    ffn = _transformer_ffn_blocks(module)
    try:
        blocks = _blocks_by_fx(module)
        log.debug("fx found %d MLP blocks", len(blocks))
    except Exception as err:  # fx raises many types on untraceable control flow
        if example_input is None:
            raise ValueError(
                f"torch.fx cannot trace {type(module).__name__} ({err}); pass an example input or "
                "name the blocks in the recipe ('blocks: [[first_linear, second_linear], ...]')"
            ) from err
        log.info("torch.fx cannot trace %s (%s); finding MLP blocks with forward hooks", type(module).__name__, err)
        with no_mha_fastpath():
            found = _blocks_by_hooks(module, example_input)
            blocks = []
            in_ffn = {b.first for b in ffn}
            for b in found:
                if b.first in in_ffn or sole_consumer(module, b, example_input):
                    blocks.append(b)
                    continue
                reason = (
                    f"the activation after {b.first} also feeds something other than {b.second} "
                    "(a residual connection?): removing its neurons would change that path"
                )
                log.warning("variance pruning: skipping block %s -> %s: %s", b.first, b.second, reason)
                if skipped is not None:
                    skipped.append({"first": b.first, "second": b.second, "reason": reason})
    known = {b.first for b in blocks}
    return blocks + [b for b in ffn if b.first not in known]


def check_blocks(module: nn.Module, blocks: Iterable[MLPBlock]) -> list[MLPBlock]:
    """Validate named blocks: both ends exist, are Linear, and agree on the hidden width."""
    mods = dict(module.named_modules())
    out = []
    for b in blocks:
        for name in (b.first, b.second):
            if name not in mods:
                raise ValueError(f"MLP block {b.first!r} -> {b.second!r}: no module named {name!r}")
            if not isinstance(mods[name], nn.Linear):
                raise ValueError(
                    f"MLP block {b.first!r} -> {b.second!r}: {name!r} is {type(mods[name]).__name__}, not nn.Linear"
                )
        if mods[b.first].out_features != mods[b.second].in_features:
            raise ValueError(
                f"MLP block {b.first!r} -> {b.second!r}: hidden widths differ "
                f"({mods[b.first].out_features} vs {mods[b.second].in_features})"
            )
        out.append(b)
    firsts = [b.first for b in out]
    if len(set(firsts)) != len(firsts):
        raise ValueError(f"a Linear starts more than one MLP block: {firsts}")
    return out


# ------------------------------------------------------------------------------ statistics


@torch.no_grad()
def collect_statistics(
    module: nn.Module, blocks: list[MLPBlock], batches: Iterable[torch.Tensor]
) -> dict[MLPBlock, BlockStatistics]:
    """Streaming moments of each block's hidden activations, before and after sigma.

    The post-activation value is what the second Linear receives (Dropout is identity in
    eval mode), so any activation, module or functional, is covered. When the model defines
    ``token_mask(x)`` (``compress.padding``), padding positions are left out. Batches are
    moved to the model's device; the moments stay there.

    Under a process group (``compress.distributed``), each rank runs its contiguous share
    of the batches (whole batches, so each sample is computed as in one process) and the
    moments are merged across ranks (``merge_across_ranks``): every rank returns the same
    statistics, those of all the batches. Every rank must call it.
    """
    from compress.distributed import rank_and_world, shard_bounds
    from compress.padding import token_mask, valid_rows

    if rank_and_world()[1] > 1:
        batches = list(batches)  # views of the calibration tensor: cheap
        start, stop = shard_bounds(len(batches))
        batches = batches[start:stop]
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    mods = dict(module.named_modules())
    stats = {b: BlockStatistics() for b in blocks}
    handles = []
    # Padding positions (a model's ``token_mask``) are not samples: they never reach the output.
    current: list[torch.Tensor | None] = [None]
    for b in blocks:
        s = stats[b]
        handles.append(
            mods[b.first].register_forward_hook(lambda m, i, o, s=s: s.pre.update(valid_rows(o, current[0])))
        )
        handles.append(
            mods[b.second].register_forward_pre_hook(lambda m, i, s=s: s.post.update(valid_rows(i[0], current[0])))
        )
    was_training = module.training
    module.eval()
    try:
        with no_mha_fastpath():
            for xb in batches:
                xb = xb.to(device)
                current[0] = token_mask(module, xb)
                module(xb)
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    widths = [w for b in blocks for w in (mods[b.first].out_features,) * 2]
    merge_across_ranks([m for b in blocks for m in (stats[b].pre, stats[b].post)], widths)
    for b, s in stats.items():
        if s.post.n == 0:
            raise ValueError(f"MLP block {b.first!r} -> {b.second!r} never ran on the calibration data")
    return stats


def neuron_scores(
    module: nn.Module, blocks: list[MLPBlock], stats: dict[MLPBlock, BlockStatistics], statistic: str
) -> dict[MLPBlock, torch.Tensor]:
    """Per-neuron importance: low scores are removed first."""
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; allowed: {', '.join(STATISTICS)}")
    mods = dict(module.named_modules())
    if statistic == "variance":
        return {b: stats[b].post.variance for b in blocks}
    if statistic == "output_variance":
        # Var(h_j) * ||W2[:, j]||^2: exactly the mean squared output change that removing
        # neuron j (with its mean folded) causes, so neurons of blocks whose next layer
        # scales differently compete fairly in the global ranking.
        return {b: stats[b].post.variance * mods[b.second].weight.detach().double().pow(2).sum(0) for b in blocks}
    if statistic == "pre_activation_variance":
        return {b: stats[b].pre.variance for b in blocks}
    return {b: mods[b.first].weight.detach().double().norm(dim=1) for b in blocks}


def select_pruned(
    scores: dict[MLPBlock, torch.Tensor], amount: float, min_neurons: int = 1, scope: str = "global"
) -> dict[MLPBlock, torch.Tensor]:
    """The lowest-scoring ``round(amount * total)`` neurons, each block keeping ``min_neurons``.

    Args:
        scores: per block, one score per hidden neuron.
        amount: fraction to remove.
        min_neurons: neurons every block keeps.
        scope: ``"global"`` ranks all blocks' neurons together (the method); ``"block"``
            removes ``amount`` of each block separately.

    Returns:
        Per block, a bool tensor over its hidden neurons (True = removed).
    """
    if not 0 <= amount < 1:
        raise ValueError(f"pruning amount must be in [0, 1), got {amount}")
    if scope not in RANKING_SCOPES:
        raise ValueError(f"unknown ranking scope {scope!r}; allowed: {', '.join(RANKING_SCOPES)}")
    if scope == "block":
        out: dict[MLPBlock, torch.Tensor] = {}
        for b, s in scores.items():
            out.update(select_pruned({b: s}, amount, min_neurons, "global"))
        return out
    blocks = list(scores)
    total = sum(s.numel() for s in scores.values())
    k = round(amount * total)
    removed = {b: torch.zeros(scores[b].numel(), dtype=torch.bool) for b in blocks}
    if k == 0 or not blocks:
        return removed
    flat = torch.cat([scores[b].double() for b in blocks])
    owner = torch.cat([torch.full((scores[b].numel(),), i) for i, b in enumerate(blocks)])
    local = torch.cat([torch.arange(scores[b].numel()) for b in blocks])
    order = torch.sort(flat, stable=True).indices
    left = [scores[b].numel() for b in blocks]
    taken = 0
    for idx in order.tolist():
        if taken == k:
            break
        i = int(owner[idx])
        if left[i] <= min_neurons:
            continue
        removed[blocks[i]][int(local[idx])] = True
        left[i] -= 1
        taken += 1
    if taken < k:
        log.warning("removed %d neurons instead of %d: every block keeps at least %d", taken, k, min_neurons)
    return removed


# ------------------------------------------------------------------------------- surgery


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


@torch.no_grad()
def remove_neurons(
    module: nn.Module,
    removed: dict[MLPBlock, torch.Tensor],
    means: dict[MLPBlock, torch.Tensor] | None = None,
    masks: dict[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, Any]]:
    """Physically delete the removed neurons, folding their means into the next bias.

    Args:
        module: changed in place: the blocks' Linear modules are replaced.
        removed: per block, True for each hidden neuron to delete.
        means: per block, the post-activation means to fold (None: no fold).
        masks: pruning masks by parameter name, sliced along with their parameters.

    Returns:
        Per replaced Linear: its new ``in_features`` / ``out_features``.
    """
    mods = dict(module.named_modules())
    out_keep: dict[str, torch.Tensor] = {}
    in_keep: dict[str, torch.Tensor] = {}
    bias_delta: dict[str, torch.Tensor] = {}
    for b, rem in removed.items():
        keep = torch.nonzero(~rem).flatten()
        out_keep[b.first] = keep
        in_keep[b.second] = keep
        if means is not None and rem.any():
            w2 = mods[b.second].weight.double()
            bias_delta[b.second] = w2[:, rem] @ means[b].double().to(w2.device)[rem]
    report = {}
    for name in sorted(set(out_keep) | set(in_keep)):
        old: nn.Linear = mods[name]
        w = old.weight
        rows = out_keep.get(name, torch.arange(old.out_features))
        cols = in_keep.get(name, torch.arange(old.in_features))
        delta = bias_delta.get(name)
        bias: torch.Tensor | None = old.bias
        if delta is not None:
            bias = (
                torch.zeros(old.out_features, dtype=torch.float64, device=w.device) if bias is None else bias.double()
            ) + delta
        new = nn.Linear(len(cols), len(rows), bias=bias is not None, device=w.device, dtype=w.dtype)
        new.weight.copy_(w[rows][:, cols])
        if bias is not None:
            new.bias.copy_(bias[rows].to(w.dtype))
        new.train(old.training)
        _set_submodule(module, name, new)
        if masks is not None:
            wname = f"{name}.weight"
            if wname in masks:
                masks[wname] = masks[wname][rows][:, cols]
            bname = f"{name}.bias"
            if bname in masks:
                masks[bname] = masks[bname][rows]
                if delta is not None:  # a folded bias is a new value; keep it
                    masks[bname] = torch.ones_like(masks[bname])
        report[name] = {"in_features": len(cols), "out_features": len(rows)}
    return report


def variance_prune(
    module: nn.Module,
    batches: Iterable[torch.Tensor],
    amount: float,
    *,
    blocks: list[MLPBlock] | None = None,
    statistic: str = "variance",
    mean_fold: bool = True,
    min_neurons: int = 1,
    scope: str = "global",
    example_input: torch.Tensor | None = None,
    masks: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Prune ``module``'s MLP blocks in place; the functional core of the stage.

    Args:
        module: changed in place.
        batches: calibration inputs.
        amount: fraction of all blocks' hidden neurons to remove.
        blocks: the blocks; None finds them by tracing.
        statistic: ``variance`` (post-activation), or the ablations
            ``pre_activation_variance`` / ``magnitude``.
        mean_fold: fold removed neurons' means into the next bias.
        min_neurons: neurons each block keeps at least.
        scope: ``global`` ranking over all blocks (the method) or per ``block``.
        example_input: for tracing by hooks when fx fails.
        masks: pruning masks to slice along (see ``remove_neurons``).

    Returns:
        A report: per block the hidden width before/after, and the removed count.
    """
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; allowed: {', '.join(STATISTICS)}")
    skipped: list[dict] = []
    blocks = check_blocks(module, blocks if blocks is not None else find_mlp_blocks(module, example_input, skipped))
    if not blocks:
        raise InputError(
            f"no Linear -> activation -> Linear block found in {type(module).__name__}; "
            "name them in the recipe as 'blocks: [[first_linear, second_linear], ...]'"
        )
    stats = collect_statistics(module, blocks, batches)
    scores = neuron_scores(module, blocks, stats, statistic)
    removed = select_pruned(scores, amount, min_neurons, scope)
    means: dict[MLPBlock, torch.Tensor] | None = None
    if mean_fold:
        means = {}
        for b in blocks:
            mean = stats[b].post.mean
            assert mean is not None  # collect_statistics raises for a block that never ran
            means[b] = mean
    remove_neurons(module, removed, means, masks)
    report = {
        "blocks": [
            {
                "first": b.first,
                "second": b.second,
                "activation": b.activation,
                "hidden_before": int(removed[b].numel()),
                "hidden_after": int((~removed[b]).sum()),
            }
            for b in blocks
        ],
        "neurons_removed": int(sum(int(r.sum()) for r in removed.values())),
        "neurons_total": int(sum(r.numel() for r in removed.values())),
        "calibration_samples": int(next(iter(stats.values())).post.n),
        "skipped_blocks": skipped,
    }
    log.info(
        "variance pruning (%s, fold=%s): removed %d of %d hidden neurons in %d blocks",
        statistic,
        mean_fold,
        report["neurons_removed"],
        report["neurons_total"],
        len(blocks),
    )
    return report


def apply_variance(state: ModelState, config: VarianceConfig, ctx: StageContext) -> ModelState:
    """The stage's variance method: prune, then optionally fine-tune with distillation."""
    from compress.prune.training import evaluate_split, finetune

    if state.quant:
        raise InputError(
            f"variance pruning must run before quantization; quantized parameters present: {sorted(state.quant)}"
        )
    calib = ctx.data.calibration()
    blocks = [MLPBlock(a, b) for a, b in config.blocks] if config.blocks is not None else None
    device = next((p.device for p in state.module.parameters()), torch.device("cpu"))
    report = variance_prune(
        state.module,
        calib.batches(config.calibration_batch_size),
        config.amount,
        blocks=blocks,
        statistic=config.statistic,
        mean_fold=config.mean_fold,
        min_neurons=config.min_neurons,
        scope=config.scope,
        example_input=calib.x[:2].to(device),
        masks=state.masks,
    )
    state.apply_masks()
    ctx.metrics.update(report)
    from compress.coverage import parameter_coverage

    names = {f"{b[k]}.weight" for b in report["blocks"] for k in ("first", "second")}
    ctx.metrics["coverage"] = parameter_coverage(
        state.module,
        names,
        {},
        what="prune",
        unsupported_kinds=lambda m: f"{type(m).__name__}, not in a Linear -> activation -> Linear block",
    )
    if skipped_note := [f"skipped {b['first']} -> {b['second']}: {b['reason']}" for b in report["skipped_blocks"]]:
        ctx.metrics["notes"] = skipped_note
    ctx.metrics["accuracy_pruned"] = evaluate_split(state.module, ctx)
    if config.finetune is not None and config.finetune.epochs > 0:
        from compress.prune.magnitude import MaskEnforcer

        enforce = MaskEnforcer(state.module, state.masks) if state.masks else None
        ctx.metrics["finetune"] = finetune(state.module, config.finetune, config, ctx, after_step=enforce)
        ctx.metrics["accuracy_finetuned"] = evaluate_split(state.module, ctx)
    return state
