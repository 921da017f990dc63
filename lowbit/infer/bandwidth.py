"""The machine's memory bandwidth, measured with torch on this process's threads."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Bandwidth:
    """Best-of-``repeats`` bandwidths in GB/s (1e9 bytes per second).

    Attributes:
        copy_gbs: ``dst.copy_(src)``, counting bytes read plus bytes written.
        read_gbs: a reduction over ``src`` (bytes read only).
        nbytes: buffer size; threads: torch threads used.
    """

    copy_gbs: float
    read_gbs: float
    nbytes: int
    threads: int


def measure_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> Bandwidth:
    """Copy and read bandwidth over ``nbytes`` buffers (choose one far above the caches)."""
    if nbytes < 1 << 20 or repeats < 1:
        raise ValueError("measure_bandwidth needs nbytes >= 1 MiB and repeats >= 1")
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    size = src.numel() * 4
    copy = _best(lambda: dst.copy_(src), repeats)
    read = _best(lambda: src.sum(), repeats)
    return Bandwidth(2 * size / copy / 1e9, size / read / 1e9, size, torch.get_num_threads())


def _best(fn, repeats: int) -> float:
    fn()  # touch the pages
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
