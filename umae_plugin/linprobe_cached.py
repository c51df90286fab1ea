"""Linear probing on cached features, and weighted k-NN accuracy: minutes instead of hours.

The encoder is frozen in linear probing, so its features of unaugmented images can be computed
once (`extract_features`) and the probe head (BatchNorm without affine parameters, then a linear
layer) trained on them (`train_linear_head`) with the same LARS optimiser and schedule as the
image-level probe. The one difference from `main_linprobe.py` without `--cache_features` is the
missing RandomResizedCrop + flip augmentation of the training images.

`knn_accuracy` is the weighted k-NN classifier of DINO (Caron et al., 2021): cosine similarity
to every training feature, the k most similar vote for their class with weight
`exp(similarity / temperature)`.

Accuracies are fractions in [0, 1]. Plain functions with explicit arguments.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from . import distributed
from .train_step import check_finite
from .logger import progress
from .metrics import topk_correct
from .optim import adjust_learning_rate, build_lars

log = logging.getLogger("umae")

Autocast = Callable[[], contextlib.AbstractContextManager]
EpochHook = Callable[[int, dict, dict], None]


def _gather_shards(x: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Undo an unshuffled `DistributedSampler`: rank r holds dataset items r, r + W, r + 2W, ...
    (padded to equal length), so stacking the ranks' [n, ...] shards as [n, W, ...] and
    flattening gives items 0, 1, 2, ... in dataset order; the padding is cut off."""
    world = distributed.get_world_size()
    shards = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(shards, x.contiguous())
    return torch.stack(shards, dim=1).flatten(0, 1)[:num_samples]


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    autocast: Autocast = contextlib.nullcontext,
    *,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    print_freq: int = 20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features of every image of `loader`'s dataset: ([N, D] float32, [N] int64) on
    `device`, in dataset order.

    `forward` defaults to `model.forward_features` (pooled [B, D] features; pass a compiled
    version to speed it up). With several processes the loader must shard with an unshuffled
    `DistributedSampler` (what `data.build_loader(train=False)` builds); each rank extracts its
    shard and every rank returns the whole set.
    """
    forward = forward if forward is not None else model.forward_features
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for _, (images, targets) in progress(loader, len(loader), "features", print_freq):
        with autocast():
            feats.append(forward(images.to(device, non_blocking=True)).float())
        labels.append(targets.to(device, non_blocking=True))
    model.train(was_training)
    feats_t, labels_t = torch.cat(feats), torch.cat(labels).long()
    if isinstance(loader.sampler, DistributedSampler) and distributed.get_world_size() > 1:
        if loader.sampler.shuffle:
            raise ValueError("extract_features needs an unshuffled DistributedSampler to restore dataset order")
        n = len(loader.dataset)
        feats_t, labels_t = _gather_shards(feats_t, n), _gather_shards(labels_t, n)
    return feats_t, labels_t


def train_head_epoch(
    head: nn.Module,
    feats: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    epoch: int,
    batch_size: int,
    lr: float,
    min_lr: float,
    warmup_epochs: float,
    epochs: int,
    seed: int = 0,
) -> dict[str, float]:
    """One epoch of the probe head on cached [N, D] features: a shuffle drawn from (seed, epoch),
    `N // batch_size` full batches (one batch of all N if N < batch_size), cross-entropy, and the
    lr set every step from the fractional epoch. Returns the mean `loss` and the mean `lr`.
    Raises `NonFiniteLossError` if a loss was NaN / inf (one host sync, at the end)."""
    head.train()
    n = len(labels)
    steps = max(1, n // batch_size)
    size = min(batch_size, n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).to(feats.device)
    loss_sum = torch.zeros((), device=feats.device)
    lr_sum = 0.0
    for step in range(steps):
        lr_sum += adjust_learning_rate(optimizer, epoch + step / steps, lr=lr, min_lr=min_lr,
                                       warmup_epochs=warmup_epochs, epochs=epochs)
        idx = order[step * size:(step + 1) * size]
        loss = F.cross_entropy(head(feats[idx]), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach()
    check_finite(~torch.isfinite(loss_sum), f"training the probe head in epoch {epoch}")
    return {"loss": loss_sum.item() / steps, "lr": lr_sum / steps}


@torch.no_grad()
def evaluate_head(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor, batch_size: int = 4096) -> dict[str, float]:
    """Top-1 / top-5 accuracy (fractions) and mean cross-entropy of `head` on cached features."""
    was_training = head.training
    head.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=feats.device)
    for start in range(0, len(labels), batch_size):
        logits, target = head(feats[start:start + batch_size]).float(), labels[start:start + batch_size]
        top1, top5 = topk_correct(logits, target, (1, 5))
        totals += torch.stack([top1.double(), top5.double(), F.cross_entropy(logits, target, reduction="sum").double()])
    head.train(was_training)
    top1, top5, loss = (totals / max(len(labels), 1)).tolist()
    return {"acc1": top1, "acc5": top5, "loss": loss}


def train_linear_head(
    head: nn.Module,
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    min_lr: float = 0.0,
    warmup_epochs: float = 0.0,
    weight_decay: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    start_epoch: int = 0,
    seed: int = 0,
    val_feats: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
    on_epoch_end: EpochHook | None = None,
) -> dict[str, float]:
    """Train `head` on cached features for epochs `start_epoch .. epochs - 1`.

    `optimizer` defaults to the linear-probe LARS (`optim.build_lars`, momentum 0.9) over the
    head's parameters with `weight_decay`. After each epoch the head is evaluated on the val
    features (when given) and `on_epoch_end(epoch, train_stats, val_stats)` is called (train:
    `loss`, `lr`; val: `acc1`, `acc5`, `loss`, or {}). Returns the last epoch's
    {"train_loss", "train_lr", "acc1", "acc5", "loss"} (val keys only with val features; when no
    epoch runs, the val keys of the head as it is).
    """
    if optimizer is None:
        optimizer = build_lars(head.parameters(), lr=lr, weight_decay=weight_decay)
    result: dict[str, float] = {}
    for epoch in range(start_epoch, epochs):
        train_stats = train_head_epoch(head, train_feats, train_labels, optimizer, epoch=epoch, batch_size=batch_size,
                                       lr=lr, min_lr=min_lr, warmup_epochs=warmup_epochs, epochs=epochs, seed=seed)
        val_stats = evaluate_head(head, val_feats, val_labels) if val_feats is not None else {}
        result = {"train_loss": train_stats["loss"], "train_lr": train_stats["lr"], **val_stats}
        if on_epoch_end is not None:
            on_epoch_end(epoch, train_stats, val_stats)
    if not result and val_feats is not None:
        result = evaluate_head(head, val_feats, val_labels)
    return result


@torch.no_grad()
def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 256,
) -> dict[str, float]:
    """Weighted k-NN top-1 / top-5 accuracy (fractions) of `val_feats` [M, D] against the bank
    `train_feats` [N, D], as in DINO's `eval_knn.py`.

    Features are L2-normalised; each val sample takes the `k` (capped at N) training samples of
    highest cosine similarity s, each adds `exp(s / temperature)` to its class's score, and the
    classes are ranked by score. Val samples are processed `chunk_size` at a time, so memory is
    [chunk_size, N].
    """
    if num_classes is None:
        num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    bank = F.normalize(train_feats.float(), dim=1)
    bank_labels = train_labels.to(bank.device).long()
    k = min(k, len(bank_labels))
    correct = torch.zeros(2, dtype=torch.float64, device=bank.device)
    for start in range(0, len(val_labels), chunk_size):
        query = F.normalize(val_feats[start:start + chunk_size].float().to(bank.device), dim=1)
        target = val_labels[start:start + chunk_size].to(bank.device).long()
        sims, idx = (query @ bank.T).topk(k, dim=1)  # [B, k]
        votes = torch.zeros(len(target), num_classes, device=bank.device)
        votes.scatter_add_(1, bank_labels[idx], (sims / temperature).exp())
        top1, top5 = topk_correct(votes, target, (1, 5))
        correct += torch.stack([top1.double(), top5.double()])
    top1, top5 = (correct / max(len(val_labels), 1)).tolist()
    return {"acc1": top1, "acc5": top5}
