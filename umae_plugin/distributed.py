"""Distributed state, resolved once: set-up from torchrun / SLURM / a single process, rank helpers,
and the differentiable all-gather the uniformity loss needs."""
from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def init_distributed(backend: str | None = None, timeout_min: int = 30) -> bool:
    """Join the process group described by the environment (torchrun's or submitit's `RANK`,
    `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, `LOCAL_RANK`). Returns False, touching nothing,
    when the environment describes a single process. NCCL on GPUs, gloo otherwise."""
    if is_enabled():
        return True
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(get_local_rank())
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=int(os.environ["RANK"]),
        world_size=world_size,
        timeout=datetime.timedelta(minutes=timeout_min),
    )
    log.info("distributed: rank %d of %d (%s)", get_rank(), world_size, backend)
    return True


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` [B, ...] from every rank along dim 0, differentiably.

    The backward pass sums, over ranks, the gradient each rank computes for this rank's slice
    (reduce-scatter), so a loss that every rank computes identically on the gathered batch gives,
    after DDP's gradient averaging, the gradient of that loss on one process. All ranks must pass
    the same shape. Without distributed (or with one rank) returns `x` itself.
    """
    if get_world_size() == 1:
        return x
    from torch.distributed._functional_collectives import all_gather_single_autograd

    return all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over ranks (a copy; `x` itself is untouched)."""
    if get_world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / get_world_size()


def shutdown() -> None:
    """Leave the process group together: a rank that exits while rank 0 still writes its last
    checkpoint can bring the job down (gloo aborts on a peer's closed connection)."""
    if is_enabled():
        dist.barrier()
        dist.destroy_process_group()
