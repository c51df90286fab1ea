"""Training logs: running meters kept on the device (read only at print steps), progress lines
with ETA, images/s, the fraction of time spent waiting for data and peak memory, the upstream
JSON-lines `log.txt`, and TensorBoard scalars."""
from __future__ import annotations

import datetime
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from . import distributed

log = logging.getLogger("umae")


class Meters:
    """Sums of per-step scalars, accumulated as device tensors so that recording a step never
    waits for the GPU; `averages()` syncs (and all-reduces across ranks) once."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def update(self, **values: torch.Tensor | float) -> None:
        for k, v in values.items():
            v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1

    def averages(self, all_ranks: bool = True) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        stacked = torch.stack([self.sums[k].to(self.sums[keys[0]].device) / self.counts[k] for k in keys])
        if all_ranks:
            stacked = distributed.all_reduce_mean(stacked)
        return dict(zip(keys, stacked.tolist()))


def peak_memory_mb(device: torch.device | str | None = None) -> float:
    """Peak memory so far in MiB: on CUDA, the most tensors ever held on the device
    (`torch.cuda.max_memory_allocated`, as the MAE reference's and DINOv2's logs); elsewhere this
    process's peak resident set size (`ru_maxrss`; DataLoader workers are not counted)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def _batch_len(item: Any) -> int:
    """Images in a loader item: the length of its first element ((images, targets) batches)."""
    first = item[0] if isinstance(item, (tuple, list)) else item
    return len(first) if hasattr(first, "__len__") else 1


class Progress:
    """Iterate `iterable` as (step, item), timing the wait for each item; every `print_freq` steps
    (and at the last) log `header [step/total] eta ..., it/s, img/s, data N%, max mem M MB` (images/s
    and the data-wait share over the steps since the last line; peak memory of `device`,
    `peak_memory_mb`). `summary()` gives the pass's `images_per_s` and `data_wait_frac` (time blocked
    in the loader / wall time), from host clocks alone: no device sync."""

    def __init__(self, iterable: Iterable[Any], total: int, header: str, print_freq: int,
                 device: torch.device | str | None = None) -> None:
        self.iterable, self.total, self.header, self.print_freq = iterable, total, header, print_freq
        self.device = device
        self.images = 0
        self.wait_s = 0.0
        self.elapsed_s = 0.0

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        start = window_start = time.perf_counter()
        window_wait, window_images = 0.0, 0
        it = iter(self.iterable)
        step = 0
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                break
            waited = time.perf_counter() - t0
            n = _batch_len(item)
            self.wait_s += waited
            window_wait += waited
            self.images += n
            window_images += n
            yield step, item
            now = time.perf_counter()
            self.elapsed_s = now - start
            if (step + 1) % self.print_freq == 0 or step + 1 == self.total:
                window = max(now - window_start, 1e-9)
                eta = self.elapsed_s / (step + 1) * (self.total - step - 1)
                log.info("%s [%d/%d] eta %s, %.2f it/s, %.1f img/s, data %.1f%%, max mem %.0f MB", self.header,
                         step + 1, self.total, datetime.timedelta(seconds=int(eta)),
                         (step + 1) / max(self.elapsed_s, 1e-9), window_images / window, 100 * window_wait / window,
                         peak_memory_mb(self.device))
                window_start, window_wait, window_images = now, 0.0, 0
            step += 1
        self.elapsed_s = time.perf_counter() - start

    def summary(self, all_ranks: bool = False) -> dict[str, float]:
        """{"images_per_s", "data_wait_frac"} of the pass so far. With `all_ranks` (every rank must
        call it), images/s summed over ranks (the job's) and the wait fraction averaged."""
        elapsed = max(self.elapsed_s, 1e-9)
        rate, wait = self.images / elapsed, self.wait_s / elapsed
        if all_ranks and distributed.get_world_size() > 1:
            device = self.device if self.device is not None else "cpu"
            mean = distributed.all_reduce_mean(torch.tensor([rate, wait], dtype=torch.float32, device=device))
            rate, wait = float(mean[0]) * distributed.get_world_size(), float(mean[1])
        return {"images_per_s": rate, "data_wait_frac": wait}


def progress(iterable: Iterable[Any], total: int, header: str, print_freq: int,
             device: torch.device | str | None = None) -> Progress:
    """Yield (step, item) and log progress lines every `print_freq` steps (`Progress`)."""
    return Progress(iterable, total, header, print_freq, device)


class RunLog:
    """Rank 0's `log.txt` (one JSON line per epoch, as upstream) and TensorBoard writer."""

    def __init__(self, output_dir: str | os.PathLike | None, log_dir: str | os.PathLike | None, enabled: bool) -> None:
        self.enabled = enabled and bool(output_dir)
        self.path = Path(output_dir) / "log.txt" if output_dir else None
        self.tb = None
        if enabled and log_dir:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(log_dir, exist_ok=True)
            self.tb = SummaryWriter(log_dir=str(log_dir))

    def logged_epochs(self) -> set[int]:
        if not self.path or not self.path.exists():
            return set()
        epochs = set()
        for line in self.path.read_text().splitlines():
            try:
                epochs.add(int(json.loads(line)["epoch"]))
            except (ValueError, KeyError, TypeError):
                continue
        return epochs

    def write_epoch(self, stats: dict[str, Any]) -> None:
        """Append one epoch's line (skipped if that epoch is already in the file: a resumed run
        re-logs the epoch its checkpoint holds only when the line was lost)."""
        if not self.enabled:
            return
        if int(stats["epoch"]) in self.logged_epochs():
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(stats) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            self.tb.flush()

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a `log.txt` (`RunLog`'s JSON lines, upstream's format); lines that are not
    JSON objects are skipped. A missing or unreadable file raises `OSError`."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
