import argparse
import errno
import os
import stat
from functools import partial

import pytest
import timm
import torch
import torch.nn as nn

from umae_plugin import checkpoint as ckpt
from umae_plugin.errors import UserError
from umae_plugin.models_mae import MaskedAutoencoderViT
from umae_plugin.models_vit import VisionTransformerClassifier
from umae_plugin.pos_embed import sincos_2d

ENC = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4)
DEC = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)


def mae(**kw):
    return MaskedAutoencoderViT(**{**ENC, **DEC, "norm_layer": partial(nn.LayerNorm, eps=1e-6), **kw})


def vit(global_pool=True, **kw):
    return VisionTransformerClassifier(global_pool=global_pool, qkv_bias=True, **{**ENC, "num_classes": 10, **kw})


def encoder_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if ckpt._group(k) == "encoder"]
    return all(torch.equal(sa[k], sb[k]) for k in keys) and len(keys) > 0


def test_own_and_official_full_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    src = mae()
    path = tmp_path / "checkpoint-3.pth"
    torch.save({"model": src.state_dict(), "args": argparse.Namespace(model="x"), "epoch": 3}, path)
    dst = mae()
    report = ckpt.load_pretrained(dst, path)
    assert report.fresh == [] and report.ignored == []
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in src.state_dict().items())


def test_encoder_only_file_leaves_decoder_fresh():
    torch.manual_seed(0)
    src = mae()
    enc = {k: v for k, v in src.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    dst = mae()
    before = dst.decoder_pred.weight.clone()
    report = ckpt.load_pretrained(dst, {"model": enc})
    assert encoder_equal(src, dst) and torch.equal(dst.norm.weight, src.norm.weight)
    assert "mask_token" in report.fresh and "decoder_pred.weight" in report.fresh
    assert torch.equal(dst.decoder_pred.weight, before)


def test_pretrain_into_cls_classifier_gives_same_features():
    torch.manual_seed(0)
    src = mae().eval()
    with torch.no_grad():
        src.norm.weight.uniform_(0.5, 1.5)
    dst = vit(global_pool=False).eval()
    report = ckpt.load_pretrained(dst, src.state_dict())
    assert set(report.fresh) == {"head.weight", "head.bias"}
    assert "mask_token" in report.ignored
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst.forward_features(x), src.forward_features(x, pool="cls"), rtol=1e-5, atol=1e-5)


def test_umae_reference_probe_keys_are_ignored():
    torch.manual_seed(0)
    sd = dict(mae().state_dict())
    sd.update({"fc.weight": torch.randn(10, 64), "fc.bias": torch.randn(10),
               "fc_norm.weight": torch.full((64,), 3.0), "fc_norm.bias": torch.ones(64)})
    assert {"fc.weight", "fc_norm.weight"} <= set(ckpt.load_pretrained(mae(), sd).ignored)
    dst = vit(global_pool=True)
    report = ckpt.load_pretrained(dst, {"model": sd})
    assert "fc_norm.weight" in report.fresh and torch.all(dst.fc_norm.weight == 1)


def test_finetuned_classifier_loads_fc_norm_and_matching_head():
    torch.manual_seed(0)
    src = vit(global_pool=True)
    with torch.no_grad():
        src.fc_norm.weight.fill_(2.0)
    same = vit(global_pool=True)
    assert ckpt.load_pretrained(same, {"model": src.state_dict()}).fresh == []
    assert torch.equal(same.head.weight, src.head.weight)
    other = vit(global_pool=True, num_classes=5)
    report = ckpt.load_pretrained(other, src.state_dict())
    assert set(report.fresh) == {"head.weight", "head.bias"} and torch.all(other.fc_norm.weight == 2)
    # into a pre-training model: the classifier has no `norm`, so it starts fresh
    report = ckpt.load_pretrained(mae(), src.state_dict())
    assert "norm.weight" in report.fresh and "head.weight" in report.ignored


