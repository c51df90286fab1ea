"""MAE pre-training ViT: a drop-in, reference-exact replacement for the official `models_mae.py`.

Same constructor, methods, state-dict keys and random draws as the reference, so official
checkpoints load with `strict=True` and a seeded forward pass reproduces the reference's mask,
prediction and loss. Built on timm's `Block` (fused `scaled_dot_product_attention`) and
`PatchEmbed`. Conventions: `N` batch, `L` patches, `D` width; `mask` is `[N, L]`, 0 keep, 1 remove.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint

from .features import pool_normed
from .pos_embed import sincos_2d
from .timm_plugin import build_model, cfgs_for, register_model

FEATURE_POOLS = ("mean", "cls")  # the features the uniformity term can act on (`features.NORMED`)


def pool_latent(latent: torch.Tensor, pool: str = "mean") -> torch.Tensor:
    """[N, 1 + L, D] normalised encoder output -> [N, D] image features: `features.pool_normed`
    (`mean`: average of the patch tokens, class token excluded; `cls`: the class token)."""
    if pool not in FEATURE_POOLS:
        raise ValueError(f"unknown feature pool {pool!r}; expected one of {FEATURE_POOLS}")
    return pool_normed(latent, pool)


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, L, p*p*C], patches row-major, channels last within a patch."""
    n, c, h, w = imgs.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int]) -> torch.Tensor:
    """[N, L, p*p*C] -> [N, C, H, W], the inverse of `patchify` for a `grid` of patches."""
    gh, gw = grid
    if x.shape[1] != gh * gw:
        raise ValueError(f"expected {gh * gw} patches, got {x.shape[1]}")
    c = x.shape[2] // (p * p)
    x = x.reshape(x.shape[0], gh, gw, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], c, gh * p, gw * p)


def pixel_targets(imgs: torch.Tensor, p: int, norm_pix: bool) -> torch.Tensor:
    """Reconstruction targets [N, L, p*p*C]: raw patches, or each patch normalised by its own mean
    and (unbiased) variance + 1e-6 (`norm_pix_loss`)."""
    target = patchify(imgs, p)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    return target


class ViTEncoderBase(nn.Module):
    """The ViT encoder the masked-image models share: patch embedding, class token, fixed sin-cos
    position table, timm `Block`s and the final norm. Its state-dict keys are the reference MAE
    encoder's (and timm's), so every model built on it loads into the classifier of `models_vit`."""

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        norm_layer: Callable[..., nn.Module],
    ) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.feature_pool = "mean"
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed sin-cos table, stored in the state dict as the reference stores it.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    @property
    def embed_dim(self) -> int:
        return self.cls_token.shape[-1]

    def _init_encoder(self) -> None:
        """Sin-cos table, xavier-uniform patch projection viewed as a linear, normal(0.02) class
        token; `_init_weights` then handles every linear and LayerNorm."""
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d(self.embed_dim, self.grid_size, cls_token=True)[None])
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for blk in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def _encode_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens [N, L', D] (position added) -> normalised [N, 1 + L', D], class token first."""
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        return self.norm(self._run_blocks(self.blocks, torch.cat([cls, x], dim=1)))

    def forward_latent(self, imgs: torch.Tensor) -> torch.Tensor:
        """Normalised encoder output [N, 1 + L, D] of unmasked images (no masking draw), class
        token first: what `pool_latent` pools."""
        return self._encode_tokens(self.patch_embed(imgs) + self.pos_embed[:, 1:, :])

    def forward_features(self, imgs: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        """Pooled features [N, D] of unmasked images (no masking draw): what probes and
        collapse diagnostics look at."""
        return pool_latent(self.forward_latent(imgs), pool or self.feature_pool)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, p*p*C] -> [N, C, H, W] for the model's (square or not) patch grid."""
        return unpatchify(x, self.patch_size, self.grid_size)


