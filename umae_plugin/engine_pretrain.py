"""The pre-training loop: one epoch of MAE / U-MAE steps, the online linear probe, and the
collapse measurement. Explicit arguments, no `args` namespace."""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import distributed
from .data import epoch_bad_images
from .logger import Meters, RunLog, progress
from .metrics import effective_rank, topk_correct
from .optim import adjust_learning_rate
from .train_step import accumulation_step, check_finite

log = logging.getLogger("umae")


class OnlineProbe(nn.Module):
    """Linear classifier on detached pooled features (paper appendix B.5): BatchNorm without
    affine parameters, then a linear layer, as the linear-probe protocol uses."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(features))


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and / or `torch.compile` wrappers."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    epoch: int,
    mask_ratio: float,
    schedule: dict[str, float],
    accum_iter: int = 1,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    scaler: torch.amp.GradScaler | None = None,
    probe: nn.Module | None = None,
    probe_optimizer: torch.optim.Optimizer | None = None,
    print_freq: int = 20,
    run_log: RunLog | None = None,
) -> dict[str, float]:
    """One epoch of masked-autoencoder steps; returns the epoch's mean `loss`, `loss_mae`,
    `loss_unif` (U-MAE), `lr` and, with a probe, `probe_loss`, averaged over ranks; and
    `bad_images`, the unreadable images the loader met this epoch summed over workers and ranks,
    when there was at least one (`data.epoch_bad_images`).

    `schedule` holds `lr, min_lr, warmup_epochs, epochs` for the per-step cosine schedule, set at
    every `accum_iter`-th step from the fractional epoch `epoch + step / len(loader)`. Gradient
    accumulation as the reference (`train_step.accumulation_step`): the gradients are cleared at
    the start of the epoch, the loss is divided by `accum_iter` and the optimiser steps after every
    `accum_iter`-th step only; the `len(loader) % accum_iter` leftover batches at the end are
    forwarded, backpropagated and logged, but their gradients are never applied (the next epoch's
    start discards them; DDP skips their all-reduce). The host reads device values only every
    `print_freq` steps and at the end of the epoch.
    """
    model.train()
    meters = Meters()
    steps = len(loader)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    optimizer.zero_grad(set_to_none=True)
    lr = optimizer.param_groups[0]["lr"]
    for step, (imgs, targets) in progress(loader, steps, f"epoch {epoch}", print_freq):
        if step % accum_iter == 0:
            lr = adjust_learning_rate(optimizer, epoch + step / steps, **schedule)
        imgs = imgs.to(device, non_blocking=True)
        loss, _, _, terms = accumulation_step(
            model, optimizer, lambda: model(imgs, mask_ratio, return_terms=True), step=step,
            accum_iter=accum_iter, autocast=autocast, scaler=scaler, bad=bad,
        )

        values = {k: v for k, v in terms.items() if k.startswith("loss")}
        values["loss"] = loss
        if probe is not None:
            targets = targets.to(device, non_blocking=True)
            probe_loss = F.cross_entropy(probe(terms["features"].detach().float()), targets)
            probe_optimizer.zero_grad(set_to_none=True)
            probe_loss.backward()
            probe_optimizer.step()
            values["probe_loss"] = probe_loss
        meters.update(**values)
        meters.update(lr=lr)

        if (step + 1) % print_freq == 0:
            check_finite(bad, f"at epoch {epoch}, step {step}")
            avg = meters.averages(all_ranks=False)
            log.info("epoch %d step %d: %s", epoch, step + 1, ", ".join(f"{k} {v:.4f}" for k, v in avg.items()))
            if run_log is not None:
                x = int((epoch + (step + 1) / steps) * 1000)  # upstream's epoch_1000x axis
                run_log.scalars({("train_loss" if k == "loss" else k): v for k, v in avg.items()}, x)
    check_finite(bad, f"in epoch {epoch}")
    stats = meters.averages()
    bad_images = epoch_bad_images(loader, device)
    if bad_images:  # only when some were met: healthy data keeps the log lines as they were
        stats["bad_images"] = bad_images
    return stats


@torch.no_grad()
def measure_effective_rank(model: nn.Module, images: torch.Tensor, autocast=contextlib.nullcontext) -> float:
    """Effective rank of the pooled features of unmasked `images` (the model's own pooling)."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    with autocast():
        feats = model.forward_features(images)
    model.train(was_training)
    return effective_rank(feats.float())


@torch.no_grad()
def evaluate_probe(
    model: nn.Module, probe: nn.Module, loader: DataLoader, device: torch.device, autocast=contextlib.nullcontext
) -> dict[str, float]:
    """Top-1 / top-5 accuracy of the online probe on unmasked images (counts summed over ranks).

    The U-MAE reference evaluates its probe on 75%-masked views; unmasked images are what a
    linear probe sees, so the number is comparable to linear-probe accuracy."""
    model, probe = unwrap(model), unwrap(probe)
    was_training = model.training, probe.training
    model.eval()
    probe.eval()
    counts = torch.zeros(3, device=device)
    for imgs, targets in loader:
        imgs, targets = imgs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast():
            feats = model.forward_features(imgs)
        top1, top5 = topk_correct(probe(feats.float()), targets, (1, 5))
        counts += torch.stack([top1.float(), top5.float(), torch.tensor(float(len(targets)), device=device)])
    model.train(was_training[0])
    probe.train(was_training[1])
    if distributed.get_world_size() > 1:
        torch.distributed.all_reduce(counts)
    top1, top5, n = counts.tolist()
    return {"online_probe_acc1": top1 / max(n, 1), "online_probe_acc5": top5 / max(n, 1)}


def fixed_images(dataset: Any, num: int, seed: int = 0) -> torch.Tensor:
    """`num` images of `dataset` chosen by a fixed seed (the same ones every epoch and run)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[: min(num, len(dataset))]
    return torch.stack([dataset[int(i)][0] for i in idx])