def test_linear_probe_checkpoint_loads():
    torch.manual_seed(0)
    src = vit(global_pool=True)
    src.head = nn.Sequential(nn.BatchNorm1d(64, affine=False, eps=1e-6), src.head)
    sd = src.state_dict()
    assert "head.0.running_mean" in sd and "head.1.weight" in sd
    dst = vit(global_pool=True)
    report = ckpt.load_pretrained(dst, {"model": sd})
    assert encoder_equal(src, dst) and set(report.fresh) == {"head.weight", "head.bias"}
    probe = vit(global_pool=True)
    probe.head = nn.Sequential(nn.BatchNorm1d(64, affine=False, eps=1e-6), probe.head)
    assert ckpt.load_pretrained(probe, sd).fresh == []


def test_timm_weights_and_ddp_prefix():
    torch.manual_seed(0)
    t = timm.create_model("vit_tiny_patch16_224", num_classes=0, global_pool="token")
    dst = MaskedAutoencoderViT(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, **DEC)
    report = ckpt.load_pretrained(dst, {"module." + k: v for k, v in t.state_dict().items()})
    assert torch.equal(dst.blocks[11].mlp.fc2.weight, t.blocks[11].mlp.fc2.weight)
    assert torch.equal(dst.norm.weight, t.norm.weight)
    assert "decoder_embed.weight" in report.fresh


def test_classifier_pos_embed_resampled_224_to_256():
    kw = dict(patch_size=16, embed_dim=32, depth=1, num_heads=2)
    src = vit(img_size=224, **kw)
    with torch.no_grad():
        src.pos_embed[:, 0].fill_(7.0)
        src.pos_embed[:, 1:].fill_(0.25)
    dst = vit(img_size=256, **kw)
    report = ckpt.load_pretrained(dst, src.state_dict())
    assert report.resampled == ["pos_embed"] and dst.pos_embed.shape == (1, 257, 32)
    assert torch.all(dst.pos_embed[:, 0] == 7.0)  # the class token's row is carried over
    torch.testing.assert_close(dst.pos_embed[:, 1:], torch.full((1, 256, 32), 0.25))


def test_pretrain_pos_embed_regenerated_not_interpolated():
    kw = dict(patch_size=16, embed_dim=32, depth=1, num_heads=2, **DEC)
    src = MaskedAutoencoderViT(img_size=224, **kw)
    dst = MaskedAutoencoderViT(img_size=256, **kw)
    ckpt.load_pretrained(dst, src.state_dict())
    assert torch.equal(dst.pos_embed[0], sincos_2d(32, 16, cls_token=True))
    assert torch.equal(dst.decoder_pos_embed[0], sincos_2d(32, 16, cls_token=True))


def test_architecture_mismatch_names_keys():
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"unexpected key\s+blocks\.1\."):
        ckpt.load_pretrained(mae(depth=1), mae().state_dict())
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"missing key\s+blocks\.2\."):
        ckpt.load_pretrained(mae(depth=3), mae().state_dict())
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"cls_token: checkpoint \(1, 1, 64\) vs model \(1, 1, 128\)"):
        ckpt.load_pretrained(mae(embed_dim=128), mae().state_dict())
    with pytest.raises(ValueError, match="no state dict"):
        ckpt.load_pretrained(mae(), {"epoch": 3})


@pytest.mark.parametrize("global_pool", [True, False])
def test_export_loads_into_timm_strict(global_pool):
    torch.manual_seed(0)
    src = mae(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3).eval()
    sd = ckpt.export_timm_state_dict({"model": src.state_dict()}, global_pool=global_pool)
    t = timm.create_model("vit_tiny_patch16_224", global_pool="avg" if global_pool else "token").eval()
    t.load_state_dict(sd, strict=True)
    if not global_pool:
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            feats = t.forward_head(t.forward_features(x), pre_logits=True)
            torch.testing.assert_close(feats, src.forward_features(x, pool="cls"), rtol=1e-4, atol=1e-4)


