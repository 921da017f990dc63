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


_caller_threads: int | None = None  # the count outside the outermost torch_threads context


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` (>= 1) while the context lasts."""
    global _caller_threads
    before = torch.get_num_threads()
    outermost = _caller_threads is None
    if outermost:
        _caller_threads = before
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before != n:
            torch.set_num_threads(before)
        if outermost:
            _caller_threads = None


def threads_for(numel: int) -> int:
    """One thread for work on at most :data:`SMALL` values, else the caller's count (the one
    outside any :func:`torch_threads` context, so large work nested in a one-thread context,
    such as a wide Hessian's factorisation inside a small layer's solve, gets it back)."""
    if numel <= SMALL:
        return 1
    return _caller_threads if _caller_threads is not None else torch.get_num_threads()
