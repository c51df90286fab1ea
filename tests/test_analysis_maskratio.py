"""maskratio tool: vectorised masked-image distances against python loops over patch pairs."""
import itertools
import json
import math
import statistics

import pytest
import torch
from PIL import Image

from umae_plugin.analysis import maskratio
from umae_plugin.analysis.__main__ import main as cli


def brute_force(imgs, visible, p, reduce):
    """Distance matrix by loops: patches cut out of the images one by one, l2 per pair."""
    n = imgs.shape[0]
    g = imgs.shape[-1] // p
    cut = lambda img, a: img[:, (a // g) * p:(a // g + 1) * p, (a % g) * p:(a % g + 1) * p]  # noqa: E731
    out = torch.zeros(n, n, dtype=torch.float64)
    for i, j in itertools.product(range(n), range(n)):
        d = [torch.linalg.vector_norm(cut(imgs[i], a) - cut(imgs[j], b)).item()
             for a in range(g * g) if visible[i, a] for b in range(g * g) if visible[j, b]]
        out[i, j] = max(d) if reduce == "max" else sum(d) / len(d)
    return out


@pytest.fixture
def tiny_set():
    """2 classes x 3 images of 3x8x8 (patch 4: 4 patches of 48 values), class-dependent means."""
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64)
    imgs[:3] += 1.5
    return imgs, torch.tensor([0, 0, 0, 1, 1, 1])


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_distances_match_brute_force(tiny_set, reduce):
    imgs, labels = tiny_set
    patches = maskratio.patchify(imgs, 4)
    uneven = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 0], [1, 0, 1, 0], [0, 1, 0, 0]], dtype=torch.bool)
    even = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    masks = torch.stack([uneven, even])  # the general path and the equal-count (gather) path
    got = maskratio.masked_image_distances(patches, masks, reduce, max_block_elems=2 * 4 * 6 * 4)  # 2-image blocks
    for k in range(2):
        want = brute_force(imgs, masks[k], 4, reduce)
        assert torch.allclose(got[k], want, atol=1e-9), (k, got[k], want)
        intra, inter = maskratio.class_means(got[k], labels)
        same = [want[i, j] for i, j in itertools.combinations(range(6), 2) if labels[i] == labels[j]]
        diff = [want[i, j] for i, j in itertools.combinations(range(6), 2) if labels[i] != labels[j]]
        assert len(same) == 6 and len(diff) == 9
        assert abs(intra.item() - sum(same) / 6) < 1e-9 and abs(inter.item() - sum(diff) / 9) < 1e-9


def test_random_visible_keeps_the_model_count():
    g = torch.Generator().manual_seed(0)
    for ratio, keep in ((0.0, 16), (0.25, 12), (0.75, 4), (0.99, 1)):
        vis = maskratio.random_visible(3, 5, 16, ratio, g)
        assert vis.shape == (3, 5, 16) and (vis.sum(-1) == keep).all()
    assert not torch.equal(*maskratio.random_visible(2, 5, 16, 0.5, g))  # draws differ
    with pytest.raises(ValueError):
        maskratio.random_visible(1, 1, 4, 1.0, g)


def test_table_averages_draws(tiny_set):
    imgs, labels = tiny_set
    patches = maskratio.patchify(imgs, 4)
    rows = maskratio.mask_ratio_table(patches, labels, [0.0, 0.5], draws=3, reduce="mean", seed=1)
    assert [r["visible_patches"] for r in rows] == [4, 2]
    # Ratio 0: nothing is masked, so every draw gives the unmasked mean distance exactly.
    full = brute_force(imgs, torch.ones(6, 4, dtype=torch.bool), 4, "mean")
    intra, inter = maskratio.class_means(full, labels)
    assert abs(rows[0]["intra"] - intra.item()) < 1e-9 and rows[0]["intra_std"] < 1e-12
    assert abs(rows[0]["intra_inter_ratio"] - (intra / inter).item()) < 1e-9


def test_maskratio_cli_on_digits(tmp_path, capsys):
    out = tmp_path / "out"
    result = cli(["maskratio", "--dataset", "digits", "--input_size", "32", "--patch_size", "8", "--num_classes", "3",
                  "--per_class", "4", "--ratios", "0.25", "0.5", "0.75", "--draws", "2", "--device", "cpu",
                  "--output_dir", str(out)])
    rows = json.loads((out / "maskratio.json").read_text())["rows"]
    assert [r["mask_ratio"] for r in rows] == [0.25, 0.5, 0.75]
    best = min(rows, key=lambda r: r["intra_inter_ratio"])["mask_ratio"]
    assert result["best_mask_ratio"] == best and f"at mask ratio {best:g}" in capsys.readouterr().out
    assert (out / "maskratio.csv").read_text().startswith(",".join(maskratio.COLUMNS))
    assert "| mask_ratio |" in (out / "maskratio.md").read_text()
    assert Image.open(out / "maskratio.png").size == (1000, 440)


