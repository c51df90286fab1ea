"""The pre-training input pipelines (`--data_backend pil | tensor | gpu`, umae_plugin.data): uint8
until the device with bitwise the reference's float values, JPEG headers against PIL, the `tensor`
backend close to PIL, the `gpu` backend (CPU as the device) equal to the `tensor` backend, crop
boxes equal to and distributed like the reference transform's, per-file fallbacks, and short
pre-trainings with each backend."""
import io
import json
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import main_pretrain
from umae_plugin import data
from umae_plugin.data import (DeviceDecodeLoader, build_loader, build_pretrain_dataset, build_pretrain_loader,
                              jpeg_header, normalize_pixels, not_for_jpeg_decoder, pretrain_transform)


def photo_like(rng, h, w):
    """Smooth colour noise plus a gradient: compresses and resamples like a photo."""
    coarse = rng.uniform(0, 255, size=(max(2, h // 8), max(2, w // 8), 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    pixels = smooth + np.linspace(-30, 30, w)[None, :, None] + rng.normal(0, 4, size=(h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """An image folder of 16 RGB JPEGs of assorted sizes, 2 classes."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for n in range(16):
        folder = root / "train" / f"class_{n % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        h, w = (int(v) for v in rng.integers(40, 90, size=2))
        photo_like(rng, h, w).save(folder / f"{n:02d}.jpg", quality=90)
    return root


def batches(loader, epoch=0):
    data.set_epoch(loader, epoch)
    return [(imgs.clone(), targets.clone()) for imgs, targets in loader]


# ---------------------------------------------------------------------------------------------
# uint8 until the device


def test_normalize_pixels_is_bitwise_totensor_normalize_on_every_level():
    levels = np.arange(256, dtype=np.uint8)
    pixels = np.stack([np.roll(levels, 17 * c) for c in range(3)], -1).reshape(16, 16, 3)
    reference = transforms.Compose([transforms.ToTensor(), transforms.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])
    expected = reference(Image.fromarray(pixels))
    got = normalize_pixels(torch.from_numpy(pixels).permute(2, 0, 1)[None])[0]
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    # timm's PrefetchLoader folds 255 into mean / std: not bitwise (why it is not used)
    mean = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(data.IMAGENET_STD).view(3, 1, 1) * 255
    folded = (torch.from_numpy(pixels).permute(2, 0, 1).float() - mean) / std
    assert not torch.equal(folded, expected)


@pytest.mark.parametrize("workers", [0, 2])
def test_uint8_loader_gives_the_reference_float_batches_bitwise(jpegs, workers):
    """Same seed: the uint8 training loader + normalize_pixels == ToTensor + Normalize in the workers."""
    uint8_set = build_pretrain_dataset("imagefolder", jpegs, 32, "pil")
    float_set = data.build_dataset("imagefolder", jpegs, "train", pretrain_transform(32))
    a = batches(build_loader(uint8_set, 4, train=True, num_workers=workers, pin_memory=False, seed=3), epoch=1)
    b = batches(build_loader(float_set, 4, train=True, num_workers=workers, pin_memory=False, seed=3), epoch=1)
    assert len(a) == 4
    for (u8, ta), (fl, tb) in zip(a, b):
        assert u8.dtype == torch.uint8 and u8.shape == (4, 3, 32, 32)
        assert torch.equal(normalize_pixels(u8), fl) and torch.equal(ta, tb)


def test_digits_pretraining_set_is_uint8_too():
    ds = build_pretrain_dataset("digits", None, 32, "pil")
    img, _ = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32)


# ---------------------------------------------------------------------------------------------
# JPEG headers


def encode(img, **kw):
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode, kw, channels", [("RGB", {}, 3), ("RGB", {"progressive": True}, 3),
                                                ("L", {}, 1), ("CMYK", {}, 4)])
def test_jpeg_header_reads_the_size_and_channels_pil_reads(mode, kw, channels):
    rng = np.random.default_rng(1)
    img = photo_like(rng, 37, 53).convert(mode)
    blob = encode(img, quality=90, **kw)
    header = jpeg_header(blob)
    assert (header.width, header.height) == Image.open(io.BytesIO(blob)).size == (53, 37)
    assert header.components == channels and header.precision == 8
    assert header.marker == (0xC2 if kw else 0xC0)
    assert (not_for_jpeg_decoder(header) is None) == (channels == 3)
    assert jpeg_header(np.frombuffer(blob, np.uint8).copy()) == header  # numpy bytes too (as read from files)


