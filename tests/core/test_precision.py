"""Half-precision checkpoints compute in float32 on the CPU, one layer at a time."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from torch import nn

from compress.precision import float32_compute


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 8)).eval()


def test_outputs_are_the_float32_models_and_weights_keep_their_dtype():
    model = _model()
    half = copy.deepcopy(model).bfloat16()
    exact = copy.deepcopy(half).float()  # the bf16 weights' exact values in float32
    x = torch.randn(64, 16).bfloat16().float()  # an input bf16 holds exactly
    with torch.no_grad(), float32_compute(half):
        got = half(x.bfloat16())
        # a copy made inside the context carries the hooks too (GPFQ's float skeleton)
        twin = copy.deepcopy(half)(x)
    assert got.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(got, exact(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(twin, got, rtol=0, atol=0)
    # bf16 arithmetic is measurably different: the context did change the arithmetic
    with torch.no_grad():
        assert (half(x.bfloat16()).float() - got).abs().max() > 1e-3
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert not half[0]._forward_pre_hooks and not half[0]._forward_hooks


def test_buffers_updated_in_the_forward_keep_the_update_in_their_dtype():
    half = _model().bfloat16().train()
    before = half[1].running_mean.clone()
    with torch.no_grad(), float32_compute(half):
        half(torch.randn(32, 16).bfloat16())
    assert half[1].running_mean.dtype == torch.bfloat16
    assert not torch.equal(half[1].running_mean, before)


def test_training_passes_compute_in_the_weights_dtype():
    half = _model().bfloat16()
    with float32_compute(half):
        out = half(torch.randn(4, 16).bfloat16())
        out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    assert half[0].weight.grad is not None and half[0].weight.grad.dtype == torch.bfloat16


def test_a_layer_failing_mid_forward_is_restored():
    half = _model().bfloat16()

    def boom(_m, _a):
        raise RuntimeError("stop")

    handle = half[3].register_forward_pre_hook(boom)
    with torch.no_grad(), float32_compute(half), pytest.raises(RuntimeError, match="stop"):
        half(torch.randn(2, 16).bfloat16())
    handle.remove()
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_multihead_attention_reads_its_out_proj_in_float32():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    half = copy.deepcopy(mha).bfloat16()
    exact = copy.deepcopy(half).float()
    x = torch.randn(2, 5, 16)
    with torch.no_grad(), float32_compute(half):
        got, _ = half(x, x, x)
        assert got.dtype == torch.float32
        want, _ = exact(x, x, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    sys.platform != "linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ, reason="glibc's dynamic mmap threshold"
)
def test_freed_heap_memory_goes_back_to_the_os():
    """glibc keeps freed blocks below its (risen) mmap threshold in its heap, counted in RSS;
    ``release_free_memory`` returns them (GPFQ calls it between layers)."""
    from compress.metrics import release_free_memory

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    big = torch.ones(5_000_000)  # freeing a 20 MB block raises glibc's mmap threshold to 20 MB
    del big
    blocks = [torch.ones(250_000) for _ in range(200)]  # 1 MB each: now served from the heap
    last = blocks[-1]  # pins the top of the heap: only trimming inside it can return the rest
    del blocks
    before = rss()
    if not release_free_memory():
        pytest.skip("not glibc")
    assert before - rss() > 100 << 20
    assert last.sum().item() == 250_000


@pytest.mark.skipif(sys.platform != "linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ, reason="glibc's mallopt")
def test_compact_heap_returns_freed_blocks_at_once():
    """After ``compact_heap`` (``--memory low``), blocks at or above its threshold are maps of
    their own: freed out of order, they leave no heap holes and go back to the OS without
    a trim. Without it (glibc's risen threshold) the same frees stay in the RSS. Each case
    runs in a fresh process: the setting lasts for the process."""
    import subprocess

    script = """
import sys, numpy as np
from compress.metrics import compact_heap
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
if sys.argv[1] == "compact" and not compact_heap(4 << 20):
    print("unsupported"); raise SystemExit
big = np.ones(5_000_000, dtype=np.float32)  # a 20 MB free raises glibc's own threshold to 20 MB
del big
blocks = [np.ones(1_250_000, dtype=np.float32) for _ in range(20)]  # 5 MB each
last = blocks[-1]  # pins the heap's top, as a live tensor does
before = rss()
del blocks
print(before - rss())
"""
    freed = {}
    for mode in ("default", "compact"):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True)
        if out.stdout.strip() == "unsupported":
            pytest.skip("not glibc")
        freed[mode] = int(out.stdout)
    assert freed["compact"] > 80 << 20  # 19 of the 20 blocks: 95 MB
    assert freed["default"] < 20 << 20
