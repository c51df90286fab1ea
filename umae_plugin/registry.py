"""Model names -> factories, for scripts and tools that build models from a `--model` string."""
from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple

import torch.nn as nn

from . import models_mae, models_simmim, models_umae, models_vit

_FACTORIES: dict[str, Callable[..., nn.Module]] = {}


def register(name: str, factory: Callable[..., nn.Module]) -> None:
    _FACTORIES[name] = factory


for _module, _prefix in ((models_mae, "mae_vit_"), (models_umae, "umae_vit_"), (models_vit, "vit_")):
    for _name in dir(_module):
        if _name.startswith(_prefix):
            register(_name, getattr(_module, _name))
for _name, _factory in models_simmim.FACTORIES.items():
    register(_name, _factory)


def list_models(prefix: str = "") -> list[str]:
    return sorted(n for n in _FACTORIES if n.startswith(prefix))


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model registered as `name`; keyword arguments override the factory's defaults."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}") from None
    return factory(**kwargs)


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
