"""MAE vs U-MAE on CIFAR-10 with paired seeds, on one GPU: the three arms x three seeds of
`recipes/cifar10_paired.py` for 100 epochs each, with the data, the augmentation and the loop on
the GPU, then the probes and the same paired tables, plus curves over training.

    python recipes/cifar10_gpu.py plan        # FLOPs per image -> the epochs that fit (on the CPU, ~30 s)
    python recipes/cifar10_gpu.py run --data data/cifar10.tar.gz   # the nine runs (skips finished ones), report
    python recipes/cifar10_gpu.py report --out <runs>   # docs/results/cifar10_gpu.{csv,md}, cifar10_gpu_curves.png
    python recipes/cifar10_gpu.py prepare --data data/cifar10.tar.gz   # -> data/cifar10_uint8.npz (optional)
    SMOKE=1 python recipes/cifar10_gpu.py run --out /tmp/smoke   # CPU, digits, tiny model, 2 epochs (tests)

Arms: MAE (lambda 0), U-MAE lambda 0.01 on the class token (`unif_pool="cls"`, the U-MAE reference's
feature) and U-MAE lambda 0.01 on the mean of the patch tokens (`unif_pool="mean"`, this project's
default). Seeds 0, 1, 2, paired: a seed fixes the initialisation (`torch.manual_seed(seed)` before
the model is built), the masks (the model draws them from the global generator, which no other
part of the step touches) and, through a generator seeded from (seed, epoch), the data order and
every crop and flip, identically in every arm.

Setting: ViT-Tiny (embed 192, depth 12, 3 heads), 32 px, patch 4 (64 patches), 128-d 2-block decoder
(4 heads), norm-pix loss, mask 0.75; batch 1024, AdamW betas (0.9, 0.95), weight decay 0.05, base lr
blr = 3e-4 and, by the MAE rule lr = blr * batch / 256, lr = 1.2e-3; 10 warm-up epochs then a
half-cycle cosine to 0, set every step (`umae_plugin.optim`); bf16 autocast; 100 epochs of 48 full
batches (the order is a fresh permutation each epoch; the 848 left over are a different set each
epoch). Augmentation on the GPU: random resized crop of 20-100% of the area, aspect ratio 3/4-4/3,
bicubic, then a horizontal flip with probability 1/2 (the MAE pre-training transform), batched
with per-sample affine grids (`umae_plugin.data.gpu_augment`); the crop box is continuous and clamped to the image
(one draw, no retries, like `data.RandomResizedCropNoRetry`). ImageNet mean/std normalisation as
the package's transforms.

Measured on the way (both pools, `mean` = average of the final-normed patch tokens, `cls` = the
final-normed class token, as `engine_pretrain`): two online probes (`engine_pretrain.OnlineProbe`,
AdamW 1e-3, on the detached features of the masked training pass through `LatentTap`s, so every arm
has both), evaluated with `evaluate_probe` on the 10,000 val images, masked (0.75, fixed masks) and
unmasked; `measure_collapse` (effective rank uncentred and centred, uniformity) of 1024 fixed val
images; both at initialisation and every 5 epochs. At the end: the cached-feature linear probe of
`linprobe_cached.probe_features` on the unmasked train / val features of each pool (LARS, 100
epochs, batch 4096, lr = 0.1 * 4096 / 256 = 1.6 times a factor picked on a held-out 10% of the
training set, 10 warm-up epochs) and weighted 20-NN. Baselines, in each MAE run (the same probes,
no pre-training): the exact initial weights every arm of that seed starts from, both pools, and the
normalised raw pixels (`baseline_probes`; the report's baselines table).

Plan (`python recipes/cifar10_gpu.py plan`; FLOPs measured on the CPU with `FlopCounterMode`,
which counts matmuls and attention: forward and backward of one masked batch plus both online
probes): 0.702 GFLOP per training image, 34.5 TFLOP per epoch of 48 x 1024 = 49,152 images.
ASSUMED, until a run measures it: an achieved 25% of the H100 / H200's 989 dense bf16 TFLOPS =
247 TFLOPS for a model this small. Then an epoch takes 0.14 s of compute, the nine runs of 100
epochs 126 s = 2.1 min, and 6 min would hold 286 epochs per run. The step itself is small (2.9 ms
of compute), and eager PyTorch spends host time on each of the ~1,570 ATen ops a step dispatches
(measured on the CPU): at an assumed 5 us per op that is 7.9 ms per step, so one process alone would
be host-bound at ~5.7 min for the nine runs. The runs therefore go in three worker processes sharing
the GPU (`--procs 3`, one arm each, seed-major), whose host work overlaps: expected ~2-4 min of GPU
time for the nine pre-trainings (2.1 min if the overlap is complete; no worse than ~5.7 min), plus
~1 min for data decoding, the evaluations (~15 s of compute in all) and the probes (18 for the
runs, 9 for the baselines: small LARS steps, host-bound like training). 100 epochs of pre-training
therefore fit the 6 minutes under these assumptions; every run prints its seconds per epoch and
images per second and the report states them, which checks the assumption. `--compile`
(`torch.compile` of each transformer block; off by default; tried on the CPU only) cuts the op
count if needed.

Data (`--data`): the ImageFolder of `/work/shared/data/cifar10.tar.gz` (train/<class>/*.jpg,
val/<class>/*.jpg; JPEG re-encoded, so pixels differ slightly from the original release), given
as the .tar.gz itself (19 MB, decoded in memory: ~5-20 s), as the unpacked folder, or as the
`cifar10_uint8.npz` that `prepare` writes (uint8 [N, 32, 32, 3] arrays + int64 labels + class
names, 176 MiB). Default: `data/cifar10_uint8.npz`, else `data/cifar10.tar.gz` (`data/` should be
git-ignored). `run` converts a tar or folder once into `--cache` (default data/cifar10_uint8.npz)
and hands that to its worker processes. The npz is larger than what travels to a GPU machine with
the working tree, so bring the tar and let `run` decode it there:

    mkdir -p data && cp /work/shared/data/cifar10.tar.gz data/      # once, in the checkout
    # on the GPU machine (carry data/cifar10.tar.gz), writing everything under $OUT:
    python recipes/cifar10_gpu.py run --data data/cifar10.tar.gz --out $OUT/runs --results $OUT/results
    # back here, with the fetched runs: docs/results/cifar10_gpu.{csv,md} and cifar10_gpu_curves.png
    python recipes/cifar10_gpu.py report --out <fetched>/runs

Outputs: one folder per run in `--out` (`<arm>_seed<seed>/result.json`: the setting, the GPU, the
final measures, the curves); a run whose result exists (with the same setting) is skipped, so an
interrupted recipe is simply started again. `report` (also run at the end of `run`) writes
`--results` (default docs/results/) cifar10_gpu.csv (one row per arm and seed), cifar10_gpu.md
(per-seed rows; per arm the mean over seeds and the paired difference arm - MAE, mean and 95% t
interval) and cifar10_gpu_curves.png (effective rank and masked online-probe accuracy over epochs,
mean over seeds with the min-max band), each naming the GPU. Without matplotlib the figure is
skipped with a warning (run `report` again where it is installed).

SMOKE=1: digits (scikit-learn's, 32 px), a 32-d 1-block encoder, 2 epochs, batch 256, seed 0, all
three arms in one worker process, the same code path on the CPU without autocast; csv / md / png go
to `--out`.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import importlib.util
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tarfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("umae_plugin") is None:  # a bare checkout (the GPU machine): import it from there
    sys.path.insert(0, str(ROOT))

from umae_plugin.analysis import paired  # noqa: E402
# the batched on-device crop / flip and the exact normalisation live in the package (one implementation)
from umae_plugin.data import gpu_augment  # noqa: E402
from umae_plugin.data import normalize_pixels as normalize  # noqa: E402
from umae_plugin.engine_pretrain import (LatentTap, OnlineProbe, evaluate_probe, fixed_images,  # noqa: E402
                                         measure_collapse)
from umae_plugin.linprobe_cached import probe_features  # noqa: E402
from umae_plugin.models_mae import FEATURE_POOLS, pool_latent  # noqa: E402
from umae_plugin.optim import adjust_learning_rate, param_groups_weight_decay  # noqa: E402
from umae_plugin.registry import create_model  # noqa: E402
from umae_plugin.train_step import accumulation_step, check_finite  # noqa: E402

SMOKE = os.environ.get("SMOKE") == "1"

ARMS = {  # name -> (lambda_unif, unif_pool)
    "mae": (0.0, "mean"),
    "umae_cls": (0.01, "cls"),
    "umae_mean": (0.01, "mean"),
}
ARM_LABELS = {"mae": "MAE", "umae_cls": "U-MAE cls", "umae_mean": "U-MAE mean"}
SEEDS = (0,) if SMOKE else (0, 1, 2)
POOLS = FEATURE_POOLS  # ("mean", "cls"): every measure is taken for both

H100_BF16_DENSE = 989e12  # FLOP/s, the H100 / H200 SXM datasheet's dense bf16 tensor-core peak
GPU_BUDGET_S = 360.0  # the nine pre-training runs' GPU time


@dataclasses.dataclass(frozen=True)
class Setting:
    """Everything a run's numbers depend on; saved into its result, compared on resume."""

    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    decoder_embed_dim: int = 128
    decoder_depth: int = 2
    decoder_num_heads: int = 4
    img_size: int = 32
    patch_size: int = 4
    mask_ratio: float = 0.75
    epochs: int = 100
    warmup_epochs: int = 10
    batch_size: int = 1024
    blr: float = 3e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    crop_scale: tuple[float, float] = (0.2, 1.0)
    eval_every: int = 5
    erank_samples: int = 1024
    eval_batch: int = 1024
    probe_epochs: int = 100
    probe_batch: int = 4096
    probe_blr: float = 0.1
    probe_warmup: int = 10
    knn_k: int = 20

    @property
    def lr(self) -> float:
        """The MAE rule: lr = blr * batch / 256."""
        return self.blr * self.batch_size / 256

    @property
    def probe_lr(self) -> float:
        return self.probe_blr * self.probe_batch / 256


