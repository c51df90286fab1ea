"""`umae_plugin.hf` and HF folders through `checkpoint` / `export`: HF transformers' ViTMAE checkpoints
in (every key layout) and out, checked against transformers' own forward with the same `noise`."""
import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from umae_plugin import checkpoint as ckpt
from umae_plugin import hf, registry
from umae_plugin.export import export_checkpoint
from umae_plugin.models_mae import MaskedAutoencoderViT
from umae_plugin.models_vit import VisionTransformer

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
            patch_size=4, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
            decoder_intermediate_size=32, layer_norm_eps=1e-6)
OURS = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, decoder_embed_dim=16,
            decoder_depth=1, decoder_num_heads=2)


def hf_model(cls="ViTMAEForPreTraining", seed=0, **overrides):
    torch.manual_seed(seed)
    config = transformers.ViTMAEConfig(**{**TINY, **overrides})
    return getattr(transformers, cls)(config).eval()


def inputs(seed=1, n=3, length=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.rand(n, length, generator=g)


def compare(hf_net, ours, tol=1e-6):
    """HF's forward and ours with the same noise: the same mask, loss and prediction within `tol`
    (max abs); returns the two differences."""
    x, noise = inputs()
    with torch.no_grad():
        out = hf_net(pixel_values=x, noise=noise)
        loss, pred, mask, terms = ours(x, hf_net.config.mask_ratio, noise=noise, return_terms=True)
    assert torch.equal(out.mask, mask)
    diffs = (out.loss - terms["loss_mae"]).abs().item(), (out.logits - pred).abs().max().item()
    assert max(diffs) <= tol, diffs
    return diffs


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_saved_pretraining_folder_gives_hfs_loss_prediction_mask(tmp_path, norm_pix_loss):
    net = hf_model(norm_pix_loss=norm_pix_loss, mask_ratio=0.6)
    net.save_pretrained(tmp_path / "hf")  # what the installed transformers writes
    model = ckpt.load_model(tmp_path / "hf")
    assert type(model) is MaskedAutoencoderViT and model.norm_pix_loss is norm_pix_loss
    record = ckpt.checkpoint_model_args(ckpt.torch_load(tmp_path / "hf"))
    assert {k: record["kwargs"][k] for k in OURS} == OURS
    compare(net, model)


def test_load_pretrained_and_init_from_take_the_folder(tmp_path):
    net = hf_model()
    net.save_pretrained(tmp_path / "hf")
    model = registry.create_model("umae_vit_tiny_patch16", **OURS).eval()
    report = ckpt.load_pretrained(model, tmp_path / "hf", origin="--init_from")
    assert report.fresh == [] and len(report.loaded) == len(model.state_dict())
    compare(net, model)
    import timm  # and timm's pretrained=True with the folder as the file

    compare(net, timm.create_model("mae_vit_tiny_patch16", pretrained=True, **OURS,
                                   pretrained_cfg_overlay=dict(file=str(tmp_path / "hf"))).eval())


def transformers4(state):
    """transformers 5's module names -> the Hub's transformers-4 names, written out by hand."""
    out = {}
    for key, value in state.items():
        for old, new in (("vit.layers.", "vit.encoder.layer."), ("attention.q_proj", "attention.attention.query"),
                         ("attention.k_proj", "attention.attention.key"), ("attention.v_proj", "attention.attention.value"),
                         ("attention.o_proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"),
                         ("mlp.fc2", "output.dense")):
            key = key.replace(old, new)
        if key.startswith("layers."):  # ViTMAEModel: no `vit.` prefix
            key = "encoder.layer." + key[len("layers."):]
        out[key] = value.clone()
    return out


@pytest.mark.parametrize("layout", ["transformers4_bin", "transformers5_modules"])
def test_hand_written_layouts_load(tmp_path, layout):
    net = hf_model(seed=3)
    folder = tmp_path / layout
    folder.mkdir()
    net.config.to_json_file(folder / "config.json")
    if layout == "transformers4_bin":
        state = transformers4(net.state_dict())
        assert "vit.encoder.layer.1.attention.attention.query.weight" in state
        assert "decoder.decoder_layers.0.attention.output.dense.bias" in state
        torch.save(state, folder / "pytorch_model.bin")
        # the layout is the real one: transformers itself loads it with no key left over
        _, info = transformers.ViTMAEForPreTraining.from_pretrained(folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
    else:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
    model = ckpt.load_model(folder)
    compare(net, model)


def test_vitmae_model_folder_is_an_encoder(tmp_path):
    net = hf_model("ViTMAEModel", mask_ratio=0.0)
    net.save_pretrained(tmp_path / "enc")
    encoder = ckpt.load_model(tmp_path / "enc")  # a classifier without head: the mean of the normalised patch tokens
    assert isinstance(encoder, VisionTransformer) and encoder.num_classes == 0
    x, _ = inputs()
    with torch.no_grad():  # mask ratio 0 and increasing noise: every patch kept, in order
        tokens = net(pixel_values=x, noise=torch.arange(16.0).expand(3, 16)).last_hidden_state
        torch.testing.assert_close(encoder.forward_features(x), tokens[:, 1:].mean(1), rtol=0, atol=1e-6)
    mae = registry.create_model("mae_vit_tiny_patch16", **OURS).eval()
    report = ckpt.load_pretrained(mae, tmp_path / "enc")
    assert {k.split(".")[0] for k in report.fresh} == {"decoder_embed", "mask_token", "decoder_pos_embed",
                                                      "decoder_blocks", "decoder_norm", "decoder_pred"}


@pytest.mark.parametrize("field, override", [
    ("num_attention_heads", dict(num_heads=4)), ("decoder_num_attention_heads", dict(decoder_num_heads=4)),
    ("num_hidden_layers", dict(depth=3)), ("hidden_size", dict(embed_dim=64)), ("patch_size", dict(patch_size=8)),
    ("intermediate_size", dict(mlp_ratio=4.0)), ("decoder_hidden_size", dict(decoder_embed_dim=32)),
])
def test_mismatched_model_raises_naming_the_field(tmp_path, field, override):
    hf_model().save_pretrained(tmp_path / "hf")
    model = registry.create_model("mae_vit_tiny_patch16", **{**OURS, **override})
    with pytest.raises(ckpt.CheckpointMismatchError, match=rf"--init_from x: the HF config does not fit the model: "
                                                           rf"(.*; )?{field} "):
        ckpt.load_pretrained(model, tmp_path / "hf", origin="--init_from x")


@pytest.mark.parametrize("field, value", [("hidden_act", "gelu_new"), ("qkv_bias", False)])
def test_config_only_mismatches_raise_naming_the_field(tmp_path, field, value):
    hf_model(**{field: value}).save_pretrained(tmp_path / "hf")
    model = registry.create_model("mae_vit_tiny_patch16", **OURS)
    with pytest.raises(ckpt.CheckpointMismatchError, match=field):
        ckpt.load_pretrained(model, tmp_path / "hf")


def test_layer_norm_eps_only_warns(tmp_path, caplog):
    """The Hub's configs say 1e-12; the weights were trained with 1e-6, which our models use."""
    hf_model(layer_norm_eps=1e-12).save_pretrained(tmp_path / "hf")
    with caplog.at_level(logging.WARNING, logger="umae"):
        model = ckpt.load_model(tmp_path / "hf")
    assert model.blocks[0].norm1.eps == 1e-6 and "layer_norm_eps 1e-12" in caplog.text


def test_export_to_hf_loads_with_no_missing_keys_and_same_outputs(tmp_path):
    torch.manual_seed(0)
    ours = registry.create_model("umae_vit_tiny_patch16", **OURS, norm_pix_loss=True).eval()
    torch.save({"model": ours.state_dict(), "args": {"mask_ratio": 0.6, "blr": 1.5e-4},
                ckpt.MODEL_ARGS_KEY: ckpt.model_args("umae_vit_tiny_patch16", {**registry.resolved_kwargs(ours),
                                                                                "mlp_ratio": 2.0})},
               tmp_path / "checkpoint-last.pth")
    (tmp_path / "log.txt").write_text('{"epoch": 0, "train_loss": 0.9}\n{"epoch": 1, "train_loss": 0.7}\n')
    out = export_checkpoint(tmp_path / "checkpoint-last.pth", tmp_path / "hf", "hf")
    net, info = transformers.ViTMAEForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    config = json.loads((out / "config.json").read_text())
    assert (config["layer_norm_eps"], config["norm_pix_loss"], config["mask_ratio"]) == (1e-6, True, 0.6)
    keys = set(load_file(str(out / "model.safetensors")))
    assert "vit.encoder.layer.1.attention.attention.query.weight" in keys  # the Hub's transformers-4 names
    assert "decoder.decoder_layers.0.intermediate.dense.weight" in keys
    compare(net.eval(), ours)
    back = ckpt.load_model(out)  # and in again: every weight as it was
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in back.state_dict().items())
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "| train_loss | 0.7 |" in card and "| blr |" in card


def test_export_encoder_to_vitmae_model(tmp_path):
    net = hf_model("ViTMAEModel", seed=5)
    net.save_pretrained(tmp_path / "enc")
    out = export_checkpoint(tmp_path / "enc", tmp_path / "out", "hf")
    again, info = transformers.ViTMAEModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in again.state_dict().items())


