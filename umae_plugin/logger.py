"""Training logs: running meters kept on the device (read only at print steps), progress lines
with ETA, the upstream JSON-lines `log.txt`, and TensorBoard scalars."""
from __future__ import annotations

import datetime
import json
import logging
import os
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


def progress(iterable: Iterable[Any], total: int, header: str, print_freq: int) -> Iterator[tuple[int, Any]]:
    """Yield (step, item) and log `header [step/total] eta ... it/s` every `print_freq` steps."""
    start = time.time()
    for step, item in enumerate(iterable):
        yield step, item
        if (step + 1) % print_freq == 0 or step + 1 == total:
            elapsed = time.time() - start
            eta = elapsed / (step + 1) * (total - step - 1)
            log.info("%s [%d/%d] eta %s, %.2f it/s", header, step + 1, total,
                     datetime.timedelta(seconds=int(eta)), (step + 1) / max(elapsed, 1e-9))


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
