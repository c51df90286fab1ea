"""Datasets, transforms and data loaders for pre-training, linear probing and fine-tuning.

Three datasets share one interface (`.classes`, `.targets`, `(image, target)` items):
`imagefolder` (`<data_path>/<split>/<class>/<image>`), `cifar10` (torchvision) and `digits`
(scikit-learn's bundled 8x8 digits, for smoke tests without any download). `build_dataset` fails
with a `DataError` naming the path before any model is built, and the image folder survives
corrupt files instead of crashing mid-epoch.

Training loaders (`build_loader(train=True)`) make each sample's augmentation a function of
(seed, epoch, sample index) alone: the sampler tags every index with its epoch (`EpochIndex`) and
`SeededDataset` reseeds torch's, numpy's and Python's global generators from a hash of the three
around each sample, restoring them afterwards. A run is then the same for any `--num_workers`,
and a resumed run sees the augmentations the uninterrupted one saw; the main process's random
streams (masking, mixup) are never touched by the data pipeline. The same loaders collect the
unreadable images of each epoch over their workers (`epoch_bad_images`).

Pre-training samples stay uint8 until the device (`normalize_pixels` there gives bitwise
ToTensor + Normalize), and `--data_backend` picks where images are decoded and cropped:
`pil` (the reference's values), `tensor` (torchvision's JPEG decoder and torch's uint8 resize in
the workers) or `gpu` (the workers read bytes; `DeviceDecodeLoader` decodes on the device):
`build_pretrain_dataset`, `build_pretrain_loader`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import logging
import math
import queue
import random
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, auto_augment, create_transform
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler
import torch.nn.functional as F
from torch.utils.data import default_collate
from torchvision import datasets, transforms
from torchvision import io as tv_io
from torchvision.transforms import InterpolationMode

from .distributed import get_world_size
from .errors import UsageError, UserError

log = logging.getLogger("umae.data")

IMAGENET_MEAN: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
IMAGENET_STD: tuple[float, float, float] = IMAGENET_DEFAULT_STD

DATASETS = ("imagefolder", "cifar10", "digits")
SPLITS = ("train", "val")

Transform = Callable[[Any], Any]

# Paths that failed to decode in this process (each DataLoader worker is its own process).
_bad_paths: set[str] = set()
# Files the `tensor` / `gpu` backends decoded with PIL instead of the JPEG decoder, (path, why), since
# the last `SeededDataset` fetch took them: they travel with the batch to the loader, which notes once.
_cpu_decoded: list[tuple[str, str]] = []


class DataError(UserError, ValueError):
    """A dataset is missing, empty or unusable; the message says where it looked."""


def num_bad_images() -> int:
    """Number of distinct unreadable images met so far in this process."""
    return len(_bad_paths)


# ---------------------------------------------------------------------------------------------
# transforms


def _normalize() -> list[Transform]:
    return [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


SMALL_INPUT_MAX = 64  # eval inputs up to this size are resized to the input size, not cropped


def _resize_center_crop(input_size: int, crop_pct: float) -> transforms.Compose:
    """Resize the shorter side to `input_size / crop_pct` (bicubic), center-crop `input_size`.
    Inputs of `SMALL_INPUT_MAX` (64) px or less are never cropped (`crop_pct` 1, the usual CIFAR
    protocol): a 32-px image evaluated at 32 px passes unchanged (resizing 32 -> 36 and cropping
    32 would drop ~21% of it)."""
    if input_size <= SMALL_INPUT_MAX:
        crop_pct = 1.0
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


PRETRAIN_SCALE = (0.2, 1.0)  # the MAE pre-training crop's area fraction
PRETRAIN_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # and its aspect ratio (torchvision's default)


def pretrain_transform(input_size: int, uint8: bool = False) -> transforms.Compose:
    """The MAE pre-training augmentation: a random crop of 20-100% of the area (bicubic), then a
    flip, then ToTensor + Normalize: float32 [3, S, S]. With `uint8`, the pixels stop before the
    conversion: uint8 [3, S, S] (`PILToTensor`), 4x less to send from the workers, and
    `normalize_pixels` on the device gives bitwise the float values (same random draws)."""
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=PRETRAIN_SCALE, ratio=PRETRAIN_RATIO,
                                     interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        *([transforms.PILToTensor()] if uint8 else _normalize()),
    ])


_MEAN_STD: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # per device, copied there once


def normalize_pixels(x: torch.Tensor) -> torch.Tensor:
    """Pixel values 0..255 [..., 3, H, W] (uint8, or float holding those values) -> float32
    normalised by ImageNet's mean / std, computed as `ToTensor` + `Normalize` do: `x.float().div(255)`
    then `(x - mean) / std` with float32 mean / std, so uint8 batches give bitwise their values.
    (timm's `PrefetchLoader` folds the 255 into mean and std, one rounding fewer: last-bit
    differences.) The constants are copied to each device once: a copy per step would make the
    host wait for the device."""
    if x.device not in _MEAN_STD:
        _MEAN_STD[x.device] = (torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).view(3, 1, 1),
                               torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).view(3, 1, 1))
    mean, std = _MEAN_STD[x.device]
    return (x.float().div(255) - mean) / std


def linprobe_transform(input_size: int, train: bool) -> transforms.Compose:
    """Linear-probe augmentation (train: the reference's no-retry random resized crop, bicubic,
    then a flip) or the resize-to-input/0.875 + center crop (val) above 64 px; at 64 px or less
    the val image is resized to the input size only (a 32-px image passes unchanged)."""
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


def _fix_posterize(transform: transforms.Compose) -> transforms.Compose:
    """`transform` with its RandAugment / AutoAugment / AugMix posterize ops on `_posterize`
    (timm's own table is left alone)."""
    for t in transform.transforms:
        ops = getattr(t, "ops", None) or [op for sub_policy in getattr(t, "policy", ()) for op in sub_policy]
        for op in ops:
            if isinstance(op, auto_augment.AugmentOp) and op.name.startswith("Posterize"):
                op.aug_fn = _posterize
    return transform


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

    Evaluation crops 224/256 of the resized image from 65 to 224 px and the whole image above,
    where models are fine-tuned at their final resolution, and at 64 px or less (the usual CIFAR
    protocol: resized to the input size only, a 32-px image passes unchanged).
    """
    if not train:
        return _resize_center_crop(input_size, 224 / 256 if input_size <= 224 else 1.0)
    return _fix_posterize(create_transform(
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
    ))


def eval_transform(input_size: int) -> transforms.Compose:
    """Unaugmented transform for cached features, effective rank and online-probe evaluation:
    `linprobe_transform(input_size, train=False)`, i.e. resize to input/0.875 + center crop above
    64 px, resize to the input size only (no crop) at 64 px or less."""
    return linprobe_transform(input_size, train=False)


# ---------------------------------------------------------------------------------------------
# datasets

_WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def image_to_rgb(img: Image.Image) -> Image.Image:
    """`img` as 8-bit RGB. 16-bit grayscale (`I;16*`) is scaled to 8 bits, v -> round(v * 255 / 65535);
    32-bit integer (`I`) likewise when its values fit in 16 bits, else by its maximum (negative
    values become 0). PIL's own `convert("RGB")` clips those modes at 255: near-white images."""
    if img.mode not in _WIDE_GRAY_MODES:
        return img.convert("RGB")
    values = np.asarray(img).astype(np.float64)
    top = 65535.0
    if img.mode == "I":
        values = np.clip(values, 0.0, None)
        top = max(top, float(values.max(initial=0.0)))
    gray = np.rint(values * (255.0 / top)).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def load_image(path: str) -> Image.Image:
    """The image file at `path` as 8-bit RGB (`image_to_rgb`); the image folder's loader."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
        return image_to_rgb(img)


class RobustImageFolder(datasets.ImageFolder):
    """`ImageFolder` that replaces an undecodable image by the next readable one.

    A corrupt file in a large folder should not kill a multi-day run. The replacement is
    deterministic (index + 1, + 2, ... wrapping around), so batch shapes never change. Read
    directly (`dataset[i]`, evaluation loaders), each bad path is logged once per process, with a
    running count of bad files in this process; `num_bad` counts this dataset's bad files as seen
    by this process. Training loaders read through `load_reporting` instead, which returns the bad
    files met and leaves the warning to the loader (once per path and epoch, over all workers).
    16-bit and 32-bit grayscale images are scaled to 8 bits (`load_image`).
    """

    can_report_bad_images = True

    def __init__(self, root: str | Path, transform: Transform | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("loader", load_image)
        super().__init__(str(root), transform=transform, **kwargs)
        self.bad_paths: set[str] = set()
        self._bad_reasons: dict[str, str] = {}

    @property
    def num_bad(self) -> int:
        return len(self.bad_paths)

    def _mark_bad(self, path: str, err: Exception, quiet: bool) -> None:
        self.bad_paths.add(path)
        self._bad_reasons[path] = f"{type(err).__name__}: {err}"
        if path not in _bad_paths:
            _bad_paths.add(path)
            if not quiet:
                log.warning("skipping unreadable image %s (%s); %d bad image(s) so far in this process",
                            path, self._bad_reasons[path], len(_bad_paths))

    def _load(self, index: int, report: list[tuple[str, str]] | None = None) -> tuple[Any, int]:
        """The first readable sample from `index` on; with `report`, append (path, reason) for every
        bad file passed over (known ones too) instead of logging."""
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            if path not in self.bad_paths:
                try:
                    return self.loader(path), target
                except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
                    self._mark_bad(path, err, quiet=report is not None)
            if report is not None:
                report.append((path, self._bad_reasons.get(path, "unreadable")))
        raise DataError(f"no readable image in {self.root}")

    def _finish(self, sample: Any, target: int) -> tuple[Any, int]:
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self._finish(*self._load(index))

    def load_reporting(self, index: int) -> tuple[tuple[Any, int], list[tuple[str, str]]]:
        """(`self[index]`, [(path, reason) of each unreadable file met]), without logging."""
        report: list[tuple[str, str]] = []
        item = self._finish(*self._load(index, report))
        return item, report


class DigitsDataset(Dataset):
    """scikit-learn's 1797 bundled 8x8 handwritten digits as 32x32 RGB PIL images.

    Gray levels 0..16 are scaled to 0..255 and the images upscaled 4x with bicubic interpolation,
    so that unaugmented evaluation images (no resize at 32 px) look like the training views, which
    RandomResizedCrop always resamples bicubically (4x4 nearest-neighbour blocks are a train/test
    shift: 84% vs 95% linear probe in the quick start). The split is fixed:
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
        img = Image.fromarray(self.images[index]).resize((self.size, self.size), Image.Resampling.BICUBIC)
        img = img.convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


def _require_path(name: str, data_path: str | Path | None) -> Path:
    if data_path is None:
        raise DataError(f"dataset '{name}' needs --data_path")
    return Path(data_path)


def _build_imagefolder(data_path: str | Path | None, split: str, transform: Transform | None,
                       loader: Callable[[str], Any] | None = None) -> RobustImageFolder:
    root = _require_path("imagefolder", data_path) / split
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist (expected <data_path>/{split}/<class>/<image>)")
    try:
        return RobustImageFolder(root, transform=transform, **({"loader": loader} if loader is not None else {}))
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
    """Number of classes of a dataset built here (or a `Subset` of one, or a training loader's
    `SeededDataset` view of one)."""
    while isinstance(dataset, (torch.utils.data.Subset, SeededDataset)):
        dataset = dataset.dataset
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        return len(classes)
    return int(max(dataset.targets)) + 1


# ---------------------------------------------------------------------------------------------
# loaders


class EpochIndex(int):
    """A dataset index that also carries the epoch it was drawn for.

    Persistent DataLoader workers hold their own copy of the dataset, so the epoch cannot reach
    them through the dataset; it travels with every index instead (the training sampler yields these,
    `SeededDataset` reads them). It is an `int` everywhere else: `list(loader.sampler)` still
    compares equal to plain indices."""

    epoch: int

    def __new__(cls, index: int, epoch: int) -> "EpochIndex":
        obj = super().__new__(cls, index)
        obj.epoch = int(epoch)
        return obj

    def __reduce__(self) -> tuple[Any, tuple[int, int]]:
        return EpochIndex, (int(self), self.epoch)


class EpochDistributedSampler(DistributedSampler):
    """`DistributedSampler` that yields `EpochIndex`es (its order is already (seed, epoch)'s). One
    process shuffles with it too (`num_replicas=1, rank=0`: the whole set, in the MAE reference's
    order), so a resumed run sees the shuffles of an uninterrupted one."""

    def __iter__(self) -> Iterator[EpochIndex]:
        epoch = self.epoch
        return (EpochIndex(i, epoch) for i in super().__iter__())


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The 64-bit seed of sample `index`'s augmentation at `epoch`: a hash of the three, the same
    on every rank, in every worker and in every process."""
    digest = hashlib.blake2b(f"{int(seed)},{int(epoch)},{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def seed_global_rngs(seed: int) -> None:
    """Seed torch's CPU generator, numpy's and Python's global generators from the 64-bit `seed`
    (torchvision transforms draw from torch, timm's RandAugment / random erasing from `random`
    and numpy). CUDA generators are left alone."""
    torch.default_generator.manual_seed(seed)
    np.random.seed([seed & 0xFFFFFFFF, seed >> 32])
    random.seed(seed)


@contextlib.contextmanager
def preserved_global_rngs() -> Iterator[None]:
    """Put torch's CPU generator and numpy's and Python's global generators back as they were on exit."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


class SeededDataset(Dataset):
    """A training loader's view of `dataset`: item `i` drawn at epoch `e` (an `EpochIndex`; a plain
    index counts as epoch 0) is `dataset[i]` computed right after
    `seed_global_rngs(sample_seed(seed, e, i))`, so its augmentation depends on (seed, e, i) only,
    whichever process computes it. In the main process (`num_workers=0`) the global generators
    are put back after each batch.

    Otherwise it stands for `dataset`: same length, and attributes (`classes`, `targets`,
    `transform`, ...) are read from it; `.dataset` is the dataset itself. The loader fetches batches
    through `__getitems__`, which also returns each item's unreadable files (`RobustImageFolder`)."""

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = seed
        self.can_report_bad_images = bool(getattr(dataset, "can_report_bad_images", False))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes the wrapper lacks; dunders and private names (pickling,
        # `__getitems__` probes) must not be forwarded.
        if name.startswith("_") or "dataset" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["dataset"], name)

    def _fetch(self, index: int) -> tuple[Any, list[tuple[str, str]], list[tuple[str, str]]]:
        """(item, its unreadable files, its files decoded by PIL in place of the JPEG decoder)."""
        seed_global_rngs(sample_seed(self.seed, getattr(index, "epoch", 0), int(index)))
        if self.can_report_bad_images:
            item, report = self.dataset.load_reporting(int(index))
        else:
            item, report = self.dataset[int(index)], []
        cpu_decoded = _cpu_decoded[:]
        _cpu_decoded.clear()
        return item, report, cpu_decoded

    def _fetch_all(self, indices: Sequence[int]) -> list[tuple[Any, list[tuple[str, str]], list[tuple[str, str]]]]:
        # A DataLoader worker's generators serve this dataset only: no need to restore them there
        # (in the main process, once per batch: saving numpy's state costs more than a small image).
        if torch.utils.data.get_worker_info() is not None:
            return [self._fetch(i) for i in indices]
        with preserved_global_rngs():
            return [self._fetch(i) for i in indices]

    def __getitem__(self, index: int) -> Any:
        return self._fetch_all([index])[0][0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Any, list[tuple[str, str]], list[tuple[str, str]]]]:
        return self._fetch_all(indices)


