"""Datasets, transforms and data loaders for pre-training, linear probing and fine-tuning.

Three datasets share one interface (`.classes`, `.targets`, `(image, target)` items):
`imagefolder` (`<data_path>/<split>/<class>/<image>`), `cifar10` (torchvision) and `digits`
(scikit-learn's bundled 8x8 digits, for smoke tests without any download). `build_dataset` fails
with a `DataError` naming the path before any model is built, and the image folder survives
corrupt files instead of crashing mid-epoch.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, auto_augment, create_transform
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, SequentialSampler
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from .distributed import get_world_size

log = logging.getLogger("umae.data")

IMAGENET_MEAN: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
IMAGENET_STD: tuple[float, float, float] = IMAGENET_DEFAULT_STD

DATASETS = ("imagefolder", "cifar10", "digits")
SPLITS = ("train", "val")

Transform = Callable[[Any], Any]

# Paths that failed to decode in this process (each DataLoader worker is its own process).
_bad_paths: set[str] = set()


class DataError(ValueError):
    """A dataset is missing, empty or unusable; the message says where it looked."""


def num_bad_images() -> int:
    """Number of distinct unreadable images met so far in this process."""
    return len(_bad_paths)


# ---------------------------------------------------------------------------------------------
# transforms


def _normalize() -> list[Transform]:
    return [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def _resize_center_crop(input_size: int, crop_pct: float) -> transforms.Compose:
    return transforms.Compose([
        transforms.Resize(int(input_size / crop_pct), interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        *_normalize(),
    ])


class RandomResizedCropNoRetry(transforms.RandomResizedCrop):
    """The MAE linear probe's random resized crop (after BYOL's TensorFlow code): one draw of the
    area fraction and the log-uniform aspect ratio, the crop clamped to the image, no retries
    and no center-crop fallback (torchvision's draws up to 10 times, then center-crops).

    Only `get_params` differs from torchvision's, so cropping, resizing and antialiasing are
    torchvision's. The default interpolation is bicubic."""

    def __init__(self, size: int | Sequence[int], scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
                 interpolation: InterpolationMode = InterpolationMode.BICUBIC, **kwargs: Any) -> None:
        super().__init__(size, scale=scale, ratio=ratio, interpolation=interpolation, **kwargs)

    @staticmethod
    def get_params(img: Any, scale: Sequence[float], ratio: Sequence[float]) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop; exactly four draws from torch's global RNG:
        area fraction, log aspect ratio, top, left. Width and height are clamped to [1, size]."""
        _, height, width = transforms.functional.get_dimensions(img)
        target_area = height * width * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1])).item())
        w = max(1, min(width, round(math.sqrt(target_area * aspect))))
        h = max(1, min(height, round(math.sqrt(target_area / aspect))))
        i = int(torch.randint(0, height - h + 1, size=(1,)).item())
        j = int(torch.randint(0, width - w + 1, size=(1,)).item())
        return i, j, h, w


def pretrain_transform(input_size: int) -> transforms.Compose:
    """The MAE pre-training augmentation: a random crop of 20-100% of the area, then a flip."""
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        *_normalize(),
    ])


def linprobe_transform(input_size: int, train: bool) -> transforms.Compose:
    """Linear-probe augmentation (train: the reference's no-retry random resized crop, bicubic,
    then a flip) or the resize-to-input/0.875 + center crop (val)."""
    if not train:
        return _resize_center_crop(input_size, 224 / 256)
    return transforms.Compose([
        RandomResizedCropNoRetry(input_size, interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        *_normalize(),
    ])


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's RandAugment asks for 0 bits at some magnitudes; recent Pillow (13 here) rejects bits < 1
    where older Pillow returned a black image, so an upstream fine-tune with the default `--aa` would
    crash within its first batches. Keep the old result."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


for _name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
    auto_augment.NAME_TO_OP[_name] = _posterize


def finetune_transform(
    input_size: int,
    train: bool,
    *,
    color_jitter: float | None = None,
    aa: str | None = None,
    reprob: float = 0.0,
    remode: str = "pixel",
    recount: int = 1,
) -> Transform:
    """timm's training pipeline (RandAugment, random erasing, ...) or a center-crop eval transform.

    Evaluation crops 224/256 of the resized image up to 224 px and the whole image above, where
    models are fine-tuned at their final resolution.
    """
    if not train:
        return _resize_center_crop(input_size, 224 / 256 if input_size <= 224 else 1.0)
    return create_transform(
        input_size=input_size,
        is_training=True,
        color_jitter=color_jitter,
        auto_augment=aa,
        interpolation="bicubic",
        re_prob=reprob,
        re_mode=remode,
        re_count=recount,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


def eval_transform(input_size: int) -> transforms.Compose:
    """Unaugmented transform for cached features, effective rank and online-probe evaluation."""
    return linprobe_transform(input_size, train=False)


# ---------------------------------------------------------------------------------------------
# datasets


class RobustImageFolder(datasets.ImageFolder):
    """`ImageFolder` that replaces an undecodable image by the next readable one.

    A corrupt file in a large folder should not kill a multi-day run. The replacement is
    deterministic (index + 1, + 2, ... wrapping around), so batch shapes never change. Each bad
    path is logged once, with a running count of bad files in this process; `num_bad` counts this
    dataset's bad files as seen by this process.
    """

    def __init__(self, root: str | Path, transform: Transform | None = None, **kwargs: Any) -> None:
        super().__init__(str(root), transform=transform, **kwargs)
        self.bad_paths: set[str] = set()

    @property
    def num_bad(self) -> int:
        return len(self.bad_paths)

    def _mark_bad(self, path: str, err: Exception) -> None:
        self.bad_paths.add(path)
        if path not in _bad_paths:
            _bad_paths.add(path)
            log.warning("skipping unreadable image %s (%s: %s); %d bad image(s) so far in this process",
                        path, type(err).__name__, err, len(_bad_paths))

    def _load(self, index: int) -> tuple[Any, int]:
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            if path in self.bad_paths:
                continue
            try:
                return self.loader(path), target
            except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
                self._mark_bad(path, err)
        raise DataError(f"no readable image in {self.root}")

    def __getitem__(self, index: int) -> tuple[Any, int]:
        sample, target = self._load(index)
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target


class DigitsDataset(Dataset):
    """scikit-learn's 1797 bundled 8x8 handwritten digits as 32x32 RGB PIL images.

    Gray levels 0..16 are scaled to 0..255 and each pixel becomes a 4x4 block (nearest-neighbour
    upscaling, so no interpolation artefacts before the usual transforms). The split is fixed:
    a stratified split with a fixed seed holds out 360 images for `val`, 1437 remain for `train`.
    """

    num_val = 360
    size = 32

    def __init__(self, split: str, transform: Transform | None = None) -> None:
        try:
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split
        except ImportError as err:
            raise ImportError("the 'digits' dataset needs scikit-learn: pip install scikit-learn "
                              "(or the 'analysis' extra: pip install 'umae[analysis]')") from err
        digits = load_digits()
        labels = digits.target.astype(int)
        train_idx, val_idx = train_test_split(np.arange(len(labels)), test_size=self.num_val,
                                              stratify=labels, random_state=0)
        self.indices: np.ndarray = np.sort(train_idx if split == "train" else val_idx)
        self.images = np.rint(digits.images[self.indices] * (255 / 16)).astype(np.uint8)
        self.targets: list[int] = labels[self.indices].tolist()
        self.classes: list[str] = [str(c) for c in range(10)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[index]).resize((self.size, self.size), Image.Resampling.NEAREST)
        img = img.convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


def _require_path(name: str, data_path: str | Path | None) -> Path:
    if data_path is None:
        raise DataError(f"dataset '{name}' needs --data_path")
    return Path(data_path)


def _build_imagefolder(data_path: str | Path | None, split: str, transform: Transform | None) -> RobustImageFolder:
    root = _require_path("imagefolder", data_path) / split
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist (expected <data_path>/{split}/<class>/<image>)")
    try:
        return RobustImageFolder(root, transform=transform)
    except FileNotFoundError as err:
        raise DataError(f"no images found in {root} (expected {root}/<class>/<image>): {err}") from err


def _build_cifar10(data_path: str | Path | None, split: str, transform: Transform | None,
                   download: bool) -> datasets.CIFAR10:
    root = _require_path("cifar10", data_path)
    try:
        return datasets.CIFAR10(root=str(root), train=split == "train", download=download, transform=transform)
    except RuntimeError as err:
        raise DataError(f"CIFAR-10 not found in {root / datasets.CIFAR10.base_folder}; "
                        "pass --download to fetch it") from err


def build_dataset(
    name: str,
    data_path: str | Path | None,
    split: str,
    transform: Transform | None,
    download: bool = False,
) -> Dataset:
    """Dataset `name` (one of `DATASETS`) for `split` ("train" or "val"); raises `DataError` early.

    `data_path` is the folder holding `train/` and `val/` (imagefolder) or the CIFAR-10 root;
    `download` only applies to cifar10. `digits` needs neither.
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    if name == "imagefolder":
        return _build_imagefolder(data_path, split, transform)
    if name == "cifar10":
        return _build_cifar10(data_path, split, transform, download)
    if name == "digits":
        return DigitsDataset(split, transform)
    raise DataError(f"unknown dataset {name!r}; choose from {DATASETS}")


def num_classes(dataset: Dataset) -> int:
    """Number of classes of a dataset built here (or a `Subset` of one)."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        return len(classes)
    return int(max(dataset.targets)) + 1


# ---------------------------------------------------------------------------------------------
# loaders


class EpochRandomSampler(RandomSampler):
    """`RandomSampler` whose order depends only on (seed, epoch), like `DistributedSampler`, so
    a resumed single-process run sees the same shuffles as an uninterrupted one."""

    def __init__(self, data_source: Sequence[Any], seed: int = 0) -> None:
        super().__init__(data_source, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    num_workers: int,
    pin_memory: bool,
    seed: int = 0,
    drop_last: bool | None = None,
) -> DataLoader:
    """A loader that shards with `DistributedSampler` when more than one process runs.

    Shuffles when `train`; `drop_last` defaults to `train`. Call `set_epoch` every epoch.
    """
    sampler: Sampler
    if get_world_size() > 1:
        sampler = DistributedSampler(dataset, shuffle=train, seed=seed)
    elif train:
        sampler = EpochRandomSampler(dataset, seed=seed)
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=train if drop_last is None else drop_last,
        persistent_workers=num_workers > 0,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reseed the loader's sampler for `epoch` where it supports it."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)


# ---------------------------------------------------------------------------------------------
# synthetic data


def make_synthetic_imagefolder(
    root: str | Path,
    num_classes: int = 3,
    per_class: int = 8,
    size: int = 32,
    splits: Sequence[str] = ("train", "val"),
    seed: int = 0,
) -> Path:
    """Write a small random image folder `root/<split>/class_<i>/<n>.png` and return `root`.

    Each class has its own mean colour plus noise, so a probe can learn it: handy for smoke tests.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split in splits:
        for c in range(num_classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            hue = 2 * math.pi * c / num_classes
            colour = 127.5 + 80 * np.cos(hue + np.array([0.0, 2.0, 4.0]) * math.pi / 3)
            for n in range(per_class):
                pixels = colour + rng.normal(0.0, 40.0, size=(size, size, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{n}.png")
    return root
