"""collapse tool: spectra / effective rank against closed forms, log parsing, model loading from
stored args and from a bare state dict, and one real run on a micro checkpoint."""
import argparse
import json
import math
from functools import partial

import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import TensorDataset

from umae_plugin import checkpoint as ckpt
from umae_plugin import metrics
from umae_plugin.analysis import collapse, features
from umae_plugin.analysis.__main__ import main as cli
from umae_plugin.engine_pretrain import fixed_images
from umae_plugin.models_mae import MaskedAutoencoderViT
from umae_plugin.models_vit import VisionTransformerClassifier
from umae_plugin.registry import create_model

# LayerNorm eps 1e-6 as every registered factory (and the reference) builds it.
MICRO = dict(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
             decoder_depth=1, decoder_num_heads=2, norm_layer=partial(nn.LayerNorm, eps=1e-6))


def micro_checkpoint(path, **model_kw):
    """A micro MAE saved as main_pretrain.py saves: weights plus the args that rebuild it (a real
    model name; the micro sizes ride along as extra args keys)."""
    torch.manual_seed(0)
    cfg = {**MICRO, **model_kw}
    model = MaskedAutoencoderViT(**cfg)
    args = argparse.Namespace(model="mae_vit_tiny_patch16", input_size=cfg["img_size"], patch_size=cfg["patch_size"],
                              embed_dim=cfg["embed_dim"], depth=cfg["depth"], num_heads=cfg["num_heads"],
                              decoder_embed_dim=cfg["decoder_embed_dim"], decoder_depth=cfg["decoder_depth"],
                              decoder_num_heads=cfg["decoder_num_heads"], norm_pix_loss=cfg.get("norm_pix_loss", False),
                              lambda_unif=0.0, unif_pool="mean")
    torch.save({"model": model.state_dict(), "args": args, "epoch": 3}, path)
    return model


def test_spectrum_closed_forms():
    # Orthonormal rows: every singular value 1, effective rank n.
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    s = collapse.collapse_stats(q * torch.linspace(0.5, 3.0, 8, dtype=torch.float64)[:, None])  # row scale is normalised away
    assert torch.allclose(torch.tensor(s["spectrum"], dtype=torch.float64), torch.ones(8, dtype=torch.float64), atol=1e-10)
    assert abs(s["effective_rank"] - 8.0) < 1e-8
    # The terms on the same rows: cosines 0 off the diagonal, so unif = 8 / 64; Z^T Z = I, so the
    # coding-rate loss is -8 log(1 + mu / 8); the centred rank of a centred orthonormal set is 7.
    assert abs(s["unif"] - 1 / 8) < 1e-12 and abs(s["tcr"] + 8 * math.log(1 + 3 / 8)) < 1e-10
    assert s["tcr_mu"] == 3.0 and abs(s["effective_rank_centered"] - 7.0) < 1e-6
    # 9 rows along e1 and 4 along e2: singular values sqrt(9), sqrt(4).
    f = torch.cat([torch.tensor([[2.0, 0, 0]]).repeat(9, 1), torch.tensor([[0, 5.0, 0]]).repeat(4, 1)])
    s = collapse.collapse_stats(f)
    assert torch.allclose(torch.tensor(s["singular_values"][:2], dtype=torch.float64), torch.tensor([3.0, 2.0], dtype=torch.float64))
    assert abs(s["spectrum"][1] - 2 / 3) < 1e-12 and abs(s["spectrum"][2]) < 1e-12
    p = torch.tensor([0.6, 0.4], dtype=torch.float64)
    assert abs(s["effective_rank"] - math.exp(-(p * p.log()).sum().item())) < 1e-10
    # Z^T Z = diag(9, 4, 0), mu / D = 1: -(log 10 + log 5); cosines 1 within a group, 0 across.
    assert abs(s["tcr"] + math.log(10) + math.log(5)) < 1e-5 and abs(s["unif"] - (81 + 16) / 169) < 1e-6
    # All rows parallel: rank one.
    g = torch.Generator().manual_seed(0)  # float64: the float32 round-off alone moves the rank by ~1e-6
    s = collapse.collapse_stats(torch.rand(20, 1, generator=g, dtype=torch.float64).add(0.1)
                                * torch.randn(1, 6, generator=g, dtype=torch.float64))
    assert abs(s["effective_rank"] - 1.0) < 1e-6 and s["spectrum"][0] == 1.0 and max(s["spectrum"][1:]) < 1e-6
    assert s["num_samples"] == 20 and s["feature_dim"] == 6