SMOKE_SETTING = Setting(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                        decoder_num_heads=2, epochs=2, warmup_epochs=1, batch_size=256, blr=1e-3, eval_every=1,
                        eval_batch=512, probe_epochs=2, probe_batch=256, probe_warmup=1)


def setting_from(args: argparse.Namespace) -> Setting:
    base = SMOKE_SETTING if SMOKE else Setting()
    changes = {k: getattr(args, k) for k in ("epochs", "batch_size", "blr") if getattr(args, k, None) is not None}
    return dataclasses.replace(base, **changes)


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# data: CIFAR-10 as uint8 arrays [N, 32, 32, 3] + int64 labels


SPLITS = ("train", "val")
DEFAULT_NPZ = ROOT / "data" / "cifar10_uint8.npz"
DEFAULT_TAR = ROOT / "data" / "cifar10.tar.gz"


def _decode(blob: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(blob)) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    if arr.shape != (32, 32, 3):
        raise ValueError(f"expected 32x32 RGB images, got {arr.shape}")
    return arr


def _arrays(items: dict[str, list[tuple[str, str, bytes | Path]]], source: str) -> dict[str, np.ndarray]:
    """{split: [(class, file name, bytes or path)]} -> the npz layout, in ImageFolder order (classes
    sorted, files sorted within a class)."""
    classes = sorted({c for c, _, _ in items.get("train", [])})
    if not classes or not items.get("val"):
        raise SystemExit(f"error: {source}: expected train/<class>/<image> and val/<class>/<image>")
    index = {c: i for i, c in enumerate(classes)}
    out: dict[str, np.ndarray] = {"classes": np.array(classes)}
    for split in SPLITS:
        entries = sorted(items[split], key=lambda e: (e[0], e[1]))
        out[f"x_{split}"] = np.stack([_decode(b if isinstance(b, bytes) else b.read_bytes()) for _, _, b in entries])
        out[f"y_{split}"] = np.array([index[c] for c, _, _ in entries], dtype=np.int64)
    return out


def _from_tar(path: Path) -> dict[str, np.ndarray]:
    items: dict[str, list] = {s: [] for s in SPLITS}
    with tarfile.open(path) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) >= 3 and parts[-3] in SPLITS:
                items[parts[-3]].append((parts[-2], parts[-1], tar.extractfile(member).read()))
    return _arrays(items, str(path))