def test_jpeg_header_of_other_files_is_none():
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, "PNG")
    assert jpeg_header(png.getvalue()) is None and not_for_jpeg_decoder(None) == "not a JPEG"
    blob = encode(Image.new("RGB", (8, 8)))
    assert jpeg_header(blob[:20]) is None  # cut before the frame header
    assert jpeg_header(b"") is None and jpeg_header(b"\xff\xd8\xff\xd9") is None


# ---------------------------------------------------------------------------------------------
# tensor and gpu backends


def test_tensor_backend_crops_the_same_boxes_close_to_pil(jpegs):
    """Same draws as the PIL pipeline; values close to but not equal to PIL's (different decoder and
    resampler rounding): here a mean absolute difference well under one level of 255."""
    pil = batches(build_pretrain_loader(build_pretrain_dataset("imagefolder", jpegs, 48, "pil"), 8, backend="pil",
                                        device="cpu", input_size=48, num_workers=0, pin_memory=False))
    ten = batches(build_pretrain_loader(build_pretrain_dataset("imagefolder", jpegs, 48, "tensor"), 8,
                                        backend="tensor", device="cpu", input_size=48, num_workers=0, pin_memory=False))
    diffs = []
    for (a, ta), (b, tb) in zip(pil, ten):
        assert b.dtype == torch.uint8 and b.shape == a.shape == (8, 3, 48, 48) and torch.equal(ta, tb)
        diffs.append((a.float() - b.float()).abs().mean().item())
    assert 0 < max(diffs) < 1.0, diffs  # different crops or flips would differ by tens of levels


@pytest.mark.parametrize("workers", [0, 2])
def test_gpu_backend_on_the_cpu_equals_the_tensor_backend(jpegs, workers):
    """The device path (bytes from the workers, batched decode, crop, flip on the device; here the
    CPU) gives bitwise the tensor backend's batches: the same draws, the same decoder and resize."""
    ten = batches(build_pretrain_loader(build_pretrain_dataset("imagefolder", jpegs, 32, "tensor"), 4,
                                        backend="tensor", device="cpu", input_size=32, num_workers=0,
                                        pin_memory=False), epoch=2)
    loader = build_pretrain_loader(build_pretrain_dataset("imagefolder", jpegs, 32, "gpu"), 4, backend="gpu",
                                   device="cpu", input_size=32, num_workers=workers, pin_memory=True)
    assert isinstance(loader, DeviceDecodeLoader) and loader.prefetch == (workers > 0) and len(loader) == 4
    gpu = batches(loader, epoch=2)
    assert len(gpu) == len(ten) == 4
    for (a, ta), (b, tb) in zip(ten, gpu):
        assert b.dtype == torch.uint8 and b.shape == (4, 3, 32, 32) and torch.equal(a, b) and torch.equal(ta, tb)
        x = normalize_pixels(b)
        lo = (0 - max(data.IMAGENET_MEAN)) / min(data.IMAGENET_STD)
        hi = (1 - min(data.IMAGENET_MEAN)) / min(data.IMAGENET_STD)
        assert lo - 1e-6 <= x.min() and x.max() <= hi + 1e-6
    assert loader.bad_images == 0


def test_prefetching_loader_stops_cleanly_when_left_early(jpegs):
    loader = build_pretrain_loader(build_pretrain_dataset("imagefolder", jpegs, 32, "gpu"), 2, backend="gpu",
                                   device="cpu", input_size=32, num_workers=1, pin_memory=False)
    for _ in range(2):
        first = next(iter(loader))
        assert first[0].shape == (2, 3, 32, 32)
    assert len(batches(loader)) == 8  # and a full pass afterwards


def _spy_boxes(monkeypatch):
    """Record the (top, left, height, width) every torchvision resized_crop call is given."""
    boxes = []
    real = transforms.functional.resized_crop

    def spy(img, top, left, height, width, *args, **kwargs):
        boxes.append((top, left, height, width))
        return real(img, top, left, height, width, *args, **kwargs)

    monkeypatch.setattr(transforms.functional, "resized_crop", spy)
    return boxes


def test_gpu_backend_draws_the_reference_transforms_boxes(jpegs, monkeypatch):
    """Per (seed, epoch, index), the boxes the workers draw for the device are the boxes the PIL
    pipeline crops."""
    boxes = _spy_boxes(monkeypatch)
    pil_set = build_pretrain_dataset("imagefolder", jpegs, 32, "pil")
    batches(build_loader(pil_set, 4, train=True, num_workers=0, pin_memory=False, seed=5), epoch=1)
    gpu_set = build_pretrain_dataset("imagefolder", jpegs, 32, "gpu")
    encoded = build_loader(gpu_set, 4, train=True, num_workers=0, pin_memory=False, seed=5)
    data.set_epoch(encoded, 1)
    drawn = [box for batch, _ in encoded for box in batch.boxes]
    assert drawn == boxes and len(drawn) == 16


def ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b|."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, grid, side="right") / len(a) - np.searchsorted(b, grid, side="right") / len(b)).max()


def test_crop_parameter_distribution_matches_the_pil_paths(monkeypatch):
    """Boxes of the device path (drawn from the per-sample seeds of seed 0) against those the PIL
    transform crops (seed 1, independent draws) on a 60x80 image: the area fraction, log aspect
    ratio and relative box centre agree in distribution (two-sample KS, n = m = 1500, below the
    0.001-level critical distance 1.95 * sqrt(2 / 1500) = 0.071); the flip rate is 1/2."""
    n, h, w = 1500, 60, 80
    transform = data.TensorPretrainTransform(16)
    drawn, flips = [], []
    for i in range(n):
        data.seed_global_rngs(data.sample_seed(0, 0, i))
        box, flip = transform.draw(h, w)
        drawn.append(box)
        flips.append(flip)
    boxes = _spy_boxes(monkeypatch)
    reference = pretrain_transform(16)
    img = Image.new("RGB", (w, h))
    for i in range(n):
        data.seed_global_rngs(data.sample_seed(1, 0, i))
        reference(img)

    def features(bs):
        t, l, bh, bw = np.array(bs, dtype=np.float64).T
        return [bh * bw / (h * w), np.log(bw / bh), (l + bw / 2) / w, (t + bh / 2) / h]

    critical = 1.95 * math.sqrt(2 / n)
    for name, a, b in zip(["area", "log aspect", "centre x", "centre y"], features(drawn), features(boxes)):
        assert ks_distance(a, b) < critical, name
    assert features(drawn)[0].min() >= 0.2 - 0.05 and features(drawn)[0].max() <= 1.0  # the 0.2-1.0 scale
    assert abs(np.mean(flips) - 0.5) < 4 * math.sqrt(0.25 / n)


# ---------------------------------------------------------------------------------------------
# fallbacks: one bad file never fails a batch