def test_atomic_save_survives_a_kill_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-last.pth"
    ckpt.save_atomic({"epoch": 1, "model": {"w": torch.ones(3)}}, path)

    def killed(obj, f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_atomic({"epoch": 2}, path)
    assert ckpt.torch_load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-last.pth"]


def test_find_latest_checkpoint(tmp_path):
    assert ckpt.find_latest_checkpoint(tmp_path) is None
    for epoch in (0, 20):
        ckpt.save_atomic({"epoch": epoch}, tmp_path / f"checkpoint-{epoch}.pth")
    ckpt.save_atomic({"epoch": 23}, tmp_path / "checkpoint-last.pth")
    (tmp_path / "checkpoint-40.pth").write_bytes(b"truncated")
    assert ckpt.find_latest_checkpoint(tmp_path).name == "checkpoint-last.pth"
    ckpt.save_atomic({"epoch": 24}, tmp_path / "checkpoint-24.pth")
    assert ckpt.find_latest_checkpoint(tmp_path).name == "checkpoint-24.pth"


def _disk_full_oserror(obj, f):
    f.write(b"some bytes")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _disk_full_in_torch(obj, f):  # torch's own wrapping: the OSError only in the chain
    try:
        _disk_full_oserror(obj, f)
    except OSError as err:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                           "file data/0: file write failed") from err


def _disk_full_message_only(obj, f):
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0: "
                       "No space left on device")


