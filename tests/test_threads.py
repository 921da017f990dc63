"""Thread counts for small work: one thread, and large work nested inside gets the caller's."""

from __future__ import annotations

import torch

from lowbit.core.threads import SMALL, threads_for, torch_threads


def test_large_work_nested_in_a_one_thread_context_gets_the_callers_count():
    """A small layer's solve runs on one thread; a wide Hessian factorised inside it must get
    the caller's threads back, not the one it is nested in."""
    before = torch.get_num_threads()
    with torch_threads(3):
        assert threads_for(SMALL) == 1
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            assert threads_for(SMALL + 1) == before  # the count outside every context
            with torch_threads(threads_for(SMALL + 1)):
                assert torch.get_num_threads() == before
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == before
    assert threads_for(SMALL + 1) == before  # outside any context: the current count
