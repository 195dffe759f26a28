"""Data-parallel training under ``torchrun``: process group, DistributedDataParallel, the data split, metrics.

torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and the rendezvous address; :func:`setup` reads them
(a plain ``python`` run is a world of one) and joins the group with NCCL on GPUs and gloo on the CPU. The trainers
(:class:`~varcore.train.var_trainer.VARTrainer`, :class:`~varcore.train.gpt_trainer.GPTTrainer`) take
``distributed=True`` to run their forward pass through :class:`~torch.nn.parallel.DistributedDataParallel`, which
averages the gradients over the ranks, so N ranks with per-rank batch b take the same steps as one process with
batch N*b (up to float rounding), as long as the model draws no random numbers (class dropout, drop path and token
dropout draw per rank).

Batches come from :func:`make_loader`: a :class:`~torch.utils.data.distributed.DistributedSampler` (also for a world
of one), whose shuffled order is the same on every world size; rank r takes every W-th index of it, so the N
per-rank batches of a step together hold exactly the global batch one process would see.
"""
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

__all__ = ["DistEnv", "setup", "cleanup", "process_group", "wrap_ddp", "make_loader", "mean_over_ranks"]


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: ``rank`` of ``world_size``, its ``local_rank`` on the node and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: Optional[str] = None, timeout_min: float = 60.0) -> DistEnv:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (NCCL with CUDA, gloo otherwise).

    ``device`` defaults to ``cuda:LOCAL_RANK`` with a GPU, else the CPU; a world of one needs no group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if world == 1:
        return DistEnv(device=dev)
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(minutes=timeout_min))
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def cleanup(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(device: Optional[str] = None):
    """``with process_group(device) as env:`` :func:`setup`, then :func:`cleanup` however the block ends."""
    env = setup(device)
    try:
        yield env
    finally:
        cleanup(env)


def wrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when a process group is up (else ``model`` itself). Rank 0's parameters
    and buffers are broadcast to every rank here, so all ranks start from the same weights."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return model
    device = next(model.parameters()).device
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def make_loader(dataset: Dataset, global_batch: int, env: DistEnv, workers: int = 0, seed: int = 0) -> DataLoader:
    """A loader of this rank's share (``global_batch / world_size`` per step) of a shuffled epoch; the union of the
    ranks' batches of a step is the global batch of a one-process run with the same ``seed``."""
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
        raise ValueError(f"global_batch must be an int >= 1, got {global_batch!r}")
    if global_batch % env.world_size:
        raise ValueError(f"global_batch ({global_batch}) must be a multiple of the world size ({env.world_size})")
    full = len(dataset) >= global_batch  # a smaller dataset gives one short batch per epoch (one process only)
    if env.enabled and not full:
        raise ValueError(f"the dataset holds {len(dataset)} items, fewer than one global batch ({global_batch})")
    sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed,
                                 drop_last=True)
    return DataLoader(dataset, batch_size=global_batch // env.world_size, sampler=sampler, drop_last=full,
                      num_workers=workers, persistent_workers=workers > 0)


def mean_over_ranks(metrics: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    """Each value (a number or a 0-dim tensor) averaged over the ranks, as 0-dim float64 tensors on ``device``: one
    all-reduce and no host synchronisation. Unchanged without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return metrics
    keys = sorted(metrics)
    t = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float64, device=device).reshape(()) for k in keys])
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.unbind()))