def _from_folder(root: Path) -> dict[str, np.ndarray]:
    if not (root / "train").is_dir() and (root / "cifar10" / "train").is_dir():
        root = root / "cifar10"
    items = {s: [(f.parent.name, f.name, f) for f in sorted((root / s).glob("*/*")) if f.is_file()] for s in SPLITS
             if (root / s).is_dir()}
    return _arrays(items, str(root))


def _digits() -> dict[str, np.ndarray]:
    """SMOKE data: the package's digits dataset (32x32 RGB) as arrays."""
    from umae_plugin.data import DigitsDataset

    out: dict[str, np.ndarray] = {"classes": np.array([str(c) for c in range(10)])}
    for split in SPLITS:
        ds = DigitsDataset(split)
        out[f"x_{split}"] = np.stack([np.asarray(ds[i][0], dtype=np.uint8) for i in range(len(ds))])
        out[f"y_{split}"] = np.array(ds.targets, dtype=np.int64)
    return out


def load_arrays(path: Path | None) -> tuple[dict[str, np.ndarray], str]:
    """(arrays, a description of the source). `path`: an npz from `prepare`, a .tar(.gz) or a folder
    of the CIFAR-10 ImageFolder; None: the default npz, else the default tar; SMOKE: digits."""
    if SMOKE:
        return _digits(), "digits (SMOKE)"
    if path is None:
        path = DEFAULT_NPZ if DEFAULT_NPZ.is_file() else DEFAULT_TAR
    if not path.exists():
        raise SystemExit(f"error: {path}: no CIFAR-10 data (pass --data: the .tar.gz, its unpacked folder or an npz)")
    start = time.time()
    if path.suffix == ".npz":
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    elif path.is_dir():
        arrays = _from_folder(path)
    else:
        arrays = _from_tar(path)
    log(f"data: {path}: {len(arrays['y_train'])} train, {len(arrays['y_val'])} val images "
        f"({time.time() - start:.1f} s)")
    return arrays, f"CIFAR-10 ({path.name})"


def cmd_prepare(args: argparse.Namespace) -> None:
    arrays, _ = load_arrays(args.data)
    out = args.npz
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(out)
    log(f"wrote {out} ({out.stat().st_size / 2**20:.0f} MiB)")


# ---------------------------------------------------------------------------------------------
# one run


def build_model(st: Setting, arm: str) -> nn.Module:
    """The arm's model from the registry: plain MAE for lambda 0 (as `registry.build_pretrain_model`),
    U-MAE with its pool otherwise."""
    lambda_unif, pool = ARMS[arm]
    kwargs = dict(img_size=st.img_size, patch_size=st.patch_size, embed_dim=st.embed_dim, depth=st.depth,
                  num_heads=st.num_heads, decoder_embed_dim=st.decoder_embed_dim, decoder_depth=st.decoder_depth,
                  decoder_num_heads=st.decoder_num_heads, norm_pix_loss=True)
    if lambda_unif > 0:
        return create_model("umae_vit_tiny_patch16", lambda_unif=lambda_unif, unif_pool=pool, **kwargs)
    return create_model("mae_vit_tiny_patch16", **kwargs)


def epoch_generator(device: torch.device, seed: int, epoch: int) -> torch.Generator:
    """The data order and augmentation stream of (seed, epoch): the same in every arm, and a resumed
    or re-run epoch sees the same draws."""
    return torch.Generator(device=device).manual_seed(1_000_003 * seed + epoch)


@torch.no_grad()
def pooled_features(model: nn.Module, images: torch.Tensor, batch: int, autocast) -> dict[str, torch.Tensor]:
    """Unmasked features of uint8 [N, 3, H, W] images for both pools: {pool: float32 [N, D]}."""
    model.eval()
    out: dict[str, list[torch.Tensor]] = {p: [] for p in POOLS}
    for chunk in images.split(batch):
        with autocast():
            latent = model.forward_latent(normalize(chunk))
        for p in POOLS:
            out[p].append(pool_latent(latent, p).float())
    return {p: torch.cat(v) for p, v in out.items()}


def evaluate(model: nn.Module, probes: nn.ModuleDict, val_batches: list, erank_images: torch.Tensor,
             st: Setting, device: torch.device, autocast) -> dict[str, float]:
    """Collapse measures of the fixed val images and both online probes on masked / unmasked val views
    (accuracies in percent)."""
    stats = measure_collapse(model, erank_images, batch_size=st.eval_batch, autocast=autocast)
    for p in POOLS:
        acc = evaluate_probe(model, probes[p], val_batches, device, autocast, mask_ratio=st.mask_ratio, pool=p)
        for view in ("masked", "unmasked"):
            stats[f"online_probe_{view}_acc1_{p}"] = 100.0 * acc[f"online_probe_{view}_acc1"]
    return stats


