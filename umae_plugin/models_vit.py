"""ViT classifier for linear probing and fine-tuning, on timm's `VisionTransformer`.

Pooling as in the reference `models_vit.py`: with `global_pool` the patch tokens (class token
excluded) are averaged and passed through `fc_norm` (the final `norm` is dropped); otherwise the
class token after `norm`. The state-dict keys equal the reference classifier's, which are also
timm's, so `timm.create_model("vit_base_patch16_224", global_pool="avg")` loads ours directly.

`VisionTransformer` here is the reference's drop-in (`models_vit.VisionTransformer(global_pool=True,
embed_dim=..., ...)`); `VisionTransformerClassifier` is the same class under its older name.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.models import vision_transformer as timm_vit

from .models_mae import ARCHS
from .timm_plugin import build_model, cfgs_for, register_model


_TIMM_POOL = {"avg": True, "token": False}


def _as_global_pool(global_pool: Any) -> bool:
    """The reference's `global_pool: bool`; timm's "avg"/"token" map to True/False. Any other
    value (timm's "max", "avgmax", "", "map", ... or a non-bool) is rejected, not guessed."""
    if isinstance(global_pool, bool):
        return global_pool
    if isinstance(global_pool, str) and global_pool in _TIMM_POOL:
        return _TIMM_POOL[global_pool]
    raise ValueError(f"global_pool={global_pool!r} is not supported: use a bool (True: average of the "
                     f"patch tokens, False: class token) or timm's 'avg' / 'token'")


class VisionTransformer(timm_vit.VisionTransformer):
    """timm's ViT with the reference's `global_pool: bool` switch and a `forward_features` that
    returns the pooled [N, D] features (the reference's), not the token map (timm's)."""

    def __init__(self, global_pool: bool | str = False, **kwargs: Any) -> None:
        global_pool = _as_global_pool(global_pool)
        kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
        kwargs.setdefault("fc_norm", global_pool)
        super().__init__(global_pool="avg" if global_pool else "token", **kwargs)
        self.global_pool_enabled = global_pool

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(super().forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.forward_features(x)))


VisionTransformerClassifier = VisionTransformer


def build_vit(arch: str, variant: str | None = None, **kwargs: Any) -> VisionTransformerClassifier:
    """The classifier for encoder `arch` (a key of `models_mae.ARCHS`); keywords override, and
    timm's (`pretrained`, `pretrained_cfg`, ...) work as `timm_plugin.build_model` says for the
    registered factory `variant` (default: `vit_<arch>`)."""
    return build_model(VisionTransformerClassifier, variant or f"vit_{arch}", dict(ARCHS[arch], mlp_ratio=4, qkv_bias=True),
                       **kwargs)


# timm has no `vit_<size>_patch<p>` names (its ViTs end in the input size): these are ours, with the
# reference's `forward_features` (pooled [N, D] features).
default_cfgs = cfgs_for((f"vit_{arch}" for arch in ARCHS), classifier=True)  # timm reads it when registering


@register_model
def vit_tiny_patch16(pretrained: bool = False, **kwargs: Any) -> VisionTransformerClassifier:
    return build_vit("tiny_patch16", "vit_tiny_patch16", pretrained=pretrained, **kwargs)


@register_model
def vit_small_patch16(pretrained: bool = False, **kwargs: Any) -> VisionTransformerClassifier:
    return build_vit("small_patch16", "vit_small_patch16", pretrained=pretrained, **kwargs)


@register_model
def vit_base_patch16(pretrained: bool = False, **kwargs: Any) -> VisionTransformerClassifier:
    return build_vit("base_patch16", "vit_base_patch16", pretrained=pretrained, **kwargs)


@register_model
def vit_large_patch16(pretrained: bool = False, **kwargs: Any) -> VisionTransformerClassifier:
    return build_vit("large_patch16", "vit_large_patch16", pretrained=pretrained, **kwargs)


@register_model
def vit_huge_patch14(pretrained: bool = False, **kwargs: Any) -> VisionTransformerClassifier:
    return build_vit("huge_patch14", "vit_huge_patch14", pretrained=pretrained, **kwargs)
