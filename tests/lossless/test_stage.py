"""The compress stage: packs the state, records metrics, round-trips bit-exactly."""

from __future__ import annotations

import dataclasses

import torch

from compress.lossless.config import CompressStageConfig
from compress.lossless.stage import apply, unpack_state_tensors
from compress.qtensor import CodebookTensor, UniformTensor
from compress.registry import stages
from compress.state import ModelState, StageContext


def make_state() -> ModelState:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.BatchNorm1d(64), torch.nn.Linear(64, 10))
    state = ModelState(module=model, input_shape=(1, 32))
    w0 = model[0].weight.detach()
    scale = w0.abs().amax(dim=1, keepdim=True) / 7
    codes = torch.clamp(torch.round(w0 / scale), -8, 7).to(torch.int8)
    state.quant["0.weight"] = UniformTensor(codes=codes, bits=4, scale=scale, method="rtn")
    idx = torch.randint(0, 16, model[2].weight.shape, dtype=torch.uint8)
    state.quant["2.weight"] = CodebookTensor(
        codes=idx,
        bits=4,
        codebook=torch.randn(1, 16),
        codebook_of_row=torch.zeros(10, dtype=torch.int64),
        method="kmeans",
    )
    state.masks["0.weight"] = torch.rand(w0.shape) > 0.8
    state.sync_quantized()
    state.apply_masks()
    return state


def test_stage_registered_without_heavy_imports() -> None:
    assert stages()["compress"].config is CompressStageConfig
    assert CompressStageConfig().level == 3


def test_apply_and_roundtrip(tmp_path) -> None:
    state = make_state()
    ctx = StageContext(data=None, out_dir=tmp_path, device=torch.device("cpu"), reference=state.module)
    out = apply(state, CompressStageConfig(threads=2), ctx)
    assert out is state
    m = ctx.metrics
    assert (tmp_path / "weights.czip").stat().st_size == m["packed_bytes"]
    assert m["dense_bytes"] == sum(p.numel() * 4 for p in state.module.parameters())
    assert m["packed_bytes"] < m["dense_bytes"] / 2
    assert 0 < m["nonzeros"] < m["n_params"]
    assert m["per_tensor"]["0.weight"]["bits"] == 4 and m["per_tensor"]["0.weight"]["ratio"] < 1

    back = unpack_state_tensors(tmp_path / "weights.czip")
    sd = state.module.state_dict()
    assert set(back["params"]) == set(sd) - set(state.quant)
    for name, t in back["params"].items():
        assert t.dtype == sd[name].dtype and t.shape == sd[name].shape
        assert torch.equal(
            t.view(-1).view(torch.uint8) if t.is_floating_point() else t,
            sd[name].view(-1).view(torch.uint8) if t.is_floating_point() else sd[name],
        )
    for name, qt in state.quant.items():
        got = back["quant"][name]
        assert type(got) is type(qt)
        for part in ("codes", "scale", "zero_point", "codebook", "codebook_of_row"):
            a, b = getattr(qt, part, None), getattr(got, part, None)
            assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), (name, part)
        assert got.bits == qt.bits and got.method == qt.method
    assert torch.equal(back["masks"]["0.weight"], state.masks["0.weight"])


def test_bf16_and_fp16_params(tmp_path) -> None:
    model = torch.nn.Linear(40, 40).to(torch.bfloat16)
    model.register_buffer("h", torch.tensor([float("nan"), -0.0, float("inf"), 6e-8], dtype=torch.float16))
    state = ModelState(module=model, input_shape=(1, 40))
    ctx = StageContext(data=None, out_dir=tmp_path, device=torch.device("cpu"), reference=model)
    apply(state, CompressStageConfig(), ctx)
    back = unpack_state_tensors(tmp_path / "weights.czip")["params"]
    for name, t in model.state_dict().items():
        assert back[name].dtype == t.dtype
        assert torch.equal(back[name].view(torch.int16), t.view(torch.int16))


def with_codes(qt: UniformTensor, edit) -> UniformTensor:
    """A copy of ``qt`` whose codes ``edit`` changed (codes are values: ``qt.codes`` is a fresh tensor)."""
    return dataclasses.replace(qt, codes=edit(qt.codes))


