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
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, auto_augment, create_transform
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler
from torch.utils.data import default_collate
from torchvision import datasets, transforms
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


def pretrain_transform(input_size: int) -> transforms.Compose:
    """The MAE pre-training augmentation: a random crop of 20-100% of the area, then a flip."""
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        *_normalize(),
    ])


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

    def _fetch(self, index: int) -> tuple[Any, list[tuple[str, str]]]:
        seed_global_rngs(sample_seed(self.seed, getattr(index, "epoch", 0), int(index)))
        if self.can_report_bad_images:
            return self.dataset.load_reporting(int(index))
        return self.dataset[int(index)], []

    def _fetch_all(self, indices: Sequence[int]) -> list[tuple[Any, list[tuple[str, str]]]]:
        # A DataLoader worker's generators serve this dataset only: no need to restore them there
        # (in the main process, once per batch: saving numpy's state costs more than a small image).
        if torch.utils.data.get_worker_info() is not None:
            return [self._fetch(i) for i in indices]
        with preserved_global_rngs():
            return [self._fetch(i) for i in indices]

    def __getitem__(self, index: int) -> Any:
        return self._fetch_all([index])[0][0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Any, list[tuple[str, str]]]]:
        return self._fetch_all(indices)


def _collate_reported(batch: list[tuple[Any, list[tuple[str, str]]]]) -> tuple[Any, list[tuple[str, str]]]:
    """(the default collation of the items, the batch's unreadable files)."""
    return default_collate([item for item, _ in batch]), [bad for _, report in batch for bad in report]


class TrainLoader(DataLoader):
    """The training `DataLoader`: iterates like any loader, and gathers the unreadable images met
    during the current pass over all workers; each is warned about once per pass (epoch)."""

    def __iter__(self) -> Iterator[Any]:
        self._bad_this_epoch: dict[str, str] = {}
        for batch, report in super().__iter__():
            for path, reason in report:
                if path not in self._bad_this_epoch:
                    self._bad_this_epoch[path] = reason
                    log.warning("skipping unreadable image %s (%s); %d bad image(s) so far this epoch",
                                path, reason, len(self._bad_this_epoch))
            yield batch

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
        return TrainLoader(SeededDataset(dataset, seed), collate_fn=_collate_reported, **options)
    return DataLoader(dataset, **options)


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


def require_full_batch(dataset: Dataset, batch_size: int, world_size: int) -> None:
    """Refuse a training set too small for one full batch per process (the training loaders drop
    the last partial batch, so the run would train nothing); raises `UsageError`."""
    per_process = math.ceil(len(dataset) / world_size)  # DistributedSampler pads to equal shards
    if per_process < batch_size:
        raise UsageError(f"--batch_size {batch_size} is larger than the {per_process} training images each process "
                         f"gets ({len(dataset)} images over {world_size} process(es)): no full batch to train on; "
                         "lower --batch_size")
