"""U-MAE: the MAE pre-training ViT plus lambda * the uniformity term (Zhang, Wang & Wang, 2022)."""
from __future__ import annotations

from typing import Any

import torch

from .losses import uniformity_loss
from .models_mae import FEATURE_POOLS, MaskedAutoencoderViT, build_mae


class UniformityMixin:
    """Adds `lambda_unif * uniformity_loss(features)` to a masked-image model's loss, where
    `features` are pooled from the normalised encoder output of the same pass."""

    def _set_uniformity(self, lambda_unif: float, unif_pool: str) -> None:
        if lambda_unif < 0:
            raise ValueError(f"lambda_unif must be >= 0, got {lambda_unif}")
        if unif_pool not in FEATURE_POOLS:
            raise ValueError(f"unknown unif_pool {unif_pool!r}; expected one of {FEATURE_POOLS}")
        self.lambda_unif = float(lambda_unif)
        self.feature_pool = unif_pool

    def _terms(self, imgs: torch.Tensor, latent: torch.Tensor, loss: torch.Tensor) -> dict[str, Any]:
        terms = super()._terms(imgs, latent, loss)
        if self.lambda_unif > 0:
            loss_unif = uniformity_loss(terms["features"])
            terms["loss_unif"] = loss_unif
            terms["loss"] = terms["loss"] + self.lambda_unif * loss_unif
        return terms


class UMAEViT(UniformityMixin, MaskedAutoencoderViT):
    """`MaskedAutoencoderViT` whose loss is `loss_mae + lambda_unif * uniformity_loss(features)`.

    `features` are pooled from the normalised encoder output of the same masked pass:
    `unif_pool="mean"` (default) averages the patch tokens, class token excluded; `"cls"` takes
    the class token. The U-MAE reference pools the class token and applies the encoder's final
    norm to it a second time; we do not re-apply the norm. No parameters are added, so the state
    dict equals the MAE model's; `lambda_unif=0` is exactly MAE and skips the term's work.
    """

    def __init__(self, *args: Any, lambda_unif: float = 0.01, unif_pool: str = "mean", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._set_uniformity(lambda_unif, unif_pool)


def umae_vit_tiny_patch16(**kwargs: Any) -> UMAEViT:
    return build_mae(UMAEViT, "tiny_patch16", **kwargs)


def umae_vit_small_patch16(**kwargs: Any) -> UMAEViT:
    return build_mae(UMAEViT, "small_patch16", **kwargs)


def umae_vit_base_patch16(**kwargs: Any) -> UMAEViT:
    return build_mae(UMAEViT, "base_patch16", **kwargs)


def umae_vit_large_patch16(**kwargs: Any) -> UMAEViT:
    return build_mae(UMAEViT, "large_patch16", **kwargs)


def umae_vit_huge_patch14(**kwargs: Any) -> UMAEViT:
    return build_mae(UMAEViT, "huge_patch14", **kwargs)
