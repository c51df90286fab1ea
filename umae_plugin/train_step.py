"""Mechanics of one optimisation step shared by the training loops: gradient accumulation under
DDP, the (optionally scaled and clipped) optimiser step, and the non-finite-loss guard.

The accumulation rule, as the MAE reference (both its pre-training and fine-tuning loops): a loop
clears the gradients once at the start of each epoch, and the optimiser steps after steps
`accum_iter - 1, 2 * accum_iter - 1, ...` only (`is_update_step`). The `steps % accum_iter`
leftover batches at the end of an epoch are still forwarded, backpropagated and logged, but their
gradients are never applied: the next epoch's start clears them."""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.nn as nn

from .errors import UserError


class NonFiniteLossError(UserError, FloatingPointError):
    """A loss became NaN or infinite: training stops before any checkpoint is written."""


def check_finite(bad: torch.Tensor, where: str) -> None:
    """Raise if the device-side flag says a loss was non-finite (one host sync)."""
    if bool(bad.item()):
        raise NonFiniteLossError(
            f"non-finite loss {where}: stopping. No checkpoint was written after it; the last one in "
            "the output folder is intact. Lower the learning rate, or try --amp bf16 / none."
        )


def is_update_step(step: int, accum_iter: int) -> bool:
    """Whether the optimiser steps after 0-based `step` of an epoch: every `accum_iter`-th step.
    Not on a partial group at the end of the epoch (the reference's rule)."""
    return (step + 1) % accum_iter == 0


def accumulation_context(model: nn.Module, update: bool) -> contextlib.AbstractContextManager:
    """Wrap forward and backward of a step that does not update: DDP then skips the gradient
    all-reduce, which happens once on the updating step. The end-of-epoch leftover steps do not
    update either, so they skip it too (their gradients are discarded, nothing to reduce)."""
    if update or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


# A scaler that is off: `scale` returns the loss, `unscale_` does nothing, `step` is `optimizer.step()`.
# What a loop without fp16 gets (`runtime.Runtime.grad_scaler`), and what `scaler=None` means here.
NO_SCALING = torch.amp.GradScaler("cpu", enabled=False)


def backward(loss: torch.Tensor, accum_iter: int, scaler: torch.amp.GradScaler | None) -> None:
    (scaler or NO_SCALING).scale(loss / accum_iter).backward()


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
    clip_grad: float | None = None,
) -> None:
    """Unscale (fp16), clip the global gradient norm if asked, step, and clear the gradients.
    `scaler`: the run's (`runtime.Runtime.grad_scaler`, off without fp16); None: off."""
    scaler = scaler or NO_SCALING
    if clip_grad is not None:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def accumulation_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    compute_loss: Callable[[], Any],
    *,
    step: int,
    accum_iter: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    scaler: torch.amp.GradScaler | None = None,
    clip_grad: float | None = None,
    bad: torch.Tensor | None = None,
) -> Any:
    """One training step of both loops: forward (`compute_loss` under `autocast`) and backward of
    the loss / `accum_iter` inside `accumulation_context`, then the optimiser step if
    `is_update_step(step, accum_iter)`. The caller clears the gradients at the start of the epoch.

    `compute_loss()` returns the loss or a tuple whose first item is the loss; that value is
    returned as is. `bad` (a bool tensor), if given, is or-ed in place with "the loss is not finite".
    """
    update = is_update_step(step, accum_iter)
    with accumulation_context(model, update):
        with autocast():
            out = compute_loss()
        loss = out if isinstance(out, torch.Tensor) else out[0]
        if bad is not None:
            bad |= ~torch.isfinite(loss.detach())
        backward(loss, accum_iter, scaler)
    if update:
        optimizer_step(model, optimizer, scaler, clip_grad)
    return out