def _collate_reported(collate: Callable[[list[Any]], Any], batch: list[tuple[Any, list, list]]) -> tuple[Any, list, list]:
    """(`collate` of the items, the batch's unreadable files, its files decoded by PIL instead)."""
    return (collate([item for item, _, _ in batch]), [bad for _, report, _ in batch for bad in report],
            [c for _, _, cpu in batch for c in cpu])


class TrainLoader(DataLoader):
    """The training `DataLoader`: iterates like any loader, and gathers the unreadable images met
    during the current pass over all workers; each is warned about once per pass (epoch). Files the
    `tensor` / `gpu` backends had to decode with PIL (not a 3-channel baseline / progressive JPEG)
    get one notice per loader, for the first of them."""

    def __iter__(self) -> Iterator[Any]:
        self._bad_this_epoch: dict[str, str] = {}
        for batch, report, cpu_decoded in super().__iter__():
            for path, reason in report:
                self.note_bad(path, reason)
            for path, reason in cpu_decoded:
                self.note_cpu_decoded(path, reason)
            yield batch

    def note_bad(self, path: str, reason: str) -> None:
        """Count `path` as unreadable this epoch; warn the first time."""
        if path not in self._bad_this_epoch:
            self._bad_this_epoch[path] = reason
            log.warning("skipping unreadable image %s (%s); %d bad image(s) so far this epoch",
                        path, reason, len(self._bad_this_epoch))

    def note_cpu_decoded(self, path: str, reason: str) -> None:
        """The one-time notice that some files are decoded by PIL on the CPU, not the JPEG decoder."""
        if not getattr(self, "_cpu_noticed", False):
            self._cpu_noticed = True
            log.info("data backend: %s is %s: decoded with PIL on the CPU instead (such files are; this "
                     "notice is shown once)", path, reason)

    @property
    def bad_images(self) -> int | None:
        """Distinct unreadable images met by this process in the current (or last) epoch; None
        where the dataset cannot have any (it is not an image folder)."""
        if not self.dataset.can_report_bad_images:
            return None
        return len(getattr(self, "_bad_this_epoch", {}))