def train_run(arm: str, seed: int, st: Setting, arrays: dict[str, np.ndarray], device: torch.device,
              compile_model: bool = False) -> dict:
    """Pre-train one arm with one seed, measuring on the way; then the probes. Returns the result.
    `compile_model`: every encoder and decoder block `torch.compile`d in place (regional compilation:
    whole-model `torch.compile` with the `LatentTap` hooks fails in torch 2.14 with "incorrect out shape
    after application of ViewMeta sequence"; the hooks on the final norm stay eager this way)."""
    cuda = device.type == "cuda"
    autocast = partial(torch.autocast, device_type="cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext

    def to_images(x: np.ndarray) -> torch.Tensor:  # uint8 [N, 32, 32, 3] -> uint8 [N, 3, 32, 32] on the device
        return torch.from_numpy(x).to(device).permute(0, 3, 1, 2).contiguous()

    train_x, val_x = to_images(arrays["x_train"]), to_images(arrays["x_val"])
    train_y = torch.from_numpy(arrays["y_train"]).to(device)
    val_y = torch.from_numpy(arrays["y_val"]).to(device)
    num_classes = len(arrays["classes"])
    n_train, batch = len(train_y), st.batch_size
    steps = n_train // batch
    if steps < 1:
        raise SystemExit(f"error: batch {batch} is larger than the {n_train} training images")

    torch.manual_seed(seed)  # initialisation and masks: the same in every arm
    model = build_model(st, arm).to(device)
    probes = nn.ModuleDict({p: OnlineProbe(model.embed_dim, num_classes) for p in POOLS}).to(device)
    taps = {p: LatentTap(model, p) for p in POOLS}  # before any compile: hooks on the final norm
    fused = dict(fused=True) if cuda else {}
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, st.weight_decay), lr=st.lr, betas=(0.9, 0.95),
                                  **fused)
    probe_optimizer = torch.optim.AdamW(probes.parameters(), lr=1e-3, weight_decay=0.0, **fused)
    if compile_model:
        for block in (*model.blocks, *model.decoder_blocks):
            block.compile()
    schedule = dict(lr=st.lr, min_lr=st.min_lr, warmup_epochs=st.warmup_epochs, epochs=st.epochs)

    val_float = normalize(val_x)  # [10000, 3, 32, 32] float32: 123 MB
    val_batches = list(zip(val_float.split(st.eval_batch), val_y.split(st.eval_batch)))
    erank_images = fixed_images(torch.utils.data.TensorDataset(val_float), st.erank_samples)

    tag = f"[{arm} seed {seed}]"
    history = [dict(epoch=0, **evaluate(model, probes, val_batches, erank_images, st, device, autocast))]
    epoch_log = []
    train_s = 0.0
    for epoch in range(st.epochs):
        model.train()
        probes.train()
        start = time.perf_counter()
        gen = epoch_generator(device, seed, epoch)
        order = torch.randperm(n_train, generator=gen, device=device)
        sums = torch.zeros(5, device=device)  # loss, loss_mae, loss_unif, probe loss mean, probe loss cls
        bad = torch.zeros((), dtype=torch.bool, device=device)
        zero = torch.zeros((), device=device)
        if cuda and epoch == 0:  # any hidden host-device sync in the step is reported (once per place)
            torch.cuda.set_sync_debug_mode("warn")
        for step in range(steps):
            adjust_learning_rate(optimizer, epoch + step / steps, **schedule)
            idx = order[step * batch:(step + 1) * batch]
            imgs = gpu_augment(train_x[idx], gen, st.img_size, st.crop_scale)
            loss, _, _, terms = accumulation_step(
                model, optimizer, partial(model, imgs, st.mask_ratio, return_terms=True),
                step=step, accum_iter=1, autocast=autocast, bad=bad)
            targets = train_y[idx]
            probe_losses = [F.cross_entropy(probes[p](taps[p].features().float()), targets) for p in POOLS]
            probe_optimizer.zero_grad(set_to_none=True)
            sum(probe_losses).backward()
            probe_optimizer.step()
            sums += torch.stack([loss.detach().float(), terms["loss_mae"].detach().float(),
                                 terms.get("loss_unif", zero).detach().float(), *(pl.detach() for pl in probe_losses)])
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
        check_finite(bad, f"{tag} in epoch {epoch}")
        means = (sums / steps).tolist()  # the epoch's host sync (with check_finite's)
        seconds = time.perf_counter() - start
        train_s += seconds
        line = dict(epoch=epoch + 1, train_loss=means[0], train_loss_mae=means[1], train_loss_unif=means[2],
                    train_probe_loss_mean=means[3], train_probe_loss_cls=means[4], lr=optimizer.param_groups[0]["lr"],
                    seconds=seconds, img_per_s=steps * batch / seconds)
        epoch_log.append(line)
        last = epoch + 1 == st.epochs
        if (epoch + 1) % st.eval_every == 0 or last:
            history.append(dict(epoch=epoch + 1, train_loss_mae=means[1], train_loss_unif=means[2],
                                **evaluate(model, probes, val_batches, erank_images, st, device, autocast)))
            h = history[-1]
            if (epoch + 1) % (5 * st.eval_every) == 0 or last:  # stdout: every 25th epoch; all in result.json
                log(f"{tag} epoch {epoch + 1}/{st.epochs}: loss_mae {means[1]:.4f} loss_unif {means[2]:.4f} "
                    f"erank mean/cls {h['effective_rank_mean']:.1f}/{h['effective_rank_cls']:.1f} online probe "
                    f"masked mean/cls {h['online_probe_masked_acc1_mean']:.1f}/{h['online_probe_masked_acc1_cls']:.1f}% "
                    f"{seconds:.2f} s/epoch {line['img_per_s']:.0f} img/s")
        if epoch == 1:  # the first epoch pays for warm-up (and compilation): project from the second
            log(f"{tag} epoch 2: {seconds:.2f} s, {line['img_per_s']:.0f} img/s (device shared by every worker) "
                f"-> this run's pre-training ~{seconds * st.epochs:.0f} s")
    for tap in taps.values():
        tap.remove()

    probe_start = time.perf_counter()
    train_feats = pooled_features(model, train_x, st.eval_batch, autocast)
    val_feats = pooled_features(model, val_x, st.eval_batch, autocast)
    probe = {}
    for p in POOLS:
        res = probe_features(train_feats[p], train_y, val_feats[p], val_y, num_classes=num_classes,
                             epochs=st.probe_epochs, batch_size=min(st.probe_batch, n_train), lr=st.probe_lr,
                             warmup_epochs=st.probe_warmup, seed=seed, lr_search=True, k=st.knn_k)
        probe.update({f"test_acc1_{p}": 100.0 * res["acc1"], f"knn_acc1_{p}": 100.0 * res["knn_acc1"],
                      f"probe_lr_{p}": res["probe_lr"]})
    probe_s = time.perf_counter() - probe_start
    if arm == "mae":  # the baselines of this seed, once (every arm starts from the same weights)
        probe.update(baseline_probes(st, seed, (train_x, train_y), (val_x, val_y), num_classes, autocast))
        log(f"{tag} baselines: linear probe at initialisation mean/cls {probe['init_test_acc1_mean']:.2f}/"
            f"{probe['init_test_acc1_cls']:.2f}%, raw pixels {probe['pixels_test_acc1']:.2f}%")

    final, init = history[-1], history[0]
    row = {k: final[k] for k in PRETRAIN_KEYS}
    row.update({k: init[k.replace("_init", "")] for k in INIT_KEYS})
    row.update(probe)
    row.update(arm=arm, seed=seed, epochs=st.epochs, batch_size=st.batch_size, blr=st.blr, lr=st.lr,
               pretrain_s=round(train_s, 1), probe_s=round(probe_s, 1),
               img_per_s=round(statistics.median(e["img_per_s"] for e in (epoch_log[1:] or epoch_log))))
    log(f"{tag} done: linear probe mean/cls {probe['test_acc1_mean']:.2f}/{probe['test_acc1_cls']:.2f}%, "
        f"20-NN mean/cls {probe['knn_acc1_mean']:.2f}/{probe['knn_acc1_cls']:.2f}%, "
        f"pre-training {train_s:.0f} s, probes {probe_s:.0f} s")
    return dict(row=row, history=history, epoch_log=epoch_log, erank_images=len(erank_images))


