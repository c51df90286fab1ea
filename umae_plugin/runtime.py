"""Process set-up shared by the scripts: device, distributed group, seeds, autocast, output folder."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import distributed

log = logging.getLogger("umae")

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def setup_logging(is_main: bool) -> None:
    """INFO lines on rank 0 only (other ranks: warnings), without touching `print`."""
    level = logging.INFO if is_main else logging.WARNING
    logging.basicConfig(stream=sys.stdout, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(level)


def resolve_device(requested: str) -> torch.device:
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"--device {requested} asked for CUDA, which is not available: running on the CPU")
        return torch.device("cpu")
    if device.type == "cuda":
        return torch.device("cuda", distributed.get_local_rank())
    return device


def resolve_amp(amp: str | None, device: torch.device) -> torch.dtype | None:
    """`None` (not given): bf16 on GPUs that support it, else full precision."""
    if amp is None:
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return AMP_DTYPES[amp]


def setup_runtime(device: str, seed: int, amp: str | None) -> Runtime:
    """Join the process group (torchrun / submitit environment, or none), pick the device and
    autocast dtype, seed every generator with `seed + rank`."""
    distributed.init_distributed(backend="nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo")
    rank = distributed.get_rank()
    setup_logging(rank == 0)
    dev = resolve_device(device)
    seed = seed + rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(dev, resolve_amp(amp, dev), rank, distributed.get_world_size())


def get_rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """Random state at the end of an epoch, so that a resumed run draws the masks and
    augmentations the uninterrupted run would have drawn (rank 0's state)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor] | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_args(args: argparse.Namespace, output_dir: str | os.PathLike) -> None:
    """The resolved arguments as `args.json` in the output folder (rank 0)."""
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "args.json").write_text(json.dumps(vars(args), indent=2, sort_keys=True, default=str) + "\n")


def accept_local_rank_alias(argv: list[str]) -> list[str]:
    """torchrun < 2 passes `--local-rank=N`; the upstream scripts declare `--local_rank`."""
    return [a.replace("--local-rank", "--local_rank", 1) if a.startswith("--local-rank") else a for a in argv]
