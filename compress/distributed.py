"""Multi-process training: the same recipe on 1 or N processes.

`compress run --nproc N` relaunches itself under torchrun. Every rank runs the pipeline;
training (``compress.train.fit``) wraps the model in DistributedDataParallel and gives
each rank its shard of every batch, so N processes do one run's training together. Only
rank 0 writes artifacts and the report; the other ranks work in private scratch folders
and follow rank 0's cache decisions so every collective call matches.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def uses_cuda(device: str) -> bool:
    """Whether ``--device`` puts the model on a GPU."""
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device.startswith("cuda")


def init_from_env(device: str = "cpu") -> None:
    """Join the process group torchrun set up: NCCL when the model is on CUDA, else gloo
    (a CPU run on a machine that has GPUs must not pick NCCL, which needs GPU tensors)."""
    if not launched_by_torchrun():
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = uses_cuda(device) and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend)
        log.info("rank %d of %d joined (%s)", dist.get_rank(), dist.get_world_size(), backend)


def rank_and_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist
    except ImportError:
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_world()[0] == 0


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's value of ``obj`` on every rank (a no-op in one process)."""
    if rank_and_world()[1] == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    if rank_and_world()[1] > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


# ------------------------------------------------------------ exact data-parallel statistics


def shard_bounds(n: int) -> tuple[int, int]:
    """This rank's contiguous share ``[start, stop)`` of ``n`` items (``(0, n)`` in one
    process). Shares differ by at most one item; a rank may get none when ``n`` < world."""
    rank, world = rank_and_world()
    return rank * n // world, (rank + 1) * n // world


def all_gather_tensor(t: Any) -> list[Any]:
    """Every rank's ``t`` in rank order (``[t]`` in one process), on ``t``'s device.

    ``t`` must have the same shape and dtype on every rank. gloo gathers CPU tensors and
    NCCL CUDA ones: ``t`` travels on the device the process group's backend needs.
    """
    if rank_and_world()[1] == 1:
        return [t]
    import torch
    import torch.distributed as dist

    wire = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    src = t.detach().to(wire).contiguous()
    out = [torch.empty_like(src) for _ in range(dist.get_world_size())]
    dist.all_gather(out, src)
    return [o.to(t.device) for o in out]


def split_range(n: int, parts: int) -> list[range]:
    """``range(n)`` cut into ``parts`` contiguous pieces, sizes differing by at most one."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + base + (i < extra)
        out.append(range(start, stop))
        start = stop
    return out


def all_gather_same(tensor: Any) -> list:
    """Every rank's ``tensor`` (same shape and dtype on all ranks), in rank order."""
    _rank, world = rank_and_world()
    if world == 1:
        return [tensor]
    import torch.distributed as dist

    out = [tensor.new_empty(tensor.shape) for _ in range(world)]
    dist.all_gather(out, tensor.contiguous())
    return out


def all_reduce_sum_(tensor: Any) -> Any:
    """``tensor`` summed over all ranks, in place (a no-op in one process)."""
    if rank_and_world()[1] > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_rows(piece: Any, rows: int) -> Any:
    """The ``rows``-row tensor whose slice ``split_range(rows, world)[rank]`` each rank holds as
    ``piece``: the slices gathered and joined in order (padded to one size for the collective)."""
    _rank, world = rank_and_world()
    if world == 1:
        return piece
    import torch

    slices = split_range(rows, world)
    longest = max(len(s) for s in slices)
    padded = piece.new_zeros((longest, *piece.shape[1:]))
    padded[: piece.shape[0]] = piece
    gathered = all_gather_same(padded)
    return torch.cat([g[: len(s)] for g, s in zip(gathered, slices)])