def test_erank_over_epochs_reads_logged_values(tmp_path):
    lines = [
        json.dumps({"epoch": 0, "train_loss": 1.0, "effective_rank_mean": 3.0, "effective_rank_cls": 2.0}),
        "not json",
        json.dumps({"epoch": 2, "train_loss": 0.8, "effective_rank_mean": 5.0}),
        json.dumps({"epoch": 1, "train_loss": 0.9}),  # not measured this epoch
        json.dumps({"epoch": 2, "train_loss": 0.8, "effective_rank_mean": 6.0}),  # re-logged after a resume
    ]
    (tmp_path / "log.txt").write_text("\n".join(lines) + "\n")
    assert collapse.erank_over_epochs(tmp_path) == ([0, 2], [3.0, 6.0])
    assert collapse.erank_over_epochs(tmp_path, "effective_rank_cls") == ([0], [2.0])


def test_load_for_analysis_from_stored_args_and_from_bare_state_dict(tmp_path):
    original = micro_checkpoint(tmp_path / "ours.pth").eval()
    lm = features.load_for_analysis(tmp_path / "ours.pth")
    assert lm.source == "inferred" and lm.name == "mae_vit_tiny_patch16" and lm.input_size == 32
    assert lm.model_args["kwargs"]["num_heads"] == 2 and lm.args["model"] == "mae_vit_tiny_patch16"
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(lm.model.forward_features(x), original.forward_features(x), atol=1e-6)

    # A foreign file with no args: width, depth, patch, grid and decoder come from the shapes.
    foreign = MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=1,
                                   decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=1,
                                   norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    torch.save({"model": foreign.state_dict()}, tmp_path / "foreign.pth")
    lm = features.load_for_analysis(tmp_path / "foreign.pth")
    assert lm.source == "inferred" and lm.input_size == 32 and isinstance(lm.model, MaskedAutoencoderViT)
    assert lm.model.patch_size == 8 and len(lm.model.blocks) == 2
    with torch.no_grad():
        assert torch.allclose(lm.model.forward_features(x), foreign.forward_features(x), atol=1e-6)


def test_collapse_cli_on_micro_checkpoints(tmp_path):
    micro_checkpoint(tmp_path / "a.pth")
    micro_checkpoint(tmp_path / "b.pth", embed_dim=48)
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.txt").write_text("".join(json.dumps({"epoch": e, "effective_rank_mean": 2.0 + e}) + "\n" for e in range(3)))
    out = tmp_path / "out"
    cli(["collapse", "--checkpoints", str(tmp_path / "a.pth"), str(tmp_path / "b.pth"), "--labels", "MAE", "U-MAE",
         "--runs", str(run), "--dataset", "digits", "--num_samples", "40", "--device", "cpu",
         "--output_dir", str(out)])
    result = json.loads((out / "collapse.json").read_text())
    assert [e["label"] for e in result["checkpoints"]] == ["MAE", "U-MAE"]
    assert [e["feature_dim"] for e in result["checkpoints"]] == [32, 48]
    # Second computation: the same images through the same model, measured directly.
    lm = features.load_for_analysis(tmp_path / "a.pth")
    ds = features.build_eval_dataset("digits", None, "val", 32)
    idx = result["sample"]["indices"]
    assert len(idx) == 40 and idx == features.random_indices(len(ds), 40, 0).tolist()
    feats, _ = features.extract_features(lm.model, ds, idx)
    assert abs(result["checkpoints"][0]["effective_rank"] - metrics.effective_rank(feats)) < 1e-4
    assert len(result["checkpoints"][0]["spectrum"]) == 32 and result["checkpoints"][0]["spectrum"][0] == 1.0
    assert Image.open(out / "spectra.png").size == (640, 480)
    assert Image.open(out / "erank_over_epochs.png").size == (640, 480)
    csv = (out / "erank_over_epochs.csv").read_text().splitlines()
    assert csv[0] == "label,epoch,effective_rank" and csv[1:] == ["run,0,2.0", "run,1,3.0", "run,2,4.0"]


def test_random_init_baseline_is_the_first_architecture_freshly_seeded(tmp_path):
    micro_checkpoint(tmp_path / "a.pth", embed_dim=48)
    out = tmp_path / "out"
    cli(["collapse", "--checkpoints", str(tmp_path / "a.pth"), "--labels", "MAE", "--random_init", "--seed", "3",
         "--dataset", "digits", "--num_samples", "40", "--device", "cpu", "--output_dir", str(out)])
    entries = json.loads((out / "collapse.json").read_text())["checkpoints"]
    assert [e["label"] for e in entries] == ["MAE", "random init (seed 3)"]
    # Second computation: the same factory and sizes, seeded, not trained, on the same images.
    torch.manual_seed(3)
    fresh = MaskedAutoencoderViT(**{**MICRO, "embed_dim": 48}).eval()
    ds = features.build_eval_dataset("digits", None, "val", 32)
    feats, _ = features.extract_features(fresh, ds, features.random_indices(len(ds), 40, 3))
    assert abs(entries[1]["effective_rank"] - metrics.effective_rank(feats)) < 1e-4
    assert abs(entries[1]["effective_rank"] - entries[0]["effective_rank"]) > 1e-3  # not the trained weights


