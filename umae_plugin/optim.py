"""Parameter groups, the learning-rate schedule and LARS, following the MAE recipes.

Pre-training: AdamW over `param_groups_weight_decay`. Fine-tuning: AdamW over
`param_groups_layer_decay`. Linear probing: `build_lars`. Every epoch (fractionally, per
iteration) `adjust_learning_rate` sets each group's lr to the schedule times its `lr_scale`.
"""
from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from types import SimpleNamespace
from typing import Any

import timm.optim
import torch
import torch.nn as nn

# The MAE reference's layer ids (`util/lr_decay.get_layer_id_for_vit`) as a timm group matcher:
# embeddings and tokens first (0), then `blocks.i` (i + 1); names it leaves unmatched (the final
# `norm` / `fc_norm`, the head, a decoder) come after the blocks, at lr scale 1.
MAE_LAYER_MATCHER = {
    "stem": r"^(?:cls_token|mask_token|reg_token|register_tokens|pos_embed)$|^patch_embed\.",
    "blocks": r"^blocks\.(\d+)\.",
}


def param_groups_weight_decay(
    model: nn.Module, weight_decay: float, skip: Collection[str] = ()
) -> list[dict[str, Any]]:
    """`[no decay, decay]`: `timm.optim.param_groups_weight_decay`'s split (no decay on 1-D
    parameters, biases and names matching `skip`; frozen parameters left out), always as these two
    groups, as the MAE reference's `add_weight_decay`.

    timm merges them into one group when `weight_decay` is 0 and drops empty ones: the optimizer's
    groups would then depend on the value, and checkpoints of such runs would not resume. With the
    default empty `skip` the class and mask tokens ([1, 1, D]) are decayed, as in the MAE
    pre-training recipe.
    """
    split = timm.optim.param_groups_weight_decay(model, 1.0, no_weight_decay_list=skip)  # 1.0: decayed
    params = {group["weight_decay"]: group["params"] for group in split}
    return [
        {"params": params.get(0.0, []), "weight_decay": 0.0},
        {"params": params.get(1.0, []), "weight_decay": weight_decay},
    ]


def param_groups_layer_decay(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float,
    no_weight_decay_list: Collection[str] = (),
) -> list[dict[str, Any]]:
    """Layer-wise lr decay groups: `timm.optim.param_groups_layer_decay` with the MAE reference's
    layers (`MAE_LAYER_MATCHER`): the parameters of layer `i` get `lr_scale = layer_decay ** (L - i)`,
    `L = len(model.blocks) + 1`; no weight decay on 1-D parameters and on names matching
    `no_weight_decay_list`. Frozen parameters are left out. Groups come in the order their first
    parameter has in `model.named_parameters()`, keys `params`, `weight_decay`, `lr_scale`.

    The model's own `group_matcher` (timm's ViT puts the final `norm` in the last block's layer,
    scale `layer_decay`; the MAE reference gives it 1) is bypassed through a view of the model that
    answers with ours. timm numbers the layers it finds densely, so the rule equals the reference's
    for models with parameters before, in and after their blocks (every ViT and MAE here).
    """
    view = SimpleNamespace(named_parameters=model.named_parameters,
                           group_matcher=lambda coarse=False: MAE_LAYER_MATCHER)
    return timm.optim.param_groups_layer_decay(view, weight_decay=weight_decay, layer_decay=layer_decay,
                                               no_weight_decay_list=no_weight_decay_list)


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
    Hand-written as the reference's `lr_sched.adjust_learning_rate`, for its arithmetic at fractional
    epochs (timm's `CosineLRScheduler` steps per epoch or update and warms up as `init + t * step`).
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