def test_masked_codes_are_stored_once_and_restored_exactly(tmp_path) -> None:
    from compress.lossless.container import ContainerReader

    state = make_state()
    mask = state.masks["0.weight"]
    # pruned positions hold the zero code, as after prune + quantize
    qt = state.quant["0.weight"] = with_codes(state.quant["0.weight"], lambda c: c.masked_fill_(~mask, 0))
    ctx = StageContext(data=None, out_dir=tmp_path, device=torch.device("cpu"), reference=state.module)
    apply(state, CompressStageConfig(threads=1), ctx)
    with ContainerReader(tmp_path / "weights.czip") as r:
        e = r.entry("quant/0.weight/codes")
        assert e.mask == "mask/0.weight" and e.coded_elements == int(mask.sum())
    back = unpack_state_tensors(tmp_path / "weights.czip")
    assert torch.equal(back["quant"]["0.weight"].codes, qt.codes)
    # masked positions that do not share one code: the codes are stored whole, still exact
    noise = torch.randint(-8, 8, (int((~mask).sum()),), dtype=torch.int8)
    qt = state.quant["0.weight"] = with_codes(qt, lambda c: c.masked_scatter_(~mask, noise))
    apply(state, CompressStageConfig(threads=1), ctx)
    with ContainerReader(tmp_path / "weights.czip") as r:
        assert r.entry("quant/0.weight/codes").mask is None
    assert torch.equal(unpack_state_tensors(tmp_path / "weights.czip")["quant"]["0.weight"].codes, qt.codes)


def test_tied_weights_are_stored_once_and_restored_shared(tmp_path) -> None:
    emb = torch.nn.Embedding(500, 64)
    head = torch.nn.Linear(64, 500, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    state = ModelState(module=model, input_shape=(1, 1))
    ctx = StageContext(data=None, out_dir=tmp_path, device=torch.device("cpu"), reference=model)
    apply(state, CompressStageConfig(threads=1), ctx)
    assert ctx.metrics["packed_bytes"] < 500 * 64 * 4  # once, not twice
    back = unpack_state_tensors(tmp_path / "weights.czip")["params"]
    assert torch.equal(back["emb.weight"], emb.weight.detach())
    assert back["head.weight"] is back["emb.weight"]


def test_tied_output_of_a_quantized_embedding_is_stored_once(tmp_path):
    """A Parameter shared by an embedding (quantized) and an output layer: its codes once,
    no float copy under the second name; unpacked, both names hold the dequantized value."""
    from compress.lossless.config import CompressStageConfig
    from compress.lossless.container import ContainerReader
    from compress.lossless.stage import pack_state, unpack_state_tensors

    torch.manual_seed(0)
    emb = torch.nn.Embedding(32, 16)
    out = torch.nn.Linear(16, 32, bias=False)
    out.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "out": out})
    state = ModelState(module=model, input_shape=(1, 4))
    w = emb.weight.detach()
    scale = w.abs().amax(dim=1, keepdim=True) / 7
    state.quant["emb.weight"] = UniformTensor(
        codes=torch.clamp(torch.round(w / scale), -8, 7).to(torch.int8), bits=4, scale=scale, method="rtn"
    )
    state.sync_quantized()
    path = tmp_path / "tied.czip"
    pack_state(state, path, CompressStageConfig())
    with ContainerReader(path) as r:
        names = list(r.names())
    assert "param/out.weight" not in names and "quant/emb.weight/codes" in names
    back = unpack_state_tensors(path)
    assert back["params"]["out.weight"] is not None
    assert torch.equal(back["params"]["out.weight"], model.out.weight.detach())


def test_narrow_int8_codes_are_paired_under_a_mask_and_restored_exactly(tmp_path) -> None:
    """8-bit codes that mostly lie in -8..7 (one scale for a tensor with a few large
    weights) are coded in pairs, only where the mask is set; the restore is exact."""
    from compress.lossless.container import ContainerReader

    state = make_state()
    w0 = state.module[0].weight.detach()
    scale = torch.full((w0.shape[0], 1), float(w0.abs().max()) / 127)
    codes = torch.round(w0 / scale / 20).to(torch.int8)  # as if most weights were small
    mask = state.masks["0.weight"]
    codes[~mask] = 0
    codes.view(-1)[mask.view(-1).nonzero()[:3, 0]] = 100  # a few wide codes: escapes
    state.quant["0.weight"] = UniformTensor(codes=codes, bits=8, scale=scale, method="rtn")
    ctx = StageContext(data=None, out_dir=tmp_path, device=torch.device("cpu"), reference=state.module)
    apply(state, CompressStageConfig(threads=1), ctx)
    with ContainerReader(tmp_path / "weights.czip") as r:
        e = r.entry("quant/0.weight/codes")
        assert e.layout == "bytes" and e.mask == "mask/0.weight"
        assert all(len(streams) == 2 for _, _, streams in e.chunks)  # paired
    back = unpack_state_tensors(tmp_path / "weights.czip")
    assert torch.equal(back["quant"]["0.weight"].codes, codes)