def epoch_bad_images(loader: Any, device: torch.device | str = "cpu") -> int | None:
    """Unreadable images `loader` met in its last epoch, summed over processes (all ranks must
    call it); None for loaders that do not count them (evaluation loaders, foreign loaders, datasets
    without files to fail)."""
    count = getattr(loader, "bad_images", None)
    if count is None:
        return None
    if get_world_size() > 1:
        total = torch.tensor(count, dtype=torch.int64, device=device)
        torch.distributed.all_reduce(total)
        count = int(total.item())
    return count


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

    A training loader (`TrainLoader`) reads `dataset` through `SeededDataset`: each sample's
    augmentation depends on (`seed`, epoch, index) only, the same for any `num_workers` and on
    resume, and iterating it leaves the main process's random state as it was. `loader.dataset`
    is then that view (`.dataset` the dataset itself); `loader.sampler` shuffles as before.
    Evaluation loaders read `dataset` as is. No loader draws from the global torch generator (its
    worker base seed comes from a generator of its own).
    """
    sampler: Sampler
    if train:
        one_process = dict(num_replicas=1, rank=0) if get_world_size() == 1 else {}
        sampler = EpochDistributedSampler(dataset, shuffle=True, seed=seed, **one_process)
    elif get_world_size() > 1:
        sampler = DistributedSampler(dataset, shuffle=False, seed=seed)
    else:
        sampler = SequentialSampler(dataset)
    options = dict(
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=train if drop_last is None else drop_last,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
    if train:
        # A dataset may bring its own collation (the `gpu` backend's encoded files): `collate_items`.
        collate = functools.partial(_collate_reported, getattr(dataset, "collate_items", default_collate))
        return TrainLoader(SeededDataset(dataset, seed), collate_fn=collate, **options)
    return DataLoader(dataset, **options)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reseed the loader's sampler for `epoch` where it supports it."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)


# ---------------------------------------------------------------------------------------------
# pre-training input pipelines: --data_backend pil | tensor | gpu
#
# Every backend's training samples are uint8 [3, S, S]; `normalize_pixels` turns them into floats on
# the device. The random draws are the reference transform's (torchvision's
# `RandomResizedCrop.get_params`, then `torch.rand(1) < 0.5` for the flip) from the per-sample seeds
# of `SeededDataset`, so every backend crops the same boxes of the same images.

FILE_BACKENDS = ("pil", "tensor", "gpu")  # loaders over the dataset's items (`build_pretrain_dataset`)
DATA_BACKENDS = (*FILE_BACKENDS, "memory")  # memory: the set decoded once (`data_memory`; pretrain builds it)

# torchvision 0.29 deprecates its image decoders for TorchCodec (>= 0.16), which is neither a dependency
# here nor on the GPU machines; `_decode_jpeg` is the one place to switch. Its warning is not repeated.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated",
                        category=DeprecationWarning)


def _decode_jpeg(data: torch.Tensor | list[torch.Tensor], device: torch.device | str) -> Any:
    """torchvision's JPEG decoder, to RGB: libjpeg-turbo on the CPU, nvJPEG on CUDA (batched for a
    list). `data`: 1-D uint8 CPU tensor(s) of file bytes -> uint8 [3, H, W] tensor(s) on `device`."""
    return tv_io.decode_jpeg(data, mode=tv_io.ImageReadMode.RGB, device=device)


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers (C4 DHT, C8 JPG, CC DAC)
_DECODER_SOF = {0xC0, 0xC1, 0xC2}  # Huffman baseline, extended, progressive: what both decoders take


@dataclasses.dataclass(frozen=True)
class JpegHeader:
    """A JPEG's frame header (its first SOF segment)."""

    marker: int  # 0xC0 baseline, 0xC1 extended, 0xC2 progressive, ...
    precision: int  # bits per sample
    height: int
    width: int
    components: int  # 1 grayscale, 3 YCbCr / RGB, 4 CMYK / YCCK


