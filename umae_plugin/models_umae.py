"""U-MAE: the MAE pre-training ViT plus lambda * the uniformity term (Zhang, Wang & Wang, 2022), or
M-MAE's coding-rate term in its place (Tan et al., 2024; `reg="TCR"`)."""
from __future__ import annotations

import logging
import math
from typing import Any

import torch

from .distributed import GATHER_MODES
from .losses import coding_rate_loss, uniformity_loss
from .models_mae import ARCHS, FEATURE_POOLS, MaskedAutoencoderViT, build_mae
from .timm_plugin import cfgs_for, register_model

log = logging.getLogger("umae")

REGS = ("square", "TCR")  # M-MAE's names: U-MAE's squared cosine, the total coding rate
REG_ALIASES = {"spectral": "square", "entropy": "square"}  # the U-MAE reference's --reg values for its term
TERM_KEYS = {"square": "loss_unif", "TCR": "loss_tcr"}  # the term's key in `terms` (and the log)


class UniformityMixin:
    """Adds `lambda_unif * term(features)` to a masked-image model's loss, where `features` are
    pooled from the normalised encoder output of the same pass and the term is
    `losses.uniformity_loss` (`reg="square"`, reported as `loss_unif`) or
    `losses.coding_rate_loss(features, uniformity_mu, centering)` (`reg="TCR"`, `loss_tcr`).
    The term sees the global batch; `set_unif_gather` picks how its gradient crosses ranks."""

    def _set_uniformity(self, lambda_unif: float, unif_pool: str, reg: str = "square", uniformity_mu: float = 1.0,
                        centering: bool = False) -> None:
        if lambda_unif < 0:
            raise ValueError(f"lambda_unif must be >= 0, got {lambda_unif}")
        if unif_pool not in FEATURE_POOLS:
            raise ValueError(f"unknown unif_pool {unif_pool!r}; expected one of {FEATURE_POOLS}")
        if reg not in REGS:
            raise ValueError(f"unknown reg {reg!r}; expected one of {REGS}")
        number = isinstance(uniformity_mu, (int, float)) and not isinstance(uniformity_mu, bool)
        if not (number and math.isfinite(uniformity_mu) and uniformity_mu > 0):
            raise ValueError(f"uniformity_mu must be a finite number > 0, got {uniformity_mu!r}")
        if not isinstance(centering, bool):
            raise ValueError(f"centering must be True or False, got {centering!r}")
        if lambda_unif == 0 and reg != "square":
            log.warning("the %s term has lambda_unif 0: it is off (the model is plain MAE / SimMIM)", reg)
        self.lambda_unif = float(lambda_unif)
        self.feature_pool = unif_pool
        self.reg = reg
        self.uniformity_mu = float(uniformity_mu)
        self.centering = centering
        self.unif_gather = "global"

    def set_unif_gather(self, mode: str = "global") -> None:
        """How the term's gradient crosses ranks (`losses`): `global` (exact: the same gradient on
        any number of ranks) or `reference` (the U-MAE / M-MAE code's: 1/world_size of it). A
        training-time setting like gradient checkpointing: not a constructor argument, not in
        the state dict."""
        if mode not in GATHER_MODES:
            raise ValueError(f"unknown unif_gather {mode!r}; expected one of {GATHER_MODES}")
        self.unif_gather = mode

    def uniformity_term(self, features: torch.Tensor) -> torch.Tensor:
        """The term of `features` [B, D] (gathered over ranks), unweighted: a scalar."""
        if self.reg == "TCR":
            return coding_rate_loss(features, self.uniformity_mu, self.centering, gather=self.unif_gather)
        return uniformity_loss(features, gather=self.unif_gather)

    def _terms(self, imgs: torch.Tensor, latent: torch.Tensor, loss: torch.Tensor) -> dict[str, Any]:
        terms = super()._terms(imgs, latent, loss)
        if self.lambda_unif > 0:
            value = self.uniformity_term(terms["features"])
            terms[TERM_KEYS[self.reg]] = value
            terms["loss"] = terms["loss"] + self.lambda_unif * value
        return terms


class UMAEViT(UniformityMixin, MaskedAutoencoderViT):
    """`MaskedAutoencoderViT` whose loss is `loss_mae + lambda_unif * term(features)`: U-MAE's
    `uniformity_loss` (`reg="square"`, default) or M-MAE's `coding_rate_loss` (`reg="TCR"`, with
    `uniformity_mu` and `centering`).

    `features` are pooled from the normalised encoder output of the same masked pass:
    `unif_pool="mean"` (default) averages the patch tokens, class token excluded; `"cls"` takes
    the class token. The U-MAE reference pools the class token and applies the encoder's final
    norm to it a second time; we do not re-apply the norm. No parameters are added, so the state
    dict equals the MAE model's; `lambda_unif=0` is exactly MAE and skips the term's work.
    """

    def __init__(self, *args: Any, lambda_unif: float = 0.01, unif_pool: str = "mean", reg: str = "square",
                 uniformity_mu: float = 1.0, centering: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._set_uniformity(lambda_unif, unif_pool, reg, uniformity_mu, centering)


default_cfgs = cfgs_for(f"umae_vit_{arch}" for arch in ARCHS)  # timm reads it when registering


@register_model
def umae_vit_tiny_patch16(pretrained: bool = False, **kwargs: Any) -> UMAEViT:
    return build_mae(UMAEViT, "tiny_patch16", "umae_vit_tiny_patch16", pretrained=pretrained, **kwargs)


@register_model
def umae_vit_small_patch16(pretrained: bool = False, **kwargs: Any) -> UMAEViT:
    return build_mae(UMAEViT, "small_patch16", "umae_vit_small_patch16", pretrained=pretrained, **kwargs)


@register_model
def umae_vit_base_patch16(pretrained: bool = False, **kwargs: Any) -> UMAEViT:
    return build_mae(UMAEViT, "base_patch16", "umae_vit_base_patch16", pretrained=pretrained, **kwargs)


@register_model
def umae_vit_large_patch16(pretrained: bool = False, **kwargs: Any) -> UMAEViT:
    return build_mae(UMAEViT, "large_patch16", "umae_vit_large_patch16", pretrained=pretrained, **kwargs)


@register_model
def umae_vit_huge_patch14(pretrained: bool = False, **kwargs: Any) -> UMAEViT:
    return build_mae(UMAEViT, "huge_patch14", "umae_vit_huge_patch14", pretrained=pretrained, **kwargs)
