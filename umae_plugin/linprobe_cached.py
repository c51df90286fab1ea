"""Linear probing on cached features, and weighted k-NN accuracy: minutes instead of hours.

The encoder is frozen in linear probing, so its features of unaugmented images can be computed
once (`extract_features`) and the probe head (BatchNorm without affine parameters, then a linear
layer) trained on them (`train_linear_head`) with the same LARS optimiser and schedule as the
image-level probe. The one difference from `main_linprobe.py` without `--cache_features` is the
missing RandomResizedCrop + flip augmentation of the training images.

`knn_accuracy` is the weighted k-NN classifier of DINO (Caron et al., 2021): cosine similarity
to every training feature, the k most similar vote for their class with weight
`exp(similarity / temperature)`.

`NamedFeatures` gives every named feature of `features` (`cls`, `mean`, `gpool`: one definition,
whatever the classifier's `--global_pool` / `--cls_token` flag) from one pass of a ViT
classifier's blocks (`extract_named_features` over a loader), so all are probed at the cost of one
extraction. `search_lr` picks the head's lr on a stratified held-out part of the training
features (`stratified_split`), never on val; `probe_features` is the whole protocol (seeded head,
optional lr search, linear head, k-NN) on given features, for baselines and tables.

Accuracies are fractions in [0, 1]. Plain functions with explicit arguments.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.models import vision_transformer as timm_vit
from torch.utils.data import DataLoader, DistributedSampler

from . import distributed
from .features import FEATURES, available_features, pool_tokens
from .train_step import NonFiniteLossError, check_finite
from .logger import progress
from .metrics import topk_correct
from .optim import adjust_learning_rate, build_lars

log = logging.getLogger("umae")

Autocast = Callable[[], contextlib.AbstractContextManager]
EpochHook = Callable[[int, dict, dict], None]

LR_FACTORS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)  # `search_lr`: candidates are the base lr times these
HELD_OUT_FRACTION = 0.1  # `search_lr`: part of each training class held out to score the candidates


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
def knn_votes(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Weighted k-NN class scores [M, num_classes] of `val_feats` [M, D] against the bank
    `train_feats` [N, D], as in DINO's `eval_knn.py`: features are L2-normalised; each val sample
    takes the `k` (capped at N) training samples of highest cosine similarity s, each adding
    `exp(s / temperature)` to its class's score. Val samples are processed `chunk_size` at a
    time, so memory is [chunk_size, N]."""
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    bank = F.normalize(train_feats.float(), dim=1)
    bank_labels = train_labels.to(bank.device).long()
    k = min(k, len(bank_labels))
    out = []
    for start in range(0, len(val_feats), chunk_size):
        query = F.normalize(val_feats[start:start + chunk_size].float().to(bank.device), dim=1)
        sims, idx = (query @ bank.T).topk(k, dim=1)  # [B, k]
        votes = torch.zeros(len(query), num_classes, device=bank.device)
        votes.scatter_add_(1, bank_labels[idx], (sims / temperature).exp())
        out.append(votes)
    return torch.cat(out) if out else torch.zeros(0, num_classes, device=bank.device)


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
    """Weighted k-NN top-1 / top-5 accuracy (fractions) of `val_feats` against the bank
    `train_feats` (`knn_votes`; classes ranked by score)."""
    if num_classes is None:
        num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    votes = knn_votes(train_feats, train_labels, val_feats, k, temperature, num_classes, chunk_size)
    top1, top5 = topk_correct(votes, val_labels.to(votes.device).long(), (1, 5))
    n = max(len(val_labels), 1)
    return {"acc1": float(top1) / n, "acc5": float(top5) / n}


# ---------------------------------------------------------------------------------------------
# both pools in one pass, lr search, the whole protocol on given features


