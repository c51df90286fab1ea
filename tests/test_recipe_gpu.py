"""recipes/cifar10_gpu.py: its SMOKE mode end to end (digits, a tiny encoder, three arms in worker
processes, csv / md / png, a second start skips every run), and its batched augmentation against
closed forms (identity crop, mirror, a plain crop) and an independent normalisation."""
import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from umae_plugin import data

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "recipes" / "cifar10_gpu.py"


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("cifar10_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def smoke(*argv, out):
    env = dict(os.environ, SMOKE="1")
    return subprocess.run([sys.executable, str(SCRIPT), *argv, "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_smoke_run_writes_paired_tables_and_curves(tmp_path, recipe):
    first = smoke("run", out=tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    with open(tmp_path / "cifar10_gpu.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == recipe.COLUMNS
    assert [(r["arm"], r["seed"]) for r in rows] == [("mae", "0"), ("umae_cls", "0"), ("umae_mean", "0")]
    for r in rows:  # the baselines are measured once per seed, in the MAE run
        empty = [k for k, v in r.items() if v == ""]
        assert empty == ([] if r["arm"] == "mae" else recipe.BASELINE_KEYS), (r["arm"], empty)
        assert r["device"] == "CPU" and r["epochs"] == "2"
        assert 0 <= float(r["test_acc1_mean"]) <= 100 and 0 <= float(r["online_probe_masked_acc1_cls"]) <= 100
        assert float(r["effective_rank_cls"]) >= 1 and float(r["effective_rank_init_mean"]) >= 1
    by_arm = {r["arm"]: r for r in rows}
    assert float(by_arm["mae"]["train_loss_unif"]) == 0 and float(by_arm["umae_mean"]["train_loss_unif"]) > 0
    # same seed: same initialisation, so the arms' initial measures agree (the model classes share weights)
    assert by_arm["mae"]["effective_rank_init_cls"] == by_arm["umae_cls"]["effective_rank_init_cls"]

    md = (tmp_path / "cifar10_gpu.md").read_text()
    assert "| measure | MAE | U-MAE cls | U-MAE mean | cls - MAE | mean - MAE |" in md
    assert "| linear probe, mean pool (%) |" in md and "(one pair)" in md and "on CPU" in md
    assert "| arm | seed |" in md  # the per-seed rows
    mae = by_arm["mae"]
    assert all(0 <= float(mae[k]) <= 100 for k in recipe.BASELINE_KEYS)
    assert f"| raw pixels | {float(mae['pixels_test_acc1']):.2f} | {float(mae['pixels_knn_acc1']):.2f} |" in md
    assert f"| random initialisation, class token | {float(mae['init_test_acc1_cls']):.2f} |" in md
    png = tmp_path / "cifar10_gpu_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for arm in recipe.ARMS:  # curves: init, then every epoch
        assert (tmp_path / f"{arm}_seed0" / "result.json").is_file()

    again = smoke("run", out=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skip ") == 3


def test_augment_is_seeded(recipe):
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    a = recipe.gpu_augment(images, torch.Generator().manual_seed(7), 32)
    b = recipe.gpu_augment(images, torch.Generator().manual_seed(7), 32)
    c = recipe.gpu_augment(images, torch.Generator().manual_seed(8), 32)
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    crop = data.resized_crop(images, data.crop_flip_params(6, torch.Generator().manual_seed(7)), 24)
    assert crop.shape == (6, 3, 24, 24) and crop.dtype == torch.float32
    assert crop.min() >= 0 and crop.max() <= 255


def test_full_crop_without_flip_is_identity_and_flip_mirrors(recipe):
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    whole = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0))
    same = data.resized_crop(images, data.crop_flip_params(4, torch.Generator(), flip_p=0.0, **whole), 32)
    torch.testing.assert_close(same, images.float(), atol=1e-3, rtol=0)
    assert torch.equal(same.round().to(torch.uint8), images)
    flipped = data.resized_crop(images, data.crop_flip_params(4, torch.Generator(), flip_p=1.0, **whole), 32)
    assert torch.equal(flipped.round().to(torch.uint8), images.flip(-1))


def test_plain_crop_and_box_inside_image(recipe):
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    # the top-left 16x16 quarter at its own size: box [0, 0.5] x [0, 0.5] of the image -> pixels 0..15
    theta = torch.tensor([[0.5, 0.0, -0.5], [0.0, 0.5, -0.5]]).expand(2, 2, 3)
    quarter = data.resized_crop(images, theta, 16)
    assert torch.equal(quarter.round().to(torch.uint8), images[:, :, :16, :16])
    theta = data.crop_flip_params(4096, torch.Generator().manual_seed(0), scale=(0.2, 1.0))
    w, h = theta[:, 0, 0].abs(), theta[:, 1, 1]
    assert (w <= 1 + 1e-6).all() and (h <= 1 + 1e-6).all()
    # the box [t - s, t + s] lies inside [-1, 1] on both axes
    assert (theta[:, 0, 2].abs() + w <= 1 + 1e-5).all() and (theta[:, 1, 2].abs() + h <= 1 + 1e-5).all()
    area = w * h  # clamped boxes (area * ratio > 1) keep at least 0.75 of the image: never below the scale's 0.2
    assert area.max() <= 1 + 1e-6 and area.min() >= 0.2 - 1e-6
    assert 0.4 < (theta[:, 0, 0] < 0).float().mean() < 0.6  # flips about half


def test_normalize_matches_torchvision(recipe):
    from PIL import Image
    from torchvision import transforms

    from umae_plugin.data import IMAGENET_MEAN, IMAGENET_STD

    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    expected = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(
        Image.fromarray(pixels))
    got = recipe.normalize(torch.from_numpy(pixels).permute(2, 0, 1)[None])[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
