"""Checkpoint I/O, used by every script: load any MAE-family checkpoint into a pre-training model or
a classifier, export timm weights, and write checkpoints atomically.

Accepted sources (a path or an already loaded dict): official MAE checkpoints (`{"model": ...}`),
their encoder-only pre-training files, visualisation files with the decoder, fine-tuned and
linear-probe classifiers (head `head` or `head.0` BatchNorm / `head.1` Linear), U-MAE reference
checkpoints (their online-probe `fc.*` / `fc_norm.*` are ignored), this project's checkpoints, and
timm-format ViT weights (same key names). Every key is sorted into a group, each group has one
rule, and the report says exactly what was loaded, initialised fresh, resampled or ignored.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

log = logging.getLogger("umae.checkpoint")

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+|last)\.pth$")


def _group(key: str) -> str:
    """Which part of a ViT a state-dict key belongs to."""
    if key in ("cls_token", "pos_embed") or key.startswith(("patch_embed.", "blocks.")):
        return "encoder"
    if key == "mask_token" or key.startswith("decoder"):
        return "decoder"
    for prefix in ("norm", "fc_norm", "head", "fc"):
        if key.startswith(prefix + "."):
            return prefix
    return "unknown"


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        def short(keys: list[str]) -> str:
            groups = sorted({k.split(".")[0] for k in keys})
            return ", ".join(groups) if groups else "none"

        return (
            f"loaded {len(self.loaded)} tensors; initialised fresh: {short(self.fresh)}; "
            f"ignored from the checkpoint: {short(self.ignored)}; resampled: {short(self.resampled)}"
        )


class CheckpointMismatchError(ValueError):
    """The checkpoint's encoder does not fit the model's architecture."""


def torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """`torch.load` with `weights_only=True`; `argparse.Namespace` (the `args` of upstream
    checkpoints) is allowed as a safe global. `mmap` reads tensors lazily."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def extract_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights held by a checkpoint path or dict (`model`, `state_dict`, `module` or the
    dict itself), with DDP / compile prefixes removed."""
    obj = torch_load(source) if isinstance(source, (str, os.PathLike)) else source
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"no state dict of tensors found in checkpoint {source if not isinstance(source, Mapping) else '<dict>'}")
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def _is_fixed_table(model: nn.Module, key: str) -> bool:
    params = dict(model.named_parameters())
    return key in params and not params[key].requires_grad


def _grid(num_tokens: int, prefix: int = 1) -> list[int]:
    side = math.isqrt(num_tokens - prefix)
    if side * side != num_tokens - prefix:
        raise CheckpointMismatchError(f"position embedding of {num_tokens} tokens is not a square grid")
    return [side, side]


def load_pretrained(model: nn.Module, source: str | os.PathLike | Mapping[str, Any]) -> LoadReport:
    """Load a checkpoint's weights into `model` (a pre-training model or a classifier).

    Rules by group: the encoder (`cls_token`, `pos_embed`, `patch_embed`, `blocks`) must match in
    keys and shapes, else `CheckpointMismatchError` names the offending keys; a position embedding
    of another grid is resampled for a classifier (timm's `resample_abs_pos_embed`) and, for a
    pre-training model's fixed sin-cos table, regenerated (the model's own table is kept); `norm`
    and the decoder load when present and of the right shape, else stay freshly initialised;
    `fc_norm` and `head` load only from a real classifier (one with `head.*`) whose head has the
    model's structure and shapes; U-MAE online-probe keys (`fc.*`) are ignored.
    """
    src = extract_state_dict(source)
    target = model.state_dict()
    src_is_classifier = any(_group(k) == "head" for k in src)
    report = LoadReport()
    mismatched, unexpected = [], []
    new_state = dict(target)

    src_head = {k for k in src if _group(k) == "head"}
    tgt_head = {k for k in target if _group(k) == "head"}
    head_fits = src_head == tgt_head and all(src[k].shape == target[k].shape for k in tgt_head)

    for key, value in src.items():
        group = _group(key)
        if key not in target:
            if group in ("encoder", "unknown"):
                unexpected.append(f"{key} {tuple(value.shape)}")
            else:
                report.ignored.append(key)
            continue
        if group == "head" and not head_fits:
            report.ignored.append(key)
            continue
        if group == "fc_norm" and not src_is_classifier:
            report.ignored.append(key)
            continue
        if value.shape != target[key].shape:
            if key.endswith("pos_embed") and _is_fixed_table(model, key):
                report.ignored.append(key)  # the model's own sin-cos table is already the right one
                continue
            if key == "pos_embed":
                new_grid = list(model.patch_embed.grid_size)
                value = resample_abs_pos_embed(value, new_grid, _grid(value.shape[1]), num_prefix_tokens=1)
                report.resampled.append(key)
            elif group == "decoder":
                report.ignored.append(key)
                log.warning("decoder key %s has shape %s in the checkpoint but %s in the model: initialised fresh",
                            key, tuple(value.shape), tuple(target[key].shape))
                continue
            else:
                mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target[key].shape)}")
                continue
        new_state[key] = value.to(dtype=target[key].dtype)
        report.loaded.append(key)

    missing_encoder = [k for k in target if _group(k) == "encoder" and k not in src]
    if mismatched or unexpected or missing_encoder:
        lines = ["checkpoint does not fit the model's architecture:"]
        lines += [f"  shape mismatch  {m}" for m in mismatched]
        lines += [f"  unexpected key  {u}" for u in unexpected[:20]]
        lines += [f"  missing key     {k} {tuple(target[k].shape)}" for k in missing_encoder[:20]]
        raise CheckpointMismatchError("\n".join(lines))

    loaded = set(report.loaded)
    report.fresh = [k for k in target if k not in loaded]
    model.load_state_dict(new_state, strict=True)
    log.info("checkpoint: %s", report)
    return report


def export_timm_state_dict(
    source: str | os.PathLike | Mapping[str, Any], global_pool: bool, num_classes: int = 1000
) -> dict[str, torch.Tensor]:
    """An encoder as a timm ViT state dict, loadable with `strict=True` by
    `timm.create_model("vit_base_patch16_224", global_pool="avg" if global_pool else "token",
    num_classes=num_classes)` (and the other sizes). `fc_norm` and the head come from the source
    when it is a classifier with such a head, else they are freshly initialised (untrained)."""
    from .models_vit import VisionTransformerClassifier

    src = extract_state_dict(source)
    embed_dim = src["cls_token"].shape[-1]
    patch = src["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in src if k.startswith("blocks."))
    grid = _grid(src["pos_embed"].shape[1])
    # num_heads does not change any weight's shape; any divisor of the width will do.
    model = VisionTransformerClassifier(
        global_pool=global_pool, img_size=grid[0] * patch, patch_size=patch, embed_dim=embed_dim,
        depth=depth, num_heads=1, num_classes=num_classes, qkv_bias=True,
        mlp_ratio=src["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
    )
    load_pretrained(model, src)
    return model.state_dict()


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to a temporary file in the same folder, fsync, then rename over `path`: a kill
    at any moment leaves either the old file or the new one, never a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint (`checkpoint-<epoch>.pth` or `checkpoint-last.pth`) with the
    highest stored epoch in `output_dir`, or None. Files that fail to load are skipped."""
    best, best_epoch = None, -1
    for path in Path(output_dir).glob("checkpoint-*.pth"):
        if not CHECKPOINT_RE.search(path.name):
            continue
        try:
            epoch = int(torch_load(path, mmap=True).get("epoch", -1))
        except Exception as err:  # a partial or foreign file: never resume from it
            log.warning("skipping unreadable checkpoint %s: %s", path, err)
            continue
        if epoch > best_epoch or (epoch == best_epoch and path.name == "checkpoint-last.pth"):
            best, best_epoch = path, epoch
    return best


def resolve_resume(resume: str, output_dir: str | os.PathLike | None) -> Path | None:
    """`--resume`: '' (none), 'auto' (the newest complete checkpoint in `output_dir`, or None when
    there is none yet: a fresh start) or a path, which must exist."""
    if not resume:
        return None
    if resume == "auto":
        found = find_latest_checkpoint(output_dir) if output_dir and Path(output_dir).is_dir() else None
        log.info("resume auto: %s", found or f"no checkpoint in {output_dir}, starting fresh")
        return found
    if not Path(resume).is_file():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint file")
    return Path(resume)
