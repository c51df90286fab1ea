"""What every analysis tool needs: a model rebuilt from any checkpoint, a seeded sample of a
dataset, and the pooled features of its unmasked images.

How the architecture of a checkpoint is found, first match wins:
1. `--model NAME` on the command line (with `--input_size` / `--patch_size`);
2. the `args` stored in this project's (and the upstream scripts') checkpoints: the model is
   rebuilt as `main_pretrain.py` built it (`pretrain.build_pretrain_model` with
   `pretrain.model_overrides(args)`, plus `embed_dim` / `depth` / `num_heads` / `mlp_ratio` where
   `args` has them, which custom micro models use);
3. the state dict itself: width, depth, patch size, channels, patch grid, MLP ratio and decoder
   width / depth are read off the tensor shapes. The number of attention heads changes no shape,
   so it is taken from the standard ViT of that width (else width / 64; decoder: width / 32) and
   a warning says so. A state dict with a classification head and no decoder becomes a
   `VisionTransformerClassifier` (`global_pool` when it has `fc_norm`), anything else a
   `MaskedAutoencoderViT`.
If rebuilding from `args` fails (an unregistered name, a shape mismatch), step 3 is tried.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from .. import checkpoint as ckpt
from .. import data
from ..logger import progress
from ..models_mae import ARCHS, MaskedAutoencoderViT
from ..models_vit import VisionTransformerClassifier
from ..pretrain import build_pretrain_model, model_overrides
from ..registry import create_model, parse_model_name
from ..runtime import resolve_device

log = logging.getLogger("umae")

# Shape-defining keys that custom configurations may store in `args` beside the standard ones.
ARCH_KEYS = ("embed_dim", "depth", "num_heads", "mlp_ratio")
_HEADS_BY_WIDTH = {cfg["embed_dim"]: cfg["num_heads"] for cfg in ARCHS.values()}


@dataclass
class LoadedModel:
    """A model in eval mode on its device, and how it was built."""

    model: nn.Module
    source: str  # "command line", "checkpoint args" or "state dict"
    name: str
    input_size: int
    norm_pix_loss: bool
    report: ckpt.LoadReport
    args: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def has_decoder(self) -> bool:
        return isinstance(self.model, MaskedAutoencoderViT) and not any(
            k.startswith("decoder") for k in self.report.fresh)


# ---------------------------------------------------------------------------------------------
# command-line pieces shared by the tools


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model (only for checkpoints without stored args)")
    g.add_argument("--model", default=None, help="model name (e.g. mae_vit_base_patch16); "
                   "default: the checkpoint's args, else inferred from the state dict")
    g.add_argument("--input_size", default=None, type=int, help="image size with --model (default: the model's)")
    g.add_argument("--patch_size", default=None, type=int, help="patch size with --model (default: the model's)")
    g.add_argument("--pool", default=None, choices=["mean", "cls"],
                   help="feature pooling of a pre-training model (default: the model's own)")


def add_data_args(parser: argparse.ArgumentParser, default_split: str = "val") -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="imagefolder", choices=data.DATASETS)
    g.add_argument("--data_path", default=None, help="<data_path>/<split>/<class>/<image>, or the CIFAR-10 root")
    g.add_argument("--split", default=default_split, choices=data.SPLITS)
    g.add_argument("--seed", default=0, type=int, help="seed of the image sample (and of masks, t-SNE)")


def add_runtime_args(parser: argparse.ArgumentParser, output_dir: str) -> None:
    g = parser.add_argument_group("run")
    g.add_argument("--output_dir", default=output_dir)
    g.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    g.add_argument("--batch_size", default=64, type=int)
    g.add_argument("--num_workers", default=0, type=int)


def device_from(requested: str | None) -> torch.device:
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return resolve_device(requested)


# ---------------------------------------------------------------------------------------------
# models


def _stored_args(obj: Any) -> dict[str, Any] | None:
    args = obj.get("args") if isinstance(obj, Mapping) else None
    if isinstance(args, argparse.Namespace):
        return vars(args)
    if isinstance(args, Mapping):
        return dict(args)
    return None


def holds_classifier(sd: Mapping[str, torch.Tensor]) -> bool:
    """A fine-tuned or linear-probe classifier: a head and no pre-training decoder."""
    return any(k.startswith("head.") for k in sd) and not any(k.startswith("decoder_") for k in sd)


def _classifier_name(name: str, sd: Mapping[str, torch.Tensor]) -> str | None:
    """The `vit_*` name to build for `name` when it is a classifier name or the weights are a
    classifier's (`main_linprobe.py --model mae_vit_base_patch16` stores the MAE name)."""
    try:
        parsed = parse_model_name(name)
    except ValueError:
        parsed = None
    if parsed is not None and parsed.family == "vit":
        return name
    if not holds_classifier(sd):
        return None
    if parsed is None:
        raise ValueError(f"the checkpoint holds a classifier, but {name!r} names no vit_* model for it")
    return parsed.arch


