"""What every analysis tool needs: a model rebuilt from any checkpoint, a seeded sample of a
dataset, and the pooled features of its unmasked images.

Models are rebuilt by `checkpoint.load_model`: from the checkpoint's "model_args" record, else from
`checkpoint.infer_model_args` (the weights' shapes, plus the name, heads and loss settings of the
`args` stored beside them), weights loaded strictly. `--model NAME` names the factory for a
checkpoint without a record (e.g. a bare state dict of a custom model whose heads the shapes do not
tell); `--input_size` evaluates at another size, with the position embedding resampled.
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from .. import checkpoint as ckpt
from .. import data
from ..logger import progress
from ..models_vit import VisionTransformerClassifier
from ..runtime import resolve_device

log = logging.getLogger("umae")


@dataclass
class LoadedModel:
    """A model in eval mode on its device, and how it was built."""

    model: nn.Module
    name: str  # the registry factory it was built with
    model_args: dict[str, Any]  # its "model_args" record
    source: str  # "model_args" (stored in the checkpoint), "inferred" (from its weights) or "command line"
    input_size: int
    args: dict[str, Any] | None = None  # the run arguments stored in the checkpoint


# ---------------------------------------------------------------------------------------------
# command-line pieces shared by the tools


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None, help="model name (e.g. mae_vit_base_patch16) for checkpoints without "
                   "model_args; default: the name in the checkpoint's args, else a standard one of the weights' shapes")
    g.add_argument("--input_size", default=None, type=int,
                   help="evaluate at this image size, position embedding resampled (default: the checkpoint's)")
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


def load_for_analysis(
    path: str | os.PathLike,
    *,
    model: str | None = None,
    input_size: int | None = None,
    device: torch.device | str = "cpu",
) -> LoadedModel:
    """The model of checkpoint `path` (see the module docstring), in eval mode on `device`.

    `model` names the factory when the checkpoint has no "model_args" (ignored, with a warning,
    when it has); `input_size` other than the checkpoint's rebuilds at that size and loads with
    `checkpoint.load_pretrained` (position embedding resampled or regenerated)."""
    obj = ckpt.torch_load(path)
    try:
        state = ckpt.extract_state_dict(obj)
    except ckpt.CheckpointMismatchError as err:
        raise ckpt.CheckpointMismatchError(f"{path}: {err}") from None
    stored = ckpt.stored_args(obj)
    record = obj.get(ckpt.MODEL_ARGS_KEY) if isinstance(obj, Mapping) else None
    if record is not None:
        source = "model_args"
        if model is not None:
            log.warning("%s: --model %s ignored: the checkpoint names its model", path, model)
    elif model is not None:
        source, record = "command line", ckpt.infer_model_args(state, {**(stored or {}), "model": model})
    else:
        source, record = "inferred", ckpt.infer_model_args(state, stored)
    checkpoint = {"model": state, ckpt.MODEL_ARGS_KEY: record}
    try:
        record = ckpt.checkpoint_model_args(checkpoint)  # a stored record checked
        if input_size is None or input_size == record["kwargs"].get("img_size"):
            net = ckpt.load_model(checkpoint)
        else:
            record = {**record, "kwargs": {**record["kwargs"], "img_size": input_size}}
            net = ckpt.build_model(record)
            ckpt.load_pretrained(net, state)
    except ckpt.CheckpointMismatchError as err:
        raise ckpt.CheckpointMismatchError(f"{path}: {err}") from None
    net.eval().to(device)
    size = int(net.patch_embed.img_size[0])
    log.info("%s: %s built from %s (%d px)", path, record["name"], source, size)
    return LoadedModel(net, record["name"], record, source, size, stored)


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
        lm = load_for_analysis(path, model=args.model, input_size=args.input_size, device=device)
        if lm.input_size not in datasets:
            datasets[lm.input_size] = build_eval_dataset(args.dataset, args.data_path, args.split, lm.input_size)
        yield label, path, lm, datasets[lm.input_size]
