import json
import re
from functools import partial

import pytest
import torch
import torch.nn as nn
from timm.models import vision_transformer as timm_vit

from umae_plugin import models_vit
from umae_plugin.models_vit import VisionTransformerClassifier
from umae_plugin.registry import create_model

from conftest import DATA

SPEC = json.loads((DATA / "official_state_dict_shapes.json").read_text())


@pytest.mark.parametrize("arch", ["base_patch16", "large_patch16", "huge_patch14"])
@pytest.mark.parametrize("pool", ["global_pool", "cls_token"])
def test_state_dict_matches_reference_classifier(arch, pool):
    with torch.device("meta"):
        model = create_model(f"vit_{arch}", num_classes=1000, global_pool=pool == "global_pool")
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == SPEC[f"vit_{arch}_{pool}"]


@pytest.mark.parametrize("case", ["vit_global_pool", "vit_cls_token"])
def test_reproduces_reference_classifier(reference_cases, case):
    c = reference_cases[case]
    model = VisionTransformerClassifier(qkv_bias=True, **c["config"]).eval()
    model.load_state_dict(c["state_dict"], strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(c["imgs"]), c["features"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(c["imgs"]), c["logits"], rtol=1e-5, atol=1e-5)


def test_small_factories():
    assert create_model("vit_tiny_patch16", img_size=32, patch_size=4).embed_dim == 192
    assert create_model("vit_small_patch16").embed_dim == 384
    with pytest.raises(ValueError, match="unknown model"):
        create_model("vit_gigantic")


# ---------------------------------------------------------------------------------------------
# `models_vit.VisionTransformer` is the reference's constructor (global_pool: bool)


def _reference_call(global_pool, **kw):
    """The MAE reference's classifier construction, through our module's `VisionTransformer`."""
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    cfg.update(kw)
    return models_vit.VisionTransformer(global_pool=global_pool, mlp_ratio=4, qkv_bias=True,
                                        norm_layer=partial(nn.LayerNorm, eps=1e-6), **cfg)


def _perturb_norms(model):
    """LayerNorms start as the identity affine map; make them distinguishable."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            with torch.no_grad():
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))
    return model


def _tokens(model, imgs):
    x = model._pos_embed(model.patch_embed(imgs))  # prepends the class token, adds pos_embed
    for blk in model.blocks:
        x = blk(x)
    return x


def test_vision_transformer_is_the_classifier_and_a_timm_vit():
    assert models_vit.VisionTransformerClassifier is models_vit.VisionTransformer
    assert issubclass(models_vit.VisionTransformer, timm_vit.VisionTransformer)
    assert models_vit.VisionTransformer is not timm_vit.VisionTransformer


def test_reference_call_global_pool_true_averages_patch_tokens_then_fc_norm():
    torch.manual_seed(0)
    model = _perturb_norms(_reference_call(True)).eval()
    assert isinstance(model.norm, nn.Identity)
    assert isinstance(model.fc_norm, nn.LayerNorm) and model.fc_norm.eps == 1e-6
    imgs = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expect = model.fc_norm(_tokens(model, imgs)[:, 1:, :].mean(dim=1))  # class token excluded
        feats = model.forward_features(imgs)
        torch.testing.assert_close(feats, expect)
        assert feats.shape == (3, 32)
        torch.testing.assert_close(model(imgs), model.head(expect))
        # not the mean including the class token
        assert not torch.allclose(feats, model.fc_norm(_tokens(model, imgs).mean(dim=1)), atol=1e-4)


def test_reference_call_global_pool_false_takes_class_token_after_norm():
    torch.manual_seed(0)
    model = _perturb_norms(_reference_call(False)).eval()
    assert isinstance(model.norm, nn.LayerNorm) and model.norm.eps == 1e-6
    assert isinstance(model.fc_norm, nn.Identity)
    imgs = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expect = model.norm(_tokens(model, imgs))[:, 0]
        feats = model.forward_features(imgs)
        torch.testing.assert_close(feats, expect)
        assert feats.shape == (3, 32)
        torch.testing.assert_close(model(imgs), model.head(expect))


@pytest.mark.parametrize("name, flag", [("avg", True), ("token", False)])
def test_timm_pool_names_equal_the_bools(name, flag):
    torch.manual_seed(0)
    by_name = _reference_call(name)
    torch.manual_seed(0)
    by_flag = _reference_call(flag)
    assert by_name.global_pool_enabled is flag
    assert type(by_name.norm) is type(by_flag.norm) and type(by_name.fc_norm) is type(by_flag.fc_norm)
    assert by_name.state_dict().keys() == by_flag.state_dict().keys()
    by_name.load_state_dict(by_flag.state_dict())
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(by_name.eval().forward_features(imgs), by_flag.eval().forward_features(imgs))


@pytest.mark.parametrize("bad", ["max", "avgmax", "", "map", "global_pool", None, 1])
def test_other_pool_values_raise_naming_the_value(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        _reference_call(bad)


def test_classifier_alias_no_longer_reads_any_string_as_average_pooling():
    with pytest.raises(ValueError, match="'max'"):
        VisionTransformerClassifier(global_pool="max", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    assert VisionTransformerClassifier(global_pool="token", img_size=32, patch_size=8, embed_dim=32, depth=1,
                                       num_heads=2).global_pool_enabled is False