def _build_named(name: str, sd: Mapping[str, torch.Tensor], *, img_size: int | None, patch_size: int | None,
                 lambda_unif: float = 0.0, unif_pool: str = "mean",
                 extra: Mapping[str, Any] | None = None) -> nn.Module:
    """Model `name` from the registry: a classifier (built without a head: features only) for
    `vit_*` names and classifier weights, else a pre-training model as `main_pretrain.py` builds it."""
    extra = {k: v for k, v in (extra or {}).items() if v is not None}
    clf_name = _classifier_name(name, sd)
    if clf_name is None:
        return build_pretrain_model(name, lambda_unif=lambda_unif, unif_pool=unif_pool,
                                    img_size=img_size, patch_size=patch_size, **extra)
    kwargs = {k: v for k, v in dict(img_size=img_size, patch_size=patch_size).items() if v is not None}
    kwargs.update({k: v for k, v in extra.items() if k in ARCH_KEYS})
    kwargs.update(num_classes=0, global_pool=bool(extra.get("global_pool", "fc_norm.weight" in sd)))
    return create_model(clf_name, **kwargs)


def _from_args(a: dict[str, Any], sd: Mapping[str, torch.Tensor]) -> nn.Module:
    name = a["model"]
    extra = {k: a[k] for k in ARCH_KEYS if a.get(k) is not None}
    if _classifier_name(name, sd) is not None:
        if "global_pool" in a:
            extra["global_pool"] = a["global_pool"]
        return _build_named(name, sd, img_size=a.get("input_size"), patch_size=a.get("patch_size"), extra=extra)
    defaults = dict(input_size=None, patch_size=None, norm_pix_loss=False, decoder_embed_dim=None,
                    decoder_depth=None, decoder_num_heads=None)
    overrides = model_overrides(argparse.Namespace(**{**defaults, **a}))
    img_size, patch_size = overrides.pop("img_size"), overrides.pop("patch_size")
    return _build_named(name, sd, img_size=img_size, patch_size=patch_size,
                        lambda_unif=float(a.get("lambda_unif") or 0.0), unif_pool=a.get("unif_pool") or "mean",
                        extra={**overrides, **extra})


