"""The pre-training loop: one epoch of MAE / U-MAE steps, the online linear probe, and the
collapse measurement. Explicit arguments, no `args` namespace.

Features, everywhere here, are the named features of `umae_plugin.features` (`cls`, `mean`:
`models_mae.pool_latent` of the encoder's normalised output, exactly as the models pool
`terms["features"]` for the uniformity term; `gpool`: a fresh fc_norm of the un-normed patch-token
mean, the reference `--global_pool` classifier's), read off the encoder's final norm by a
`features.TokenTap` during the pass the step or evaluation makes anyway."""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import unwrap_model
from torch.utils.data import DataLoader

from . import distributed
from .data import epoch_bad_images, normalize_pixels
from .features import FEATURES, TokenTap, check_names
from .linprobe_cached import extract_features, knn_accuracy
from .logger import Meters, RunLog, progress
from .losses import uniformity_loss
from .metrics import effective_rank, effective_rank_centered, topk_correct
from .models_mae import FEATURE_POOLS, pool_latent
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


class OnlineProbes(nn.Module):
    """One `OnlineProbe` per named feature (`features.FEATURES` by default): `forward` maps
    {name: [B, D] features} to {name: [B, classes] logits}. Trained together (one optimiser: AdamW
    is per-parameter, so each head follows its own loss exactly as alone)."""

    def __init__(self, dim: int, num_classes: int, names: tuple[str, ...] = FEATURES) -> None:
        super().__init__()
        self.names = check_names(names)
        self.heads = nn.ModuleDict({n: OnlineProbe(dim, num_classes) for n in self.names})

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: self.heads[n](features[n].float()) for n in self.names}