def jpeg_header(data: bytes | np.ndarray) -> JpegHeader | None:
    """The frame header of the JPEG file whose bytes are `data`, read by walking the marker
    segments (no decoding); None when `data` is not a JPEG (no start-of-image marker) or reaches a
    scan or the end before a frame header (cut short)."""
    buf = memoryview(data).cast("B") if not isinstance(data, np.ndarray) else memoryview(data.reshape(-1))
    n = len(buf)
    if n < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        return None
    pos = 2
    while pos + 4 <= n:
        if buf[pos] != 0xFF:
            return None
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before
            return None
        if marker in _SOF_MARKERS:
            if pos + 10 > n:
                return None
            return JpegHeader(marker, buf[pos + 4], (buf[pos + 5] << 8) | buf[pos + 6],
                              (buf[pos + 7] << 8) | buf[pos + 8], buf[pos + 9])
        pos += 2 + ((buf[pos + 2] << 8) | buf[pos + 3])
    return None


def not_for_jpeg_decoder(header: JpegHeader | None) -> str | None:
    """Why a file with this header goes to PIL instead of the JPEG decoders (None: it does not):
    only 8-bit 3-channel Huffman-coded (baseline, extended, progressive) JPEGs go to them."""
    if header is None:
        return "not a JPEG"
    if header.components != 3:
        kind = {1: "grayscale", 4: "CMYK"}.get(header.components, "unusual")
        return f"a {header.components}-channel ({kind}) JPEG"
    if header.precision != 8:
        return f"a {header.precision}-bit JPEG"
    if header.marker not in _DECODER_SOF:
        return f"a JPEG with frame type 0x{header.marker:02X} (lossless or arithmetic-coded)"
    if header.height < 1 or header.width < 1:
        return "a JPEG without a size in its frame header"
    return None