@pytest.fixture
def mixed(tmp_path):
    """6 good RGB JPEGs, a PNG, a grayscale and a CMYK JPEG, and a truncated JPEG (header intact)."""
    root = tmp_path / "mixed"
    folder = root / "train" / "a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for n in range(6):
        photo_like(rng, 40, 48).save(folder / f"good{n}.jpg", quality=90)
    photo_like(rng, 40, 48).save(folder / "png.png")
    photo_like(rng, 40, 48).convert("L").save(folder / "gray.jpg", quality=90)
    photo_like(rng, 40, 48).convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    blob = encode(photo_like(rng, 40, 48), quality=90)
    (folder / "truncated.jpg").write_bytes(blob[: len(blob) // 2])
    assert jpeg_header(blob[: len(blob) // 2]) is not None
    return root


@pytest.mark.parametrize("backend, workers", [("tensor", 0), ("gpu", 0), ("gpu", 2)])
def test_fallbacks_per_file_and_one_notice(mixed, backend, workers, caplog):
    ds = build_pretrain_dataset("imagefolder", mixed, 24, backend)
    loader = build_pretrain_loader(ds, 5, backend=backend, device="cpu", input_size=24, num_workers=workers,
                                   pin_memory=False)
    with caplog.at_level(logging.INFO, logger="umae.data"):
        got = batches(loader)
    assert [imgs.shape for imgs, _ in got] == [(5, 3, 24, 24)] * 2
    assert loader.bad_images == 1  # the truncated file; PNG, grayscale and CMYK are decoded by PIL
    notices = [r for r in caplog.records if "decoded with PIL on the CPU" in r.getMessage()]
    assert len(notices) == 1
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "truncated.jpg" in r.getMessage()]
    assert len(warned) == 1


def test_a_file_the_device_decoder_refuses_is_decoded_by_pil(mixed, monkeypatch, caplog):
    """A JPEG the (device) decoder refuses, that PIL reads, is decoded by PIL; the batch stands."""
    refused = (mixed / "train" / "a" / "good0.jpg").stat().st_size
    real = data._decode_jpeg

    def picky(files, device):
        if isinstance(files, list):
            if any(len(f) == refused for f in files):
                raise RuntimeError("nvjpeg: unsupported")
            return real(files, device)
        if len(files) == refused:
            raise RuntimeError("nvjpeg: unsupported")
        return real(files, device)

    monkeypatch.setattr(data, "_decode_jpeg", picky)
    ds = build_pretrain_dataset("imagefolder", mixed, 24, "gpu")
    loader = build_pretrain_loader(ds, 10, backend="gpu", device="cpu", input_size=24, num_workers=0,
                                   pin_memory=False)
    with caplog.at_level(logging.INFO, logger="umae.data"):
        (imgs, _), = batches(loader)
    assert imgs.shape == (10, 3, 24, 24) and loader.bad_images == 1


def test_a_batch_of_unreadable_files_only_raises(tmp_path):
    folder = tmp_path / "bad" / "train" / "a"
    folder.mkdir(parents=True)
    blob = encode(Image.new("RGB", (40, 40)), quality=90)
    for n in range(2):
        (folder / f"{n}.jpg").write_bytes(blob[: len(blob) // 2])
    decoder = data.DeviceDecoder("cpu", 8)
    ds = build_pretrain_dataset("imagefolder", tmp_path / "bad", 8, "gpu")
    batch, _ = data.collate_encoded([ds[0], ds[1]])
    with pytest.raises(data.DataError, match="no readable image"):
        decoder(batch)


def test_tensor_and_gpu_backends_need_an_image_folder():
    for backend in ("tensor", "gpu"):
        with pytest.raises(data.UsageError, match="--dataset imagefolder"):
            build_pretrain_dataset("digits", None, 32, backend)


# ---------------------------------------------------------------------------------------------
# short pre-trainings with each backend


def pretrain(out, root, backend, workers=0):
    argv = ["--model", "mae_vit_micro", "--dataset", "imagefolder", "--data_path", str(root), "--input_size", "32",
            "--epochs", "1", "--warmup_epochs", "1", "--batch_size", "4", "--device", "cpu", "--num_workers",
            str(workers), "--output_dir", str(out), "--log_dir", str(out), "--print_freq", "2", "--erank_freq", "0",
            "--data_backend", backend]
    main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv))
    return json.loads((out / "log.txt").read_text().splitlines()[-1])


def test_short_pretraining_with_each_backend(jpegs, tmp_path):
    lines = {b: pretrain(tmp_path / b, jpegs, b, workers=1 if b == "gpu" else 0) for b in ("pil", "tensor", "gpu")}
    for backend, line in lines.items():
        assert math.isfinite(line["train_loss"]), backend
        assert line["train_images_per_s"] > 0 and 0 <= line["train_data_wait_frac"] <= 1 and line["max_mem_mb"] > 0
    # gpu on the CPU sees bitwise the tensor backend's batches; pil's differ slightly
    assert lines["gpu"]["train_loss"] == lines["tensor"]["train_loss"]
    assert lines["pil"]["train_loss"] == pytest.approx(lines["tensor"]["train_loss"], rel=1e-2)


def test_data_backend_flag_refused_for_in_memory_datasets(tmp_path, capsys):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "main_pretrain.py"), "--dataset", "digits", "--model",
                          "mae_vit_tiny_patch16", "--input_size", "32", "--patch_size", "4", "--device", "cpu",
                          "--data_backend", "gpu", "--output_dir", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2 and "error: --data_backend gpu decodes image files" in run.stderr
    assert "Traceback" not in run.stderr


def test_batched_float_crops_equal_the_float_path_image_by_image(jpegs, monkeypatch):
    """The device (non-CPU) path, run on the CPU: batched float resize + rounding + flips gives
    what `resized_crop_uint8`'s float path gives image by image. The CPU's uint8 kernel (PIL's
    algorithm: it clamps to 8 bits between its horizontal and vertical passes) differs on noise
    where bicubic overshoots, by under a level on average."""
    rng = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, int(h), int(w)), dtype=torch.uint8, generator=rng)
              for h, w in [(40, 50), (33, 60), (70, 41)]]
    boxes, flips = [(2, 3, 30, 40), (0, 10, 33, 20), (5, 0, 60, 41)], [True, False, True]
    batched = data.resized_crops_uint8(images, boxes, 24, flips, batched=True)
    monkeypatch.setattr(data, "_UINT8_RESIZE_OK", [False])  # the float path, one image at a time
    one_by_one = torch.stack([data.resized_crop_uint8(i, b, 24, f) for i, b, f in zip(images, boxes, flips)])
    assert batched.dtype == torch.uint8 and batched.shape == (3, 3, 24, 24) and torch.equal(batched, one_by_one)
    monkeypatch.setattr(data, "_UINT8_RESIZE_OK", [True])
    uint8_kernel = data.resized_crops_uint8(images, boxes, 24, flips)
    assert 0 < (uint8_kernel.float() - batched.float()).abs().mean() < 1
    # and a flip is a mirror of the unflipped crop
    plain = data.resized_crop_uint8(images[0], boxes[0], 24, False)
    assert torch.equal(data.resized_crop_uint8(images[0], boxes[0], 24, True), plain.flip(-1))