def probe_losses(probe: nn.Module, features: dict[str, torch.Tensor], targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cross-entropy of each head of an `OnlineProbes` (possibly DDP-wrapped) on its feature."""
    return {n: F.cross_entropy(logits, targets) for n, logits in probe(features).items()}


# The plain module inside DDP (`.module`) and / or `torch.compile` (`._orig_mod`) wrappers.
unwrap = unwrap_model


class LatentTap:
    """The online probe's training features when they are pooled otherwise than the model's own
    `terms["features"]` (its `feature_pool`, which the uniformity term uses): a forward hook on
    the encoder's final norm pools its output, detached, with `pool_latent(latent, pool)` during
    the model's own masked pass (no extra forward). `features()` returns the last pass's."""

    def __init__(self, model: nn.Module, pool: str) -> None:
        if pool not in FEATURE_POOLS:
            raise ValueError(f"unknown feature pool {pool!r}; expected one of {FEATURE_POOLS}")
        self.pool = pool
        self._features: torch.Tensor | None = None
        self._handle = unwrap(model).norm.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._features = pool_latent(output.detach(), self.pool)

    def features(self) -> torch.Tensor:
        if self._features is None:
            raise RuntimeError("LatentTap: no forward pass since the last call")
        out, self._features = self._features, None
        return out

    def remove(self) -> None:
        self._handle.remove()


def make_probe_tap(model: nn.Module, pool: str) -> LatentTap | None:
    """A `LatentTap` when `pool` differs from the pool of the model's `terms["features"]`, else
    None (those features are `pool_latent(latent, pool)` of the same pass already). Make it once
    per run, before any `torch.compile` trace."""
    return None if getattr(unwrap(model), "feature_pool", None) == pool else LatentTap(model, pool)


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
    probe_tap: LatentTap | TokenTap | None = None,
    print_freq: int = 20,
    run_log: RunLog | None = None,
) -> dict[str, float]:
    """One epoch of masked-autoencoder steps; returns the epoch's mean `loss`, `loss_mae`,
    `loss_unif` (U-MAE), `lr` and, with a probe, `probe_loss`, averaged over ranks; `images_per_s`
    (summed over ranks) and `data_wait_frac` (the share of the epoch's wall time spent waiting for
    the loader, averaged over ranks; `logger.Progress`); and `bad_images`, the unreadable images the
    loader met this epoch summed over workers and ranks, when there was at least one
    (`data.epoch_bad_images`).

    Batches of uint8 pixels [B, 3, H, W] (the pre-training loaders') become floats on the device,
    `data.normalize_pixels` (bitwise ToTensor + Normalize); float batches are used as they come.

    `schedule` holds `lr, min_lr, warmup_epochs, epochs` for the per-step cosine schedule, set at
    every `accum_iter`-th step from the fractional epoch `epoch + step / len(loader)`. Gradient
    accumulation as the reference (`train_step.accumulation_step`): the gradients are cleared at
    the start of the epoch, the loss is divided by `accum_iter` and the optimiser steps after every
    `accum_iter`-th step only; the `len(loader) % accum_iter` leftover batches at the end are
    forwarded, backpropagated and logged, but their gradients are never applied (the next epoch's
    start discards them; DDP skips their all-reduce). The host reads device values only every
    `print_freq` steps and at the end of the epoch.

    The probe trains on the detached features of the same masked pass, without an extra forward:
    an `OnlineProbes` on every feature of its `probe_tap` (a `features.TokenTap` on the encoder's
    final norm), logging `probe_loss_<name>` per head and `probe_loss` (their mean); a single
    `OnlineProbe` on the model's `terms["features"]` (`pool_latent(latent, model.feature_pool)`)
    or on those of a `LatentTap` (`make_probe_tap`: the same latent pooled another way).
    """
    model.train()
    meters = Meters()
    steps = len(loader)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    optimizer.zero_grad(set_to_none=True)
    lr = optimizer.param_groups[0]["lr"]
    tracker = progress(loader, steps, f"epoch {epoch}", print_freq, device=device)
    for step, (imgs, targets) in tracker:
        if step % accum_iter == 0:
            lr = adjust_learning_rate(optimizer, epoch + step / steps, **schedule)
        imgs = imgs.to(device, non_blocking=True)
        if imgs.dtype == torch.uint8:  # 4x less to copy than float32; the same values once converted
            imgs = normalize_pixels(imgs)
        loss, _, _, terms = accumulation_step(
            model, optimizer, lambda: model(imgs, mask_ratio, return_terms=True), step=step,
            accum_iter=accum_iter, autocast=autocast, scaler=scaler, bad=bad,
        )

        values = {k: v for k, v in terms.items() if k.startswith("loss")}
        values["loss"] = loss
        if probe is not None:
            targets = targets.to(device, non_blocking=True)
            if isinstance(probe_tap, TokenTap):
                per_head = probe_losses(probe, probe_tap.features(unwrap(probe).names), targets)
                probe_loss = torch.stack(list(per_head.values())).sum()
                values.update({f"probe_loss_{n}": v.detach() for n, v in per_head.items()})
            else:
                feats = probe_tap.features() if probe_tap is not None else terms["features"].detach()
                probe_loss = F.cross_entropy(probe(feats.float()), targets)
            probe_optimizer.zero_grad(set_to_none=True)
            probe_loss.backward()
            probe_optimizer.step()
            values["probe_loss"] = probe_loss.detach() / (len(unwrap(probe).names) if isinstance(probe_tap, TokenTap)
                                                          else 1)
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
    stats.update(tracker.summary(all_ranks=True))
    bad_images = epoch_bad_images(loader, device)
    if bad_images:  # only when some were met: healthy data keeps the log lines as they were
        stats["bad_images"] = bad_images
    return stats


PROBE_MASK_SEED = 0  # the online probe's val masks: the same draws at every evaluation


def _collapse_measures(feats: torch.Tensor) -> dict[str, float]:
    """Effective rank (uncentred: the paper's appendix B.1; centred) and uniformity of float32
    `feats` [n, D], computed outside autocast."""
    with torch.autocast(device_type=feats.device.type, enabled=False):
        return {
            "effective_rank": effective_rank(feats),
            "effective_rank_centered": effective_rank_centered(feats),
            "unif": float(uniformity_loss(feats, gather=False)),
        }


@torch.no_grad()
def measure_collapse(
    model: nn.Module, images: torch.Tensor, *, batch_size: int, autocast=contextlib.nullcontext, init: bool = False,
    names: tuple[str, ...] = FEATURES,
) -> dict[str, float]:
    """Collapse measures of the named features (`features.FEATURES`) of unmasked `images`,
    whatever the model's pool: `effective_rank_<name>` (uncentred, as the paper),
    `effective_rank_centered_<name>` and `unif_<name>` (`losses.uniformity_loss` of the batch,
    not gathered). The encoder runs under `autocast` in batches of `batch_size`; the measures are
    computed on float32 features outside it. With `init`, the keys read
    `effective_rank_init_mean`, ... (before training)."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    pooled: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    try:
        with TokenTap(model.norm) as tap:
            for chunk in images.split(max(1, batch_size)):
                with autocast():
                    model.forward_latent(chunk)
                    feats = tap.features(names)
                for n in names:
                    pooled[n].append(feats[n].float())
    finally:
        model.train(was_training)
    stats = {}
    for n in names:
        for name, value in _collapse_measures(torch.cat(pooled[n])).items():
            stats[f"{name}_init_{n}" if init else f"{name}_{n}"] = value
    return stats


def masked_latent(model: nn.Module, imgs: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """The normalised encoder output of masked `imgs`, as the model's training pass computes it
    (masks from the current random state): MAE's `forward_encoder` (visible patches only, class
    token first); SimMIM's block mask and `_encode` (mask tokens in place of masked patches)."""
    if hasattr(model, "forward_encoder"):
        return model.forward_encoder(imgs, mask_ratio)[0]
    if hasattr(model, "mask_block") and hasattr(model, "_encode"):
        from .models_simmim import block_mask

        mask = block_mask(imgs.shape[0], model.grid_size, mask_ratio, model.mask_block, imgs.device)
        return model._encode(imgs, mask)
    raise TypeError(f"{type(model).__name__}: no masked encoder pass (forward_encoder or SimMIM's _encode)")


@contextlib.contextmanager
def seeded_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Inside: the CPU generator and `device`'s own generator seeded with `seed`; on exit both are
    put back as they were, so the run's random stream is not disturbed."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"):
            torch.default_generator.manual_seed(seed)
            torch.cuda.default_generators[index].manual_seed(seed)
            yield
    elif device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
    else:
        with torch.random.fork_rng(device_type=device.type):
            torch.manual_seed(seed)
            yield


@torch.no_grad()
def evaluate_probe(
    model: nn.Module,
    probe: nn.Module,
    loader: DataLoader,
    device: torch.device,
    autocast=contextlib.nullcontext,
    *,
    mask_ratio: float,
    pool: str,
    mask_seed: int = PROBE_MASK_SEED,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (fractions; counts summed over ranks) of the online probe on the
    val images, both masked and unmasked: `online_probe_masked_acc{1,5}` on views masked with
    `mask_ratio` as in training (the U-MAE reference code's protocol; the probe is trained on such
    features), and `online_probe_unmasked_acc{1,5}` on whole images (what a linear probe sees).
    For an `OnlineProbes` every head is evaluated on its own named feature (a `TokenTap` on the
    final norm), keys `online_probe_{masked,unmasked}_acc{1,5}_<name>`, and the unsuffixed keys
    are feature `pool`'s; a single `OnlineProbe` reads `pool_latent(latent, pool)`. The masks are
    drawn from generators seeded with `mask_seed` (+ the rank) inside `seeded_rng`: the same masks
    at every evaluation, the run's random state untouched."""
    model, probe = unwrap(model), unwrap(probe)
    names = probe.names if isinstance(probe, OnlineProbes) else (pool,)
    was_training = model.training, probe.training
    model.eval()
    probe.eval()
    counts = torch.zeros(len(names), 5, device=device)  # per head: masked top1, top5, unmasked top1, top5, n
    tap = TokenTap(model.norm) if isinstance(probe, OnlineProbes) else None
    try:
        with seeded_rng(device, mask_seed + distributed.get_rank()):
            for imgs, targets in loader:
                imgs, targets = imgs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                if tap is not None:
                    with autocast():
                        masked_latent(model, imgs, mask_ratio)
                        masked = probe(tap.features(names))
                        model.forward_latent(imgs)
                        whole = probe(tap.features(names))
                else:
                    with autocast():
                        masked = {pool: probe(pool_latent(masked_latent(model, imgs, mask_ratio), pool).float())}
                        whole = {pool: probe(pool_latent(model.forward_latent(imgs), pool).float())}
                n = torch.tensor(float(len(targets)), device=device)
                counts += torch.stack([torch.stack([*(h.float() for h in topk_correct(masked[name].float(), targets, (1, 5))),
                                                    *(h.float() for h in topk_correct(whole[name].float(), targets, (1, 5))),
                                                    n]) for name in names])
    finally:
        if tap is not None:
            tap.remove()
        model.train(was_training[0])
        probe.train(was_training[1])
    if distributed.get_world_size() > 1:
        torch.distributed.all_reduce(counts)
    out: dict[str, float] = {}
    for name, (m1, m5, u1, u5, n) in zip(names, counts.tolist()):
        n = max(n, 1)
        accs = {"online_probe_masked_acc1": m1 / n, "online_probe_masked_acc5": m5 / n,
                "online_probe_unmasked_acc1": u1 / n, "online_probe_unmasked_acc5": u5 / n}
        if tap is not None:
            out.update({f"{k}_{name}": v for k, v in accs.items()})
        if name == pool:
            out.update(accs)
    return out


KNN_K, KNN_TEMPERATURE = 20, 0.07  # the cached probe's k-NN (DINO's): 20 neighbours, exp(s / 0.07) votes


def knn_bank_indices(num_images: int, bank_size: int, seed: int = 0) -> list[int]:
    """The k-NN monitor's bank: the first `bank_size` of a permutation of `num_images` drawn from a
    generator seeded with `seed` (all of them, permuted, if fewer), the same in every run."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    return order[: max(0, bank_size)].tolist()


def evaluate_knn(
    model: nn.Module,
    bank_loader: DataLoader,
    val_loader: DataLoader,
    device: torch.device,
    autocast=contextlib.nullcontext,
    *,
    pool: str,
    num_classes: int | None = None,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    names: tuple[str, ...] = FEATURES,
) -> dict[str, float]:
    """The k-NN monitor: weighted `k`-NN top-1 (`linprobe_cached.knn_accuracy`, the cached probe's
    function) of each named feature (`names`; a `TokenTap` on the final norm) of unmasked val
    images against those of a bank of unmasked training images, no training of anything. Each
    rank extracts its share of both loaders (`linprobe_cached.extract_features`: unshuffled
    `DistributedSampler`s, as `data.build_loader(train=False)` builds) and every rank gets the
    gathered sets. Returns `knn_acc1_<name>` per feature, `knn_acc1` (feature `pool`'s; fractions)
    and `knn_time_s` (seconds the evaluation took, extraction included). Works for any model with
    `forward_latent` (MAE, SimMIM, any lambda)."""
    start = time.perf_counter()
    model = unwrap(model)
    names = tuple(dict.fromkeys((*names, pool)))
    tap = TokenTap(model.norm)

    def forward(imgs: torch.Tensor) -> torch.Tensor:
        model.forward_latent(imgs)
        feats = tap.features(names)
        return torch.cat([feats[n] for n in names], dim=1)

    big = 1 << 30  # no progress lines: the monitor's cost is logged as knn_time_s
    try:
        bank, bank_labels = extract_features(model, bank_loader, device, autocast, forward=forward, print_freq=big)
        val, val_labels = extract_features(model, val_loader, device, autocast, forward=forward, print_freq=big)
    finally:
        tap.remove()
    out: dict[str, float] = {}
    for name, b, v in zip(names, bank.chunk(len(names), dim=1), val.chunk(len(names), dim=1)):
        acc = knn_accuracy(b, bank_labels, v, val_labels, k=k, temperature=temperature, num_classes=num_classes)
        out[f"knn_acc1_{name}"] = acc["acc1"]
    out["knn_acc1"] = out[f"knn_acc1_{pool}"]
    out["knn_time_s"] = time.perf_counter() - start
    return out


def fixed_images(dataset: Any, num: int, seed: int = 0) -> torch.Tensor:
    """`num` images of `dataset` chosen by a fixed seed (the same ones every epoch and run)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[: min(num, len(dataset))]
    return torch.stack([dataset[int(i)][0] for i in idx])
