import math

import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay as timm_param_groups_layer_decay

from umae_plugin.models_vit import VisionTransformerClassifier
from umae_plugin.optim import (
    LARS,
    adjust_learning_rate,
    build_lars,
    param_groups_layer_decay,
    param_groups_weight_decay,
    resolve_lr,
)


def names_of(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def tiny_vit(**kwargs):
    return VisionTransformerClassifier(img_size=32, patch_size=16, embed_dim=16, depth=2, num_heads=2,
                                       num_classes=3, **kwargs)


# ---------------------------------------------------------------------------------------------
# schedule


def sgd(*lr_scales):
    params = [nn.Parameter(torch.zeros(1)) for _ in lr_scales]
    groups = [{"params": [p]} if s is None else {"params": [p], "lr_scale": s} for p, s in zip(params, lr_scales)]
    return torch.optim.SGD(groups, lr=123.0)


@pytest.mark.parametrize("epoch, expected", [
    (0.0, 0.0),          # start of warm-up
    (2.5, 0.5),          # half-way through warm-up: lr / 2
    (5.0, 1.0),          # end of warm-up: lr
    (27.5, 0.55),        # cosine midpoint: (lr + min_lr) / 2
    (50.0, 0.1),         # end: min_lr
])
def test_schedule_closed_form(epoch, expected):
    opt = sgd(None, 0.25)
    value = adjust_learning_rate(opt, epoch, lr=1.0, min_lr=0.1, warmup_epochs=5, epochs=50)
    assert value == pytest.approx(expected, abs=1e-12)
    assert opt.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.25 * expected, abs=1e-12)


def test_schedule_quarter_of_cosine():
    opt = sgd(None)
    value = adjust_learning_rate(opt, 16.25, lr=1.0, min_lr=0.0, warmup_epochs=5, epochs=50)
    assert value == pytest.approx(0.5 * (1 + math.sqrt(0.5)))  # cos(pi / 4)


def test_schedule_no_warmup():
    opt = sgd(None)
    assert adjust_learning_rate(opt, 0.0, lr=2.0, min_lr=0.0, warmup_epochs=0, epochs=10) == pytest.approx(2.0)


def test_resolve_lr():
    assert resolve_lr(None, 1.5e-4, 64, 4, 8) == pytest.approx(1.5e-4 * 2048 / 256)
    assert resolve_lr(3e-3, 1.5e-4, 64, 4, 8) == 3e-3


# ---------------------------------------------------------------------------------------------
# weight decay groups


def test_weight_decay_groups_exclude_1d_bias_skip_and_frozen():
    model = nn.Module()
    model.linear = nn.Linear(4, 3)
    model.norm = nn.LayerNorm(3)
    model.token = nn.Parameter(torch.zeros(1, 1, 3))
    model.pos = nn.Parameter(torch.zeros(1, 5, 3))
    model.frozen = nn.Linear(3, 3)
    model.frozen.requires_grad_(False)
    model.conv_bias_2d = nn.Parameter(torch.zeros(2, 2))  # not 1-D, but named like no bias

    no_decay, decay = param_groups_weight_decay(model, 0.05, skip={"pos"})
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    assert names_of(model, no_decay) == {"linear.bias", "norm.weight", "norm.bias", "pos"}
    assert names_of(model, decay) == {"linear.weight", "token", "conv_bias_2d"}


