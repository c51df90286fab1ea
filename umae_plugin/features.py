"""The named image features of a ViT encoder, defined once.

Every probe, monitor and table of this package names the feature it reads with one of `FEATURES`,
each a pooling of the encoder's token map (class token first, then the patch tokens):

- `cls`: the class token after the encoder's final norm. The U-MAE reference's uniformity feature
  (`--unif_pool cls`) and what a `--cls_token` classifier reads.
- `mean`: the mean of the patch tokens (class token excluded) after the final norm. This project's
  default uniformity feature (`--unif_pool mean`).
- `gpool`: the reference `--global_pool` classifier's feature: its `fc_norm` (a LayerNorm, eps 1e-6)
  over the mean of the patch tokens *before* the final norm (which that classifier drops). Before
  fine-tuning `fc_norm` is freshly initialised (weight 1, bias 0): a LayerNorm without affine.

A source that has no final norm (a fine-tuned `--global_pool` classifier, whose pre-training norm
was dropped) has no `cls` / `mean`: `available_features` says which can be computed. `TokenTap`
reads the tokens going into and out of an encoder's final norm during any forward pass (the masked
training pass included), so all features come from one pass. Only torch is imported here.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

FEATURES = ("cls", "mean", "gpool")
NORMED = ("cls", "mean")  # computed from the final-normed tokens: unavailable without a final norm
GPOOL_EPS = 1e-6  # the reference classifier's fc_norm (`partial(nn.LayerNorm, eps=1e-6)`)
DESCRIPTIONS = {
    "cls": "class token after the final norm",
    "mean": "mean of the patch tokens after the final norm",
    "gpool": "fc_norm of the mean of the un-normed patch tokens (the --global_pool classifier's)",
}


def check_names(names: Iterable[str]) -> tuple[str, ...]:
    """`names` as a tuple, each one of `FEATURES`, else a one-line `ValueError`."""
    names = tuple(names)
    unknown = [n for n in names if n not in FEATURES]
    if unknown:
        raise ValueError(f"unknown feature {unknown[0]!r}; expected one of {FEATURES}")
    return names


def pool_normed(normed: torch.Tensor, name: str, num_prefix_tokens: int = 1) -> torch.Tensor:
    """`cls` or `mean` of final-normed tokens [B, P + L, D] -> [B, D]."""
    if name == "mean":
        return normed[:, num_prefix_tokens:].mean(dim=1)
    if name == "cls":
        return normed[:, 0]
    raise ValueError(f"unknown feature pool {name!r}; expected one of {NORMED}")


def gpool(tokens: torch.Tensor, fc_norm: nn.Module | None = None, num_prefix_tokens: int = 1) -> torch.Tensor:
    """`gpool` of un-normed tokens [B, P + L, D] -> [B, D]: `fc_norm` (None: a fresh one, i.e. a
    LayerNorm without affine, eps `GPOOL_EPS`) of the patch tokens' mean."""
    pooled = tokens[:, num_prefix_tokens:].mean(dim=1)
    if fc_norm is None:
        return F.layer_norm(pooled, pooled.shape[-1:], eps=GPOOL_EPS)
    return fc_norm(pooled)


def pool_tokens(
    tokens: torch.Tensor,
    normed: torch.Tensor | None,
    names: Iterable[str] = FEATURES,
    *,
    fc_norm: nn.Module | None = None,
    num_prefix_tokens: int = 1,
) -> dict[str, torch.Tensor]:
    """The named features of one pass: `tokens` = the last block's output before the final norm,
    `normed` = the final norm of it (None: no final norm, so `cls` / `mean` are left out)."""
    out = {}
    for name in check_names(names):
        if name == "gpool":
            out[name] = gpool(tokens, fc_norm, num_prefix_tokens)
        elif normed is not None:
            out[name] = pool_normed(normed, name, num_prefix_tokens)
    return out


def available_features(has_final_norm: bool, names: Iterable[str] = FEATURES) -> tuple[str, ...]:
    """The features of `names` a source can give: all with a final norm, else only `gpool`."""
    return tuple(n for n in check_names(names) if has_final_norm or n not in NORMED)


class TokenTap:
    """Forward hook on `norm` (an encoder's final norm, `nn.Identity` for a `--global_pool`
    classifier): keeps the tokens going in and, when `norm` is a real norm, coming out of its last
    call, detached unless `detach=False`. `features(names, fc_norm=..., final_norm=...)` pools the
    last pass (`pool_tokens`); `final_norm` re-applies a norm taken from elsewhere when `norm` is
    an `nn.Identity` (the classifier dropped it). Use as a context manager or call `remove()`."""

    def __init__(self, norm: nn.Module, detach: bool = True) -> None:
        self.detach = detach
        self.identity = isinstance(norm, nn.Identity)
        self._io: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._handle = norm.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        tokens = inputs[0]
        normed = None if self.identity else output
        if self.detach:
            tokens, normed = tokens.detach(), None if normed is None else normed.detach()
        self._io = (tokens, normed)

    def tokens(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tokens before the norm, after it or None) of the last pass; cleared by reading."""
        if self._io is None:
            raise RuntimeError("TokenTap: no forward pass since the last read")
        io, self._io = self._io, None
        return io

    def features(self, names: Iterable[str] = FEATURES, *, fc_norm: nn.Module | None = None,
                 final_norm: nn.Module | None = None, num_prefix_tokens: int = 1) -> dict[str, torch.Tensor]:
        tokens, normed = self.tokens()
        if normed is None and final_norm is not None:
            normed = final_norm(tokens)
        return pool_tokens(tokens, normed, names, fc_norm=fc_norm, num_prefix_tokens=num_prefix_tokens)

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> "TokenTap":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def norm_state(module: nn.Module | None) -> Mapping[str, torch.Tensor] | None:
    """A norm's state dict on the CPU (for checkpoints), or None."""
    return None if module is None else {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
