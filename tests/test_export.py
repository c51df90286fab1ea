"""`umae_plugin.export` to timm's local-dir layout (plain timm rebuilds the encoder), the command line,
and what it refuses. The HF direction is in test_hf.py (it needs transformers)."""
import json

import pytest
import timm
import torch

from umae_plugin import checkpoint as ckpt
from umae_plugin import export, registry, timm_plugin
from umae_plugin.export import export_checkpoint

SMALL = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)
DEC = dict(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def save(tmp_path, model, name, **extra):
    path = tmp_path / "run" / "checkpoint-last.pth"
    path.parent.mkdir(exist_ok=True)
    record = ckpt.model_args(name, registry.resolved_kwargs(model))
    torch.save({"model": model.state_dict(), ckpt.MODEL_ARGS_KEY: record, "args": {"model": name}, **extra}, path)
    return path


def timm_features(folder, x):
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        return model, model.forward_head(model.forward_features(x), pre_logits=True)


@pytest.mark.parametrize("name, pool", [("mae_vit_tiny_patch16", "mean"), ("umae_vit_tiny_patch16", "cls"),
                                        ("simmim_vit_tiny_patch16", "mean")])
def test_timm_local_dir_rebuilds_the_encoder(tmp_path, name, pool):
    torch.manual_seed(0)
    kwargs = dict(SMALL, **({} if name.startswith("simmim") else DEC), **({"unif_pool": pool} if pool == "cls" else {}))
    source = registry.create_model(name, **kwargs).eval()
    out = export_checkpoint(save(tmp_path, source, name), tmp_path / "timm", "timm")
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and not timm_plugin.is_ours(config["architecture"])
    assert config["model_args"]["global_pool"] == ("avg" if pool == "mean" else "token")
    x = torch.randn(3, 3, 32, 32)
    model, features = timm_features(out, x)
    encoder = {k: v for k, v in source.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    assert model.state_dict().keys() == encoder.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in encoder.items())
    with torch.no_grad():
        torch.testing.assert_close(features, source.forward_features(x), rtol=0, atol=1e-6)
    assert timm.data.resolve_model_data_config(model)["input_size"] == (3, 32, 32)
    back = ckpt.load_model(out)  # our loader reads the folder too
    assert all(torch.equal(back.state_dict()[k], v) for k, v in encoder.items())


def test_classifier_heads_export_and_a_probes_batchnorm_folds(tmp_path):
    torch.manual_seed(0)
    clf = registry.create_model("vit_tiny_patch16", num_classes=5, global_pool=True, **SMALL)
    clf.head = ckpt.linear_probe_head(clf.head)
    with torch.no_grad():  # a BatchNorm that is not the identity
        clf.head[0].running_mean.normal_()
        clf.head[0].running_var.uniform_(0.5, 2.0)
    clf.eval()
    path = tmp_path / "probe.pth"
    torch.save({"model": clf.state_dict(), ckpt.MODEL_ARGS_KEY: ckpt.model_args(
        "vit_tiny_patch16", dict(num_classes=5, global_pool=True, **SMALL), head="batchnorm")}, path)
    out = export_checkpoint(path, tmp_path / "timm", "timm")
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), clf(x), rtol=0, atol=1e-5)
    assert model.num_classes == 5 and json.loads((out / "config.json").read_text())["num_classes"] == 5


def test_our_factories_load_the_exported_folder(tmp_path):
    torch.manual_seed(0)
    source = registry.create_model("mae_vit_tiny_patch16", **SMALL, **DEC)
    out = export_checkpoint(save(tmp_path, source, "mae_vit_tiny_patch16"), tmp_path / "timm", "timm")
    model = timm.create_model("mae_vit_tiny_patch16", pretrained=True, pretrained_cfg_overlay=dict(file=str(out)),
                              **SMALL, **DEC)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items()
               if not k.startswith(("decoder", "mask_token")))


def test_model_card_has_the_args_and_last_metrics(tmp_path):
    source = registry.create_model("mae_vit_tiny_patch16", **SMALL, **DEC)
    path = save(tmp_path, source, "mae_vit_tiny_patch16")
    (path.parent / "log.txt").write_text('{"epoch": 0, "train_loss": 0.9}\nnot json\n{"epoch": 4, "train_loss": 0.5}\n')
    card = (export_checkpoint(path, tmp_path / "timm", "timm") / "README.md").read_text()
    assert "library_name: timm" in card and "| epoch | 4 |" in card and "| train_loss | 0.5 |" in card
    assert '| model | `"mae_vit_tiny_patch16"` |' in card and f"local-dir:{tmp_path / 'timm'}" in card


def test_refusals(tmp_path):
    torch.manual_seed(0)
    simmim = registry.create_model("simmim_vit_tiny_patch16", **SMALL)
    with pytest.raises(export.UsageError, match="SimMIM has no HF transformers class"):
        export_checkpoint(save(tmp_path, simmim, "simmim_vit_tiny_patch16"), tmp_path / "hf", "hf")
    assert not (tmp_path / "hf").exists()
    bare = tmp_path / "bare.pth"  # no model_args, no args: the heads of a 32-wide encoder are anyone's guess
    torch.save({"model": registry.create_model("mae_vit_tiny_patch16", **SMALL, **DEC).state_dict()}, bare)
    with pytest.raises(export.UsageError, match="refusing to export: num_heads cannot be known"):
        export_checkpoint(bare, tmp_path / "out", "timm")
    named = export_checkpoint(bare, tmp_path / "named", "hf", model="mae_vit_micro")  # --model names the heads
    config = json.loads((named / "config.json").read_text())
    assert (config["num_attention_heads"], config["decoder_num_attention_heads"], config["layer_norm_eps"]) == (2, 2, 1e-5)
    with pytest.raises(export.UsageError, match="LayerNorm eps is 1e-05; timm's ViT uses 1e-06"):
        export_checkpoint(bare, tmp_path / "out", "timm", model="mae_vit_micro")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(export.UsageError, match="exists and is not an empty folder"):
        export_checkpoint(bare, tmp_path / "full", "timm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.pth", "full", "named", "run"]  # no temporary folder


def test_command_line(tmp_path, capsys):
    source = registry.create_model("mae_vit_tiny_patch16", **SMALL, **DEC)
    path = save(tmp_path, source, "mae_vit_tiny_patch16")
    assert export.main([str(path), str(tmp_path / "out"), "--to", "timm"]) == tmp_path / "out"
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        export.main([str(path), str(tmp_path / "out"), "--to", "timm"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("error: ") and "\n" not in err
    with pytest.raises(SystemExit) as exit_:
        export.main([str(tmp_path / "missing.pth"), str(tmp_path / "out2"), "--to", "hf"])
    assert exit_.value.code == 1 and "missing.pth" in capsys.readouterr().err
