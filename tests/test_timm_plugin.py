"""`umae_plugin.timm_plugin`: the package's factories in timm's own registry, timm's keyword protocol,
`pretrained_cfg`, and `pretrained=True` from a local file."""
import subprocess
import sys

import pytest
import timm
import torch
from timm.data import resolve_model_data_config
from timm.models import get_pretrained_cfg, model_entrypoint

from umae_plugin import models_mae, models_simmim, models_umae, models_vit, registry, timm_plugin
from umae_plugin.errors import UsageError

MODULES = {"mae_": models_mae, "umae_": models_umae, "simmim_": models_simmim, "usimmim_": models_simmim,
           "vit_": models_vit}
SMALL = dict(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2)
DEC = dict(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
PACKAGE_NAMES = [n for n in registry.list_models() if not n.endswith("_micro")]  # conftest's are registered later


def module_of(name):
    return next(m for prefix, m in sorted(MODULES.items(), key=lambda kv: -len(kv[0])) if name.startswith(prefix))


def test_every_family_is_registered_in_timm():
    expected = {f"{p}_vit_{a}" for p in ("mae", "umae", "simmim", "usimmim") for a in models_mae.ARCHS}
    expected |= {f"vit_{a}" for a in models_mae.ARCHS} | set(models_mae.ALIASES)
    assert expected == set(PACKAGE_NAMES)
    assert set(timm.list_models("umae_*")) - {"umae_vit_micro"} == {f"umae_vit_{a}" for a in models_mae.ARCHS}
    assert set(models_mae.ALIASES) <= set(timm.list_models("mae_vit_*"))
    assert not timm_plugin.is_ours("vit_base_patch16_224") and "vit_base_patch16_224" not in registry.list_models()


@pytest.mark.parametrize("name", PACKAGE_NAMES)
def test_entry_point_is_the_modules_named_function_with_a_cfg(name):
    """timm keys on `__name__`: each entry point is the module's own function of that name (no
    partials or lambdas), and its registered configuration names it."""
    fn = model_entrypoint(name)
    assert fn.__name__ == name and getattr(module_of(name), name) is fn
    cfg = get_pretrained_cfg(name)
    assert cfg.architecture == name and not cfg.has_weights
    assert cfg.num_classes == (1000 if name.startswith("vit_") else 0)


def test_timm_create_model_takes_our_keywords():
    model = timm.create_model("umae_vit_base_patch16", lambda_unif=0.02, **SMALL, **DEC)
    assert isinstance(model, models_umae.UMAEViT) and model.lambda_unif == 0.02
    alias = timm.create_model("mae_vit_base_patch16_dec512d8b", **SMALL, **DEC)
    assert type(alias) is models_mae.MaskedAutoencoderViT
    with torch.device("meta"):
        assert len(timm.create_model("mae_vit_huge_patch14_dec512d8b").decoder_blocks) == 8
    clf = timm.create_model("vit_tiny_patch16", num_classes=5, **SMALL).eval()
    assert clf.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 32)  # the reference's pooled features
    assert clf(torch.randn(2, 3, 32, 32)).shape == (2, 5)


@pytest.mark.parametrize("name", ["mae_vit_tiny_patch16", "usimmim_vit_tiny_patch16", "vit_tiny_patch16", "mae_vit_micro"])
def test_pretrained_cfg_describes_the_model_as_built(name):
    kwargs = dict(img_size=48, patch_size=4) if name != "mae_vit_micro" else dict(img_size=48)
    model = timm.create_model(name, **kwargs)
    data = resolve_model_data_config(model)
    assert data["input_size"] == (3, 48, 48)
    assert data["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and data["std"] == timm.data.IMAGENET_DEFAULT_STD
    assert data["crop_pct"] == 224 / 256 and data["interpolation"] == "bicubic"
    assert model.pretrained_cfg["architecture"] == name
    assert model.pretrained_cfg["num_classes"] == getattr(model, "num_classes", 0)
    assert registry.create_model(name, **kwargs).pretrained_cfg == model.pretrained_cfg


def test_pretrained_without_a_file_is_a_one_line_error():
    with pytest.raises(UsageError, match=r"mae_vit_tiny_patch16: pretrained=True needs local weights.*"
                                         r"pretrained_cfg_overlay=dict\(file=PATH\)") as err:
        timm.create_model("mae_vit_tiny_patch16", pretrained=True, **SMALL, **DEC)
    assert "\n" not in str(err.value)


def test_pretrained_from_a_file_of_any_format(tmp_path):
    torch.manual_seed(0)
    source = registry.create_model("umae_vit_tiny_patch16", **SMALL, **DEC)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": source.state_dict(), "epoch": 3}, path)  # an upstream-style file, no model_args
    model = timm.create_model("mae_vit_tiny_patch16", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **SMALL, **DEC)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
    clf = timm.create_model("vit_tiny_patch16", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                            num_classes=0, global_pool=True, fc_norm=False, **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(clf.forward_features(x), source.eval().forward_features(x), rtol=0, atol=1e-6)


def test_create_model_refuses_names_that_are_not_ours():
    with pytest.raises(ValueError, match="unknown model 'resnet18'"):
        registry.create_model("resnet18")


def test_register_keeps_timms_protocol_and_rejects_bad_names():
    registry.register("mae_vit_registercheck", lambda **kw: models_mae.MaskedAutoencoderViT(**SMALL, **DEC, **kw))
    model = timm.create_model("mae_vit_registercheck", norm_pix_loss=True)
    assert model.norm_pix_loss and model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert "mae_vit_registercheck" in registry.list_models("mae_")
    with pytest.raises(ValueError, match="Python identifier"):
        registry.register("mae.vit", lambda **kw: None)
    with pytest.raises(ValueError, match="taken"):
        registry.register("create_model", lambda **kw: None)


def test_reimport_and_reload_are_quiet_and_a_clash_warns():
    """Reloading the model modules registers the same definitions again without timm's overwrite
    warning (warnings are errors here), and the registry still builds every family; a different
    function under a taken name keeps timm's warning. In a fresh interpreter: a reload replaces
    classes, which other tests' isinstance checks must not see."""
    code = (
        "import importlib, warnings\n"
        "warnings.simplefilter('error')\n"
        "import umae_plugin, umae_plugin.registry as r\n"
        "from umae_plugin import models_mae, models_simmim, models_umae, models_vit, timm_plugin\n"
        "import umae_plugin.registry\n"
        "for m in (models_mae, models_umae, models_vit, models_simmim):\n"
        "    importlib.reload(m)\n"
        "importlib.reload(r)\n"
        "assert len(r.list_models()) == 28, r.list_models()\n"
        "r.create_model('usimmim_vit_tiny_patch16', img_size=32, patch_size=4, depth=1)\n"
        "def mae_vit_tiny_patch16(**kw): pass\n"
        "try:\n"
        "    timm_plugin.register_model(mae_vit_tiny_patch16)\n"
        "except UserWarning as w:\n"
        "    assert 'Overwriting mae_vit_tiny_patch16' in str(w), w\n"
        "else:\n"
        "    raise SystemExit('no warning for a clash')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