def _pil_pixels(data: np.ndarray | bytes) -> torch.Tensor:
    """File bytes decoded by PIL as `load_image` does (8-bit RGB): uint8 [3, H, W]. Raises for
    files PIL cannot read."""
    with Image.open(io.BytesIO(data.tobytes() if isinstance(data, np.ndarray) else data)) as img:
        img.load()
        rgb = image_to_rgb(img)
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[-1][:200]


def load_image_tensor(path: str) -> torch.Tensor:
    """The `tensor` backend's image loader: the file at `path` as uint8 [3, H, W] RGB, decoded by
    torchvision's JPEG decoder (libjpeg-turbo) when it is an 8-bit 3-channel JPEG, else (or when
    that decoder refuses it) by PIL as `load_image` (noted for the loader's one-time notice). Raises
    for files neither can read (the image folder then skips them)."""
    data = np.fromfile(path, dtype=np.uint8)
    why = not_for_jpeg_decoder(jpeg_header(data))
    if why is None:
        try:
            return _decode_jpeg(torch.from_numpy(data), "cpu")
        except RuntimeError as err:
            why = f"refused by the JPEG decoder ({_first_line(err)})"
    pixels = _pil_pixels(data)
    _note_cpu_decoded(path, why)
    return pixels


def _note_cpu_decoded(path: str, why: str) -> None:
    """Queue (path, why) for the loader's notice (bounded: read directly, nothing drains it)."""
    if len(_cpu_decoded) < 1024:
        _cpu_decoded.append((path, why))


_UINT8_RESIZE_OK = [True]  # torch's uint8 antialiased bicubic kernel runs on this CPU (cleared if not)


