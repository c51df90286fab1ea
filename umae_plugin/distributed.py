"""Distributed state, resolved once: set-up from torchrun / SLURM / a single process, rank helpers,
and the differentiable all-gather the uniformity loss needs."""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

from .errors import UserError

log = logging.getLogger("umae.distributed")


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


class LaunchError(UserError, RuntimeError):
    """The launch environment and the distributed flags do not describe a process group that
    can be joined; the message names what is missing."""


@dataclass(frozen=True)
class Launch:
    """How this process joins (or not) a process group, and where that came from."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    init_method: str = "env://"
    source: str = "single process"
    ignored: tuple[str, ...] = ()  # flags given that the environment overrides


def _need(environ: Mapping[str, str], names: tuple[str, ...], why: str) -> None:
    missing = [n for n in names if n not in environ]
    if missing:
        raise LaunchError(f"{why} needs {', '.join(missing)} in the environment")


def resolve_launch(
    environ: Mapping[str, str], *, dist_url: str = "env://", world_size: int = 1, dist_on_itp: bool = False
) -> Launch:
    """The process group the environment and the upstream flags describe, on the reference's paths:

    1. torchrun / `torch.distributed.launch` / submitit (`RANK` and `WORLD_SIZE` set): the
       environment decides (`env://`); `--dist_url`, `--world_size`, `--dist_on_itp` are ignored and
       listed in `ignored`.
    2. `--dist_on_itp` (OpenMPI): rank, size, local rank from `OMPI_COMM_WORLD_*`, init at
       `tcp://MASTER_ADDR:MASTER_PORT`.
    3. `SLURM_PROCID` with `--world_size` > 1: rank `SLURM_PROCID`, local rank `SLURM_LOCALID`,
       init at `--dist_url`.
    4. Otherwise one process. A SLURM step of several tasks without a world size is refused: every
       task would train alone and write the same output folder.
    """
    if "RANK" in environ and "WORLD_SIZE" in environ:
        env_world = int(environ["WORLD_SIZE"])
        ignored = tuple(flag for flag, given in (
            ("--dist_on_itp", dist_on_itp),
            (f"--dist_url {dist_url}", dist_url != "env://"),
            (f"--world_size {world_size}", world_size not in (1, env_world)),
        ) if given)
        return Launch(int(environ["RANK"]), env_world, int(environ.get("LOCAL_RANK", 0)), "env://",
                      "the launcher's environment (RANK, WORLD_SIZE)", ignored)
    if dist_on_itp:
        names = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        _need(environ, names, "--dist_on_itp")
        return Launch(int(environ["OMPI_COMM_WORLD_RANK"]), int(environ["OMPI_COMM_WORLD_SIZE"]),
                      int(environ["OMPI_COMM_WORLD_LOCAL_RANK"]),
                      f"tcp://{environ['MASTER_ADDR']}:{environ['MASTER_PORT']}", "--dist_on_itp (OpenMPI)")
    if "SLURM_PROCID" in environ and world_size > 1:
        if dist_url == "env://":
            _need(environ, ("MASTER_ADDR", "MASTER_PORT"), "SLURM_PROCID with --world_size and --dist_url env://")
        rank = int(environ["SLURM_PROCID"])
        if rank >= world_size:
            raise LaunchError(f"SLURM_PROCID {rank} is not below --world_size {world_size}")
        return Launch(rank, world_size, int(environ.get("SLURM_LOCALID", 0)), dist_url,
                      "SLURM_PROCID with --world_size and --dist_url")
    tasks = int(environ.get("SLURM_STEP_NUM_TASKS") or 1)  # set by srun for its step
    if "SLURM_PROCID" in environ and tasks > 1:
        raise LaunchError(f"this SLURM step runs {tasks} tasks but --world_size is {world_size}: pass "
                          f"--world_size {tasks} and --dist_url tcp://HOST:PORT, or use torchrun / submitit_launcher.py")
    return Launch()


def init_distributed(
    backend: str | None = None,
    timeout_min: int = 30,
    *,
    dist_url: str = "env://",
    world_size: int = 1,
    dist_on_itp: bool = False,
) -> Launch:
    """Join the process group `resolve_launch` finds (torchrun / submitit environment, OpenMPI,
    or SLURM_PROCID with the upstream flags); a single process joins nothing. Exports `RANK`,
    `WORLD_SIZE` and `LOCAL_RANK` as upstream does, so the device follows the local rank. NCCL on
    GPUs, gloo otherwise. Returns the launch description."""
    if is_enabled():
        return Launch(get_rank(), get_world_size(), get_local_rank(), "", "already initialised")
    launch = resolve_launch(os.environ, dist_url=dist_url, world_size=world_size, dist_on_itp=dist_on_itp)
    if launch.world_size <= 1:
        return launch
    os.environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size), LOCAL_RANK=str(launch.local_rank))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank)
    dist.init_process_group(
        backend=backend,
        init_method=launch.init_method,
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=datetime.timedelta(minutes=timeout_min),
    )
    log.info("distributed: rank %d of %d (%s, %s, from %s)", launch.rank, launch.world_size, backend,
             launch.init_method, launch.source)
    return launch


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` [B, ...] from every rank along dim 0, differentiably.

    The backward pass sums, over ranks, the gradient each rank computes for this rank's slice
    (reduce-scatter), so a loss that every rank computes identically on the gathered batch gives,
    after DDP's gradient averaging, the gradient of that loss on one process. All ranks must pass
    the same shape. Without distributed (or with one rank) returns `x` itself.
    """
    if get_world_size() == 1:
        return x
    from torch.distributed import _functional_collectives as funcol

    # torch 2.13 renamed 2.4's all_gather_tensor_autograd (same signature and gradient)
    gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
    return gather(x.contiguous(), 0, dist.group.WORLD)


def all_gather_local_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` [B, ...] from every rank along dim 0 as the U-MAE / M-MAE reference code
    does (SimCLR's `GatherLayer`): the forward pass is an all-gather, the backward pass keeps only
    this rank's slice of the gradient and drops what the other ranks computed for it. A loss that
    every rank computes on the gathered batch then reaches, after DDP's gradient averaging,
    1/world_size of its single-process gradient. Without distributed (or with one rank) returns
    `x` itself."""
    if get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[get_rank()] = x  # the only slice autograd sees
    return torch.cat(parts)


GATHER_MODES = ("global", "reference")


def gather_features(x: torch.Tensor, mode: str = "global") -> torch.Tensor:
    """The global batch of `x` [B, ...] for a batch-level loss: `global` differentiates the
    gathered batch exactly (`all_gather_with_grad`), `reference` as the U-MAE / M-MAE code does
    (`all_gather_local_grad`: the term's gradient scales as 1/world_size)."""
    if mode == "global":
        return all_gather_with_grad(x)
    if mode == "reference":
        return all_gather_local_grad(x)
    raise ValueError(f"unknown gather mode {mode!r}; expected one of {GATHER_MODES}")


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over ranks (a copy; `x` itself is untouched)."""
    if get_world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / get_world_size()


def wrap_ddp(model: torch.nn.Module, device: torch.device, *, find_unused_parameters: bool = False) -> torch.nn.Module:
    """`model` in `DistributedDataParallel` (on `device`'s GPU, or CPU / gloo) when several
    processes run; `model` itself in a single process."""
    if get_world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused_parameters)


def shutdown() -> None:
    """Leave the process group together: a rank that exits while rank 0 still writes its last
    checkpoint can bring the job down (gloo aborts on a peer's closed connection)."""
    if is_enabled():
        dist.barrier()
        dist.destroy_process_group()
