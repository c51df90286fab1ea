"""The classification loops shared by linear probing and fine-tuning: one training epoch and
evaluation. Explicit arguments, no `args` namespace; accuracies are fractions in [0, 1]."""
from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import distributed
from .data import epoch_bad_images
from .train_step import accumulation_step, check_finite
from .logger import Meters, RunLog, progress
from .metrics import topk_correct
from .optim import adjust_learning_rate

log = logging.getLogger("umae")

Autocast = Callable[[], contextlib.AbstractContextManager]


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    epoch: int,
    lr: float,
    min_lr: float,
    warmup_epochs: float,
    epochs: int,
    autocast: Autocast = contextlib.nullcontext,
    scaler: torch.amp.GradScaler | None = None,
    accum_iter: int = 1,
    clip_grad: float | None = None,
    mixup_fn: Callable | None = None,
    print_freq: int = 20,
    run_log: RunLog | None = None,
) -> dict[str, float]:
    """One epoch of supervised steps; returns the epoch's mean `loss` and `lr`, averaged over ranks,
    and `bad_images`, the unreadable images the loader met this epoch summed over workers and
    ranks, when there was at least one (`data.epoch_bad_images`).

    As the reference: the lr follows `optim.adjust_learning_rate` (warm-up + cosine from `lr` to
    `min_lr`, each group's `lr_scale` applied), set at every `accum_iter`-th step from the
    fractional epoch; the gradients are cleared at the start of the epoch, the loss is divided by
    `accum_iter` and the optimiser steps after every `accum_iter`-th step only (DDP skips the
    gradient all-reduce in between); the `len(loader) % accum_iter` leftover batches at the end
    are forwarded, backpropagated and logged, but their gradients are never applied (the next
    epoch's start discards them; `train_step.accumulation_step`, shared with pre-training);
    `clip_grad` clips the global gradient norm after unscaling; `mixup_fn` mixes images and
    targets (the criterion then takes soft targets). The host reads device values only every
    `print_freq` steps and at the end; a non-finite loss raises `NonFiniteLossError` there, before
    any checkpoint is written.
    """
    model.train()
    meters = Meters()
    steps = len(loader)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    optimizer.zero_grad(set_to_none=True)
    current_lr = optimizer.param_groups[0]["lr"]
    for step, (images, targets) in progress(loader, steps, f"epoch {epoch}", print_freq):
        if step % accum_iter == 0:
            current_lr = adjust_learning_rate(optimizer, epoch + step / steps, lr=lr, min_lr=min_lr,
                                              warmup_epochs=warmup_epochs, epochs=epochs)
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        loss = accumulation_step(
            model, optimizer, lambda: criterion(model(images), targets), step=step, accum_iter=accum_iter,
            autocast=autocast, scaler=scaler, clip_grad=clip_grad, bad=bad,
        )
        meters.update(loss=loss, lr=current_lr)

        if (step + 1) % print_freq == 0:
            check_finite(bad, f"at epoch {epoch}, step {step}")
            avg = meters.averages(all_ranks=False)
            log.info("epoch %d step %d: loss %.4f, lr %.3e", epoch, step + 1, avg["loss"], current_lr)
            if run_log is not None:
                x = int((epoch + (step + 1) / steps) * 1000)  # upstream's epoch_1000x axis
                run_log.scalars({"loss": avg["loss"], "lr": current_lr}, x)
    check_finite(bad, f"in epoch {epoch}")
    stats = meters.averages()
    bad_images = epoch_bad_images(loader, device)
    if bad_images:  # only when some were met: healthy data keeps the log lines as they were
        stats["bad_images"] = bad_images
    return stats


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    autocast: Autocast = contextlib.nullcontext,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (fractions) and mean cross-entropy on `loader`.

    Counts are summed over ranks: with a sharding (DistributedSampler) loader that is the whole
    set, with an unsharded loader on every rank the ratios are those of the whole set too.
    """
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, loss sum
    count = 0
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast():
            logits = model(images)
        logits = logits.float()
        top1, top5 = topk_correct(logits, targets, (1, 5))
        loss = F.cross_entropy(logits, targets, reduction="sum")
        sums += torch.stack([top1.double(), top5.double(), loss.double()])
        count += len(targets)
    totals = torch.cat([sums, sums.new_tensor([count])])
    if distributed.get_world_size() > 1:
        torch.distributed.all_reduce(totals)
    top1, top5, loss, n = totals.tolist()
    n = max(n, 1.0)
    return {"acc1": top1 / n, "acc5": top5 / n, "loss": loss / n}