def _tiny_sample(seed):
    """Like `tiny_set`, a fresh draw: 2 classes x 3 images of 3x8x8, patch 4."""
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64)
    imgs[:3] += 1.5
    return imgs, torch.tensor([0, 0, 0, 1, 1, 1])


def test_sample_spread_over_per_sample_means():
    samples = [_tiny_sample(s) for s in (10, 11, 12)]
    patched = [(maskratio.patchify(imgs, 4), labels) for imgs, labels in samples]
    rows, per_sample = maskratio.mask_ratio_study(patched, [0.0, 0.5], draws=4, reduce="mean", seed=3)
    assert per_sample.shape == (3, 2)
    # Ratio 0 masks nothing: each sample's ratio is its unmasked intra / inter, by loops.
    unmasked = []
    for imgs, labels in samples:
        intra, inter = maskratio.class_means(brute_force(imgs, torch.ones(6, 4, dtype=torch.bool), 4, "mean"), labels)
        unmasked.append((intra / inter).item())
    # Ratio 0.5: each sample on its own, with the mask seed it gets in the study (seed + s).
    alone = [maskratio.mask_ratio_table(p, y, [0.0, 0.5], draws=4, reduce="mean", seed=3 + s)
             for s, (p, y) in enumerate(patched)]
    masked = [t[1]["intra_inter_ratio"] for t in alone]
    for row, values in zip(rows, (unmasked, masked)):
        assert abs(row["intra_inter_ratio"] - statistics.mean(values)) < 1e-12
        assert abs(row["ratio_sample_std"] - statistics.stdev(values)) < 1e-12  # over the 3 per-sample means
    assert rows[0]["ratio_std"] < 1e-12 and rows[0]["ratio_total_std"] == pytest.approx(rows[0]["ratio_sample_std"])
    intra_means = [t[1]["intra"] for t in alone]
    assert abs(rows[1]["intra_sample_std"] - statistics.stdev(intra_means)) < 1e-12
    # Within-sample (draw) spread: root mean square of each sample's std over its draws.
    draw_std = math.sqrt(statistics.mean(t[1]["ratio_std"] ** 2 for t in alone))
    assert abs(rows[1]["ratio_std"] - draw_std) < 1e-12
    assert rows[1]["ratio_total_std"] == pytest.approx(math.hypot(draw_std, statistics.stdev(masked)))
    assert sum(r["lowest_in_samples"] for r in rows) == 3


def test_one_sample_has_no_sample_spread(tiny_set):
    imgs, labels = tiny_set
    rows = maskratio.mask_ratio_table(maskratio.patchify(imgs, 4), labels, [0.25, 0.75], draws=3, seed=0)
    for row in rows:
        assert math.isnan(row["ratio_sample_std"]) and math.isnan(row["intra_sample_std"])
        assert row["ratio_total_std"] == row["ratio_std"] > 0 and row["lowest_in_samples"] in (0, 1)
    assert maskratio.spread_label(rows).endswith("mask draws only")


def test_star_only_for_a_separated_minimum():
    assert maskratio.separated_minimum([1.0, 0.8, 1.0], [0.05, 0.05, 0.05]) == 1
    assert maskratio.separated_minimum([1.0, 0.95, 1.0], [0.05, 0.05, 0.05]) is None  # intervals overlap
    assert maskratio.separated_minimum([1.0, 0.8], [0.01, float("nan")]) == 1  # NaN spread counts as 0


def test_maskratio_cli_with_samples(tmp_path, capsys):
    out = tmp_path / "out"
    result = cli(["maskratio", "--dataset", "digits", "--input_size", "32", "--patch_size", "8", "--num_classes", "3",
                  "--per_class", "4", "--ratios", "0.25", "0.75", "--samples", "3", "--draws", "2", "--device", "cpu",
                  "--output_dir", str(out)])
    saved = json.loads((out / "maskratio.json").read_text())
    assert len(saved["samples"]) == 3 and saved["samples"][0]["indices"] == saved["indices"]
    assert len({tuple(s["indices"]) for s in saved["samples"]}) == 3  # different images
    for i, row in enumerate(saved["rows"]):
        per_sample = [s["intra_inter_ratio"][i] for s in saved["samples"]]
        assert row["ratio_sample_std"] == pytest.approx(statistics.stdev(per_sample))
    assert result["settings"]["samples"] == 3
    assert "over image samples and mask draws" in (out / "maskratio.md").read_text()
    assert "by the error bars" in capsys.readouterr().out
