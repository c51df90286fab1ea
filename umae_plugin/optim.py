"""Parameter groups, the learning-rate schedule and LARS, following the MAE recipes.

Pre-training: AdamW over `param_groups_weight_decay`. Fine-tuning: AdamW over
`param_groups_layer_decay`. Linear probing: `build_lars`. Every epoch (fractionally, per
iteration) `adjust_learning_rate` sets each group's lr to the schedule times its `lr_scale`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable
from typing import Any

import torch
import torch.nn as nn

_STEM = ("cls_token", "mask_token", "reg_token", "register_tokens", "pos_embed")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _no_decay(name: str, param: torch.Tensor, skip: Collection[str]) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or name in skip


def param_groups_weight_decay(
    model: nn.Module, weight_decay: float, skip: Collection[str] = ()
) -> list[dict[str, Any]]:
    """Two groups: `weight_decay` for weights, none for 1-D parameters, biases and names in `skip`.

    Frozen parameters are left out. With the default empty `skip` the class and mask tokens
    ([1, 1, D]) are decayed, as in the MAE pre-training recipe.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if _no_decay(name, param, skip) else decay).append(param)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def layer_id(name: str, num_layers: int) -> int:
    """Depth of parameter `name` for layer-wise lr decay: 0 for the embeddings and tokens,
    i + 1 for `blocks.i`, `num_layers` for everything after the blocks (norms, head)."""
    if name in _STEM or name.startswith("patch_embed."):
        return 0
    match = _BLOCK.match(name)
    if match:
        return int(match.group(1)) + 1
    return num_layers


def param_groups_layer_decay(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float,
    no_weight_decay_list: Collection[str] = (),
    num_layers: int | None = None,
) -> list[dict[str, Any]]:
    """Layer-wise lr decay groups: parameter of layer `i` gets `lr_scale = layer_decay ** (L - i)`
    with `L = len(model.blocks) + 1` (see `layer_id`); no weight decay on 1-D parameters and on
    names in `no_weight_decay_list` (exact names). Frozen parameters are left out.

    Written here rather than on `timm.optim.param_groups_layer_decay`, whose layers differ from
    the MAE rule: on timm's `VisionTransformer` its `group_matcher` puts the final `norm` in the
    last block's layer (scale `layer_decay`, MAE: 1); models without a `group_matcher` (such as
    `MaskedAutoencoderViT`) get a heuristic grouping; `mask_token` is not an embedding there; and
    its no-decay list matches by wildcard. Everything else agrees, which the tests check.
    """
    if num_layers is None:
        num_layers = len(model.blocks) + 1
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim <= 1 or name in no_weight_decay_list)
        lid = layer_id(name, num_layers)
        group = groups.setdefault((lid, decay), {
            "params": [],
            "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (num_layers - lid),
        })
        group["params"].append(param)
    return list(groups.values())


def adjust_learning_rate(
    optimizer: torch.optim.Optimizer,
    epoch_float: float,
    *,
    lr: float,
    min_lr: float,
    warmup_epochs: float,
    epochs: int,
) -> float:
    """Linear warm-up to `lr`, then a half-cycle cosine down to `min_lr` at `epochs`.

    Sets every group's lr to the value times its `lr_scale` (default 1) and returns the value.
    """
    if epoch_float < warmup_epochs:
        value = lr * epoch_float / warmup_epochs
    else:
        progress = (epoch_float - warmup_epochs) / (epochs - warmup_epochs)
        value = min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    for group in optimizer.param_groups:
        group["lr"] = value * group.get("lr_scale", 1.0)
    return value


def resolve_lr(lr: float | None, blr: float, batch_size: int, accum_iter: int, world_size: int) -> float:
    """`lr` if given, else the base lr scaled linearly with the effective batch size / 256."""
    if lr is not None:
        return lr
    return blr * batch_size * accum_iter * world_size / 256


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling, as used for MAE linear probing.

    For parameters with more than one dimension: `d = g + wd * p`, scaled by
    `trust_coefficient * ||p|| / ||d||` (1 when either norm is 0), then `mu = momentum * mu + d`,
    `p -= lr * mu`. 1-D parameters (biases, BatchNorm) skip both weight decay and the scaling.

    Not `timm.optim.Lars`: although it can switch adaptation per group (`always_adapt` with
    weight decay 0), its trust ratio is `||p|| / (||g|| + wd * ||p|| + eps)` instead of
    `||p|| / ||g + wd * p||`, a different step whenever weight decay is on.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    p_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    one = torch.ones_like(p_norm)
                    ratio = torch.where(d_norm > 0, group["trust_coefficient"] * p_norm / d_norm, one)
                    d = d.mul(torch.where(p_norm > 0, ratio, one))
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(d)
                p.add_(mu, alpha=-group["lr"])
        return loss


def build_lars(
    params: Iterable[torch.Tensor],
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    trust_coefficient: float = 0.001,
) -> LARS:
    """LARS over `params` (e.g. `model.head.parameters()`), two groups: ndim > 1 and 1-D.

    The 1-D group gets `weight_decay = 0` in its dict too, so that group-level reports are honest;
    the optimizer skips decay and scaling on 1-D tensors regardless.
    """
    params = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return LARS(groups, lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
