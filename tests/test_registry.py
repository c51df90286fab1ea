"""The one model-name parser (`registry.parse_model_name`) and everything that reads names through it."""
import re
import subprocess
from pathlib import Path

import pytest
import torch

from umae_plugin import classify, models_mae, models_simmim, models_umae
from umae_plugin.registry import build_pretrain_model, default_lambda, default_mask_ratio
from umae_plugin.registry import ModelName, classifier_arch, list_models, parse_model_name, pretrain_name

ROOT = Path(__file__).resolve().parents[1]
ALIASES = ["mae_vit_base_patch16_dec512d8b", "mae_vit_large_patch16_dec512d8b", "mae_vit_huge_patch14_dec512d8b"]
PREFIXES = {"mae_": ("mae", False), "umae_": ("mae", True), "simmim_": ("simmim", False),
            "usimmim_": ("simmim", True), "vit_": ("vit", False)}


def expected(name):
    """(family, uniformity) from the name's prefix, written out independently of the parser."""
    for prefix, fu in sorted(PREFIXES.items(), key=lambda kv: -len(kv[0])):
        if name.startswith(prefix):
            return fu
    raise AssertionError(name)


def test_registry_holds_every_family_and_the_reference_aliases():
    names = set(list_models())
    assert set(models_simmim.FACTORIES) <= names
    assert set(ALIASES) <= names and all(hasattr(models_mae, a) for a in ALIASES)
    for prefix in PREFIXES:  # the round trip below is not vacuous for any family
        assert any(n.startswith(prefix) for n in names), prefix


@pytest.mark.parametrize("name", list_models())
def test_every_registered_name_round_trips(name):
    parsed = parse_model_name(name)
    assert isinstance(parsed, ModelName)
    assert (parsed.family, parsed.uniformity) == expected(name)
    assert parsed.arch.startswith("vit_") and not parsed.arch.endswith("_dec512d8b")
    canonical = name.removesuffix("_dec512d8b")
    assert parsed.name == canonical
    rebuilt = parsed.arch if parsed.family == "vit" else pretrain_name(parsed.family, parsed.uniformity, parsed.arch)
    assert rebuilt == canonical
    assert classifier_arch(name) == parsed.arch


@pytest.mark.parametrize("name", [n for n in list_models() if not n.startswith("vit_")])
def test_every_pretraining_name_has_its_classifier(name):
    """Each registered pre-training model's encoder is a registered `vit_*` classifier, which is
    what main_linprobe.py / main_finetune.py build for `--model name`."""
    arch = parse_model_name(name).arch
    assert arch in list_models("vit_")
    assert classify.classifier_name(name) == arch


def test_classifier_names_the_readme_promises():
    assert classify.classifier_name("simmim_vit_base_patch16") == "vit_base_patch16"
    assert classify.classifier_name("usimmim_vit_large_patch16") == "vit_large_patch16"
    assert classify.classifier_name("mae_vit_base_patch16_dec512d8b") == "vit_base_patch16"
    assert classify.classifier_name("mae_vit_huge_patch14_dec512d8b") == "vit_huge_patch14"
    assert classify.classifier_name("vit_small_patch16") == "vit_small_patch16"
    for bad in ("resnet50", "mae_resnet50", "simmim_vit_base_patch16_dec512d8b", "mae_vit_gigantic_patch14"):
        with pytest.raises(classify.ConfigError, match=f"--model {bad}: no classifier named"):
            classify.classifier_name(bad)


@pytest.mark.parametrize("name", ["", "resnet50", "mae_resnet50", "uvit_base_patch16", "umae_", "mae_vit_",
                                  "mae_vit__base", "xmae_vit_base_patch16", "mae_vit_base_patch16 ",
                                  "simmim_vit_base_patch16_dec512d8b", "vit_base_patch16_dec512d8b",
                                  "mae_vit_dec512d8b", "umae-vit-base-patch16"])
def test_garbage_names_raise_one_line_naming_them(name):
    with pytest.raises(ValueError) as exc:
        parse_model_name(name)
    message = str(exc.value)
    assert repr(name) in message and "\n" not in message


def test_pretrain_name_helper():
    assert pretrain_name("simmim", True, "vit_base_patch16") == "usimmim_vit_base_patch16"
    assert pretrain_name("mae", False, "vit_tiny_patch16") == "mae_vit_tiny_patch16"
    with pytest.raises(ValueError, match="'vit'"):
        pretrain_name("vit", False, "vit_base_patch16")


@pytest.mark.parametrize("name, lam, ratio", [
    ("mae_vit_base_patch16", 0.0, 0.75), ("umae_vit_base_patch16", 0.01, 0.75),
    ("mae_vit_base_patch16_dec512d8b", 0.0, 0.75), ("umae_vit_tiny_patch16", 0.01, 0.75),
    ("simmim_vit_base_patch16", 0.0, 0.6), ("usimmim_vit_base_patch16", 0.01, 0.6),
    ("vit_base_patch16", 0.0, 0.75), ("resnet50", 0.0, 0.75),
])
def test_defaults_follow_the_parsed_name(name, lam, ratio):
    assert default_lambda(name) == lam
    assert default_mask_ratio(name) == ratio


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_dec512d8b_alias_builds_the_reference_mae():
    """The alias names the reference's 512-d, 8-block decoder: the same model as `mae_vit_base_patch16`,
    and a positive lambda builds the U-MAE class of it (the alias has no `umae_` registration)."""
    with torch.device("meta"):
        alias = build_pretrain_model("mae_vit_base_patch16_dec512d8b", lambda_unif=0)
        plain = build_pretrain_model("mae_vit_base_patch16", lambda_unif=0)
        unif = build_pretrain_model("mae_vit_base_patch16_dec512d8b", lambda_unif=0.01)
    assert type(alias) is models_mae.MaskedAutoencoderViT
    assert shapes(alias) == shapes(plain)
    assert alias.decoder_embed.out_features == 512 and len(alias.decoder_blocks) == 8
    assert alias.embed_dim == 768 and len(alias.blocks) == 12
    assert isinstance(unif, models_umae.UMAEViT) and shapes(unif) == shapes(plain)


def test_simmim_names_build_their_family():
    with torch.device("meta"):
        plain = build_pretrain_model("usimmim_vit_tiny_patch16", lambda_unif=0)
        unif = build_pretrain_model("simmim_vit_tiny_patch16", lambda_unif=0.01)
    assert type(plain) is models_simmim.SimMIMViT and type(unif) is models_simmim.USimMIMViT


def test_one_model_name_regex_in_the_package():
    """`grep -rn re.compile umae_plugin`: no model-name pattern outside registry.py."""
    out = subprocess.run(["grep", "-rn", "--include=*.py", "re.compile", "umae_plugin"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    name_like = [line for line in out.splitlines()
                 if re.search(r"mae|simmim|vit", line.split(":", 2)[2]) and not line.startswith("umae_plugin/registry.py:")]
    assert name_like == []
