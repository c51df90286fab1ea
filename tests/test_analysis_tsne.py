"""tsne tool: seeded per-class sample, panels of the requested pixel size, coordinates saved."""
import argparse
import csv
import json
from functools import partial

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from umae_plugin.analysis import features, tsne
from umae_plugin.analysis.__main__ import main as cli
from umae_plugin.models_mae import MaskedAutoencoderViT


def micro_checkpoint(path, seed):
    torch.manual_seed(seed)
    model = MaskedAutoencoderViT(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                                 decoder_depth=1, decoder_num_heads=2, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    args = argparse.Namespace(model="mae_vit_tiny_patch16", input_size=32, patch_size=4, embed_dim=32, depth=1,
                              num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
                              norm_pix_loss=False, lambda_unif=0.01, unif_pool="mean")
    torch.save({"model": model.state_dict(), "args": args}, path)


def test_per_class_indices_seeded():
    targets = np.repeat(np.arange(5), 7)
    a = features.per_class_indices(targets, 3, 4, seed=0)
    assert len(a) == 12 and len(np.unique(targets[a])) == 3 and np.array_equal(a, features.per_class_indices(targets, 3, 4, 0))
    assert all((targets[a] == c).sum() == 4 for c in np.unique(targets[a]))
    assert len(features.per_class_indices(targets, 0, 100, 0)) == 35  # all classes, capped per class


def test_embed_separates_obvious_clusters():
    rng = np.random.default_rng(0)
    feats = np.concatenate([rng.normal(0, 0.05, (15, 8)) + 3 * np.eye(8)[c] for c in range(2)])
    coords, kl = tsne.embed(feats, seed=0, perplexity=30, max_iter=250)  # perplexity capped below n
    assert coords.shape == (30, 2) and np.isfinite(kl)
    assert tsne.silhouette(feats, np.repeat([0, 1], 15)) > 0.9


def test_figure_title_is_the_given_one_above_each_panels_own(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(tsne.report, "save_figure", lambda fig, path: saved.append(fig) or path)
    panels = [{"label": name, "coords": np.zeros((4, 2)), "silhouette": 0.5, "training_seed": seed}
              for name, seed in (("A", 3), ("B", None))]
    tsne.plot_panels(panels, np.array([0, 0, 1, 1]), ["x", "y"], tmp_path / "t.png", 100, title="the data")
    fig = saved[0]
    assert fig._suptitle.get_text() == "the data"
    assert [ax.get_title() for ax in fig.axes] == [
        f"{name}\n(cosine silhouette of the features, not of this embedding: 0.500)" for name in ("A (training seed 3)",
                                                                                                 "B")]


def test_tsne_cli_two_checkpoints(tmp_path):
    micro_checkpoint(tmp_path / "mae.pth", 0)
    micro_checkpoint(tmp_path / "umae.pth", 1)
    out = tmp_path / "out"
    cli(["tsne", "--checkpoints", str(tmp_path / "mae.pth"), str(tmp_path / "umae.pth"), "--labels", "MAE", "U-MAE",
         "--dataset", "digits", "--num_classes", "3", "--per_class", "6", "--panel_px", "200", "--max_iter", "250", "--device", "cpu",
         "--output_dir", str(out)])
    img = Image.open(out / "tsne.png")
    assert img.size == (400, 240) and img.format == "PNG"  # two 200 px panels under a 40 px title
    rows = list(csv.DictReader(open(out / "tsne.csv")))
    assert len(rows) == 2 * 18 and {r["label"] for r in rows} == {"MAE", "U-MAE"}
    result = json.loads((out / "tsne.json").read_text())
    assert len(result["coords"]["MAE"]) == 18 and len(set(result["classes"])) == 3
    assert result["settings"]["title"] == ("t-SNE of 18 digits val images (3 classes; image sample and t-SNE seed 0), "
                                           "L2-normalised each model's own pooled encoder features")