@pytest.mark.parametrize("writer", [_disk_full_oserror, _disk_full_in_torch, _disk_full_message_only])
def test_atomic_save_on_a_full_disk_is_a_one_line_user_error(tmp_path, monkeypatch, writer):
    path = tmp_path / "checkpoint-7.pth"
    ckpt.save_atomic({"epoch": 1}, path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", writer)
    with pytest.raises(UserError) as info:
        ckpt.save_atomic({"epoch": 2}, path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "No space left on device" in message
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-7.pth"]


def test_atomic_save_other_os_error_named_and_bugs_unchanged(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "checkpoint-last.pth"
    (tmp_path / "sub").write_text("a file where the folder should be")
    with pytest.raises(UserError, match=f"cannot write checkpoint {path}: "):
        ckpt.save_atomic({"epoch": 1}, path)

    def bug(obj, f):
        raise RuntimeError("some other failure")

    monkeypatch.setattr(torch, "save", bug)
    with pytest.raises(RuntimeError, match="some other failure") as info:
        ckpt.save_atomic({"epoch": 1}, tmp_path / "checkpoint-0.pth")
    assert not isinstance(info.value, UserError)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_save_follows_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        ckpt.save_atomic({"epoch": 1}, tmp_path / "checkpoint-1.pth")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "checkpoint-1.pth").stat().st_mode) == mode


def test_resume_auto_with_only_unreadable_checkpoints_stops(tmp_path, caplog):
    (tmp_path / "checkpoint-last.pth").write_bytes(b"")
    (tmp_path / "checkpoint-20.pth").write_bytes(b"PK\x03\x04truncated")
    with pytest.raises(UserError) as info:
        ckpt.resolve_resume("auto", tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "checkpoint-20.pth" in message and "checkpoint-last.pth" in message
    assert ckpt.resolve_resume("auto", tmp_path / "empty") is None  # nothing there yet: a fresh start
    ckpt.save_atomic({"epoch": 3}, tmp_path / "checkpoint-3.pth")  # one readable: the others are skipped
    assert ckpt.resolve_resume("auto", tmp_path) == tmp_path / "checkpoint-3.pth"
    assert "skipping unreadable checkpoint" in caplog.text and "checkpoint-last.pth" in caplog.text


def test_save_checkpoint_and_restore_a_missing_numbered_one(tmp_path):
    state = {"model": {"w": torch.arange(3.0)}, "epoch": 4}
    ckpt.save_checkpoint(tmp_path, state, 4, save_freq=2, last=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4.pth", "checkpoint-last.pth"]
    (tmp_path / "checkpoint-4.pth").unlink()
    resumed = ckpt.torch_load(tmp_path / "checkpoint-last.pth")
    assert ckpt.restore_missing_checkpoint(tmp_path, resumed, 3, 10, "auto") is None  # 4 not due
    assert ckpt.restore_missing_checkpoint(tmp_path, resumed, 4, 10, str(tmp_path / "elsewhere" / "x.pth")) is None
    assert ckpt.restore_missing_checkpoint(tmp_path, resumed, 3, 5, "auto") == tmp_path / "checkpoint-4.pth"  # last
    assert torch.equal(ckpt.torch_load(tmp_path / "checkpoint-4.pth")["model"]["w"], torch.arange(3.0))
    assert ckpt.restore_missing_checkpoint(tmp_path, resumed, 2, 10, "auto") is None  # there now


# ---------------------------------------------------------------------------------------------
# self-describing checkpoints: model_args, plain args, load_model, infer_model_args

SMALL = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3)  # none of them a factory default
SMALL_DEC = dict(decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2)
# (registry name, constructor keywords, probe head, the `--model` an older run would have stored)
FAMILIES = {
    "mae": ("mae_vit_tiny_patch16", {**SMALL, **SMALL_DEC, "norm_pix_loss": True}, None, "mae_vit_tiny_patch16"),
    "umae": ("umae_vit_tiny_patch16", {**SMALL, **SMALL_DEC, "lambda_unif": 0.05, "unif_pool": "cls"}, None,
             "umae_vit_tiny_patch16"),
    "simmim": ("simmim_vit_tiny_patch16", SMALL, None, "simmim_vit_tiny_patch16"),
    "usimmim": ("usimmim_vit_tiny_patch16", {**SMALL, "lambda_unif": 0.1}, None, "usimmim_vit_tiny_patch16"),
    "vit_global_pool": ("vit_tiny_patch16", {**SMALL, "num_classes": 7, "global_pool": True}, None, "vit_tiny_patch16"),
    "vit_cls_token": ("vit_tiny_patch16", {**SMALL, "num_classes": 7, "global_pool": False}, None,
                      "mae_vit_tiny_patch16"),
    "linear_probe": ("vit_tiny_patch16", {**SMALL, "num_classes": 7, "global_pool": False}, "batchnorm",
                     "mae_vit_tiny_patch16"),
}


def family_model(family):
    """A trained-looking model of `family` built through the registry: random weights everywhere,
    norms and BatchNorm statistics included (so that a part left fresh would show)."""
    from umae_plugin.registry import create_model

    name, kwargs, head, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    if head == "batchnorm":
        model.head = ckpt.linear_probe_head(model.head)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                value.copy_(torch.rand_like(value) + 0.5 if key.endswith(("running_var", "norm.weight")) else
                            torch.randn_like(value) * 0.1)
    return model.eval()


def old_args(family):
    """The Namespace an older run of ours stored: `--model` and the overrides it was given."""
    name, kwargs, _, stored = FAMILIES[family]
    fields = dict(model=stored, input_size=kwargs["img_size"], patch_size=kwargs["patch_size"],
                  embed_dim=kwargs["embed_dim"], depth=kwargs["depth"], num_heads=kwargs["num_heads"])
    fields.update({k: v for k, v in kwargs.items() if k.startswith(("decoder_", "norm_pix", "lambda", "unif"))})
    if "global_pool" in kwargs:
        fields.update(global_pool=kwargs["global_pool"], nb_classes=kwargs["num_classes"])
    return argparse.Namespace(**fields)


def masked_pass(model, x):
    """A pre-training model's whole pass (encoder, decoder, loss terms) with a seeded mask draw."""
    torch.manual_seed(2)
    return model(x, 0.5, return_terms=True)


def assert_same_model(a, b):
    """Same class, same tensors, same outputs; `b` in eval mode."""
    assert type(a) is type(b) and not b.training
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(a.forward_features(x), b.forward_features(x))
        if isinstance(a, VisionTransformerClassifier):
            assert torch.equal(a(x), b(x))
            return
        (loss_a, pred_a, mask_a, terms_a), (loss_b, pred_b, mask_b, terms_b) = masked_pass(a, x), masked_pass(b, x)
        assert torch.equal(mask_a, mask_b) and torch.equal(pred_a, pred_b) and torch.equal(loss_a, loss_b)
        assert terms_a.keys() == terms_b.keys()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_new_format_round_trip_reads_weights_only(tmp_path, family):
    from umae_plugin.cli import DefaultMaskRatio

    name, kwargs, head, _ = FAMILIES[family]
    src = family_model(family)
    run_args = argparse.Namespace(model=name, output_dir=tmp_path / "run", mask_ratio=DefaultMaskRatio(), epochs=3,
                                  device=torch.device("cpu"), cutmix_minmax=(0.2, 0.8), resume="")
    path = tmp_path / "checkpoint-3.pth"
    ckpt.save_atomic({"model": src.state_dict(), "model_args": ckpt.model_args(name, kwargs, head),
                      "args": ckpt.plain_args(run_args), "epoch": 3}, path)
    obj = torch.load(path, weights_only=True)  # plain: no allow-list needed
    assert obj["model_args"] == {"name": name, "kwargs": kwargs, **({"head": head} if head else {})}
    assert obj["args"]["output_dir"] == str(tmp_path / "run") and type(obj["args"]["mask_ratio"]) is float
    dst = ckpt.load_model(path)
    assert_same_model(src, dst)
    assert_same_model(src, ckpt.load_model(obj))
    if family == "umae":
        assert dst.lambda_unif == 0.05 and dst.feature_pool == "cls"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_old_format_with_namespace_args_goes_through_inference(tmp_path, family):
    name, kwargs, head, _ = FAMILIES[family]
    src = family_model(family)
    path = tmp_path / "checkpoint-3.pth"
    torch.save({"model": src.state_dict(), "args": old_args(family), "epoch": 3}, path)
    with pytest.raises(Exception, match="argparse.Namespace"):
        torch.load(path, weights_only=True)  # why the format changes
    record = ckpt.infer_model_args(ckpt.torch_load(path)["model"], old_args(family))
    assert record["name"] == name and record.get("head") == head
    assert {k: record["kwargs"][k] for k in kwargs} == kwargs  # and only derived extras beside them
    assert ckpt.checkpoint_model_args(ckpt.torch_load(path)) == record
    assert_same_model(src, ckpt.load_model(path))


def test_reference_style_args_name_the_term():
    """M-MAE's and the U-MAE reference's stored args spell the weight `lamb` and name the term with
    `reg` (`TCR` with `uniformity_mu`, `centering`; `spectral` meaning `square`): inference reads them."""
    src = family_model("umae")
    saved = argparse.Namespace(**{**vars(old_args("umae")), "lambda_unif": None})
    del saved.lambda_unif
    tcr = argparse.Namespace(**vars(saved), lamb=0.02, reg="TCR", uniformity_mu=3.0, centering=False)
    record = ckpt.infer_model_args(src.state_dict(), tcr)
    assert {k: record["kwargs"][k] for k in ("lambda_unif", "reg", "uniformity_mu", "centering")} == {
        "lambda_unif": 0.02, "reg": "TCR", "uniformity_mu": 3.0, "centering": False}
    assert ckpt.build_model(record).reg == "TCR"
    spectral = ckpt.infer_model_args(src.state_dict(), argparse.Namespace(**vars(saved), lamb=0.05, reg="spectral"))
    assert spectral["kwargs"]["lambda_unif"] == 0.05 and spectral["kwargs"]["reg"] == "square"


def official_shaped(kind):
    """Standard widths (192: 3 heads; decoder 512: 16 heads), so the shapes tell everything."""
    torch.manual_seed(0)
    enc = dict(img_size=32, patch_size=4, embed_dim=192, depth=1, num_heads=3)
    if kind == "classifier":
        return vit(global_pool=True, **enc).eval()
    if kind == "probe":
        model = vit(global_pool=False, **{**enc, "num_classes": 1000})
        model.head = ckpt.linear_probe_head(model.head)
        with torch.no_grad():
            model.head[0].running_var.uniform_(0.5, 2.0)
        return model.eval()
    return mae(**enc, decoder_embed_dim=512, decoder_depth=1, decoder_num_heads=16).eval()


@pytest.mark.parametrize("kind", ["mae", "classifier", "probe"])
def test_official_mae_shaped_file_is_inferred_exactly(tmp_path, kind):
    src = official_shaped(kind)
    torch.save({"model": src.state_dict()}, tmp_path / "official.pth")
    record = ckpt.infer_model_args(src.state_dict())
    assert record["name"] == ("mae_vit_tiny_patch16" if kind == "mae" else "vit_tiny_patch16")
    assert record["kwargs"]["num_heads"] == 3 and record["kwargs"].get("decoder_num_heads", 16) == 16
    assert_same_model(src, ckpt.load_model(tmp_path / "official.pth"))


def test_encoder_only_file_becomes_a_headless_classifier_with_the_same_features():
    src = official_shaped("mae")
    enc = {k: v for k, v in src.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    model = ckpt.load_model({"model": enc})
    assert isinstance(model, VisionTransformerClassifier) and model.num_classes == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), src.forward_features(x, pool="mean"))


def test_umae_reference_online_probe_keys_dropped_by_load_model():
    src = official_shaped("mae")
    sd = dict(src.state_dict(), **{"fc.weight": torch.randn(10, 192), "fc_norm.weight": torch.ones(192),
                                   "fc_norm.bias": torch.zeros(192)})
    assert_same_model(src, ckpt.load_model({"model": sd}))


def test_model_args_rejects_what_json_cannot_carry():
    assert ckpt.model_args("vit_micro", {"img_size": (32, 32)})["kwargs"] == {"img_size": [32, 32]}
    with pytest.raises(ValueError, match="norm_layer"):
        ckpt.model_args("mae_vit_micro", {"depth": 2, "norm_layer": partial(nn.LayerNorm, eps=1e-6)})
    with pytest.raises(ValueError, match="out_dir"):
        ckpt.model_args("mae_vit_micro", {"out_dir": ckpt.Path("/tmp")})
    with pytest.raises(ValueError, match="mlp_ratio"):
        ckpt.model_args("mae_vit_micro", {"mlp_ratio": float("nan")})
    with pytest.raises(ValueError, match="table"):
        ckpt.model_args("mae_vit_micro", {"table": {1: 2}})  # JSON would turn the key into "1"
    with pytest.raises(ValueError, match="head"):
        ckpt.model_args("vit_micro", {}, head="mlp")
    assert ckpt.plain_args({"a": {"b": ckpt.Path("x")}, "c": {3}, "d": True}) == {"a": {"b": "x"}, "c": [3], "d": True}


def test_load_model_mismatch_is_one_line_naming_keys(tmp_path):
    src = family_model("mae")
    _, kwargs, _, _ = FAMILIES["mae"]
    torch.save({"model": src.state_dict(), "model_args": ckpt.model_args("mae_vit_tiny_patch16", {**kwargs, "depth": 1})},
               tmp_path / "bad.pth")
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"bad.pth: .*unexpected blocks\.1\.") as err:
        ckpt.load_model(tmp_path / "bad.pth")
    assert "\n" not in str(err.value)
    with pytest.raises(ckpt.CheckpointMismatchError, match="cannot build mae_vit_gone"):
        ckpt.load_model({"model": src.state_dict(), "model_args": {"name": "mae_vit_gone", "kwargs": {}}})
    with pytest.raises(ckpt.CheckpointMismatchError, match="no 'cls_token'"):
        ckpt.infer_model_args({"blocks.0.mlp.fc1.weight": torch.zeros(4, 2)})


