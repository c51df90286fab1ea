"""umae_plugin.logger's throughput measures: images/s and data-wait fraction from host clocks
against known sleeps, peak memory against an allocation of known size."""
import logging
import os
import subprocess
import sys
import time

import pytest
import torch

from umae_plugin.logger import peak_memory_mb, progress


def slow_batches(n, wait, batch=4):
    for _ in range(n):
        time.sleep(wait)
        yield torch.zeros(batch, 3), torch.zeros(batch)


def test_progress_measures_images_per_second_and_the_data_wait(caplog):
    """Each item takes 30 ms to arrive and the loop body 30 ms: about half the time waits for data."""
    tracker = progress(slow_batches(6, 0.03), 6, "epoch 0", print_freq=3)
    with caplog.at_level(logging.INFO, logger="umae"):
        for _ in tracker:
            time.sleep(0.03)
    summary = tracker.summary()
    assert tracker.images == 24
    assert summary["data_wait_frac"] == pytest.approx(0.5, abs=0.15)
    assert summary["images_per_s"] == pytest.approx(24 / tracker.elapsed_s) and 24 / 0.6 < summary["images_per_s"] < 24 / 0.3
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("epoch 0 [3/6]") and "img/s, data " in lines[0]
    assert "max mem" in lines[1]


def vm_hwm_mb():
    """The kernel's peak resident set size of this process (/proc/self/status VmHWM), MiB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status")


def test_peak_memory_on_the_cpu_is_the_kernels_peak_rss():
    assert peak_memory_mb("cpu") == pytest.approx(vm_hwm_mb(), abs=2)


def test_peak_memory_rises_with_a_large_allocation():
    """In a fresh process: after touching 384 MiB, the peak is at least the resident size before
    (VmRSS) plus the block."""
    code = ("import numpy as np; from umae_plugin.logger import peak_memory_mb\n"
            "rss = lambda: next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:')) / 1024\n"
            "before = rss(); block = np.ones(384 * 2**20, dtype=np.uint8); print(before, peak_memory_mb())")
    if not os.path.exists("/proc/self/status"):
        pytest.skip("no /proc/self/status")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    before, peak = float(out[0]), float(out[1])
    assert peak >= before + 384 - 8
