import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler, SequentialSampler
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from umae_plugin import data
from umae_plugin.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    RandomResizedCropNoRetry,
    build_dataset,
    build_loader,
    eval_transform,
    finetune_transform,
    linprobe_transform,
    make_synthetic_imagefolder,
    num_bad_images,
    num_classes,
    pretrain_transform,
    set_epoch,
)


@pytest.fixture
def folder(tmp_path):
    return make_synthetic_imagefolder(tmp_path / "ds", num_classes=3, per_class=4, size=24)


# ---------------------------------------------------------------------------------------------
# transforms


def test_imagenet_constants():
    assert IMAGENET_MEAN == pytest.approx((0.485, 0.456, 0.406))
    assert IMAGENET_STD == pytest.approx((0.229, 0.224, 0.225))


@pytest.mark.parametrize("make", [
    pretrain_transform,
    eval_transform,
    lambda s: linprobe_transform(s, train=True),
    lambda s: linprobe_transform(s, train=False),
    lambda s: finetune_transform(s, train=False),
    lambda s: finetune_transform(s, train=True, color_jitter=None, aa="rand-m9-mstd0.5-inc1",
                                 reprob=0.25, remode="pixel", recount=1),
])
def test_transforms_give_square_tensors(make):
    img = Image.new("RGB", (40, 30), (10, 200, 30))
    out = make(16)(img)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 16, 16)