def infer_architecture(sd: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, Any], list[str]]:
    """("mae" or "classifier", constructor keywords, notes on guessed values) from tensor shapes."""
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
        if key not in sd:
            raise ValueError(f"cannot infer the architecture: the state dict has no {key!r}; pass --model")
    width = sd["cls_token"].shape[-1]
    proj = sd["patch_embed.proj.weight"]  # [D, C, p, p]
    patch, in_chans = proj.shape[-1], proj.shape[1]
    grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    notes = []
    heads = _HEADS_BY_WIDTH.get(width, max(1, width // 64))
    notes.append(f"num_heads={heads} guessed from the width {width} (heads change no weight shape)")
    cfg: dict[str, Any] = dict(img_size=grid * patch, patch_size=patch, in_chans=in_chans, embed_dim=width,
                               depth=depth, num_heads=heads, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / width)
    has_decoder = "decoder_embed.weight" in sd
    if holds_classifier(sd):
        cfg.update(num_classes=0, qkv_bias=True, global_pool="fc_norm.weight" in sd)
        return "classifier", cfg, notes
    if has_decoder:
        dec = sd["decoder_embed.weight"].shape[0]
        dec_depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("decoder_blocks.")), default=0)
        dec_heads = 16 if dec == 512 else max(1, dec // 32)
        cfg.update(decoder_embed_dim=dec, decoder_depth=dec_depth, decoder_num_heads=dec_heads)
        notes.append(f"decoder_num_heads={dec_heads} guessed from the decoder width {dec}")
    cfg["norm_layer"] = partial(nn.LayerNorm, eps=1e-6)
    return "mae", cfg, notes


def load_model(
    path: str | os.PathLike,
    *,
    model: str | None = None,
    input_size: int | None = None,
    patch_size: int | None = None,
    device: torch.device | str = "cpu",
    norm_pix_loss: bool | None = None,
) -> LoadedModel:
    """Rebuild the model of checkpoint `path` (see the module docstring), load its weights with
    `checkpoint.load_pretrained`, and return it in eval mode on `device`."""
    obj = ckpt.torch_load(path)
    sd = ckpt.extract_state_dict(obj)
    stored = _stored_args(obj)
    net: nn.Module | None = None
    notes: list[str] = []
    report = None
    if model is not None:
        source, name = "command line", model
        extra = {} if _classifier_name(model, sd) else {"norm_pix_loss": norm_pix_loss}
        net = _build_named(model, sd, img_size=input_size, patch_size=patch_size, extra=extra)
        report = ckpt.load_pretrained(net, sd)
    elif stored is not None and stored.get("model"):
        source, name = "checkpoint args", stored["model"]
        try:
            net = _from_args(stored, sd)
            report = ckpt.load_pretrained(net, sd)
        except (ValueError, TypeError, KeyError) as err:  # unregistered name, CheckpointMismatchError, ...
            log.warning("%s: rebuilding %r from the stored args failed (%s); inferring the architecture "
                        "from the state dict", path, name, str(err).splitlines()[0])
            net = None
    if net is None:
        kind, cfg, notes = infer_architecture(sd)
        source = "state dict"
        if kind == "classifier":
            net = VisionTransformerClassifier(**cfg)
            name = f"vit (inferred: width {cfg['embed_dim']}, depth {cfg['depth']}, patch {cfg['patch_size']})"
        else:
            if norm_pix_loss is not None:
                cfg["norm_pix_loss"] = norm_pix_loss
            net = MaskedAutoencoderViT(**cfg)
            name = f"mae (inferred: width {cfg['embed_dim']}, depth {cfg['depth']}, patch {cfg['patch_size']})"
        for note in notes:
            log.warning("%s: %s", path, note)
        report = ckpt.load_pretrained(net, sd)
    net.eval().to(device)
    size = int(net.patch_embed.img_size[0])
    pix = bool(getattr(net, "norm_pix_loss", False))
    log.info("%s: %s built from the %s (%d px); %s", path, name, source, size, report)
    return LoadedModel(net, source, name, size, pix, report, stored, notes)


# ---------------------------------------------------------------------------------------------
# data


def data_name(dataset: str, data_path: str | None, split: str) -> str:
    """What a figure title calls the data: an image folder by its folder's name ("cifar10 val"),
    the other datasets by their own name."""
    if dataset == "imagefolder" and data_path:
        return f"{Path(data_path).resolve().name} {split}"
    return f"{dataset} {split}"


def build_eval_dataset(name: str, data_path: str | None, split: str, input_size: int) -> Dataset:
    """The dataset with the unaugmented evaluation transform (ImageNet-normalised tensors)."""
    return data.build_dataset(name, data_path, split, data.eval_transform(input_size))


def targets_of(dataset: Dataset) -> np.ndarray:
    """Integer labels of every item (from `.targets` when the dataset has them)."""
    if isinstance(dataset, Subset):
        return targets_of(dataset.dataset)[np.asarray(dataset.indices)]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [dataset[i][1] for i in range(len(dataset))]
    return np.asarray(targets, dtype=np.int64)


def random_indices(num_items: int, num: int, seed: int) -> np.ndarray:
    """`num` distinct indices out of `num_items` (all when `num` <= 0 or too large), sorted.

    Drawn as `engine_pretrain.fixed_images` draws the images whose effective rank training logs
    (`torch.randperm` with a generator seeded by `seed`), so the same seed picks the same images.
    """
    if num <= 0 or num >= num_items:
        return np.arange(num_items)
    g = torch.Generator().manual_seed(seed)
    return np.sort(torch.randperm(num_items, generator=g)[:num].numpy())


def per_class_indices(targets: Sequence[int], num_classes: int, per_class: int, seed: int) -> np.ndarray:
    """`per_class` random items of each of `num_classes` random classes (all classes when
    `num_classes` <= 0; fewer items where a class has fewer), grouped by class."""
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    classes = np.unique(targets)
    if 0 < num_classes < len(classes):
        classes = np.sort(rng.choice(classes, size=num_classes, replace=False))
    chosen = []
    for c in classes:
        members = np.flatnonzero(targets == c)
        chosen.append(np.sort(rng.choice(members, size=min(per_class, len(members)), replace=False)))
    return np.concatenate(chosen)


def stack_images(dataset: Dataset, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, C, H, W], [n] labels) of the given items, loaded in the current process."""
    items = [dataset[int(i)] for i in indices]
    return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items])


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    indices: Sequence[int] | None = None,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    num_workers: int = 0,
    pool: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of unmasked images, `model.forward_features` (the model's own pooling
    unless `pool` is given): ([n, D] float32 on the CPU, [n] labels), in the order of `indices`."""
    subset = Subset(dataset, [int(i) for i in indices]) if indices is not None else dataset
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    was_training = model.training
    model.eval()
    kwargs = {"pool": pool} if pool is not None and not isinstance(model, VisionTransformerClassifier) else {}
    if pool is not None and not kwargs:
        log.warning("--pool applies to pre-training models only; %s pools its own way", type(model).__name__)
    feats, labels = [], []
    steps = len(loader)
    for _, (imgs, y) in progress(loader, steps, "features", max(1, steps // 10)):
        feats.append(model.forward_features(imgs.to(device), **kwargs).float().cpu())
        labels.append(torch.as_tensor(y))
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def models_with_data(args: argparse.Namespace, labels: Sequence[str], device: torch.device):
    """Yield (label, path, loaded model, eval dataset) for each of `args.checkpoints`; datasets are
    built once per input size, so checkpoints of the same size see the very same images."""
    datasets: dict[int, Any] = {}
    for label, path in zip(labels, args.checkpoints):
        lm = load_model(path, model=args.model, input_size=args.input_size, patch_size=args.patch_size, device=device)
        if lm.input_size not in datasets:
            datasets[lm.input_size] = build_eval_dataset(args.dataset, args.data_path, args.split, lm.input_size)
        yield label, path, lm, datasets[lm.input_size]
