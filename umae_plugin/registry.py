"""Model names -> factories, for scripts and tools that build models from a `--model` string.

The one registry is timm's: importing `umae_plugin` registers every factory of the model modules
with timm's `register_model` (see `timm_plugin`), so `timm.create_model("umae_vit_base_patch16")`
works; `list_models` / `create_model` here are timm's, limited to this package's models.
"""
from __future__ import annotations

import logging
import re
import sys
from typing import Any, Callable, NamedTuple

import timm
import torch.nn as nn

from . import models_mae, models_simmim, models_umae, models_vit, timm_plugin  # noqa: F401 (importing registers)

log = logging.getLogger("umae")


def register(name: str, factory: Callable[..., nn.Module]) -> None:
    """Register `factory` (any callable taking the model's keywords: a lambda, a partial) with timm
    as `name`, through an entry point of that name (timm keys its registry on `__name__`) that
    takes timm's keyword protocol (`timm_plugin.build_model`) and is bound in this module, as timm
    expects of a registered function. Registering a name again replaces it."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"cannot register model {name!r}: a timm model name is a Python identifier")
    module = sys.modules[__name__]
    if hasattr(module, name) and not getattr(getattr(module, name), timm_plugin.PLUGIN_ATTR, False):
        raise ValueError(f"cannot register model {name!r}: the name is taken in {__name__}")

    def entry(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return timm_plugin.build_model(factory, name, {}, pretrained=pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = getattr(factory, "__doc__", None)
    setattr(module, name, timm_plugin.register_model(entry))


def list_models(prefix: str = "") -> list[str]:
    """This package's registered model names that start with `prefix`, sorted."""
    return sorted(n for n in timm.list_models() if n.startswith(prefix) and timm_plugin.is_ours(n))


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model registered as `name` (`timm.create_model`); keyword arguments override the
    factory's defaults. A name that is not one of this package's raises `ValueError`."""
    if not isinstance(name, str) or not timm_plugin.is_ours(name):
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return timm.create_model(name, **kwargs)


# ---------------------------------------------------------------------------------------------
# model names: the one parser every script and tool uses

FAMILIES = ("mae", "simmim", "vit")
ALIAS_SUFFIX = "_dec512d8b"  # the MAE reference's names for its 512-d, 8-block decoder (the default)
_ARCH = r"vit(?:_[A-Za-z0-9]+)+"
_NAME = re.compile(rf"(?P<u>u?)(?P<family>mae|simmim)_(?P<arch>{_ARCH})|(?P<vit>{_ARCH})")


class ModelName(NamedTuple):
    """A parsed model name: `family` "mae" / "simmim" (pre-training) or "vit" (classifier),
    `uniformity` True for `umae_*` / `usimmim_*`, `arch` the encoder's `vit_*` classifier name."""

    family: str
    uniformity: bool
    arch: str

    @property
    def name(self) -> str:
        """The canonical registered name (`_dec512d8b` aliases drop the suffix)."""
        return self.arch if self.family == "vit" else pretrain_name(self.family, self.uniformity, self.arch)

    @property
    def is_pretrain(self) -> bool:
        return self.family != "vit"


def parse_model_name(name: str) -> ModelName:
    """`[u]mae_vit_*` (also with the reference's `_dec512d8b` suffix), `[u]simmim_vit_*` or
    `vit_*`; raises `ValueError` naming `name` for anything else."""
    m = _NAME.fullmatch(name) if isinstance(name, str) else None
    if m is None:
        raise ValueError(f"cannot parse model name {name!r}: expected [u]mae_vit_*, [u]simmim_vit_* or vit_*")
    if m["vit"] is not None:
        family, uniformity, arch = "vit", False, m["vit"]
    else:
        family, uniformity, arch = m["family"], m["u"] == "u", m["arch"]
    if arch.endswith(ALIAS_SUFFIX):
        if family != "mae":
            raise ValueError(f"cannot parse model name {name!r}: {ALIAS_SUFFIX} names MAE's 512-d, 8-block "
                             f"decoder, which {family}_* models do not have")
        arch = arch[: -len(ALIAS_SUFFIX)]
        if arch == "vit":
            raise ValueError(f"cannot parse model name {name!r}: no encoder before {ALIAS_SUFFIX}")
    return ModelName(family, uniformity, arch)


def pretrain_name(family: str, uniformity: bool, arch: str) -> str:
    """The pre-training model name for `family` ("mae" / "simmim"), with or without the uniformity
    term, and the encoder `arch` (`vit_*`): e.g. ("simmim", True, "vit_base_patch16") ->
    "usimmim_vit_base_patch16"."""
    if family not in ("mae", "simmim"):
        raise ValueError(f"no pre-training model family {family!r}; known: mae, simmim")
    return f"{'u' if uniformity else ''}{family}_{arch}"


def classifier_arch(name: str) -> str:
    """The `vit_*` classifier of model `name`'s encoder (`name` itself for `vit_*`)."""
    return parse_model_name(name).arch


# ---------------------------------------------------------------------------------------------
# pre-training models: which factory a name and a uniformity weight build, and their defaults