def resized_crop_uint8(img: torch.Tensor, box: Sequence[int], size: int, flip: bool) -> torch.Tensor:
    """Box `(top, left, height, width)` of uint8 [3, H, W] `img`, resized to [3, size, size] (bicubic,
    antialiased, as PIL), mirrored left-right if `flip`; uint8, on `img`'s device.

    On the CPU this is torch's uint8 antialiased bicubic kernel, a port of PIL's resampling (within
    one level of PIL's on the same pixels, mean difference ~0.002 levels); torchvision's tensor
    `resize` would go through float32 for bicubic, ~5x slower. Elsewhere (CUDA has no uint8 kernel):
    float32, rounded and clamped, as torchvision's."""
    top, left, height, width = (int(v) for v in box)
    crop = img[None, :, top:top + height, left:left + width]
    out = None
    if crop.device.type == "cpu" and _UINT8_RESIZE_OK[0]:
        try:
            out = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        except (RuntimeError, NotImplementedError):
            _UINT8_RESIZE_OK[0] = False
    if out is None:
        out = F.interpolate(crop.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    out = out[0]
    return out.flip(-1) if flip else out


def resized_crops_uint8(images: Sequence[torch.Tensor], boxes: Sequence[Sequence[int]], size: int,
                        flips: Sequence[bool], batched: bool | None = None) -> torch.Tensor:
    """`resized_crop_uint8` of each image, stacked: uint8 [n, 3, size, size]. `batched` (default: off
    the CPU) resizes each crop in float32 and rounds, clamps, converts and flips the whole batch at
    once, the same values as the float path image by image with ~3 device ops per image fewer
    (each op is a kernel launch on the host's time); on the CPU, image by image with the uint8
    kernel."""
    if batched is None:
        batched = bool(images) and images[0].device.type != "cpu"
    if not batched:
        return torch.stack([resized_crop_uint8(img, box, size, flip) for img, box, flip in zip(images, boxes, flips)])
    floats = [F.interpolate(img[None, :, t:t + h, l:l + w].float(), size=(size, size), mode="bicubic",
                            antialias=True, align_corners=False)[0]
              for img, (t, l, h, w) in zip(images, ((int(v) for v in box) for box in boxes))]
    out = torch.stack(floats).round_().clamp_(0, 255).to(torch.uint8)
    mirror = torch.tensor(list(flips), dtype=torch.bool).to(out.device, non_blocking=True).view(-1, 1, 1, 1)
    return torch.where(mirror, out.flip(-1), out)


class TensorPretrainTransform:
    """`pretrain_transform`'s augmentation on uint8 [3, H, W] tensors -> uint8 [3, S, S]: the same
    draws (`RandomResizedCrop.get_params`, then `torch.rand(1) < 0.5` for the flip), then
    `resized_crop_uint8`. The `tensor` backend's transform; the `gpu` backend draws with it."""

    def __init__(self, size: int, scale: tuple[float, float] = PRETRAIN_SCALE,
                 ratio: tuple[float, float] = PRETRAIN_RATIO) -> None:
        self.size, self.scale, self.ratio = size, scale, ratio

    def draw(self, height: int, width: int) -> tuple[tuple[int, int, int, int], bool]:
        """(crop box (top, left, height, width), flip) for an image of `height` x `width`."""
        shape_only = torch.empty(()).expand(3, height, width)  # get_params reads the size only
        box = transforms.RandomResizedCrop.get_params(shape_only, list(self.scale), list(self.ratio))
        return tuple(int(v) for v in box), bool(torch.rand(1) < 0.5)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        box, flip = self.draw(*img.shape[-2:])
        return resized_crop_uint8(img, box, self.size, flip)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio})"


@dataclasses.dataclass
class EncodedImage:
    """A JPEG file read by a `gpu`-backend worker: its bytes (uint8 [n]) and its size."""

    path: str
    data: np.ndarray
    height: int
    width: int


@dataclasses.dataclass
class EncodedSample:
    """An `EncodedImage` with its augmentation drawn: crop box (top, left, height, width), flip."""

    path: str
    data: np.ndarray
    box: tuple[int, int, int, int]
    flip: bool


def read_encoded(path: str) -> EncodedImage | torch.Tensor:
    """The `gpu` backend's image loader: an 8-bit 3-channel JPEG as its bytes and the size in its
    header (decoded later, on the device); any other file decoded here by PIL, uint8 [3, H, W]
    (noted for the one-time notice). Raises for such files PIL cannot read."""
    data = np.fromfile(path, dtype=np.uint8)
    header = jpeg_header(data)
    why = not_for_jpeg_decoder(header)
    if why is None:
        return EncodedImage(path, data, header.height, header.width)
    pixels = _pil_pixels(data)
    _note_cpu_decoded(path, why)
    return pixels


class EncodedPretrainTransform(TensorPretrainTransform):
    """The `gpu` backend's transform: for an `EncodedImage`, the draws only (`EncodedSample`); an
    image decoded on the CPU is cropped here as the `tensor` backend does (uint8 [3, S, S])."""

    def __call__(self, img: EncodedImage | torch.Tensor) -> EncodedSample | torch.Tensor:
        if isinstance(img, EncodedImage):
            box, flip = self.draw(img.height, img.width)
            return EncodedSample(img.path, img.data, box, flip)
        return super().__call__(img)


@dataclasses.dataclass
class EncodedBatch:
    """A `gpu` backend batch of B samples before decoding: the files' bytes one after another in
    `data` (uint8 [sum of lengths]; one tensor, so one shared-memory block per batch from a worker),
    their boxes and flips, at batch positions `encoded_at`; images the workers decoded and cropped
    themselves, uint8 [m, 3, S, S], at `ready_at`."""

    data: torch.Tensor
    lengths: list[int]
    boxes: list[tuple[int, int, int, int]]
    flips: list[bool]
    paths: list[str]
    encoded_at: list[int]
    ready: torch.Tensor | None
    ready_at: list[int]

    def __len__(self) -> int:
        return len(self.encoded_at) + len(self.ready_at)


