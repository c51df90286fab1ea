"""Mechanics of one optimisation step shared by the training loops: gradient accumulation under
DDP, the (optionally scaled and clipped) optimiser step, and the non-finite-loss guard."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite: training stops before any checkpoint is written."""


def check_finite(bad: torch.Tensor, where: str) -> None:
    """Raise if the device-side flag says a loss was non-finite (one host sync)."""
    if bool(bad.item()):
        raise NonFiniteLossError(
            f"non-finite loss {where}: stopping. No checkpoint was written after it; the last one in "
            "the output folder is intact. Lower the learning rate, or try --amp bf16 / none."
        )


def accumulation_context(model: nn.Module, update: bool) -> contextlib.AbstractContextManager:
    """Wrap forward and backward of a step that does not update: DDP then skips the gradient
    all-reduce, which happens once on the updating step."""
    if update or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def backward(loss: torch.Tensor, accum_iter: int, scaler: torch.amp.GradScaler | None) -> None:
    scaled = loss / accum_iter
    (scaler.scale(scaled) if scaler is not None else scaled).backward()


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
    clip_grad: float | None = None,
) -> None:
    """Unscale (fp16), clip the global gradient norm if asked, step, and clear the gradients."""
    if clip_grad is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
