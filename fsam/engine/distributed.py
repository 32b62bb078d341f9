"""Process-group setup for torchrun, srun and submitit, and the few collectives the loop needs.

One process per device. The launch method only decides where the rank comes from:

* ``torchrun --nproc_per_node=N train.py ...``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
  address are in the environment.
* SLURM (``srun`` or hydra-submitit-launcher with ``tasks_per_node > 1``): each task has ``SLURM_PROCID``,
  ``SLURM_NTASKS`` and ``SLURM_LOCALID``; submitit's ``TorchDistributedEnvironment`` exports the torchrun
  variables from them (the master is the first node of the job).

NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fsam.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _export_slurm_environment() -> None:
    """Under SLURM with several tasks and no torchrun variables, derive them from SLURM's."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA (this process's local GPU) when available, else the CPU."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.device={preference} but no CUDA device is visible: use trainer.device=auto or cpu"
            )
        if preference == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device(preference)
    if preference == "mps":
        return torch.device("mps")
    if preference != "cpu":
        raise ConfigError(f"trainer.device={preference!r} is not a device: use auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def setup(device_preference: str = "auto", timeout_minutes: int = 30) -> DistInfo:
    """Join the process group when launched with several processes; a no-op for one process."""
    _export_slurm_environment()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=timeout_minutes)
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DistributedDataParallel around the model when there are several processes."""
    if not info.distributed:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def is_active() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes (in place); the tensor itself for one process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum over processes (in place); the tensor itself for one process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s value on every process (for example the run's wandb id or resume decision)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """Give every process rank ``src``'s buffers (BatchNorm running statistics).

    Without SyncBatchNorm each replica updates its running statistics from its own batches, so the replicas'
    statistics drift apart (DDP broadcasts them only in forward passes that synchronise). Evaluating after this
    scores the model that rank 0 saves in the checkpoint, on every shard.
    """
    if not is_active():
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=src)


def gather_object(value: Any, dst: int = 0) -> list[Any] | None:
    """Every process's ``value`` (picklable; keep tensors on the CPU) as a list on rank ``dst``, None elsewhere."""
    if not is_active():
        return [value]
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(value, gathered, dst=dst)
    return gathered


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
