"""train_step under real DistributedDataParallel: two CPU processes on the gloo backend."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from fsam.optim import create_optimizer, train_step

WORLD = 2
STEPS = 4
BATCH_PER_RANK = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def make_batches():
    g = torch.Generator().manual_seed(3)
    return [
        (torch.randn(WORLD * BATCH_PER_RANK, 6, generator=g), torch.randint(0, 4, (WORLD * BATCH_PER_RANK,), generator=g))
        for _ in range(STEPS)
    ]


def worker(rank: int, port: int, method: str, sync_clean_pass: bool, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = DistributedDataParallel(make_model())
        opt = create_optimizer(model, method, lr=0.1, momentum=0.9, rho=0.3)
        history = []
        for x, y in make_batches():
            shard = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
            train_step(model, x[shard], y[shard], F.cross_entropy, opt, sync_clean_pass=sync_clean_pass)
            history.append([p.detach().clone() for p in model.module.parameters()])
        torch.save(history, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_two_ranks(method: str, sync_clean_pass: bool, tmp_path) -> list[list[list[torch.Tensor]]]:
    mp.spawn(worker, args=(free_port(), method, sync_clean_pass, str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("method", ["sam", "fsam"])
def test_synchronised_clean_pass_equals_one_process_on_the_combined_batch(method, tmp_path):
    ranks = run_two_ranks(method, sync_clean_pass=True, tmp_path=tmp_path)
    single = make_model()
    opt = create_optimizer(single, method, lr=0.1, momentum=0.9, rho=0.3)
    for step, (x, y) in enumerate(make_batches()):
        train_step(single, x, y, F.cross_entropy, opt)
        for rank in ranks:
            for expected, got in zip(single.parameters(), rank[step]):
                assert torch.allclose(expected, got, atol=1e-6)


@pytest.mark.parametrize("method", ["sam", "fsam"])
def test_per_replica_perturbation_keeps_replicas_identical(method, tmp_path):
    ranks = run_two_ranks(method, sync_clean_pass=False, tmp_path=tmp_path)
    single = make_model()
    opt = create_optimizer(single, method, lr=0.1, momentum=0.9, rho=0.3)
    for step, (x, y) in enumerate(make_batches()):
        train_step(single, x, y, F.cross_entropy, opt)
        for a, b in zip(ranks[0][step], ranks[1][step]):
            assert torch.equal(a, b)
    # per-replica perturbations are a different algorithm from the combined-batch one
    assert not all(torch.allclose(e, g, atol=1e-6) for e, g in zip(single.parameters(), ranks[0][-1]))