def _parsed(name: str) -> ModelName | None:
    """`parse_model_name(name)`, or None for a name it cannot parse (built as given)."""
    try:
        return parse_model_name(name)
    except ValueError:
        return None


def default_lambda(model_name: str) -> float:
    """The uniformity weight when `--lambda_unif` is not given: the paper's 0.01 for `umae_*` and
    `usimmim_*` models, 0 (exactly upstream MAE / SimMIM) for everything else."""
    parsed = _parsed(model_name)
    return 0.01 if parsed is not None and parsed.uniformity else 0.0


def default_mask_ratio(model_name: str) -> float:
    """0.6 for SimMIM models (its paper's value), 0.75 (upstream MAE) otherwise."""
    parsed = _parsed(model_name)
    return 0.6 if parsed is not None and parsed.family == "simmim" else 0.75


def pretrain_factory(name: str, *, lambda_unif: float, unif_pool: str = "mean",
                     **overrides: Any) -> tuple[str, dict[str, Any]]:
    """(factory name, keywords) that `build_pretrain_model` calls: `mae_vit_*` / `umae_vit_*` (and
    `simmim_vit_*` / `usimmim_vit_*`) name the same architectures, a positive `lambda_unif` picks
    the uniformity-enhanced class (with `lambda_unif`, `unif_pool`), zero the plain (upstream) one;
    the reference's `mae_vit_*_dec512d8b` aliases pick their `mae_vit_*` / `umae_vit_*`. Other
    names are used as given. `None` overrides are dropped, as are decoder overrides for SimMIM,
    whose decoder is one linear layer (with a warning). The term's overrides (`reg`,
    `uniformity_mu`, `centering`) go to the uniformity-enhanced class only: with lambda 0 there
    is no term to set."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    term = {k: overrides.pop(k) for k in ("reg", "uniformity_mu", "centering") if k in overrides}
    parsed = _parsed(name)
    if parsed is None or not parsed.is_pretrain:
        return name, overrides
    if parsed.family == "simmim":
        ignored = [k for k in overrides if k.startswith("decoder_")]
        if ignored:
            log.warning("SimMIM has a one-layer linear decoder: ignoring %s", ", ".join(ignored))
        overrides = {k: v for k, v in overrides.items() if k not in ignored}
    if lambda_unif > 0:
        return (pretrain_name(parsed.family, True, parsed.arch),
                dict(overrides, lambda_unif=float(lambda_unif), unif_pool=unif_pool, **term))
    return pretrain_name(parsed.family, False, parsed.arch), overrides


def build_pretrain_model(name: str, *, lambda_unif: float, unif_pool: str = "mean", **overrides: Any) -> nn.Module:
    """The pre-training model `pretrain_factory` names, freshly initialised."""
    factory, kwargs = pretrain_factory(name, lambda_unif=lambda_unif, unif_pool=unif_pool, **overrides)
    return create_model(factory, **kwargs)


def model_overrides(args: Any) -> dict[str, Any]:
    """Constructor keywords a pre-training command line gives (None: the factory's default). `--reg`
    takes the U-MAE reference's `spectral` / `entropy` as `square`; `none` sets no term."""
    reg = getattr(args, "reg", None)
    return dict(
        img_size=args.input_size,
        embed_dim=getattr(args, "embed_dim", None),
        depth=getattr(args, "depth", None),
        num_heads=getattr(args, "num_heads", None),
        patch_size=args.patch_size,
        norm_pix_loss=args.norm_pix_loss,
        decoder_embed_dim=args.decoder_embed_dim,
        decoder_depth=args.decoder_depth,
        decoder_num_heads=args.decoder_num_heads,
        reg=None if reg in (None, "none") else models_umae.REG_ALIASES.get(reg, reg),
        uniformity_mu=getattr(args, "uniformity_mu", None),
        centering=getattr(args, "centering", None),
    )


def resolved_kwargs(model: nn.Module) -> dict[str, Any]:
    """The shape-deciding constructor keywords of a built ViT, pre-training model or classifier, as
    it was built (the factory's defaults filled in): geometry, encoder, decoder, loss settings."""
    kwargs: dict[str, Any] = dict(img_size=int(model.patch_embed.img_size[0]),
                                  patch_size=int(model.patch_embed.patch_size[0]),
                                  embed_dim=int(model.embed_dim), depth=len(model.blocks),
                                  num_heads=int(model.blocks[0].attn.num_heads))
    if hasattr(model, "decoder_blocks"):
        kwargs.update(decoder_embed_dim=int(model.decoder_embed.out_features), decoder_depth=len(model.decoder_blocks),
                      decoder_num_heads=int(model.decoder_blocks[0].attn.num_heads))
    if hasattr(model, "norm_pix_loss"):
        kwargs["norm_pix_loss"] = bool(model.norm_pix_loss)
    if hasattr(model, "lambda_unif"):
        kwargs.update(lambda_unif=float(model.lambda_unif), unif_pool=str(model.feature_pool))
    if hasattr(model, "reg"):  # the uniformity family's term (old records without it mean "square")
        kwargs.update(reg=str(model.reg), uniformity_mu=float(model.uniformity_mu), centering=bool(model.centering))
    return kwargs
