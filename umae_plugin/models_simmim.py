"""SimMIM (Xie et al., 2022) on the MAE ViT encoder, and U-SimMIM (paper Sec. 5.1, Table 2).

SimMIM replaces the embeddings of masked patches by a learned mask token in the encoder input
(every patch goes through the encoder), predicts raw pixels of every patch with a one-layer linear
decoder, and takes the L1 loss on masked pixels only. Masks are drawn in square blocks of 2x2
patches (32 px blocks of 16 px patches at 224 px; 2x2 patches of 4 px for 32-px images), 60% of
the blocks by default. The encoder's keys equal the MAE encoder's, so `models_vit` classifiers and
the checkpoint loader take it unchanged; `mask_token` (encoder width) and `decoder_pred` are
pre-training-only, like MAE's decoder.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

import torch
import torch.nn as nn

from .models_mae import ARCHS, ViTEncoderBase, pixel_targets, pool_latent
from .models_umae import UniformityMixin
from .timm_plugin import build_model, cfgs_for, register_model


def block_mask(n: int, grid: tuple[int, int], mask_ratio: float, block: int, device=None) -> torch.Tensor:
    """[n, gh*gw] float mask, 1 = masked: `ceil(ratio * blocks)` random `block` x `block` squares
    of patches per sample."""
    gh, gw = grid
    if gh % block or gw % block:
        raise ValueError(f"patch grid {gh}x{gw} is not a multiple of the mask block size {block}")
    bh, bw = gh // block, gw // block
    count = math.ceil(bh * bw * mask_ratio)
    ids = torch.rand(n, bh * bw, device=device).argsort(dim=1)[:, :count]
    mask = torch.zeros(n, bh * bw, device=device).scatter_(1, ids, 1.0).view(n, bh, bw)
    return mask.repeat_interleave(block, 1).repeat_interleave(block, 2).reshape(n, gh * gw)


class SimMIMViT(ViTEncoderBase):
    """SimMIM pre-training model. `forward(imgs, mask_ratio=0.6)` -> (loss, pred [N, L, p*p*C],
    mask [N, L]) and, with `return_terms`, the `loss_mim` term and pooled `features`."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        norm_pix_loss: bool = False,
        mask_block: int = 2,
    ) -> None:
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, norm_layer)
        self.norm_pix_loss = norm_pix_loss
        self.mask_block = mask_block
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.decoder_pred = nn.Linear(embed_dim, patch_size**2 * in_chans)
        self._init_encoder()
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "mask_token"}

    def _encode(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked patches' embeddings replaced by the mask token -> normalised [N, 1 + L, D]."""
        x = self.patch_embed(imgs)
        w = mask.unsqueeze(-1).to(x.dtype)
        x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        return self._encode_tokens(x + self.pos_embed[:, 1:, :])

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L1 between predicted and true pixels, averaged over the pixels of masked patches only."""
        target = pixel_targets(imgs, self.patch_size, self.norm_pix_loss)
        loss = (pred - target).abs().mean(dim=-1)
        return (loss * mask).sum() / mask.sum().clamp(min=1)

    def _terms(self, imgs: torch.Tensor, latent: torch.Tensor, loss_mim: torch.Tensor) -> dict[str, Any]:
        return {"loss": loss_mim, "loss_mim": loss_mim, "features": pool_latent(latent, self.feature_pool)}

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.6, return_terms: bool = False):
        mask = block_mask(imgs.shape[0], self.grid_size, mask_ratio, self.mask_block, imgs.device)
        latent = self._encode(imgs, mask)
        pred = self.decoder_pred(latent[:, 1:])
        terms = self._terms(imgs, latent, self.forward_loss(imgs, pred, mask))
        loss = terms.pop("loss")
        return (loss, pred, mask, terms) if return_terms else (loss, pred, mask)


class USimMIMViT(UniformityMixin, SimMIMViT):
    """SimMIM plus `lambda_unif * uniformity_loss` of the encoder output's patch-token mean (all
    patch tokens, masked positions included); `lambda_unif=0` is exactly SimMIM."""

    def __init__(self, *args: Any, lambda_unif: float = 0.01, unif_pool: str = "mean", reg: str = "square",
                 uniformity_mu: float = 1.0, centering: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._set_uniformity(lambda_unif, unif_pool, reg, uniformity_mu, centering)


def _build(cls: type[SimMIMViT], arch: str, variant: str, **kwargs: Any) -> SimMIMViT:
    """`cls` with the encoder of `arch`; keywords override, timm's work as `timm_plugin.build_model`
    says for the registered factory `variant`."""
    defaults = dict(ARCHS[arch], mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    return build_model(cls, variant, defaults, **kwargs)


default_cfgs = cfgs_for(f"{prefix}_vit_{arch}" for prefix in ("simmim", "usimmim") for arch in ARCHS)


@register_model
def simmim_vit_tiny_patch16(pretrained: bool = False, **kwargs: Any) -> SimMIMViT:
    return _build(SimMIMViT, "tiny_patch16", "simmim_vit_tiny_patch16", pretrained=pretrained, **kwargs)


@register_model
def simmim_vit_small_patch16(pretrained: bool = False, **kwargs: Any) -> SimMIMViT:
    return _build(SimMIMViT, "small_patch16", "simmim_vit_small_patch16", pretrained=pretrained, **kwargs)


@register_model
def simmim_vit_base_patch16(pretrained: bool = False, **kwargs: Any) -> SimMIMViT:
    return _build(SimMIMViT, "base_patch16", "simmim_vit_base_patch16", pretrained=pretrained, **kwargs)


@register_model
def simmim_vit_large_patch16(pretrained: bool = False, **kwargs: Any) -> SimMIMViT:
    return _build(SimMIMViT, "large_patch16", "simmim_vit_large_patch16", pretrained=pretrained, **kwargs)


@register_model
def simmim_vit_huge_patch14(pretrained: bool = False, **kwargs: Any) -> SimMIMViT:
    return _build(SimMIMViT, "huge_patch14", "simmim_vit_huge_patch14", pretrained=pretrained, **kwargs)


@register_model
def usimmim_vit_tiny_patch16(pretrained: bool = False, **kwargs: Any) -> USimMIMViT:
    return _build(USimMIMViT, "tiny_patch16", "usimmim_vit_tiny_patch16", pretrained=pretrained, **kwargs)


@register_model
def usimmim_vit_small_patch16(pretrained: bool = False, **kwargs: Any) -> USimMIMViT:
    return _build(USimMIMViT, "small_patch16", "usimmim_vit_small_patch16", pretrained=pretrained, **kwargs)


@register_model
def usimmim_vit_base_patch16(pretrained: bool = False, **kwargs: Any) -> USimMIMViT:
    return _build(USimMIMViT, "base_patch16", "usimmim_vit_base_patch16", pretrained=pretrained, **kwargs)


@register_model
def usimmim_vit_large_patch16(pretrained: bool = False, **kwargs: Any) -> USimMIMViT:
    return _build(USimMIMViT, "large_patch16", "usimmim_vit_large_patch16", pretrained=pretrained, **kwargs)


@register_model
def usimmim_vit_huge_patch14(pretrained: bool = False, **kwargs: Any) -> USimMIMViT:
    return _build(USimMIMViT, "huge_patch14", "usimmim_vit_huge_patch14", pretrained=pretrained, **kwargs)


# Every factory of the module, by name (what timm registered).
FACTORIES: dict[str, Callable[..., SimMIMViT]] = {
    f.__name__: f for f in (simmim_vit_tiny_patch16, simmim_vit_small_patch16, simmim_vit_base_patch16,
                            simmim_vit_large_patch16, simmim_vit_huge_patch14, usimmim_vit_tiny_patch16,
                            usimmim_vit_small_patch16, usimmim_vit_base_patch16, usimmim_vit_large_patch16,
                            usimmim_vit_huge_patch14)
}
