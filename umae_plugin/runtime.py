"""Process set-up shared by the scripts: device, distributed group, seeds, autocast, output folder."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed
from .errors import UserError

log = logging.getLogger("umae")

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


class DeviceError(UserError, RuntimeError):
    """`--device` names a device this machine does not have (CUDA without a visible GPU, a GPU
    index past the last one, an unknown device string); the message is one line naming the flag.
    Raised instead of falling back to the CPU, where a long job would quietly run."""


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def grad_scaler(self) -> torch.amp.GradScaler:
        """The loss scaler of every training loop: on for fp16 autocast, a pass-through otherwise
        (`scale` returns the loss, `step` is `optimizer.step()`), so the loops have one path."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def adamw_options(device: torch.device) -> dict[str, Any]:
    """Keyword arguments for `torch.optim.AdamW` on `device`: `fused=True` on CUDA (one kernel for
    all parameters instead of a loop of ops per tensor; the same update up to float rounding),
    nothing elsewhere (the CPU keeps the default for-each implementation)."""
    return {"fused": True} if device.type == "cuda" else {}


def setup_logging(is_main: bool) -> None:
    """INFO lines on rank 0 only (other ranks: warnings), without touching `print`."""
    level = logging.INFO if is_main else logging.WARNING
    logging.basicConfig(stream=sys.stdout, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(level)


def resolve_device(requested: str) -> torch.device:
    """The torch device of `--device`; `cuda` (any index) becomes `cuda:LOCAL_RANK`, each process
    taking the GPU of its local rank. Raises `DeviceError` when the device is not there: never a
    silent fallback to the CPU."""
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"--device {requested!r} is not a device torch knows; "
                          "pass e.g. cpu, cuda, cuda:1 or mps") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        build = (f"torch {torch.__version__} built with CUDA {torch.version.cuda}, but no GPU is visible"
                 if torch.version.cuda else f"torch {torch.__version__} built without CUDA")
        raise DeviceError(f"--device {requested}: CUDA is not available on this machine ({build}); "
                          "pass --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(f"--device {requested}: GPU index {device.index} does not exist "
                          f"({count} GPU{'s' if count != 1 else ''} visible: cuda:0 to cuda:{count - 1})")
    local_rank = distributed.get_local_rank()
    if local_rank >= count:
        raise DeviceError(f"--device {requested}: local rank {local_rank} takes GPU {local_rank}, but only "
                          f"{count} GPU{'s' if count != 1 else ''} are visible (more processes than GPUs on this node?)")
    return torch.device("cuda", local_rank)


def resolve_amp(amp: str | None, device: torch.device) -> torch.dtype | None:
    """`None` (not given): bf16 on GPUs that support it, else full precision."""
    if amp is None:
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return AMP_DTYPES[amp]


def setup_runtime(
    device: str,
    seed: int,
    amp: str | None,
    *,
    dist_url: str = "env://",
    world_size: int = 1,
    dist_on_itp: bool = False,
) -> Runtime:
    """Join the process group (torchrun / submitit environment, the upstream flags' OpenMPI or
    SLURM paths, or none: `distributed.init_distributed`), pick the device and autocast dtype,
    seed every generator with `seed + rank`."""
    launch = distributed.init_distributed(
        backend="nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo",
        dist_url=dist_url, world_size=world_size, dist_on_itp=dist_on_itp)
    rank = distributed.get_rank()
    setup_logging(rank == 0)
    if launch.ignored and rank == 0:
        log.warning("the process group comes from %s: ignoring %s", launch.source, ", ".join(launch.ignored))
    dev = resolve_device(device)
    seed = seed + rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(dev, resolve_amp(amp, dev), rank, distributed.get_world_size())


def get_rng_state(device: torch.device) -> dict[str, Any]:
    """Random state at the end of an epoch, so that a resumed run draws the masks (torch) and
    mixup / cutmix choices (numpy) the uninterrupted run would have drawn (rank 0's state).
    Augmentations do not need it: training loaders seed each sample from (seed, epoch, index).

    Tensors, lists and plain numbers only, so `torch.load(weights_only=True)` reads it back:
    numpy's MT19937 state as [keys (int64 tensor), pos, has_gauss, cached_gaussian], Python's
    `random` state as [version, internal state (int64 tensor), gauss_next]."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    version, internal, gauss_next = random.getstate()
    state["python"] = [int(version), torch.tensor(internal, dtype=torch.int64), gauss_next]
    return state


def set_rng_state(state: dict[str, Any] | None) -> None:
    """Restore what `get_rng_state` saved (checkpoints without the numpy / Python parts leave
    those generators as they are)."""
    if not state:
        return
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("numpy") is not None:
        keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if state.get("python") is not None:
        version, internal, gauss_next = state["python"]
        random.setstate((int(version), tuple(int(v) for v in internal.tolist()), gauss_next))


def record_args(args: argparse.Namespace, is_main: bool, output_dir: str | os.PathLike | None = None) -> None:
    """Once at start, on rank 0: log the resolved arguments (one per line, as upstream prints
    them, so a SLURM log says what ran) and, with `output_dir`, write them to `args.json`."""
    if not is_main:
        return
    log.info("arguments:\n%s", "\n".join(f"  {k}: {v!r}" for k, v in sorted(vars(args).items())))
    if output_dir:
        save_args(args, output_dir)


def save_args(args: argparse.Namespace, output_dir: str | os.PathLike) -> Path:
    """The resolved arguments as `args.json` in the output folder (rank 0); returns its path.

    `args.json` is always the current run's. An earlier run's `args.json` in the same folder whose
    content differs (a resume with other flags, a second run into the same folder) is kept as
    `args.<n>.json`, n = 1, 2, ... the first free number; identical content is not duplicated."""
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    target = path / "args.json"
    text = json.dumps(vars(args), indent=2, sort_keys=True, default=str) + "\n"
    if target.exists():
        try:
            old = target.read_text()
        except OSError:
            old = None
        if old != text:
            n = 1
            while (path / f"args.{n}.json").exists():
                n += 1
            os.replace(target, path / f"args.{n}.json")
            log.info("%s holds other arguments: kept as args.%d.json", target, n)
    tmp = path / f".args.json.tmp{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, target)
    return target