class MaskedAutoencoderViT(ViTEncoderBase):
    """Masked autoencoder with a ViT encoder and a light ViT decoder (He et al., 2022)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        norm_pix_loss: bool = False,
    ) -> None:
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, norm_layer)
        self.norm_pix_loss = norm_pix_loss
        num_patches = self.patch_embed.num_patches
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size**2 * in_chans, bias=True)

        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The reference scheme: sin-cos tables, xavier-uniform linears (the patch projection
        viewed as a linear), zero biases, unit LayerNorms, normal(0.02) class and mask tokens."""
        self._init_encoder()
        with torch.no_grad():
            self.decoder_pos_embed.copy_(
                sincos_2d(self.decoder_pos_embed.shape[-1], self.grid_size, cls_token=True)[None]
            )
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "decoder_pos_embed", "cls_token", "mask_token"}

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, L, p*p*C], patches row-major, channels last within a patch."""
        return patchify(imgs, self.patch_size)

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random `int(L * (1 - mask_ratio))` tokens per sample, by argsort of uniform noise.
        Hand-written (timm has no MAE masking): the reference's draw, so one RNG state gives its masks.
        `noise` [N, L] (HF transformers' name) replaces the draw: the tokens of lowest noise are kept.

        x: [N, L, D] -> (x_kept [N, L_keep, D], mask [N, L], ids_restore [N, L]).
        """
        n, length, dim = x.shape
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        elif tuple(noise.shape) != (n, length):
            raise ValueError(f"noise has shape {tuple(noise.shape)}; expected [N, L] = {[n, length]}")
        else:
            noise = noise.to(x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_kept, mask, ids_restore

    def forward_encoder(
        self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[N, C, H, W] -> (latent [N, 1 + L_keep, D] after the final norm, class token first,
        mask [N, L], ids_restore [N, L]); `noise` [N, L] as in `random_masking`."""
        x = self.patch_embed(x) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        return self._encode_tokens(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [N, 1 + L_keep, D] -> pixel predictions [N, L, p*p*C] (class token dropped)."""
        x = self.decoder_embed(x)
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        x = self.decoder_norm(self._run_blocks(self.decoder_blocks, x))
        return self.decoder_pred(x)[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over removed patches only; with `norm_pix_loss`
        the target is each patch normalised by its own mean and (unbiased) variance + 1e-6."""
        target = pixel_targets(imgs, self.patch_size, self.norm_pix_loss)
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def _terms(self, imgs: torch.Tensor, latent: torch.Tensor, loss_mae: torch.Tensor) -> dict[str, Any]:
        """Loss terms of one pass; subclasses add theirs. Returns a dict with at least `loss`."""
        return {"loss": loss_mae, "loss_mae": loss_mae, "features": pool_latent(latent, self.feature_pool)}

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, return_terms: bool = False,
                noise: torch.Tensor | None = None):
        """-> (loss, pred [N, L, p*p*C], mask [N, L]) and, with `return_terms`, a dict of the
        pass's loss terms (`loss_mae`, plus `loss_unif` for U-MAE) and pooled `features` [N, D].
        `noise` [N, L] gives the mask (`random_masking`), as HF transformers' `ViTMAEForPreTraining`."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        terms = self._terms(imgs, latent, self.forward_loss(imgs, pred, mask))
        loss = terms.pop("loss")
        if return_terms:
            return loss, pred, mask, terms
        return loss, pred, mask


_LN = partial(nn.LayerNorm, eps=1e-6)
_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
ARCHS: dict[str, dict[str, Any]] = {
    "tiny_patch16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "small_patch16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}


def build_mae(cls: type[MaskedAutoencoderViT], arch: str, variant: str | None = None, **kwargs: Any
              ) -> MaskedAutoencoderViT:
    """`cls` with the encoder of `arch` (a key of `ARCHS`) and the reference 512-d, 8-block decoder;
    keyword arguments override any default, and timm's (`pretrained`, `pretrained_cfg`, ...) work as
    `timm_plugin.build_model` says for the registered factory `variant` (default: `mae_vit_<arch>`)."""
    defaults = dict(ARCHS[arch], **_DECODER, mlp_ratio=4, norm_layer=_LN)
    return build_model(cls, variant or f"mae_vit_{arch}", defaults, **kwargs)


ALIASES = tuple(f"mae_vit_{arch}_dec512d8b" for arch in ("base_patch16", "large_patch16", "huge_patch14"))
default_cfgs = cfgs_for([*(f"mae_vit_{arch}" for arch in ARCHS), *ALIASES])  # timm reads it when registering


@register_model
def mae_vit_tiny_patch16(pretrained: bool = False, **kwargs: Any) -> MaskedAutoencoderViT:
    return build_mae(MaskedAutoencoderViT, "tiny_patch16", "mae_vit_tiny_patch16", pretrained=pretrained, **kwargs)


@register_model
def mae_vit_small_patch16(pretrained: bool = False, **kwargs: Any) -> MaskedAutoencoderViT:
    return build_mae(MaskedAutoencoderViT, "small_patch16", "mae_vit_small_patch16", pretrained=pretrained, **kwargs)


@register_model
def mae_vit_base_patch16(pretrained: bool = False, **kwargs: Any) -> MaskedAutoencoderViT:
    return build_mae(MaskedAutoencoderViT, "base_patch16", "mae_vit_base_patch16", pretrained=pretrained, **kwargs)


@register_model
def mae_vit_large_patch16(pretrained: bool = False, **kwargs: Any) -> MaskedAutoencoderViT:
    return build_mae(MaskedAutoencoderViT, "large_patch16", "mae_vit_large_patch16", pretrained=pretrained, **kwargs)


@register_model
def mae_vit_huge_patch14(pretrained: bool = False, **kwargs: Any) -> MaskedAutoencoderViT:
    return build_mae(MaskedAutoencoderViT, "huge_patch14", "mae_vit_huge_patch14", pretrained=pretrained, **kwargs)


# The reference's names for the same models (its 512-d, 8-block decoder is the default), registered
# under their own names: timm keys its registry on the function's name.
@register_model
def mae_vit_base_patch16_dec512d8b(pretrained: bool = False, **kwargs: Any) -> MaskedAutoencoderViT:
    return build_mae(MaskedAutoencoderViT, "base_patch16", "mae_vit_base_patch16_dec512d8b", pretrained=pretrained,
                     **kwargs)


@register_model
def mae_vit_large_patch16_dec512d8b(pretrained: bool = False, **kwargs: Any) -> MaskedAutoencoderViT:
    return build_mae(MaskedAutoencoderViT, "large_patch16", "mae_vit_large_patch16_dec512d8b", pretrained=pretrained,
                     **kwargs)


@register_model
def mae_vit_huge_patch14_dec512d8b(pretrained: bool = False, **kwargs: Any) -> MaskedAutoencoderViT:
    return build_mae(MaskedAutoencoderViT, "huge_patch14", "mae_vit_huge_patch14_dec512d8b", pretrained=pretrained,
                     **kwargs)
