"""GPFQ under a process group: each rank sums its shard of the calibration data and runs the
greedy loop on its slice of rows; the codes are bit-identical to one process."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from compress.quantize.gpfq import AUTO_SCALE_FACTORS, RTN_GRID, LayerPlan, _output_errors, gpfq_quantize_model

from .test_gpfq import _error_problem


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h):
        return h + self.fc2(torch.relu(self.fc1(self.norm(h))))


def _models():
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Linear(6, 8), nn.Sequential(*(_Block(8) for _ in range(3))), nn.Linear(8, 3))
    conv = nn.Sequential(
        nn.Conv1d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv1d(6, 6, 3, groups=2), nn.Flatten(), nn.Linear(6 * 14, 4)
    )
    g = torch.Generator().manual_seed(1)
    return [
        (
            chain,
            torch.randn(21, 7, 6, generator=g),
            {n: LayerPlan(3) for n in ("0", "1.0.fc1", "1.0.fc2", "1.1.fc1", "1.1.fc2", "1.2.fc1", "1.2.fc2", "2")},
        ),
        (conv, torch.randn(19, 2, 16, generator=g), {n: LayerPlan(4) for n in ("0", "2", "4")}),
    ]


def _quantize_all() -> list[dict[str, torch.Tensor]]:
    out = []
    for model, x, plans in _models():
        # max_patches small: the conv layers subsample their patches
        quant, _ = gpfq_quantize_model(
            model,
            x,
            plans,
            batch_size=4,
            max_patches=40,
            scale_factor=(*AUTO_SCALE_FACTORS, RTN_GRID),
            auto_holdout=0.25,
            bias_correction=True,
        )
        out.append(
            {k: qt.codes for k, qt in quant.items()}
            | {f"param:{n}": p.detach().clone() for n, p in model.named_parameters()}
        )
    return out


def _worker(rank: int, world: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = _quantize_all()
        if rank == 0:
            torch.save(result, path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_give_one_process_codes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, port, path), nprocs=2, join=True)
    two = torch.load(path)
    one = _quantize_all()
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def _errors_worker(rank: int, world: int, port: int, path: str) -> None:
    """Each rank measures the candidates' output errors; rank ``r`` saves what it got and the
    row slices it dequantized."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        w, blocks, _data, stats, cands = _error_problem()
        asked: list[tuple[int, int]] = []

        def rows_of(q):
            def make(rows):
                asked.append((rows.start, rows.stop))
                return q[rows]

            return make

        result = _output_errors(w, [rows_of(q) for q in cands], blocks, stats)
        torch.save({"result": result, "asked": sorted(set(asked))}, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_share_the_output_errors_and_get_one_process_floats(tmp_path):
    """The candidates' output errors (which choose each weight's scale) are measured on half
    the rows per rank, and every rank gets exactly the floats one process computes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "errors")
    mp.spawn(_errors_worker, args=(2, port, path), nprocs=2, join=True)
    w, blocks, _data, stats, cands = _error_problem()
    one = _output_errors(w, cands, blocks, stats)
    ranks = [torch.load(f"{path}.{r}") for r in range(2)]
    for got in ranks:
        assert got["result"] == one
    # blocks of 100 and 200 rows, each cut in two pieces: rank r measures piece r of each
    assert ranks[0]["asked"] == [(0, 50), (100, 200)]
    assert ranks[1]["asked"] == [(50, 100), (200, 300)]