def _by_hand(H, W, scale, ratio):
    """The reference crop's draws, written out: area, log aspect, top, left (in that order)."""
    target_area = H * W * torch.empty(1).uniform_(scale[0], scale[1]).item()
    aspect = math.exp(torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1])).item())
    w = min(round(math.sqrt(target_area * aspect)), W)
    h = min(round(math.sqrt(target_area / aspect)), H)
    i = torch.randint(0, H - h + 1, size=(1,)).item()
    j = torch.randint(0, W - w + 1, size=(1,)).item()
    return i, j, h, w


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("scale, ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.2, 0.9), (0.5, 2.0))])
def test_linprobe_crop_draws_equal_hand_computation_and_use_exactly_four_draws(seed, scale, ratio):
    img = Image.new("RGB", (40, 30))  # W=40, H=30
    torch.manual_seed(seed)
    start = torch.get_rng_state()
    got = RandomResizedCropNoRetry.get_params(img, scale, ratio)
    after = torch.get_rng_state()
    torch.set_rng_state(start)
    expect = _by_hand(30, 40, scale, ratio)
    assert got == expect
    assert all(type(v) is int for v in got)
    assert torch.equal(after, torch.get_rng_state())  # the four draws, no more, no fewer
    # the same through a tensor image (C, H, W)
    torch.set_rng_state(start)
    assert RandomResizedCropNoRetry.get_params(torch.zeros(3, 30, 40), scale, ratio) == expect


def test_linprobe_crop_many_draws_follow_the_hand_computation():
    img = Image.new("RGB", (40, 30))
    t = RandomResizedCropNoRetry(16)
    assert t.scale == (0.08, 1.0) and t.ratio == pytest.approx((3 / 4, 4 / 3))
    assert t.interpolation == InterpolationMode.BICUBIC
    torch.manual_seed(123)
    got = [t.get_params(img, t.scale, t.ratio) for _ in range(200)]
    torch.manual_seed(123)
    assert got == [_by_hand(30, 40, t.scale, t.ratio) for _ in range(200)]


def test_linprobe_crop_clamps_instead_of_retrying():
    img = Image.new("RGB", (40, 30))  # W=40, H=30
    torch.manual_seed(0)
    for _ in range(50):
        i, j, h, w = RandomResizedCropNoRetry.get_params(img, (0.5, 1.0), (10.0, 10.0))
        assert w == 40 and j == 0 and 1 <= h <= 30 and 0 <= i <= 30 - h
        i, j, h, w = RandomResizedCropNoRetry.get_params(img, (0.5, 1.0), (0.1, 0.1))
        assert h == 30 and i == 0 and 1 <= w <= 40 and 0 <= j <= 40 - w
    # the whole area at aspect 10 (w = 110 > 40) fits nowhere: torchvision's would draw 10 times,
    # then center-crop h = round(40 / 10) = 4; ours draws once, clamps w to 40, h = round(sqrt(120))
    torch.manual_seed(0)
    start = torch.get_rng_state()
    got = RandomResizedCropNoRetry.get_params(img, (1.0, 1.0), (10.0, 10.0))
    after = torch.get_rng_state()
    assert got[1:] == (0, 11, 40)
    torch.set_rng_state(start)
    assert _by_hand(30, 40, (1.0, 1.0), (10.0, 10.0)) == got
    assert torch.equal(torch.get_rng_state(), after)


@pytest.mark.parametrize("size", [(1, 1), (1, 5), (5, 1), (2, 3)])
def test_linprobe_crop_never_empty_on_tiny_images(size):
    img = Image.new("RGB", size)
    W, H = size
    t = RandomResizedCropNoRetry(4)
    torch.manual_seed(0)
    for scale, ratio in [((1e-6, 1e-6), (3 / 4, 4 / 3)), ((0.08, 1.0), (3 / 4, 4 / 3)), ((1e-4, 0.01), (0.1, 10.0))]:
        for _ in range(300):
            i, j, h, w = t.get_params(img, scale, ratio)
            assert 1 <= h <= H and 1 <= w <= W and 0 <= i <= H - h and 0 <= j <= W - w
    assert t(img).size == (4, 4)


def test_linprobe_train_transform_uses_the_no_retry_crop():
    t = linprobe_transform(32, train=True)
    crop = t.transforms[0]
    assert type(crop) is RandomResizedCropNoRetry
    assert isinstance(crop, transforms.RandomResizedCrop)
    assert crop.size == (32, 32) and crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert crop.interpolation == InterpolationMode.BICUBIC
    assert isinstance(t.transforms[1], transforms.RandomHorizontalFlip)
    assert [type(x) for x in t.transforms[2:]] == [transforms.ToTensor, transforms.Normalize]
    # forward goes through our get_params: same crop box as torchvision's resized_crop on it
    img = Image.fromarray(np.arange(30 * 40 * 3, dtype=np.uint8).reshape(30, 40, 3))
    torch.manual_seed(7)
    start = torch.get_rng_state()
    out = crop(img)
    torch.set_rng_state(start)
    i, j, h, w = _by_hand(30, 40, crop.scale, crop.ratio)
    expect = transforms.functional.resized_crop(img, i, j, h, w, [32, 32], InterpolationMode.BICUBIC, antialias=True)
    assert np.array_equal(np.asarray(out), np.asarray(expect))


def test_eval_transform_resize_and_normalize():
    t = eval_transform(224)
    resize, crop = t.transforms[0], t.transforms[1]
    assert resize.size == 256 and crop.size == (224, 224)
    assert finetune_transform(384, train=False).transforms[0].size == 384
    # a constant image normalises to (c - mean) / std per channel
    out = t(Image.new("RGB", (300, 260), (255, 0, 51)))
    expected = (torch.tensor([1.0, 0.0, 0.2]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out.mean(dim=(1, 2)), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("make", [
    eval_transform,
    lambda s: linprobe_transform(s, train=False),
    lambda s: finetune_transform(s, train=False),
])
def test_small_eval_inputs_are_not_cropped(make):
    """At 64 px or less (CIFAR) evaluation resizes to the input size only: a 32-px image passes
    unchanged (no 32 -> 36 resize and 32 crop dropping ~21% of it); larger inputs keep 224/256."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    plain = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    torch.testing.assert_close(make(32)(img), plain(img), rtol=0, atol=0)
    assert make(64).transforms[0].size == 64 and make(64)(img).shape == (3, 64, 64)
    assert make(96).transforms[0].size == int(96 / 0.875)  # above 64 px: resize to input/0.875, crop


# ---------------------------------------------------------------------------------------------
# image folder


def test_imagefolder_round_trip(folder):
    train = build_dataset("imagefolder", str(folder), "train", eval_transform(16))
    assert len(train) == 12 and train.classes == ["class_0", "class_1", "class_2"]
    assert train.targets == [0] * 4 + [1] * 4 + [2] * 4
    assert num_classes(train) == 3
    img, target = train[5]
    assert img.shape == (3, 16, 16) and target == 1
    raw = build_dataset("imagefolder", folder, "val", None)
    assert raw[0][0].size == (24, 24) and raw[0][0].mode == "RGB"


def test_synthetic_folder_is_deterministic(tmp_path):
    a = make_synthetic_imagefolder(tmp_path / "a", per_class=2, splits=("train",))
    b = make_synthetic_imagefolder(tmp_path / "b", per_class=2, splits=("train",))
    for rel in ["train/class_0/0.png", "train/class_2/1.png"]:
        assert np.array_equal(np.asarray(Image.open(a / rel)), np.asarray(Image.open(b / rel)))
    assert not (tmp_path / "a" / "val").exists()


def test_corrupt_image_is_skipped_counted_and_warned_once(folder, caplog):
    bad = folder / "train" / "class_1" / "0.png"  # index 4
    bad.write_bytes(b"definitely not a png" * 10)
    ds = build_dataset("imagefolder", folder, "train", eval_transform(16))
    before = num_bad_images()
    with caplog.at_level(logging.WARNING, logger=data.log.name):
        img, target = ds[4]
        again, _ = ds[4]
    # replaced by the next sample (index 5), the same every time
    expected, expected_target = ds[5]
    assert target == expected_target == 1
    torch.testing.assert_close(img, expected)
    torch.testing.assert_close(again, expected)
    assert ds.num_bad == 1 and num_bad_images() == before + 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(bad) in warnings[0].getMessage() and f"{before + 1} bad image" in warnings[0].getMessage()

    loader = build_loader(ds, 5, train=False, num_workers=0, pin_memory=False, drop_last=False)
    shapes = [tuple(x.shape) for x, _ in loader]
    assert shapes == [(5, 3, 16, 16), (5, 3, 16, 16), (2, 3, 16, 16)]


def test_corrupt_last_image_wraps_around(folder):
    (folder / "val" / "class_2" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ds = build_dataset("imagefolder", folder, "val", eval_transform(8))
    img, target = ds[len(ds) - 1]
    assert target == 0 and img.shape == (3, 8, 8)


def test_all_images_corrupt_raises(tmp_path):
    root = make_synthetic_imagefolder(tmp_path, num_classes=1, per_class=2, splits=("train",))
    for f in (root / "train" / "class_0").iterdir():
        f.write_bytes(b"junk")
    ds = build_dataset("imagefolder", root, "train", None)
    with pytest.raises(DataError, match="no readable image"):
        ds[0]


def test_missing_and_empty_folders_raise(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope" / "train")):
        build_dataset("imagefolder", tmp_path / "nope", "train", None)
    (tmp_path / "empty" / "val").mkdir(parents=True)
    with pytest.raises(DataError, match=str(tmp_path / "empty" / "val")):
        build_dataset("imagefolder", tmp_path / "empty", "val", None)
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "train" / "cat" / "notes.txt").write_text("no images")
    with pytest.raises(DataError, match=str(tmp_path / "empty" / "train")):
        build_dataset("imagefolder", tmp_path / "empty", "train", None)
    with pytest.raises(DataError, match="data_path"):
        build_dataset("imagefolder", None, "train", None)


def test_bad_name_and_split():
    with pytest.raises(DataError, match="unknown dataset"):
        build_dataset("imagenet22k", "/x", "train", None)
    with pytest.raises(DataError, match="split"):
        build_dataset("digits", None, "test", None)


# ---------------------------------------------------------------------------------------------
# cifar10 and digits


def test_cifar10_missing_without_download(tmp_path):
    with pytest.raises(DataError, match="--download") as info:
        build_dataset("cifar10", tmp_path, "train", None)
    assert str(tmp_path / "cifar-10-batches-py") in str(info.value)


def test_digits():
    from sklearn.datasets import load_digits

    train = build_dataset("digits", None, "train", None)
    val = build_dataset("digits", None, "val", None)
    assert (len(train), len(val)) == (1437, 360)
    assert num_classes(train) == 10 and train.classes == [str(i) for i in range(10)]
    assert set(val.targets) == set(range(10))
    assert set(train.indices).isdisjoint(val.indices)
    assert len(set(train.indices) | set(val.indices)) == 1797
    again = build_dataset("digits", None, "val", None)
    assert np.array_equal(again.indices, val.indices)

    ref = load_digits()
    img, target = train[7]
    assert img.mode == "RGB" and img.size == (32, 32)
    assert target == ref.target[train.indices[7]]
    pixels = np.asarray(img)
    assert np.array_equal(pixels[..., 0], pixels[..., 2])
    # bicubic 4x upscaling of the source, 0..16 mapped onto 0..255 (a second computation with PIL)
    src = Image.fromarray(np.rint(ref.images[train.indices[7]] * 255 / 16).astype(np.uint8))
    assert np.array_equal(pixels[..., 1], np.asarray(src.resize((32, 32), Image.Resampling.BICUBIC)))

    x, _ = build_dataset("digits", None, "val", eval_transform(32))[0]
    assert x.shape == (3, 32, 32)


# ---------------------------------------------------------------------------------------------
# loaders


def test_loader_samplers_and_drop_last(folder):
    ds = build_dataset("imagefolder", folder, "train", eval_transform(8))
    train = build_loader(ds, 5, train=True, num_workers=0, pin_memory=False, seed=3)
    val = build_loader(ds, 5, train=False, num_workers=0, pin_memory=False)
    assert isinstance(train.sampler, DistributedSampler) and train.drop_last
    assert (train.sampler.num_replicas, train.sampler.rank, train.sampler.shuffle) == (1, 0, True)
    assert isinstance(val.sampler, SequentialSampler) and not val.drop_last
    assert len(train) == 2 and len(val) == 3

    def order(loader, epoch):
        set_epoch(loader, epoch)
        return list(loader.sampler)

    assert order(train, 0) == order(train, 0) != order(train, 1)
    assert sorted(order(train, 1)) == list(range(12))
    for epoch in (0, 1, 5):  # torch's one-replica DistributedSampler order, as the MAE reference's
        library = DistributedSampler(range(12), num_replicas=1, rank=0, shuffle=True, seed=3)
        library.set_epoch(epoch)
        assert order(train, epoch) == list(library)
    other = build_loader(ds, 5, train=True, num_workers=0, pin_memory=False, seed=4)
    assert order(other, 0) != order(train, 0)
    set_epoch(val, 5)  # no-op for samplers without set_epoch
    assert list(val.sampler) == list(range(12))


def test_loader_distributed_sampler(folder, monkeypatch):
    ds = build_dataset("imagefolder", folder, "train", None)
    monkeypatch.setattr(data, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    loader = build_loader(ds, 2, train=True, num_workers=0, pin_memory=False, seed=7)
    sampler = loader.sampler
    assert isinstance(sampler, DistributedSampler)
    assert sampler.shuffle and sampler.seed == 7 and sampler.num_replicas == 2 and sampler.rank == 1
    set_epoch(loader, 4)
    assert sampler.epoch == 4
    assert not build_loader(ds, 2, train=False, num_workers=0, pin_memory=False).sampler.shuffle


def test_loader_with_workers(folder):
    ds = build_dataset("imagefolder", folder, "train", eval_transform(8))
    loader = build_loader(ds, 4, train=True, num_workers=1, pin_memory=False)
    assert loader.persistent_workers
    batches = [tuple(x.shape) for x, _ in loader]
    assert batches == [(4, 3, 8, 8)] * 3


# magnitude at which each posterize op asks for 0 bits (PosterizeOriginal keeps 4 or more)
_ZERO_BITS = {"Posterize": 0, "PosterizeIncreasing": 10}


@pytest.mark.parametrize("aa", ["rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5", "augmix-m5-w4-d2", "v0"])
def test_finetune_posterize_to_zero_bits_gives_black_image(aa):
    """Pillow 13 rejects posterizing to 0 bits, which timm's ops ask for at some magnitudes: the
    fine-tune transform's ops give the black image older Pillow gave instead of crashing."""
    import copy

    from timm.data.auto_augment import AugmentOp

    ops = [op for t in finetune_transform(16, train=True, aa=aa).transforms
           for op in (getattr(t, "ops", None) or [o for sub in getattr(t, "policy", ()) for o in sub])
           if isinstance(op, AugmentOp) and op.name in _ZERO_BITS]
    assert ops
    for op in ops:
        op = copy.copy(op)
        op.prob, op.magnitude, op.magnitude_std = 1.0, _ZERO_BITS[op.name], 0
        out = op(Image.new("RGB", (8, 8), (200, 100, 50)))
        assert out.getextrema() == ((0, 0), (0, 0), (0, 0)), op.name


def test_importing_data_leaves_timms_augment_table_alone():
    """The posterize fix lives in the fine-tune transform only (a fresh process: nothing imported yet)."""
    import subprocess
    import sys

    code = ("import timm.data.auto_augment as A; before = dict(A.NAME_TO_OP)\n"
            "import umae_plugin.data as D; assert A.NAME_TO_OP == before, 'import'\n"
            "D.finetune_transform(16, train=True, aa='rand-m9-mstd0.5-inc1'); assert A.NAME_TO_OP == before, 'build'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# seeded training loaders: augmentations depend on (seed, epoch, index) only


def _augmenting_folder(folder):
    """Train split with timm's fine-tune pipeline: draws from torch (crop, erasing), Python's
    `random` and numpy (RandAugment)."""
    return build_dataset("imagefolder", folder, "train", finetune_transform(
        16, train=True, aa="rand-m9-mstd0.5-inc1", reprob=0.5, remode="pixel", recount=1))


def _epoch_batches(loader, epoch):
    set_epoch(loader, epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb)
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)


def test_train_batches_are_the_same_for_any_number_of_workers(folder):
    ds = _augmenting_folder(folder)
    runs = {}
    for workers in (0, 1, 2):
        loader = build_loader(ds, 4, train=True, num_workers=workers, pin_memory=False, seed=5)
        runs[workers] = [_epoch_batches(loader, epoch) for epoch in (0, 1)]
    for workers in (1, 2):
        for epoch in (0, 1):
            _assert_same_batches(runs[0][epoch], runs[workers][epoch])
    # a resumed run: persistent workers that start at epoch 1 give what epoch 1 gave after epoch 0
    fresh = build_loader(ds, 4, train=True, num_workers=2, pin_memory=False, seed=5)
    _assert_same_batches(_epoch_batches(fresh, 1), runs[0][1])


def test_train_augmentation_changes_with_the_epoch_and_the_seed(folder):
    ds = build_dataset("imagefolder", folder, "train", pretrain_transform(16))

    def by_index(seed, epoch):
        loader = build_loader(ds, 4, train=True, num_workers=0, pin_memory=False, seed=seed)
        set_epoch(loader, epoch)
        order = [int(i) for i in loader.sampler]
        images = torch.cat([x for x, _ in loader])
        return images[torch.argsort(torch.tensor(order))]  # image of sample 0, 1, ... 11

    a = by_index(0, 0)
    torch.testing.assert_close(a, by_index(0, 0), rtol=0, atol=0)
    for other in (by_index(0, 1), by_index(1, 0)):
        assert all(not torch.equal(a[i], other[i]) for i in range(len(a)))


def test_loader_item_is_a_function_of_seed_epoch_and_index(folder):
    ds = _augmenting_folder(folder)
    loader = build_loader(ds, 4, train=True, num_workers=0, pin_memory=False, seed=5)
    view = loader.dataset
    assert isinstance(view, data.SeededDataset) and view.dataset is ds
    assert len(view) == len(ds) and view.classes == ds.classes and view.targets == ds.targets
    assert num_classes(view) == 3
    x, y = view[data.EpochIndex(7, 3)]
    torch.testing.assert_close(x, view[data.EpochIndex(7, 3)][0], rtol=0, atol=0)
    assert y == ds.targets[7] and not torch.equal(x, view[data.EpochIndex(7, 4)][0])
    set_epoch(loader, 3)
    order = list(loader.sampler)
    assert all(isinstance(i, data.EpochIndex) and i.epoch == 3 for i in order)
    first, _ = next(iter(loader))
    torch.testing.assert_close(first, torch.stack([view[i][0] for i in order[:4]]), rtol=0, atol=0)


def test_iterating_a_loader_leaves_the_main_process_random_state_alone(folder):
    import random

    ds = _augmenting_folder(folder)
    val = build_dataset("imagefolder", folder, "val", eval_transform(16))
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    for loader in (build_loader(ds, 4, train=True, num_workers=0, pin_memory=False),
                   build_loader(val, 4, train=False, num_workers=0, pin_memory=False)):
        for epoch in (0, 1):
            set_epoch(loader, epoch)
            assert sum(len(y) for _, y in loader) == 12
    assert torch.equal(torch.get_rng_state(), states[0])
    after = np.random.get_state()
    assert after[0] == states[1][0] and np.array_equal(after[1], states[1][1]) and after[2:] == states[1][2:]
    assert random.getstate() == states[2]


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    from umae_plugin.runtime import get_rng_state, set_rng_state

    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.normal()  # a cached gaussian in numpy's state
    torch.save({"rng": get_rng_state(torch.device("cpu"))}, tmp_path / "ckpt.pth")
    expected = torch.rand(3), np.random.rand(3), np.random.normal(), [random.random() for _ in range(3)]
    torch.manual_seed(9)
    np.random.seed(9)
    random.seed(9)
    set_rng_state(torch.load(tmp_path / "ckpt.pth", weights_only=True)["rng"])
    got = torch.rand(3), np.random.rand(3), np.random.normal(), [random.random() for _ in range(3)]
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and got[3] == expected[3]
    set_rng_state({"cpu": torch.get_rng_state()})  # checkpoints written before: torch state only


# ---------------------------------------------------------------------------------------------
# 16-bit and 32-bit grayscale images


def _gradient16():
    return np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)


def _wide_images():
    """(file name, PIL image) in each wide grayscale mode PIL can write."""
    g = _gradient16()
    return [
        ("i16.png", Image.frombytes("I;16", (16, 16), g.astype("<u2").tobytes())),
        ("i16b.png", Image.frombytes("I;16B", (16, 16), g.astype(">u2").tobytes())),
        ("i16b.tiff", Image.frombytes("I;16B", (16, 16), g.astype(">u2").tobytes())),
        ("i16l.tiff", Image.frombytes("I;16L", (16, 16), g.astype("<u2").tobytes())),
        ("i32.tiff", Image.fromarray(g.astype(np.int32))),
    ]


def test_16_bit_images_are_scaled_to_8_bits_not_saturated(tmp_path):
    folder = tmp_path / "wide" / "train" / "gray"
    folder.mkdir(parents=True)
    for name, img in _wide_images():
        img.save(folder / name)
    ds = build_dataset("imagefolder", tmp_path / "wide", "train", None)
    expected = np.rint(_gradient16() * (255 / 65535)).astype(np.uint8)
    assert len(ds) == 5
    for i in range(len(ds)):
        img, _ = ds[i]
        pixels = np.asarray(img)
        assert img.mode == "RGB" and pixels.min() == 0 and pixels.max() == 255, ds.samples[i][0]
        assert np.array_equal(pixels[..., 0], expected), ds.samples[i][0]
        assert np.array_equal(pixels[..., 1], expected) and np.array_equal(pixels[..., 2], expected)


@pytest.mark.parametrize("name, img", _wide_images())
def test_image_to_rgb_scales_every_wide_mode(name, img):
    expected = np.rint(_gradient16() * (255 / 65535)).astype(np.uint8)
    assert np.array_equal(np.asarray(data.image_to_rgb(img))[..., 0], expected)


def test_32_bit_images_beyond_16_bits_are_scaled_by_their_maximum():
    values = np.arange(16 * 16, dtype=np.int32).reshape(16, 16) * 40_000 - 100  # max about 1e7, one negative
    rgb = np.asarray(data.image_to_rgb(Image.fromarray(values)))
    expected = np.rint(np.clip(values, 0, None) * (255 / values.max())).astype(np.uint8)
    assert np.array_equal(rgb[..., 1], expected) and rgb.max() == 255 and rgb.min() == 0
    assert np.array_equal(np.asarray(data.image_to_rgb(Image.new("L", (4, 4), 77))), np.full((4, 4, 3), 77))