def test_weight_decay_groups_decay_tokens_by_default(tiny_kwargs):
    from umae_plugin.models_mae import MaskedAutoencoderViT

    model = MaskedAutoencoderViT(**tiny_kwargs)
    no_decay, decay = param_groups_weight_decay(model, 0.05)
    assert {"cls_token", "mask_token"} <= names_of(model, decay)
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(no_decay["params"]) + len(decay["params"]) == sum(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("arch", ["timm_vit", "vit", "mae"])
def test_weight_decay_groups_are_timms_and_always_two(arch, tiny_kwargs):
    from timm.optim import param_groups_weight_decay as timm_param_groups_weight_decay

    from umae_plugin.models_mae import MaskedAutoencoderViT

    model = {"timm_vit": lambda: VisionTransformer(img_size=32, patch_size=16, embed_dim=16, depth=2, num_heads=2),
             "vit": lambda: tiny_vit(global_pool=True),
             "mae": lambda: MaskedAutoencoderViT(**tiny_kwargs)}[arch]()

    def split(groups):
        return [(g["weight_decay"], [id(p) for p in g["params"]]) for g in groups]

    for skip in ((), {"pos_embed", "cls_token"}):
        theirs = timm_param_groups_weight_decay(model, 0.05, no_weight_decay_list=skip)
        assert split(param_groups_weight_decay(model, 0.05, skip)) == split(theirs)
    # weight decay 0: timm returns one group; ours keep the two (resuming needs the same groups)
    assert len(timm_param_groups_weight_decay(model, 0.0)) == 1
    zero, some = param_groups_weight_decay(model, 0.0), param_groups_weight_decay(model, 0.05)
    assert split(zero) == [(0.0, ids) for _, ids in split(some)]


# ---------------------------------------------------------------------------------------------
# layer decay


def scales_by_name(model, groups):
    out = {}
    for g in groups:
        for n in names_of(model, g):
            out[n] = (g["lr_scale"], g["weight_decay"])
    return out


@pytest.mark.parametrize("global_pool", [False, True])
def test_layer_decay_tiny_vit(global_pool):
    ld, wd = 0.5, 0.05
    model = tiny_vit(global_pool=global_pool)
    groups = param_groups_layer_decay(model, wd, ld, no_weight_decay_list={"pos_embed", "cls_token"})
    got = scales_by_name(model, groups)
    assert set(got) == {n for n, _ in model.named_parameters()}
    for name, param in model.named_parameters():
        if name.split(".")[0] in ("cls_token", "pos_embed", "patch_embed"):
            scale = ld ** 3
        elif name.startswith("blocks.0."):
            scale = ld ** 2
        elif name.startswith("blocks.1."):
            scale = ld ** 1
        else:
            assert name.split(".")[0] in ("norm", "fc_norm", "head")
            scale = 1.0
        decays = param.ndim > 1 and name not in ("pos_embed", "cls_token")
        assert got[name] == (pytest.approx(scale), wd if decays else 0.0), name
    assert len(groups) == len({(s, d) for s, d in got.values()})
    assert all(set(g) == {"params", "lr_scale", "weight_decay"} for g in groups)


@pytest.mark.parametrize("global_pool", [False, True])
def test_layer_decay_agrees_with_timm_on_vit(global_pool):
    model = VisionTransformer(img_size=32, patch_size=16, embed_dim=16, depth=3, num_heads=2, num_classes=3,
                              global_pool="avg" if global_pool else "token", fc_norm=global_pool)
    ours = scales_by_name(model, param_groups_layer_decay(model, 0.05, 0.65))
    timm = scales_by_name(model, timm_param_groups_layer_decay(model, 0.05, layer_decay=0.65))
    assert ours.keys() == timm.keys()
    for name in ours:
        if name.startswith("norm."):  # timm groups the final norm with the last block, MAE after it
            assert ours[name] == (1.0, timm[name][1]) and timm[name][0] == pytest.approx(0.65)
        else:
            assert ours[name] == pytest.approx(timm[name]), name


def test_layer_decay_mae_tokens_and_frozen(tiny_kwargs):
    from umae_plugin.models_mae import MaskedAutoencoderViT

    model = MaskedAutoencoderViT(**tiny_kwargs)
    model.decoder_pred.requires_grad_(False)
    got = scales_by_name(model, param_groups_layer_decay(model, 0.05, 0.5))
    assert got["mask_token"][0] == pytest.approx(0.5 ** 3)
    assert got["decoder_embed.weight"][0] == 1.0
    assert not any(n.startswith("decoder_pred") for n in got)


def reference_param_groups_lrd(model, weight_decay, no_weight_decay_list, layer_decay):
    """The MAE reference's `util/lr_decay.param_groups_lrd` (with `get_layer_id_for_vit`), written
    out independently: groups in order of first appearance, as its fine-tune checkpoints hold them."""
    num_layers = len(model.blocks) + 1

    def layer(name):
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
            return 0
        if name.startswith("blocks"):
            return int(name.split(".")[1]) + 1
        return num_layers

    groups = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim == 1 or n in no_weight_decay_list)
        group = groups.setdefault(f"layer_{layer(n)}_{decay}", {
            "lr_scale": layer_decay ** (num_layers - layer(n)), "weight_decay": weight_decay if decay else 0.0,
            "params": []})
        group["params"].append(p)
    return list(groups.values())