def baseline_probes(st: Setting, seed: int, train: tuple[torch.Tensor, torch.Tensor],
                    val: tuple[torch.Tensor, torch.Tensor], num_classes: int, autocast) -> dict[str, float]:
    """What the same probes reach without pre-training (accuracies in percent): the exact initial
    weights of this seed's runs (rebuilt after `torch.manual_seed(seed)`, as `train_run` builds them),
    both pools (`init_*`), and the normalised raw pixels, 3 x 32 x 32 values per image (`pixels_*`).
    The global random state is left as it was."""
    (train_x, train_y), (val_x, val_y) = train, val
    device = train_x.device
    sets = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = build_model(st, "mae").to(device)
        feats = [pooled_features(model, x, st.eval_batch, autocast) for x in (train_x, val_x)]
        sets.update({f"init_{p}": (feats[0][p], feats[1][p]) for p in POOLS})
        sets["pixels"] = tuple(torch.cat([normalize(chunk).flatten(1) for chunk in x.split(st.eval_batch)])
                               for x in (train_x, val_x))
        del model, feats
        out = {}
        for name, (tr, va) in sets.items():
            res = probe_features(tr, train_y, va, val_y, num_classes=num_classes, epochs=st.probe_epochs,
                                 batch_size=min(st.probe_batch, len(train_y)), lr=st.probe_lr,
                                 warmup_epochs=st.probe_warmup, seed=seed, lr_search=True, k=st.knn_k)
            what, pool = name.split("_") if name != "pixels" else ("pixels", "")
            suffix = f"_{pool}" if pool else ""
            out.update({f"{what}_test_acc1{suffix}": 100.0 * res["acc1"],
                        f"{what}_knn_acc1{suffix}": 100.0 * res["knn_acc1"]})
    return out


# ---------------------------------------------------------------------------------------------
# run: skip finished runs, spread the rest over processes sharing the device


PRETRAIN_KEYS = [
    *(f"online_probe_{v}_acc1_{p}" for v in ("masked", "unmasked") for p in POOLS),
    "effective_rank_mean", "effective_rank_cls", "effective_rank_centered_mean", "effective_rank_centered_cls",
    "unif_mean", "unif_cls", "train_loss_mae", "train_loss_unif",
]
INIT_KEYS = ["effective_rank_init_mean", "effective_rank_init_cls", "effective_rank_centered_init_mean",
             "effective_rank_centered_init_cls", "unif_init_mean", "unif_init_cls"]
PROBE_KEYS = ["test_acc1_mean", "test_acc1_cls", "knn_acc1_mean", "knn_acc1_cls", "probe_lr_mean", "probe_lr_cls"]
BASELINE_KEYS = ["init_test_acc1_mean", "init_test_acc1_cls", "init_knn_acc1_mean", "init_knn_acc1_cls",
                 "pixels_test_acc1", "pixels_knn_acc1"]  # the MAE rows only (`baseline_probes`)
COLUMNS = ["arm", "seed", "epochs", "batch_size", "blr", "lr", *PRETRAIN_KEYS, *INIT_KEYS, *PROBE_KEYS,
           "pretrain_s", "probe_s", "img_per_s", "device", *BASELINE_KEYS]


def run_folder(out: Path, arm: str, seed: int) -> Path:
    return out / f"{arm}_seed{seed}"


def finished(out: Path, arm: str, seed: int, st: Setting) -> bool:
    """Whether the run's result exists; one made with another setting stops the recipe."""
    path = run_folder(out, arm, seed) / "result.json"
    if not path.is_file():
        return False
    saved = json.loads(path.read_text())["setting"]
    if saved != json.loads(json.dumps(dataclasses.asdict(st))):
        raise SystemExit(f"error: {path} was made with another setting ({saved}); use another --out")
    return True


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and not SMOKE else "cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def cmd_worker(args: argparse.Namespace) -> None:
    """Run the given `arm:seed` jobs one after another in this process."""
    st = setting_from(args)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.threads:
        torch.set_num_threads(args.threads)
    arrays, source = load_arrays(args.data)
    for job in args.jobs.split(","):
        arm, seed = job.split(":")
        seed = int(seed)
        if finished(args.out, arm, seed, st):
            log(f"skip {arm} seed {seed}: done")
            continue
        result = train_run(arm, seed, st, arrays, device, args.compile)
        result.update(arm=arm, seed=seed, setting=dataclasses.asdict(st), device=device_name(device), data=source,
                      torch=torch.__version__, compile=args.compile)
        result["row"]["device"] = result["device"]
        folder = run_folder(args.out, arm, seed)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "result.json.tmp"
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(folder / "result.json")  # atomic: a killed run leaves no half result