def test_infer_model_args_gives_what_classify_reads_off_checkpoints():
    """What `classify.checkpoint_geometry` / `checkpoint_encoder_overrides` recover, from the weights
    (the args only for what shapes do not tell): geometry, encoder sizes, class count, pooling."""
    src = family_model("linear_probe")
    stored = argparse.Namespace(model="mae_vit_tiny_patch16", input_size=64, num_heads=3)  # input_size: not these weights'
    kw = ckpt.infer_model_args({"model": src.state_dict()}, stored)["kwargs"]
    assert (kw["img_size"], kw["patch_size"], kw["embed_dim"], kw["depth"], kw["num_heads"]) == (32, 4, 48, 2, 3)
    assert (kw["num_classes"], kw["global_pool"], kw["mlp_ratio"], kw["in_chans"]) == (7, False, 4.0, 3)


def test_stored_model_names_map_onto_the_weights_family():
    """A pre-training name stored beside classifier weights (SimMIM's, the reference's `_dec512d8b`
    alias) names its `vit_*`; a name of another family than the weights' is not used."""
    from umae_plugin.registry import create_model

    clf = create_model("vit_micro", num_classes=3).state_dict()
    for stored in ("usimmim_vit_micro", "mae_vit_micro", "vit_micro"):
        assert ckpt.infer_model_args(clf, {"model": stored})["name"] == "vit_micro"
    with torch.device("meta"):  # shapes are all inference reads
        tiny = create_model("vit_tiny_patch16", **{**SMALL, "num_classes": 3}).state_dict()
        simmim = create_model("simmim_vit_micro").state_dict()
    assert ckpt.infer_model_args(tiny, {"model": "mae_vit_tiny_patch16_dec512d8b"})["name"] == "vit_tiny_patch16"
    assert ckpt.infer_model_args(simmim, {"model": "usimmim_vit_micro"})["name"] == "usimmim_vit_micro"
    assert ckpt.infer_model_args(simmim, {"model": "usimmim_vit_micro", "lambda_unif": 0})["name"] == "simmim_vit_micro"
    assert ckpt.infer_model_args(simmim, {"model": "mae_vit_micro"})["name"].startswith("simmim_vit_")


