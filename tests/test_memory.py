"""Peak-memory readings: a phase's peak after a reset, and the whole process's across resets.

Each check runs in a fresh interpreter: in the test process the heap left by earlier tests can
hold the memory a check allocates, so the high-water mark would not move.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PHASES = """
import json, torch
from lowbit import memory
block = torch.ones(256 * 2**20 // 4)  # 256 MiB, its own mapping (returned on free)
block.add_(1)
with_block = memory.peak_rss_mb()
del block
reset = memory.reset_peak_rss()
print(json.dumps([reset, with_block, memory.peak_rss_mb(), memory.process_peak_rss_mb()]))
"""


def _child(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True).stdout


def test_process_peak_survives_a_phase_reset():
    reset, with_block, phase, process = json.loads(_child(PHASES))
    if not reset:
        pytest.skip("this kernel does not allow resetting the high-water mark")
    # the kernel's RSS counters lag by a few pages per thread: compare to 1 MiB
    assert phase < with_block - 200  # the phase starts afresh
    assert process > with_block - 1  # the process keeps its peak


def test_a_child_does_not_inherit_its_parents_peak():
    """ru_maxrss carries a parent's peak across exec; the reported peak must not."""
    import torch

    from lowbit import memory

    ballast = torch.ones(768 * 2**20 // 4)  # this process's peak: above a fresh lowbit import
    ballast.add_(1)
    child = float(_child("from lowbit import api; print(api.peak_rss_mb())"))
    assert child < memory.process_peak_rss_mb() - 100
    del ballast
