"""Peak-memory readings: a phase's peak after a reset, and the whole process's across resets."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lowbit import memory


def test_process_peak_survives_a_phase_reset():
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB resident
    block.add_(1)
    peak_with_block = memory.peak_rss_mb()
    del block
    if not memory.reset_peak_rss():
        pytest.skip("this kernel does not allow resetting the high-water mark")
    # the kernel's RSS counters lag by a few pages per thread: compare to 1 MiB
    assert memory.peak_rss_mb() < peak_with_block - 32  # the phase starts afresh
    assert memory.process_peak_rss_mb() > peak_with_block - 1  # the process keeps its peak


def test_a_child_does_not_inherit_its_parents_peak():
    """ru_maxrss carries a parent's peak across exec; the reported peak must not."""
    ballast = torch.ones(256 * 2**20 // 4)  # make this process's peak >= 256 MiB
    ballast.add_(1)
    code = "from lowbit import api; print(api.peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                 text=True).stdout)
    assert child < memory.process_peak_rss_mb() - 100
    del ballast