# ---------------------------------------------------------------------------------------------
# folders (timm's local-dir and HF transformers layouts) and .safetensors files


def test_safetensors_file_and_folders_read_like_checkpoints(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = mae()
    save_file(src.state_dict(), str(tmp_path / "weights.safetensors"))
    report = ckpt.load_pretrained(mae(), tmp_path / "weights.safetensors")
    assert report.fresh == []
    folder = tmp_path / "timm"
    folder.mkdir()
    clf = vit(num_classes=0, global_pool=True, fc_norm=False)
    save_file(clf.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"architecture": "vit_base_patch16_224", "model_args": {"num_heads": 4}}')
    obj = ckpt.torch_load(folder)
    assert obj["args"] == {"num_heads": 4}
    rebuilt = ckpt.load_model(folder)  # the heads from timm's model_args, not guessed
    assert rebuilt.blocks[0].attn.num_heads == 4 and encoder_equal(rebuilt, clf)


@pytest.mark.parametrize("config, weights, message", [
    (None, True, r"Is a directory, and no timm or HF transformers checkpoint folder \(no config.json\)"),
    ("{not json", True, "cannot read it as JSON"),
    ('{"model_type": "bert"}', True, "model_type 'bert', not 'vit_mae'"),
    ('{"architecture": "vit_base_patch16_224"}', False, "no weights"),
])
def test_folders_that_are_not_checkpoints_name_the_problem(tmp_path, config, weights, message):
    from safetensors.torch import save_file

    if config is not None:
        (tmp_path / "config.json").write_text(config)
    if weights:
        save_file(mae().state_dict(), str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match=message) as err:
        ckpt.read_checkpoint(tmp_path, "--finetune")
    assert str(err.value).startswith(f"--finetune {tmp_path}") and "\n" not in str(err.value)


def test_a_corrupt_safetensors_file_names_the_file(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(UserError, match="w.safetensors: not a readable safetensors file"):
        ckpt.torch_load(tmp_path / "w.safetensors")