def assert_same_groups(ours, expected):
    """Same groups in the same order, same parameters in the same order, same settings."""
    assert len(ours) == len(expected)
    for a, b in zip(ours, expected):
        assert set(a) == set(b) == {"params", "lr_scale", "weight_decay"}
        assert (a["lr_scale"], a["weight_decay"]) == (b["lr_scale"], b["weight_decay"])
        assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]


@pytest.mark.parametrize("global_pool", [False, True])
@pytest.mark.parametrize("freeze", [False, True])
def test_layer_decay_groups_equal_the_mae_reference_in_order(global_pool, freeze):
    """Group order matters: fine-tune checkpoints hold the optimizer state per group."""
    model = VisionTransformerClassifier(img_size=32, patch_size=16, embed_dim=16, depth=4, num_heads=2,
                                        num_classes=3, global_pool=global_pool)
    if freeze:
        model.blocks[1].requires_grad_(False)
    for ld in (0.75, 0.65):
        ours = param_groups_layer_decay(model, 0.05, ld, no_weight_decay_list=model.no_weight_decay())
        assert_same_groups(ours, reference_param_groups_lrd(model, 0.05, model.no_weight_decay(), ld))


# ---------------------------------------------------------------------------------------------
# LARS


def reference_lars(params, grads, mus, lr, wd, momentum, trust):
    """The linear-probe LARS step, written out independently for the comparison."""
    new_params, new_mus = [], []
    for p, g, mu in zip(params, grads, mus):
        if p.ndim > 1:
            dp = g + wd * p
            pn, dn = p.norm().item(), dp.norm().item()
            q = (trust * pn / dn if dn > 0 else 1.0) if pn > 0 else 1.0
            dp = dp * q
        else:
            dp = g
        mu = momentum * mu + dp
        new_params.append(p - lr * mu)
        new_mus.append(mu)
    return new_params, new_mus


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_lars_matches_reference_step(wd):
    torch.manual_seed(0)
    lr, momentum, trust = 0.3, 0.9, 0.001
    head = nn.Linear(6, 4).double()
    zero = nn.Parameter(torch.zeros(2, 3, dtype=torch.double))  # ||p|| = 0: trust ratio 1
    params = [head.weight, head.bias, zero]
    opt = build_lars(params, lr=lr, weight_decay=wd, momentum=momentum, trust_coefficient=trust)

    expected = [p.detach().clone() for p in params]
    mus = [torch.zeros_like(p) for p in params]
    for _ in range(2):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        expected, mus = reference_lars(expected, grads, mus, lr, wd, momentum, trust)
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)


def test_lars_zero_grad_keeps_trust_ratio_one():
    p = nn.Parameter(torch.ones(2, 2))
    opt = build_lars([p], lr=1.0, weight_decay=0.0, momentum=0.0)
    p.grad = torch.zeros(2, 2)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.ones(2, 2))


def test_lars_groups_and_schedule():
    head = nn.Linear(5, 2)
    opt = build_lars(head.parameters(), lr=0.1, weight_decay=0.01)
    assert isinstance(opt, LARS)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    adjust_learning_rate(opt, 1.0, lr=0.2, min_lr=0.0, warmup_epochs=2, epochs=10)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.1)] * 2


def test_lars_agrees_with_timm_without_weight_decay():
    """Second computation: with wd = 0 and eps = 0 timm's Lars (adapting 2-D only) takes the same step."""
    from timm.optim import Lars

    torch.manual_seed(1)
    a, b = nn.Linear(7, 3).double(), nn.Linear(7, 3).double()
    b.load_state_dict(a.state_dict())
    ours = build_lars(a.parameters(), lr=0.5, weight_decay=0.0)
    theirs = Lars([{"params": [b.weight], "always_adapt": True}, {"params": [b.bias], "always_adapt": False}],
                  lr=0.5, momentum=0.9, trust_coeff=0.001, eps=0.0)
    for _ in range(3):
        x = torch.randn(4, 7, dtype=torch.double)
        for m, opt in ((a, ours), (b, theirs)):
            opt.zero_grad()
            m(x).square().sum().backward()
            opt.step()
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.bias, b.bias, rtol=1e-12, atol=1e-12)