def test_unplaceable_keys_are_named():
    with pytest.raises(ckpt.CheckpointMismatchError, match="cannot place vit.pooler.dense.weight"):
        hf.from_hf_state_dict({"vit.pooler.dense.weight": torch.zeros(1)})


@pytest.mark.slow
def test_vit_base_round_trips(tmp_path, capsys):
    """The three directions at ViT-Base shapes (random weights, 2 images of 224 px, the same noise):
    HF -> ours, ours -> HF, ours -> timm local-dir; prints the max abs differences (`-s` shows them)."""
    import timm

    torch.manual_seed(0)
    x, noise = torch.randn(2, 3, 224, 224), torch.rand(2, 196)
    net = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(layer_norm_eps=1e-6, norm_pix_loss=True)).eval()
    net.save_pretrained(tmp_path / "hf_in")
    src = registry.create_model("mae_vit_base_patch16", norm_pix_loss=True).eval()
    torch.save({"model": src.state_dict(), "args": {"mask_ratio": 0.75},
                ckpt.MODEL_ARGS_KEY: ckpt.model_args("mae_vit_base_patch16", registry.resolved_kwargs(src))},
               tmp_path / "c.pth")
    lines = []
    for label, theirs, ours in (("HF->ours", net, ckpt.load_model(tmp_path / "hf_in")),
                                ("ours->HF", transformers.ViTMAEForPreTraining.from_pretrained(
                                    export_checkpoint(tmp_path / "c.pth", tmp_path / "hf_out", "hf")).eval(), src)):
        with torch.no_grad():
            out, (loss, pred, mask) = theirs(pixel_values=x, noise=noise), ours(x, 0.75, noise=noise)
        diffs = (out.loss - loss).abs().item(), (out.logits - pred).abs().max().item()
        assert torch.equal(out.mask, mask) and max(diffs) <= 1e-6, (label, diffs)
        lines.append(f"{label}: loss {diffs[0]:.3g}, prediction {diffs[1]:.3g}, masks equal")
    t = timm.create_model(f"local-dir:{export_checkpoint(tmp_path / 'c.pth', tmp_path / 'timm', 'timm')}",
                          pretrained=True).eval()
    with torch.no_grad():
        diff = (t.forward_head(t.forward_features(x), pre_logits=True) - src.forward_features(x)).abs().max().item()
    assert diff <= 1e-6
    lines.append(f"ours->timm local-dir: features {diff:.3g}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