def cmd_run(args: argparse.Namespace) -> None:
    st = setting_from(args)
    log(f"setting: {st}; lr = blr * batch / 256 = {st.blr:g} * {st.batch_size} / 256 = {st.lr:.3g}")
    todo = [(arm, seed) for seed in SEEDS for arm in ARMS if not finished(args.out, arm, seed, st)]
    for arm, seed in ((a, s) for s in SEEDS for a in ARMS if (a, s) not in todo):
        log(f"skip {arm} seed {seed}: {run_folder(args.out, arm, seed) / 'result.json'} exists")
    args.out.mkdir(parents=True, exist_ok=True)
    if todo:
        data = args.data
        if not SMOKE:  # decode once, hand the workers one npz
            if data is None and DEFAULT_NPZ.is_file():
                data = DEFAULT_NPZ
            if data is None or data.suffix != ".npz":
                if args.cache.is_file():
                    log(f"data: the cached {args.cache} (delete it to decode --data again)")
                else:
                    cmd_prepare(argparse.Namespace(data=data, npz=args.cache))
                data = args.cache
            if resolve_device(args.device).type != "cuda":
                log("warning: no GPU: the full setting on a CPU takes many hours (SMOKE=1 is the CPU check)")
        procs = max(1, min(args.procs, len(todo)))  # seed-major jobs: with 3, one arm per process
        jobs = [",".join(f"{a}:{s}" for a, s in todo[k::procs]) for k in range(procs)]
        base = [sys.executable, str(Path(__file__).resolve()), "worker", "--out", str(args.out), "--device",
                args.device, *(["--data", str(data)] if data is not None else [])]
        for flag in ("epochs", "batch_size", "blr"):
            if getattr(args, flag) is not None:
                base += [f"--{flag}", str(getattr(args, flag))]
        if args.compile:
            base.append("--compile")
        threads = 1 if SMOKE else max(1, (os.cpu_count() or 1) // procs)  # a tiny model gains nothing from more
        start = time.time()
        workers = [subprocess.Popen([*base, "--jobs", j, "--threads", str(threads)], cwd=ROOT) for j in jobs]
        codes = [w.wait() for w in workers]
        log(f"{len(todo)} run(s) in {procs} process(es): {time.time() - start:.0f} s wall")
        if any(codes):
            raise SystemExit(f"error: worker exit codes {codes}; finished runs are kept, start again to resume")
    cmd_report(args)


# ---------------------------------------------------------------------------------------------
# report: csv, paired tables, curves


REPORTED = [("test_acc1_mean", "linear probe, mean pool (%)"), ("test_acc1_cls", "linear probe, class token (%)"),
            ("knn_acc1_mean", "20-NN, mean pool (%)"), ("knn_acc1_cls", "20-NN, class token (%)"),
            ("online_probe_masked_acc1_mean", "online probe, masked views, mean pool (%)"),
            ("online_probe_masked_acc1_cls", "online probe, masked views, class token (%)"),
            ("online_probe_unmasked_acc1_mean", "online probe, unmasked views, mean pool (%)"),
            ("online_probe_unmasked_acc1_cls", "online probe, unmasked views, class token (%)"),
            ("effective_rank_mean", "effective rank, mean pool"), ("effective_rank_cls", "effective rank, class token"),
            ("effective_rank_centered_mean", "centred effective rank, mean pool"),
            ("effective_rank_centered_cls", "centred effective rank, class token"),
            ("unif_mean", "uniformity loss, mean pool"), ("unif_cls", "uniformity loss, class token"),
            ("train_loss_mae", "reconstruction loss (last epoch, train)")]
PER_SEED = ["test_acc1_mean", "test_acc1_cls", "knn_acc1_mean", "knn_acc1_cls", "online_probe_masked_acc1_mean",
            "online_probe_masked_acc1_cls", "effective_rank_mean", "effective_rank_cls", "train_loss_mae", "pretrain_s"]


def read_results(out: Path) -> list[dict]:
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*_seed*/result.json"))]
    order = {a: i for i, a in enumerate(ARMS)}
    return sorted(results, key=lambda r: (r["seed"], order.get(r["arm"], 99)))


def markdown(results: list[dict], csv_name: str, png_name: str | None) -> str:
    rows = [r["row"] for r in results]
    first = results[0]
    st, device, data = first["setting"], first["device"], first["data"]
    seeds = sorted({int(r["seed"]) for r in rows})
    total = sum(float(r["pretrain_s"]) for r in rows)
    lines = [f"# {data}: MAE vs U-MAE, paired seeds, on {device}", "",
             f"ViT-Tiny-like encoder (embed {st['embed_dim']}, depth {st['depth']}, {st['num_heads']} heads), "
             f"{st['img_size']} px, patch {st['patch_size']}, {st['decoder_embed_dim']}-d {st['decoder_depth']}-block "
             f"decoder, norm-pix, mask {st['mask_ratio']}; {st['epochs']} epochs, batch {st['batch_size']}, "
             f"lr = blr * batch / 256 = {st['blr']:g} * {st['batch_size']} / 256 = "
             f"{st['blr'] * st['batch_size'] / 256:.3g}, {st['warmup_epochs']} warm-up epochs, weight decay "
             f"{st['weight_decay']}, bf16 autocast on GPU. Seeds {seeds}; {len(rows)} of {len(ARMS) * len(SEEDS)} runs "
             f"in `{csv_name}`; GPU: {device}; pre-training time {total:.0f} s summed over runs "
             f"(runs shared the device, so wall time is less), median {statistics.median(float(r['img_per_s']) for r in rows):.0f} "
             "training images/s per run.", "",
             "Per seed:", "", "| arm | seed | " + " | ".join(PER_SEED) + " |", "|---|---|" + "---|" * len(PER_SEED)]
    for r in rows:
        lines.append(f"| {ARM_LABELS.get(r['arm'], r['arm'])} | {r['seed']} | "
                     + " | ".join(f"{float(r[k]):.2f}" for k in PER_SEED) + " |")
    lines += ["", "Per arm: mean over seeds. Paired difference: arm minus MAE on the same seed, mean and 95% t "
              "interval over the pairs.", "",
              "| measure | MAE | U-MAE cls | U-MAE mean | cls - MAE | mean - MAE |", "|---|---|---|---|---|---|"]
    for key, label in REPORTED:
        means = []
        for arm in ARMS:
            vals = [float(r[key]) for r in rows if r["arm"] == arm]
            means.append(f"{statistics.fmean(vals):.2f}" if vals else "-")
        diffs = [paired.format_interval(paired.paired_differences(rows, arm, key))
                 for arm in ("umae_cls", "umae_mean")]
        lines.append(f"| {label} | {' | '.join(means)} | {' | '.join(diffs)} |")
    lines += baseline_lines(rows)
    if png_name:
        lines += ["", f"![effective rank and masked online-probe accuracy over epochs]({png_name})"]
    return "\n".join(lines) + "\n"


def baseline_lines(rows: list[dict]) -> list[str]:
    """The baselines table: the same probes without pre-training (measured in the MAE runs)."""
    base = [r for r in rows if r.get("init_test_acc1_mean") not in ("", None)]
    if not base:
        return ["", "Baselines without pre-training: none in these runs (made before the recipe measured them)."]
    lines = ["", "Baselines without pre-training, the same probes (lr search, LARS, 20-NN) on the same images, "
             f"measured in the MAE runs (seeds {', '.join(str(r['seed']) for r in base)}): the exact initial "
             "weights every arm of a seed starts from, and the normalised raw pixels (3 x 32 x 32 values). "
             "Mean over seeds (per seed).", "", "| baseline | linear probe (%) | 20-NN (%) |", "|---|---|---|"]
    for label, suffix in (("random initialisation, class token", "_cls"), ("random initialisation, mean pool", "_mean"),
                          ("raw pixels", "")):
        prefix = "pixels" if not suffix else "init"
        cells = []
        for key in (f"{prefix}_test_acc1{suffix}", f"{prefix}_knn_acc1{suffix}"):
            vals = [float(r[key]) for r in base]
            each = f" ({', '.join(f'{v:.2f}' for v in vals)})" if len(vals) > 1 else ""
            cells.append(f"{statistics.fmean(vals):.2f}{each}")
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return lines


CURVES = [("effective_rank_mean", "effective rank, mean pool"), ("effective_rank_cls", "effective rank, class token"),
          ("online_probe_masked_acc1_mean", "online probe top-1 (%), masked val, mean pool"),
          ("online_probe_masked_acc1_cls", "online probe top-1 (%), masked val, class token")]


def plot_curves(results: list[dict], path: Path) -> bool:
    """Effective rank and masked online-probe accuracy over epochs, one line per arm (mean over
    seeds) with the min-max band over seeds. False when matplotlib is missing."""
    try:
        from matplotlib.ticker import MaxNLocator

        from umae_plugin.analysis import report
    except ImportError as err:
        log(f"warning: no figure ({err}); run `report` where matplotlib is installed")
        return False
    first = results[0]
    st = first["setting"]
    fig = report.new_figure(1100, 820)
    axes = fig.subplots(2, 2)
    colours = {"mae": "tab:blue", "umae_cls": "tab:orange", "umae_mean": "tab:green"}
    for ax, (key, label) in zip(axes.flat, CURVES):
        for arm in ARMS:
            runs = [r["history"] for r in results if r["arm"] == arm]
            if not runs:
                continue
            epochs = [h["epoch"] for h in runs[0]]
            values = np.array([[h[key] for h in hist] for hist in runs if len(hist) == len(epochs)])
            ax.plot(epochs, values.mean(0), color=colours[arm], label=f"{ARM_LABELS[arm]} (n={len(values)})")
            if len(values) > 1:
                ax.fill_between(epochs, values.min(0), values.max(0), color=colours[arm], alpha=0.2, linewidth=0)
        ax.set_xlabel("pre-training epoch")
        ax.set_ylabel(label if "rank" not in key else f"{label} (of {st['embed_dim']} dims)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    seeds = sorted({r["seed"] for r in results})
    fig.suptitle(f"{first['data']}, ViT (embed {st['embed_dim']}, depth {st['depth']}, patch {st['patch_size']}) "
                 f"MAE vs U-MAE, {st['epochs']} epochs, batch {st['batch_size']}, seeds {seeds}, {first['device']}\n"
                 f"line: mean over seeds; band: min-max over seeds; effective rank of "
                 f"{first.get('erank_images', st['erank_samples'])} fixed val images",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    report.save_figure(fig, path)
    return True


def cmd_report(args: argparse.Namespace) -> None:
    results = read_results(args.out)
    if not results:
        raise SystemExit(f"error: {args.out}: no finished runs")
    res = args.results
    res.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = res / "cifar10_gpu.csv", res / "cifar10_gpu.md", res / "cifar10_gpu_curves.png"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in results:
            writer.writerow({k: r["row"].get(k, "") for k in COLUMNS})
    have_png = plot_curves(results, png_path)
    text = markdown(results, csv_path.name, png_path.name if have_png else None)
    md_path.write_text(text)
    log(text)
    log(f"wrote {csv_path}, {md_path}" + (f", {png_path}" if have_png else ""))


# ---------------------------------------------------------------------------------------------
# plan: FLOPs per image -> epochs that fit


class _OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched (each one a kernel launch or a view on the GPU, in eager mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


FUSED_OPTIMIZER_OPS = 8  # two fused AdamW steps + zeroing grads on CUDA: a few launches (the CPU's loop has ~2,000)


def measure_step(st: Setting, arm: str, batch: int = 16) -> dict[str, float]:
    """On the CPU: FLOPs per image of a training step (forward + backward of the masked model and of
    both online probes; `FlopCounterMode` counts matmuls and attention), of an unmasked and of a
    masked encoder forward, and the ATen ops one step dispatches (augmentation, model and probes
    forward and backward, plus `FUSED_OPTIMIZER_OPS` for the fused optimisers of the GPU run)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = build_model(st, arm)
    probes = nn.ModuleDict({p: OnlineProbe(st.embed_dim, 10) for p in POOLS})
    taps = {p: LatentTap(model, p) for p in POOLS}
    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (batch, 3, st.img_size, st.img_size), dtype=torch.uint8)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:  # what the training loop does between optimiser steps
        imgs = gpu_augment(raw, gen, st.img_size, st.crop_scale)
        loss, _, _, _ = model(imgs, st.mask_ratio, return_terms=True)
        loss.backward()
        sum(F.cross_entropy(probes[p](taps[p].features()), y) for p in POOLS).backward()

    flops, counter = FlopCounterMode(display=False), _OpCounter()
    with flops:
        step()
    with counter:
        step()
    with torch.no_grad():
        fwd, masked = FlopCounterMode(display=False), FlopCounterMode(display=False)
        with fwd:
            model.forward_latent(normalize(raw))
        with masked:
            model.forward_encoder(normalize(raw), st.mask_ratio)
    for tap in taps.values():
        tap.remove()
    return dict(train=flops.get_total_flops() / batch, unmasked=fwd.get_total_flops() / batch,
                masked=masked.get_total_flops() / batch, ops=counter.count + FUSED_OPTIMIZER_OPS)


def cmd_plan(args: argparse.Namespace) -> None:
    st = setting_from(args)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    m = measure_step(st, "umae_mean")
    n_train, n_val = (1437, 360) if SMOKE else (50000, 10000)
    steps = n_train // st.batch_size
    imgs_epoch = steps * st.batch_size
    rate = args.mfu * H100_BF16_DENSE
    n_runs = len(ARMS) * len(SEEDS)
    train_epoch = m["train"] * imgs_epoch
    evals = st.epochs // st.eval_every + 1
    eval_flops = evals * (st.erank_samples * m["unmasked"] + len(POOLS) * n_val * (m["unmasked"] + m["masked"]))
    final_flops = (n_train + n_val) * m["unmasked"]
    t_epoch = train_epoch / rate
    t_train = n_runs * st.epochs * t_epoch
    t_extra = n_runs * (eval_flops + final_flops) / rate
    fit = math.floor(GPU_BUDGET_S / (n_runs * t_epoch))
    host_step = m["ops"] * args.us_per_op * 1e-6
    t_host = n_runs * st.epochs * steps * host_step
    procs = args.procs
    lines = [
        f"model: embed {st.embed_dim}, depth {st.depth}, {st.img_size} px, patch {st.patch_size}, mask {st.mask_ratio}, "
        f"decoder {st.decoder_embed_dim}-d x {st.decoder_depth}",
        f"training FLOPs per image (fwd + bwd, masked model + both online probes, FlopCounterMode): "
        f"{m['train'] / 1e9:.3f} GFLOP",
        f"encoder forward per image: unmasked {m['unmasked'] / 1e9:.3f} GFLOP, masked {m['masked'] / 1e9:.3f} GFLOP",
        f"batch {st.batch_size} (lr = {st.blr:g} * {st.batch_size} / 256 = {st.lr:.3g}): {steps} steps = {imgs_epoch} "
        f"images per epoch -> {train_epoch / 1e12:.1f} TFLOP per epoch",
        f"assumed achieved rate: {args.mfu:.0%} of {H100_BF16_DENSE / 1e12:.0f} dense bf16 TFLOPS = {rate / 1e12:.0f} "
        f"TFLOPS (an assumption until the run measures it)",
        f"-> {t_epoch:.3f} s per epoch; {n_runs} runs x {st.epochs} epochs = {t_train:.0f} s = {t_train / 60:.1f} min of "
        f"compute; evaluations + final features {t_extra:.1f} s",
        f"-> epochs that fit {n_runs} runs in {GPU_BUDGET_S / 60:.0f} min at that rate: {fit}",
        f"host side (eager): {m['ops']} dispatched ops per step x {args.us_per_op:g} us (assumed) = "
        f"{host_step * 1e3:.1f} ms per step vs {t_epoch / steps * 1e3:.1f} ms of compute; one process: "
        f"{max(t_host, t_train) / 60:.1f} min for the {n_runs} runs",
        f"with {procs} processes sharing the GPU (host work overlapped): ~{max(t_train, t_host / procs) / 60:.1f} min "
        f"for the {n_runs} runs ({st.epochs} epochs each) + probes and start-up",
    ]
    log("\n".join(lines))


# ---------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--epochs", type=int, default=None, help="pre-training epochs (default 100; SMOKE 2)")
    common.add_argument("--batch_size", type=int, default=None, help="default 1024 (SMOKE 128)")
    common.add_argument("--blr", type=float, default=None, help="base lr; lr = blr * batch / 256 (default 3e-4)")
    common.add_argument("--compile", action="store_true", help="torch.compile each transformer block (regional)")
    out_default = Path(os.environ.get("UMAE_RUNS", "/tmp/umae-runs/cifar10_gpu"))
    runs = argparse.ArgumentParser(add_help=False)
    runs.add_argument("--out", type=Path, default=out_default, help="run folders (one result.json per arm and seed)")
    runs.add_argument("--results", type=Path, default=None,
                      help="where csv / md / png go (default docs/results; SMOKE: --out)")
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--data", type=Path, default=None, help="cifar10.tar.gz, its unpacked folder, or an npz "
                      "from `prepare` (default data/cifar10_uint8.npz, else data/cifar10.tar.gz)")
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", default="auto", help="auto: cuda if available (cpu with SMOKE=1)")

    r = sub.add_parser("run", parents=[common, runs, data, device], help="all runs not done yet, then the report")
    r.add_argument("--procs", type=int, default=1 if SMOKE else 3,
                   help="worker processes sharing the device (default 3, one per arm; SMOKE: 1)")
    r.add_argument("--cache", type=Path, default=DEFAULT_NPZ,
                   help="where a tar / folder given as --data is converted to, once (default data/cifar10_uint8.npz)")
    w = sub.add_parser("worker", parents=[common, runs, data, device], help=argparse.SUPPRESS)
    w.add_argument("--jobs", required=True, help="arm:seed,arm:seed,...")
    w.add_argument("--threads", type=int, default=0)
    sub.add_parser("report", parents=[runs], help="csv / md / png from the finished runs in --out")
    pp = sub.add_parser("prepare", parents=[data], help="ImageFolder / tar -> one uint8 npz")
    pp.add_argument("--npz", type=Path, default=DEFAULT_NPZ)
    pl = sub.add_parser("plan", parents=[common], help="FLOPs per image -> epochs that fit (CPU)")
    pl.add_argument("--mfu", type=float, default=0.25, help="assumed fraction of 989 TFLOPS achieved (default 0.25)")
    pl.add_argument("--us_per_op", type=float, default=5.0, help="assumed host time per dispatched op, eager (us)")
    pl.add_argument("--procs", type=int, default=3)
    args = p.parse_args()
    if getattr(args, "results", "unset") is None:
        args.results = args.out if SMOKE else ROOT / "docs" / "results"
    dict(run=cmd_run, worker=cmd_worker, report=cmd_report, prepare=cmd_prepare, plan=cmd_plan)[args.command](args)


if __name__ == "__main__":
    main()