def collate_encoded(items: list[tuple[EncodedSample | torch.Tensor, int]]) -> tuple[EncodedBatch, torch.Tensor]:
    """The `gpu` backend's collation: (`EncodedBatch`, targets int64 [B])."""
    enc = [(k, s) for k, (s, _) in enumerate(items) if isinstance(s, EncodedSample)]
    ready = [(k, s) for k, (s, _) in enumerate(items) if not isinstance(s, EncodedSample)]
    data = torch.from_numpy(np.concatenate([s.data for _, s in enc])) if enc else torch.empty(0, dtype=torch.uint8)
    batch = EncodedBatch(data=data, lengths=[len(s.data) for _, s in enc], boxes=[s.box for _, s in enc],
                         flips=[s.flip for _, s in enc], paths=[s.path for _, s in enc], encoded_at=[k for k, _ in enc],
                         ready=torch.stack([s for _, s in ready]) if ready else None, ready_at=[k for k, _ in ready])
    return batch, torch.tensor([t for _, t in items], dtype=torch.int64)


class DeviceDecoder:
    """`EncodedBatch` -> uint8 [B, 3, size, size] on `device`: one batched decode of the JPEGs there
    (nvJPEG on CUDA, libjpeg-turbo on the CPU), each cropped, resized and flipped there
    (`resized_crop_uint8`). If the batched call fails, the files are decoded one by one; a file the
    decoder refuses is decoded by PIL on the CPU (`note_cpu_decoded`), and a file PIL cannot read
    either (`note_bad`) takes the place of the next readable image of the batch: one bad file never
    fails a batch."""

    def __init__(self, device: torch.device | str, size: int,
                 note_bad: Callable[[str, str], None] = lambda path, why: None,
                 note_cpu_decoded: Callable[[str, str], None] = lambda path, why: None) -> None:
        self.device, self.size = torch.device(device), size
        self.note_bad, self.note_cpu_decoded = note_bad, note_cpu_decoded

    def _decode(self, files: list[torch.Tensor], paths: list[str]) -> list[torch.Tensor | None]:
        if not files:
            return []
        try:
            return list(_decode_jpeg(files, self.device))
        except RuntimeError:
            pass  # the batched call fails as a whole: find the file(s)
        images: list[torch.Tensor | None] = []
        for data, path in zip(files, paths):
            try:
                images.append(_decode_jpeg(data, self.device))
                continue
            except RuntimeError as err:
                why = f"refused by the JPEG decoder ({_first_line(err)})"
            try:
                images.append(_pil_pixels(data.numpy()).to(self.device))
                self.note_cpu_decoded(path, why)
            except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
                self.note_bad(path, f"{type(err).__name__}: {_first_line(err)}")
                images.append(None)
        return images

    def __call__(self, batch: EncodedBatch) -> torch.Tensor:
        out: list[torch.Tensor | None] = [None] * len(batch)
        images = self._decode(list(batch.data.split(batch.lengths)), batch.paths)
        decoded = [(k, img, box, flip) for k, img, box, flip in zip(batch.encoded_at, images, batch.boxes, batch.flips)
                   if img is not None]
        if decoded:
            positions, imgs, boxes, flips = zip(*decoded)
            for k, crop in zip(positions, resized_crops_uint8(imgs, boxes, self.size, flips)):
                out[k] = crop
        if batch.ready is not None:
            for k, img in zip(batch.ready_at, batch.ready.to(self.device, non_blocking=True)):
                out[k] = img
        good = [k for k, img in enumerate(out) if img is not None]
        if not good:
            raise DataError(f"no readable image in a batch of {len(out)}")
        for k in range(len(out)):
            if out[k] is None:  # the next readable image of the batch, wrapping around
                out[k] = out[next((g for g in good if g > k), good[0])]
        return torch.stack(out)


_END = object()


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put `item` unless `stop` is set first; whether it was put."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


