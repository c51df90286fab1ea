"""Model names -> factories, for scripts and tools that build models from a `--model` string."""
from __future__ import annotations

from typing import Any, Callable

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
