"""`--data_backend memory`: the training set decoded once into one uint8 tensor, augmented in batches
on the training device.

For small datasets of one image size (CIFAR-10: 50,000 x 3 x 32 x 32 = 147 MiB) the per-image work
of the file backends (a worker decodes a JPEG and PIL crops and resizes it) costs more than the
model on a few CPU cores, and on a GPU it leaves the device idle. Here the images are decoded once
(PIL, through the dataset's own loader, so the pixels are the `pil` backend's before cropping), held
as uint8 [N, 3, H, W] on the device, and each batch is cropped, resized and flipped there.

The draws are exactly the `pil` backend's: for sample `i` at epoch `e`, torch's generator is seeded
with `data.sample_seed(seed, e, i)` and torchvision's own `RandomResizedCrop.get_params` (scale
(0.2, 1), ratio (3/4, 4/3), up to 10 tries, then the centre-crop fallback) and
`RandomHorizontalFlip`'s `torch.rand(1) < 0.5` are called, so every backend crops the same integer
boxes of the same images in the same order (`data.EpochDistributedSampler`), and a resumed run
draws what an uninterrupted one draws. Each box is cut out and resized as the `tensor` backend
does (`data.resized_crops_uint8`: torch's antialiased bicubic, a port of PIL's kernel, a = -0.5; on
the CPU its uint8 kernel, within one level of PIL's; elsewhere float32, rounded), so values are
close to but not bitwise the `pil` backend's. (torch's plain bicubic and `grid_sample` use a =
-0.75: not used here.) Under DDP every rank holds the whole set and takes its shard of the indices.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from .data import PRETRAIN_RATIO, PRETRAIN_SCALE, EpochDistributedSampler, resized_crops_uint8, sample_seed
from .distributed import get_world_size
from .errors import UsageError

log = logging.getLogger("umae")

DEFAULT_BUDGET_MB = 8192  # `--memory_budget_mb`: the decoded set must fit this


def decode_dataset(dataset: Dataset, *, budget_mb: float = DEFAULT_BUDGET_MB, num_workers: int = 0,
                   batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 [N, 3, H, W], int64 [N]) of every item of `dataset`, whose transform must give uint8
    [3, H, W] (`transforms.PILToTensor()`), in dataset order. Refuses in one line (`UsageError`) a
    set whose images are not all of one size or whose decoded size exceeds `budget_mb`."""
    n = len(dataset)
    first, _ = dataset[0]
    if not (isinstance(first, torch.Tensor) and first.dtype == torch.uint8 and first.dim() == 3):
        raise UsageError("--data_backend memory: the dataset must give uint8 [3, H, W] images")
    need_mb = n * first.numel() / 2**20
    if need_mb > budget_mb:
        raise UsageError(f"--data_backend memory: {n} images of {tuple(first.shape)} need {need_mb:.0f} MiB, over "
                         f"--memory_budget_mb {budget_mb:g}; use --data_backend pil")
    images = torch.empty((n, *first.shape), dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.int64)
    start = 0

    def collate(items: list[tuple[torch.Tensor, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
        return [img for img, _ in items], torch.tensor([int(t) for _, t in items])

    # a generator of its own: iterating a loader draws its base seed, which must not come from (and move)
    # the global generator the model is initialised from
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0))
    for batch, targets in loader:
        for k, img in enumerate(batch):
            if img.shape != first.shape:
                raise UsageError(f"--data_backend memory needs images of one size: item {start + k} is "
                                 f"{tuple(img.shape)}, item 0 {tuple(first.shape)}; use --data_backend pil")
            images[start + k] = img
        labels[start:start + len(batch)] = targets
        start += len(batch)
    return images, labels


def crop_boxes(height: int, width: int, seed: int, epoch: int, indices: list[int], *,
               scale: tuple[float, float] = PRETRAIN_SCALE, ratio: tuple[float, float] = PRETRAIN_RATIO
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(boxes int64 [B, 4] as (top, left, height, width), flips bool [B]) of the samples `indices` at
    `epoch`: torchvision's `RandomResizedCrop.get_params` then the flip draw, from torch's generator
    seeded with `data.sample_seed(seed, epoch, index)`, as the `pil` backend draws them. The
    global generator is put back as it was."""
    probe = torch.empty(3, height, width, device="meta")
    boxes, flips = [], []
    with torch.random.fork_rng(devices=[]):
        for index in indices:
            torch.manual_seed(sample_seed(seed, epoch, int(index)))
            boxes.append(transforms.RandomResizedCrop.get_params(probe, list(scale), list(ratio)))
            flips.append(bool(torch.rand(1) < 0.5))
    return torch.tensor(boxes, dtype=torch.int64).reshape(-1, 4), torch.tensor(flips, dtype=torch.bool)


class MemoryLoader:
    """The `memory` backend's training loader: iterates (uint8 [B, 3, S, S], int64 [B]) on `device`
    for one epoch in the order of an `EpochDistributedSampler` (seed, epoch; full batches only), each
    sample cropped and flipped as `crop_boxes` draws. Call `sampler.set_epoch(e)` (`data.set_epoch`)
    before each epoch."""

    bad_images = None  # no files to fail once decoded

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, input_size: int,
                 device: torch.device | str, seed: int = 0) -> None:
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size, self.input_size, self.seed = batch_size, input_size, seed
        self.device = torch.device(device)
        one_process = dict(num_replicas=1, rank=0) if get_world_size() == 1 else {}
        self.sampler = EpochDistributedSampler(range(len(labels)), shuffle=True, seed=seed, **one_process)
        self.dataset = self.images  # what `len(loader.dataset)` reads

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = list(self.sampler)
        epoch = self.sampler.epoch
        _, _, height, width = self.images.shape
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            boxes, flips = crop_boxes(height, width, self.seed, epoch, idx)
            index = torch.tensor([int(i) for i in idx], device=self.device)
            crops = resized_crops_uint8([self.images[int(i)] for i in idx], boxes.tolist(), self.input_size,
                                        flips.tolist())
            yield crops, self.labels[index]


def build_memory_loader(dataset: Dataset, batch_size: int, *, input_size: int, device: torch.device | str,
                        seed: int = 0, budget_mb: float = DEFAULT_BUDGET_MB, num_workers: int = 0) -> MemoryLoader:
    """Decode `dataset` (`decode_dataset`) and wrap it in a `MemoryLoader`."""
    images, labels = decode_dataset(dataset, budget_mb=budget_mb, num_workers=num_workers)
    if len(labels) < batch_size * max(get_world_size(), 1):
        raise UsageError(f"--data_backend memory: {len(labels)} images make no full batch of {batch_size}")
    log.info("data backend memory: %d images %s decoded once (%.0f MiB uint8) on %s; crops drawn as "
             "torchvision's RandomResizedCrop.get_params, resized by torch's antialiased bicubic (PIL's kernel, "
             "a = -0.5); every rank holds the whole set", len(labels), tuple(images.shape[1:]),
             images.numel() / 2**20, device)
    return MemoryLoader(images, labels, batch_size, input_size=input_size, device=device, seed=seed)


def source_dataset(name: str, data_path: Any, download: bool = False) -> Dataset:
    """The training set as uint8 [3, H, W] images without augmentation, for `decode_dataset`."""
    from .data import build_dataset
    return build_dataset(name, data_path, "train", transforms.PILToTensor(), download)