class DeviceDecodeLoader:
    """The `gpu` backend's training loader: iterates (uint8 [B, 3, S, S] on `device`, targets [B])
    from a `TrainLoader` of `EncodedBatch`es, decoding with `DeviceDecoder`. Otherwise it stands
    for that loader (`len`, `sampler`, `dataset`, `bad_images`).

    With `prefetch` (loader workers: the main process draws nothing), a thread decodes the next
    batch, up to two ahead, on a CUDA stream of its own while the main thread runs the step: the
    host's share of the decode (one launch per image and op) overlaps the step's. Without it
    (`num_workers=0`, where fetching seeds the global generators) the main thread decodes."""

    def __init__(self, loader: "TrainLoader", device: torch.device | str, size: int, prefetch: bool = True) -> None:
        self.loader, self.device, self.prefetch = loader, torch.device(device), prefetch
        self.decoder = DeviceDecoder(self.device, size, loader.note_bad, loader.note_cpu_decoded)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def sampler(self) -> Sampler:
        return self.loader.sampler

    @property
    def dataset(self) -> Dataset:
        return self.loader.dataset

    @property
    def bad_images(self) -> int | None:
        return self.loader.bad_images

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.prefetch:
            for batch, targets in self.loader:
                yield self.decoder(batch), targets
            return
        yield from self._prefetched()

    def _produce(self, q: queue.Queue, stop: threading.Event) -> None:
        cuda = self.device.type == "cuda"
        try:
            stream = torch.cuda.Stream(self.device) if cuda else None
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                for batch, targets in self.loader:
                    images = self.decoder(batch)
                    event = None
                    if cuda:
                        event = torch.cuda.Event()
                        event.record(stream)
                    if not _put(q, (images, targets, event), stop):
                        return
            _put(q, _END, stop)
        except BaseException as err:  # handed to the main thread, raised there
            _put(q, err, stop)

    def _prefetched(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        q: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(q, stop), name="umae-device-decode", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                images, targets, event = item
                if event is not None:  # the step's stream waits for the decode's, and owns the memory after
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    images.record_stream(current)
                yield images, targets
        finally:
            stop.set()
            while thread.is_alive():
                with contextlib.suppress(queue.Empty):
                    q.get_nowait()
                thread.join(timeout=0.05)


def build_pretrain_dataset(name: str, data_path: str | Path | None, input_size: int, backend: str = "pil",
                           download: bool = False) -> Dataset:
    """The pre-training set for `--data_backend`, samples uint8 (`normalize_pixels` makes floats):

    - `pil`: PIL decodes, `pretrain_transform(uint8=True)`: the reference's values exactly;
    - `tensor`: torchvision's JPEG decoder (libjpeg-turbo) and `resized_crop_uint8` in the workers
      (`load_image_tensor`, `TensorPretrainTransform`): the same crops, values close to but not
      equal to PIL's (benchmarks/bench_data.py, 224 px crops of ImageNet-like JPEGs: 97% of the
      values equal, mean absolute difference 0.03 of 255 levels, at most 11, from the decoders'
      and resamplers' rounding);
    - `gpu`: the workers read the files' bytes and draw the crops (`read_encoded`,
      `EncodedPretrainTransform`); `build_pretrain_loader` decodes them on the device.

    `tensor` and `gpu` decode image files: `imagefolder` only (`UsageError` otherwise)."""
    if backend not in FILE_BACKENDS:
        raise UsageError(f"--data_backend {backend!r}: choose from {FILE_BACKENDS} here (memory: `data_memory`)")
    if backend == "pil":
        return build_dataset(name, data_path, "train", pretrain_transform(input_size, uint8=True), download)
    if name != "imagefolder":
        raise UsageError(f"--data_backend {backend} decodes image files: it needs --dataset imagefolder "
                         f"(got {name}); use --data_backend pil")
    if backend == "tensor":
        return _build_imagefolder(data_path, "train", TensorPretrainTransform(input_size), loader=load_image_tensor)
    dataset = _build_imagefolder(data_path, "train", EncodedPretrainTransform(input_size), loader=read_encoded)
    dataset.collate_items = collate_encoded
    return dataset


def build_pretrain_loader(dataset: Dataset, batch_size: int, *, backend: str, device: torch.device | str,
                          input_size: int, num_workers: int, pin_memory: bool, seed: int = 0) -> Any:
    """The pre-training loader of a `build_pretrain_dataset` set: `build_loader(train=True)`,
    batches uint8 [B, 3, S, S]; for `gpu`, wrapped in a `DeviceDecodeLoader` (batches already on
    `device`; prefetched by a thread when there are workers)."""
    if backend != "gpu":
        return build_loader(dataset, batch_size, train=True, num_workers=num_workers, pin_memory=pin_memory,
                            seed=seed)
    loader = build_loader(dataset, batch_size, train=True, num_workers=num_workers, pin_memory=False, seed=seed)
    return DeviceDecodeLoader(loader, device, input_size, prefetch=num_workers > 0)


# ---------------------------------------------------------------------------------------------
# synthetic data


def make_synthetic_imagefolder(
    root: str | Path,
    num_classes: int = 3,
    per_class: int = 8,
    size: int = 32,
    splits: Sequence[str] = ("train", "val"),
    seed: int = 0,
    image_format: str = "png",
) -> Path:
    """Write a small random image folder `root/<split>/class_<i>/<n>.png` and return `root`
    (`image_format="jpeg"`: `<n>.jpg`, quality 90).

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
                img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
                if image_format == "jpeg":
                    img.save(folder / f"{n}.jpg", quality=90)
                else:
                    img.save(folder / f"{n}.png")
    return root


def require_full_batch(dataset: Dataset, batch_size: int, world_size: int) -> None:
    """Refuse a training set too small for one full batch per process (the training loaders drop
    the last partial batch, so the run would train nothing); raises `UsageError`."""
    per_process = math.ceil(len(dataset) / world_size)  # DistributedSampler pads to equal shards
    if per_process < batch_size:
        raise UsageError(f"--batch_size {batch_size} is larger than the {per_process} training images each process "
                         f"gets ({len(dataset)} images over {world_size} process(es)): no full batch to train on; "
                         "lower --batch_size")