def test_classifier_and_unknown_name_fall_back_to_shapes(tmp_path, caplog):
    x = torch.randn(2, 3, 32, 32)
    clf = VisionTransformerClassifier(global_pool=True, img_size=32, patch_size=4, embed_dim=64, depth=1, num_heads=1,
                                      num_classes=5, qkv_bias=True).eval()
    torch.save({"model": clf.state_dict()}, tmp_path / "clf.pth")
    lm = features.load_for_analysis(tmp_path / "clf.pth")
    assert isinstance(lm.model, VisionTransformerClassifier) and lm.model.global_pool_enabled
    with torch.no_grad():
        assert torch.allclose(lm.model.forward_features(x), clf.forward_features(x), atol=1e-6)
    # main_linprobe.py may store the MAE name it was given; the weights say "classifier".
    args = argparse.Namespace(model="mae_vit_tiny_patch16", input_size=32, patch_size=4, embed_dim=64, depth=1,
                              num_heads=1, global_pool=True)
    torch.save({"model": clf.state_dict(), "args": args}, tmp_path / "probe.pth")
    lm = features.load_for_analysis(tmp_path / "probe.pth")
    assert lm.name == "vit_tiny_patch16" and isinstance(lm.model, VisionTransformerClassifier)
    with torch.no_grad():
        assert torch.allclose(lm.model.forward_features(x), clf.forward_features(x), atol=1e-6)
    # Stored args naming a model this process does not know: rebuilt from the shapes instead.
    mae = MaskedAutoencoderViT(**{**MICRO, "embed_dim": 64, "num_heads": 1, "decoder_num_heads": 1}).eval()
    torch.save({"model": mae.state_dict(), "args": argparse.Namespace(model="mae_vit_gone", input_size=32)},
               tmp_path / "gone.pth")
    with caplog.at_level("WARNING", logger="umae.checkpoint"):
        lm = features.load_for_analysis(tmp_path / "gone.pth")
    assert "mae_vit_gone" in caplog.text and lm.name != "mae_vit_gone"
    with torch.no_grad():
        assert torch.allclose(lm.model.forward_features(x), mae.forward_features(x), atol=1e-6)


def test_model_flag_names_the_factory_and_input_size_resamples(tmp_path):
    """`--model` gives a bare state dict its factory (heads no shape tells); `--input_size` rebuilds
    at another size; a stored "model_args" record is used as is."""
    torch.manual_seed(0)
    micro = create_model("mae_vit_micro").eval()  # 2 heads of width 16, LayerNorm eps 1e-5
    torch.save({"model": micro.state_dict()}, tmp_path / "bare.pth")
    x = torch.randn(2, 3, 32, 32)
    assert features.load_for_analysis(tmp_path / "bare.pth").model.blocks[0].attn.num_heads == 1  # guessed
    lm = features.load_for_analysis(tmp_path / "bare.pth", model="mae_vit_micro")
    assert lm.source == "command line" and lm.model.blocks[0].attn.num_heads == 2
    with torch.no_grad():
        assert torch.allclose(lm.model.forward_features(x), micro.forward_features(x), atol=1e-6)
    lm = features.load_for_analysis(tmp_path / "bare.pth", model="mae_vit_micro", input_size=48)
    assert lm.input_size == 48 and lm.model.pos_embed.shape[1] == 1 + 12 * 12
    record = ckpt.model_args("mae_vit_micro", {"embed_dim": 48, "num_heads": 3})
    model = ckpt.build_model(record).eval()
    torch.save({"model": model.state_dict(), "model_args": record}, tmp_path / "new.pth")
    lm = features.load_for_analysis(tmp_path / "new.pth", model="mae_vit_tiny_patch16")
    assert lm.source == "model_args" and lm.name == "mae_vit_micro" and lm.model_args == record
    with torch.no_grad():
        assert torch.allclose(lm.model.forward_features(x), model.forward_features(x), atol=1e-6)


def test_random_indices_are_the_images_training_measures():
    """Same seed, same images as the effective rank logged during pre-training."""
    ds = TensorDataset(torch.arange(50).float()[:, None])
    logged = fixed_images(ds, 10, seed=0)[:, 0].long().tolist()
    assert features.random_indices(50, 10, 0).tolist() == sorted(logged)


def test_figure_titles_name_the_data():
    from umae_plugin.analysis.features import data_name

    assert data_name("imagefolder", "/tmp/umae-data/cifar10", "val") == "cifar10 val"
    assert data_name("digits", None, "train") == "digits train"
