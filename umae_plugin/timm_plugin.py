"""How the package's models plug into timm. Every factory (`mae_vit_base_patch16`, `vit_base_patch16`,
...) is a named function registered with timm's own `register_model` under its name, takes timm's
keyword protocol (`pretrained`, `pretrained_cfg`, `pretrained_cfg_overlay`, `cache_dir`, then the
model's keywords) and returns a model carrying a `pretrained_cfg` (input size, mean, std, crop), so
once `umae_plugin` is imported `timm.create_model(name, ...)`, `timm.list_models("umae_*")` and
`timm.data.resolve_model_data_config(model)` work.

Nothing is downloaded: `pretrained=True` loads the file or folder named by
`pretrained_cfg_overlay=dict(file=PATH)` (any source `checkpoint.load_pretrained` reads: MAE, U-MAE,
timm and HF transformers ViTMAE checkpoints), and without one raises a one-line `UsageError`.
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Callable, Iterable, Mapping

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, get_pretrained_cfg, is_model, model_entrypoint, resolve_pretrained_cfg
from timm.models import register_model as timm_register_model

from .errors import UsageError

PLUGIN_ATTR = "umae_plugin"  # set on the entry points this package registered: `registry.list_models` lists those

# The MAE reference's evaluation transform (resize 256, centre crop 224, bicubic) and ImageNet statistics.
MIM_CFG: dict[str, Any] = dict(
    input_size=(3, 224, 224), fixed_input_size=True, interpolation="bicubic", crop_pct=224 / 256,
    mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv="patch_embed.proj", num_classes=0,
    classifier=None, paper_ids="arXiv:2111.06377",
)
CLASSIFIER_CFG: dict[str, Any] = dict(MIM_CFG, num_classes=1000, classifier="head")


def cfgs_for(names: Iterable[str], classifier: bool = False) -> dict[str, Any]:
    """A model module's `default_cfgs` (timm reads it when it registers the module's factories):
    the classifier's or the pre-training models' configuration for each of `names`, without weights."""
    cfg = CLASSIFIER_CFG if classifier else MIM_CFG
    return generate_default_cfgs({name: dict(cfg) for name in names})


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """timm's `register_model`, marking `fn` as this package's. Registering the same definition again
    (same module and qualified name: a module reload, `registry.register` called twice) replaces it
    without timm's overwrite warning; another function of an existing name still warns."""
    setattr(fn, PLUGIN_ATTR, True)
    name = fn.__name__
    with warnings.catch_warnings():
        if is_model(name) and _same_definition(model_entrypoint(name), fn):
            warnings.filterwarnings("ignore", message=rf"Overwriting {re.escape(name)} in registry")
        return timm_register_model(fn)


def _same_definition(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    return (getattr(a, "__module__", None), getattr(a, "__qualname__", None)) == (b.__module__, b.__qualname__)


def is_ours(name: str) -> bool:
    """Whether timm's entry point `name` was registered by this package."""
    return is_model(name) and bool(getattr(model_entrypoint(name), PLUGIN_ATTR, False))


def build_model(
    cls: Callable[..., nn.Module],
    variant: str,
    defaults: Mapping[str, Any],
    *,
    pretrained: bool = False,
    pretrained_cfg: Any = None,
    pretrained_cfg_overlay: Mapping[str, Any] | None = None,
    cache_dir: Any = None,
    pretrained_model_args: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """`cls(**defaults, **kwargs)` as the factory `variant` builds it for timm: with the resolved
    `pretrained_cfg` (timm's `resolve_pretrained_cfg`: the registered one, or `pretrained_cfg`,
    then `pretrained_cfg_overlay`) describing the model as built (its input size and class count:
    the keywords decide the model, the configuration describes it), and with `pretrained` the
    weights of the configuration's `file` / `state_dict`. `cache_dir` and `pretrained_model_args`
    (what timm also passes) are accepted and unused: nothing is downloaded, and the constructor
    keywords arrive in `kwargs`."""
    model = cls(**{**defaults, **kwargs})
    if not pretrained_cfg and get_pretrained_cfg(variant) is None:  # a name given to registry.register
        pretrained_cfg = dict(CLASSIFIER_CFG if hasattr(model, "head") else MIM_CFG)
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg, pretrained_cfg_overlay).to_dict()
    source = cfg.pop("state_dict", None) or cfg.get("file")
    cfg.update(input_size=(int(model.patch_embed.proj.in_channels), *map(int, model.patch_embed.img_size)),
               num_classes=int(getattr(model, "num_classes", 0)))
    model.pretrained_cfg = model.default_cfg = cfg
    if pretrained:
        if source is None:
            remote = cfg.get("hf_hub_id") or cfg.get("url")
            raise UsageError(f"{variant}: pretrained=True needs local weights, and nothing is downloaded"
                             f"{f' (not {remote})' if remote else ''}: pass pretrained_cfg_overlay=dict(file=PATH) "
                             "with a checkpoint file or a timm / HF transformers folder")
        from .checkpoint import load_pretrained  # checkpoint builds models through the registry: imported here

        where = source if isinstance(source, str) else "<state dict>"
        load_pretrained(model, source, origin=f"{variant} pretrained_cfg file {where}")
    return model
