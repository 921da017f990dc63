"""torch's intra-op thread count for work made of many small operations.

An operation over a few hundred thousand values finishes in microseconds on one core; split
over worker threads it waits for all of them at a barrier, and on a machine whose cores are
busy with other processes that wait is a scheduler time slice (milliseconds). Loops of such
operations (GPTQ's columns, per-layer reports, chunked checks) run on one thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

SMALL = 1 << 22  # values (4M: a 2048 x 2048 matrix) up to which one thread is the faster


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` (>= 1) while the context lasts."""
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before != n:
            torch.set_num_threads(before)


def threads_for(numel: int) -> int:
    """One thread for work on at most :data:`SMALL` values, else the current count."""
    return 1 if numel <= SMALL else torch.get_num_threads()
