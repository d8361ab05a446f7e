"""Model evaluation: accuracy when labels exist, fidelity to a reference model always."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compress.precision import float32_compute

if TYPE_CHECKING:
    from compress.qtensor import QuantizedTensor


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Outputs of ``model`` on ``x`` in eval mode, batched, computed on the model's device
    and returned on the CPU."""
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with float32_compute(model):  # half-precision weights: float32 arithmetic on the CPU
        out = torch.cat([model(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out


@torch.no_grad()
def nearest_neighbours(emb: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Index of each row's most cosine-similar other row (itself excluded)."""
    e = torch.nn.functional.normalize(emb.flatten(1).double(), dim=1)
    n = len(e)
    out = torch.empty(n, dtype=torch.long)
    for i in range(0, n, chunk):
        sims = e[i : i + chunk] @ e.T
        rows = torch.arange(sims.shape[0])
        sims[rows, rows + i] = -float("inf")
        out[i : i + chunk] = sims.argmax(1)
    return out


def retrieval_agreement(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Share of samples whose nearest neighbour among the others is the same under ``out``
    as under ``ref`` (embeddings compared by cosine). NaN for fewer than 2 samples."""
    if len(out) < 2:
        return float("nan")
    return (nearest_neighbours(out) == nearest_neighbours(ref)).double().mean().item()


def compare_outputs(out: torch.Tensor, ref: torch.Tensor, retrieval: bool = False) -> dict[str, float]:
    """Fidelity of ``out`` to ``ref``: top-1 agreement, mean and 5th-percentile cosine, relative L2 error.

    Args:
        out: outputs of the model under test, batch first.
        ref: the reference model's outputs on the same inputs.
        retrieval: treat the outputs as embeddings and add ``retrieval_agreement`` (the
            nearest neighbour of each sample among the others is unchanged); for models
            without task labels.
    """
    out2, ref2 = out.flatten(1).double(), ref.flatten(1).double()
    cos = torch.nn.functional.cosine_similarity(out2, ref2, dim=1)
    metrics = {
        "cosine": cos.mean().item(),
        "cosine_p05": torch.quantile(cos, 0.05).item(),
        "rel_error": ((out2 - ref2).norm() / ref2.norm().clamp_min(1e-30)).item(),
        "max_abs_error": (out2 - ref2).abs().max().item(),
    }
    if out.dim() == 2 and out.shape[1] > 1:
        metrics["agreement"] = (out.argmax(1) == ref.argmax(1)).double().mean().item()
    if retrieval and len(out) > 1:
        metrics["retrieval_agreement"] = retrieval_agreement(out, ref)
    return metrics


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    reference: torch.Tensor | None = None,
    batch_size: int = 512,
) -> dict[str, float]:
    """Accuracy (with labels) and fidelity to ``reference`` outputs (when given); without
    labels the outputs are treated as embeddings and fidelity includes retrieval agreement.
    ``batch_size`` samples go through the model at a time (activation memory grows with it)."""
    return score_outputs(predict(model, x, batch_size), y, reference)


def score_outputs(
    out: torch.Tensor, y: torch.Tensor | None = None, reference: torch.Tensor | None = None
) -> dict[str, float]:
    """``evaluate``'s numbers for outputs already computed."""
    if not torch.isfinite(out).all():
        return {"accuracy": float("nan")} if y is not None else {"cosine": float("nan")}
    metrics: dict[str, float] = {}
    if y is not None:
        metrics["accuracy"] = (out.argmax(1) == y).double().mean().item()
    if reference is not None:
        metrics.update(compare_outputs(out, reference, retrieval=y is None))
    return metrics


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters, nonzero parameters)."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p).item())
    return total, nonzero


def model_size(model: nn.Module, quant: Mapping[str, QuantizedTensor] | None = None) -> dict[str, Any]:
    """The one size accounting every stage and the report use.

    Returns:
        ``parameters`` and ``nonzeros`` (parameters only, a tied parameter counted once),
        ``sparsity``, ``dense_bytes`` (every state_dict tensor at its dtype's width: what a
        float checkpoint holds), ``stored_bytes`` (quantized tensors as packed integers plus
        their scales/codebooks, the rest at its dtype's width, no entropy coding) and
        ``weight_bits`` (average stored bits per parameter: quantized ones at their width,
        the rest at their dtype's width) and ``quantized_fraction`` (share of the parameters
        held as quantized integers).
    """
    quant = quant or {}
    params, nonzeros = count_parameters(model)
    dense = stored = 0
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:  # tied tensors are stored once
            continue
        seen.add(id(t))
        nbytes = t.numel() * t.element_size()
        dense += nbytes
        qt = quant.get(name)
        stored += -(-qt.storage_bits() // 8) if qt is not None else nbytes
    bits = quantized = 0
    for name, p in dict(model.named_parameters()).items():
        qt = quant.get(name)
        bits += qt.numel * qt.bits if qt is not None else p.numel() * p.element_size() * 8
        quantized += p.numel() if qt is not None else 0
    return {
        "parameters": params,
        "nonzeros": nonzeros,
        "sparsity": 1 - nonzeros / params if params else 0.0,
        "dense_bytes": dense,
        "stored_bytes": stored,
        "weight_bits": round(bits / params, 3) if params else 0.0,
        "quantized_fraction": round(quantized / params, 6) if params else 0.0,
    }


# ----------------------------------------------------------------------------- peak memory


class PeakRSS:
    """The peak resident set size (RSS) of this process while a block of code runs.

    ``with PeakRSS() as peak: ...`` then ``peak.bytes`` and ``peak.method``. How it is
    measured, best first:

    * ``VmHWM``: Linux keeps the RSS high-water mark; writing ``5`` to
      ``/proc/self/clear_refs`` resets it to the current RSS, so ``VmHWM`` read from
      ``/proc/self/status`` afterwards is the exact peak of the block.
    * ``sampled``: where the mark cannot be reset (no permission, another kernel), a thread
      reads the current RSS every ``interval`` seconds (``/proc/self/statm``, or psutil
      where installed): a lower bound that can miss a spike shorter than the interval.
    * ``ru_maxrss``: last resort, the process's peak since it started
      (``resource.getrusage``): an upper bound when an earlier step used more.

    Counted in RSS: the process's resident pages, memory-mapped weight files included once
    they are read. A block is measured in this process only (under ``--nproc``, each rank
    measures itself).
    """

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.bytes: int | None = None
        self.method = "unavailable"
        self._sampled = 0
        self._stop: Any = None
        self._thread: Any = None

    def __enter__(self) -> PeakRSS:
        if _reset_high_water_mark():
            self.method = "VmHWM"
        elif _current_rss() is not None:
            import threading

            self.method = "sampled"
            self._sampled = _current_rss() or 0
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
            self._thread.start()
        elif _max_rss() is not None:
            self.method = "ru_maxrss"
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._sampled = max(self._sampled, _current_rss() or 0)

    def __exit__(self, *exc: object) -> None:
        if self.method == "VmHWM":
            self.bytes = _status_bytes("VmHWM")
        elif self.method == "sampled":
            self._stop.set()
            self._thread.join()
            self.bytes = max(self._sampled, _current_rss() or 0)
        elif self.method == "ru_maxrss":
            self.bytes = _max_rss()


def _status_bytes(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_high_water_mark() -> bool:
    """Reset Linux's peak-RSS mark (``VmHWM``) to the current RSS; False where that fails."""
    if _status_bytes("VmHWM") is None:
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _current_rss() -> int | None:
    try:
        import os

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


def resident_memory() -> tuple[int | None, int | None]:
    """This process's resident memory now and its peak so far (``VmHWM``, since the last
    reset), in bytes; None for what the platform does not tell."""
    return _current_rss(), _status_bytes("VmHWM")


def _max_rss() -> int | None:
    try:
        import resource
        import sys
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS: bytes; Linux: KiB


_LIBC: Any = None
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
# Allocations from this size up get their own memory map in the low-memory mode (see
# compact_heap). BERT-base GPFQ int8, peak RSS and time against glibc's default:
# 1 MiB 0.91x / 1.20x, 4 MiB 0.92x / 1.13x, 16 MiB 0.97x / 1.02x.
COMPACT_HEAP_THRESHOLD = 4 << 20


def _libc() -> Any:
    """The process's C library when it is glibc (``malloc_trim`` and ``mallopt``), else False."""
    global _LIBC
    if _LIBC is None:
        import ctypes

        try:
            lib = ctypes.CDLL(None)  # the process's own symbols: the C library it runs on
            _LIBC = lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else False
        except OSError:
            _LIBC = False
    return _LIBC


def release_free_memory() -> bool:
    """Hand the C allocator's free pages back to the operating system (glibc ``malloc_trim``).

    glibc serves allocations up to its dynamic mmap threshold (which climbs to 32 MB once
    large blocks are freed) from its heaps, and keeps what is freed there: after a few
    layers of differently sized temporaries the process holds hundreds of MB it no longer
    uses, which count in its RSS (about 160 MB of BERT-base's GPFQ peak). Trimming after
    each layer's work returns them, at a cost of milliseconds. Returns False where there is
    no glibc (nothing is done).
    """
    lib = _libc()
    if not lib:
        return False
    lib.malloc_trim(0)
    return True


def compact_heap(threshold: int = COMPACT_HEAP_THRESHOLD) -> bool:
    """Give every allocation of ``threshold`` bytes or more its own memory map (glibc
    ``mallopt(M_MMAP_THRESHOLD)``), for the rest of the process.

    Such a block goes back to the operating system the moment it is freed, so tensors of a
    few MB freed in one order and allocated in another leave no holes in the heap: what
    :func:`release_free_memory` can only trim between layers stops piling up within one.
    It also fixes the threshold, which glibc otherwise raises to 32 MB after the first large
    free. The price is a page fault per page of each such block: GPFQ on BERT-base ran
    13% slower and peaked 8% lower (1.34 against 1.46 GiB); the 1.1 B decoder's quantize
    stage, see the README. Returns False where there is no glibc (nothing is done).
    """
    lib = _libc()
    if not lib:
        return False
    return bool(lib.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