class NamedFeatures(nn.Module):
    """The named features (`features.FEATURES`) of a ViT classifier's encoder from one pass,
    whatever its classifier flags: `vit` (a `models_vit.VisionTransformer` or any timm
    `VisionTransformer` with a class token) gives the blocks; `final_norm` is the encoder's final
    norm (the classifier's own `norm` for a `--cls_token` classifier; for a `--global_pool` one,
    which dropped it, the pre-trained norm it was loaded from; None: the source has none, so no
    `cls` / `mean`); `fc_norm` the `gpool` LayerNorm (a `--global_pool` classifier's own; else
    the reference's fresh one). `forward(images)` returns {name: [B, D]} for `names`."""

    def __init__(self, vit: nn.Module, final_norm: nn.Module | None, fc_norm: nn.Module | None,
                 names: tuple[str, ...] = FEATURES) -> None:
        super().__init__()
        if not isinstance(vit, timm_vit.VisionTransformer) or vit.cls_token is None or vit.attn_pool is not None:
            raise TypeError(f"NamedFeatures needs a ViT classifier with a class token, got {type(vit).__name__}")
        self.vit, self.final_norm, self.fc_norm = vit, final_norm, fc_norm
        self.names = available_features(final_norm is not None, names)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The last block's output [B, P + L, D], before the final norm (timm's `forward_features`
        up to its `norm`)."""
        v = self.vit
        return v.blocks(v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(images)))))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.tokens(images)
        normed = self.final_norm(tokens) if self.final_norm is not None else None
        return pool_tokens(tokens, normed, self.names, fc_norm=self.fc_norm,
                           num_prefix_tokens=self.vit.num_prefix_tokens)


def extract_named_features(
    features: NamedFeatures,
    loader: DataLoader,
    device: torch.device,
    autocast: Autocast = contextlib.nullcontext,
    *,
    compile_forward: bool = False,
    print_freq: int = 20,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`extract_features` of every feature of `features` in one pass: ({name: [N, D]}, labels [N]),
    float32 on `device`, in dataset order."""
    names = features.names

    def joined(images: torch.Tensor) -> torch.Tensor:
        out = features(images)
        return torch.cat([out[n] for n in names], dim=1)

    feats, labels = extract_features(features, loader, device, autocast, forward=torch.compile(joined)
                                     if compile_forward else joined, print_freq=print_freq)
    parts = feats.split(feats.shape[1] // len(names), dim=1)
    return {n: p.contiguous() for n, p in zip(names, parts)}, labels


def new_probe_head(dim: int, num_classes: int) -> nn.Sequential:
    """The reference probe head: BatchNorm without affine parameters (eps 1e-6), then a linear
    layer with trunc-normal(0.01) weights and zero bias (drawn from the global generator)."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


def stratified_split(labels: torch.Tensor, fraction: float = HELD_OUT_FRACTION, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, held-out indices), both sorted, on `labels`' device: from each class
    round(fraction * n_c) samples drawn at random (a generator seeded with `seed`) are held out,
    at least one and at most n_c - 1 for a class with two or more samples, none for a class with
    one."""
    cpu = labels.detach().cpu().long()
    generator = torch.Generator().manual_seed(seed)
    held = []
    for c in torch.unique(cpu, sorted=True).tolist():
        idx = (cpu == c).nonzero().flatten()
        n = len(idx)
        n_held = min(max(math.floor(fraction * n + 0.5), 1), n - 1) if n >= 2 else 0
        held.append(idx[torch.randperm(n, generator=generator)[:n_held]])
    held_idx = torch.cat(held).sort().values if held else torch.zeros(0, dtype=torch.long)
    keep = torch.ones(len(cpu), dtype=torch.bool)
    keep[held_idx] = False
    return keep.nonzero().flatten().to(labels.device), held_idx.to(labels.device)


def search_lr(
    head: nn.Module,
    feats: torch.Tensor,
    labels: torch.Tensor,
    *,
    base_lr: float,
    epochs: int,
    batch_size: int,
    min_lr: float = 0.0,
    warmup_epochs: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    factors: tuple[float, ...] = LR_FACTORS,
    fraction: float = HELD_OUT_FRACTION,
) -> tuple[float, dict[float, float]]:
    """The head's lr, picked on the training features alone: `stratified_split(labels, fraction,
    seed)` holds out part of each class; for each `base_lr * factor` a copy of `head` (its
    initial state is not changed) is trained on the rest with the given schedule and scored by
    top-1 on the held-out part (ties: lower held-out loss, then the factor nearest 1; a run whose
    loss turns NaN / inf scores lowest). Returns (best lr, {lr: held-out top-1})."""
    fit_idx, held_idx = stratified_split(labels, fraction, seed)
    if len(held_idx) == 0:
        raise ValueError("search_lr: too few training samples to hold any out")
    fit_feats, fit_labels, held_feats, held_labels = feats[fit_idx], labels[fit_idx], feats[held_idx], labels[held_idx]
    scores: dict[float, tuple[float, float, float]] = {}
    for factor in factors:
        lr = base_lr * factor
        try:
            candidate = copy.deepcopy(head)
            train_linear_head(candidate, fit_feats, fit_labels, epochs=epochs, batch_size=batch_size, lr=lr,
                              min_lr=min_lr, warmup_epochs=warmup_epochs, weight_decay=weight_decay, seed=seed)
            stats = evaluate_head(candidate, held_feats, held_labels)
            acc1, loss = stats["acc1"], stats["loss"]
        except NonFiniteLossError:
            acc1, loss = -1.0, math.inf
        scores[lr] = (acc1, -loss if math.isfinite(loss) else -math.inf, -abs(math.log(factor)))
        log.info("lr search: lr %.3e (x%g): held-out top-1 %.2f%% of %d", lr, factor, max(acc1, 0) * 100, len(held_idx))
    best = max(scores, key=lambda lr: scores[lr])
    return best, {lr: score[0] for lr, score in scores.items()}


def probe_features(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    num_classes: int,
    epochs: int,
    batch_size: int,
    lr: float,
    min_lr: float = 0.0,
    warmup_epochs: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    lr_search: bool = False,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, float]:
    """The cached-feature protocol of `main_linprobe.py --cache_features` on given features: a
    `new_probe_head` drawn from `seed` (the global generator is left as it was), with
    `lr_search` its lr picked by `search_lr` (else `lr`), trained on all training features with
    LARS and the schedule, evaluated on val; and weighted k-NN. Returns `acc1`, `acc5`, `loss`,
    `knn_acc1`, `knn_acc5` (fractions) and `probe_lr` (the lr the head was trained with)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = new_probe_head(train_feats.shape[1], num_classes).to(train_feats.device)
    if lr_search:
        lr, _ = search_lr(head, train_feats, train_labels, base_lr=lr, epochs=epochs, batch_size=batch_size,
                          min_lr=min_lr, warmup_epochs=warmup_epochs, weight_decay=weight_decay, seed=seed)
    stats = train_linear_head(head, train_feats, train_labels, epochs=epochs, batch_size=batch_size, lr=lr,
                              min_lr=min_lr, warmup_epochs=warmup_epochs, weight_decay=weight_decay, seed=seed,
                              val_feats=val_feats, val_labels=val_labels)
    knn = knn_accuracy(train_feats, train_labels, val_feats, val_labels, k=k, temperature=temperature,
                       num_classes=num_classes)
    return {"acc1": stats["acc1"], "acc5": stats["acc5"], "loss": stats["loss"], "knn_acc1": knn["acc1"],
            "knn_acc5": knn["acc5"], "probe_lr": lr}
