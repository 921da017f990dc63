"""Process memory: the resident-set high-water mark, resettable on Linux.

``reset_peak_rss()`` clears the kernel's high-water mark (``/proc/self/clear_refs``, value 5) so
that ``peak_rss_mb()`` afterwards measures one phase (e.g. training) rather than the whole
process; where that is not possible the peak covers the whole process so far.
``process_peak_rss_mb()`` is the whole process's peak across such resets. Both read ``VmHWM``,
which starts afresh at ``exec``; ``ru_maxrss`` (the fallback off Linux) carries the parent's
peak into a child started from a large process.
``rss_bytes()`` and ``available_bytes()`` are what a run's pre-flight estimate starts from
(:mod:`lowbit.engine.preflight`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
from pathlib import Path

_peak_before_reset_mb = 0.0  # the process's peak up to the last reset_peak_rss


def reset_peak_rss() -> bool:
    """Start a new high-water mark; False when the kernel does not allow it."""
    global _peak_before_reset_mb
    before = peak_rss_mb()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    _peak_before_reset_mb = max(_peak_before_reset_mb, before)
    return True


def _proc_kib(file: str, field: str) -> int | None:
    """The ``field:`` line of a ``/proc`` file such as ``/proc/self/status``, in KiB; None where
    the file or the line is missing."""
    try:
        for line in Path(file).read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident memory since the last reset (or process start), MiB."""
    hwm = _proc_kib("/proc/self/status", "VmHWM")
    if hwm is not None:
        return hwm / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def process_peak_rss_mb() -> float:
    """Peak resident memory of this process since it started, resets included, MiB."""
    return max(_peak_before_reset_mb, peak_rss_mb())


def rss_bytes() -> int:
    """Resident memory of this process now, bytes (0 where unknown)."""
    return (_proc_kib("/proc/self/status", "VmRSS") or 0) * 1024


def available_bytes() -> int | None:
    """Memory this process can still take, bytes: ``MemAvailable`` of ``/proc/meminfo``, lowered
    to what is left under a cgroup v2 limit when one is set; None where unknown."""
    kib = _proc_kib("/proc/meminfo", "MemAvailable")
    available = None if kib is None else kib * 1024
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return available
    if limit != "max" and available is not None:
        available = min(available, int(limit) - used)
    return available


def trim_heap() -> bool:
    """Give the C heap's free memory back to the kernel (glibc ``malloc_trim``); False where
    there is no glibc.

    glibc raises its mmap threshold (up to 32 MiB) as large blocks are freed, so later
    tensors of a few MiB (a small model's activations) come from the heap, and its free holes
    stay resident: a streamed run of SmolLM2 cut to 18 blocks grew ~20 MiB per block here
    without this, and stays level between blocks with it (called after every block). Setting
    ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment also removes the peaks inside a block
    (~100 MiB lower peak on that run) at ~30% more CPU time (every large tensor is then a
    fresh mapping the kernel zero-fills).
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


_LIBC: ctypes.CDLL | None | bool = None


def _glibc() -> ctypes.CDLL | None:
    """glibc's C library, or None (musl, macOS, Windows)."""
    global _LIBC
    if _LIBC is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
            _LIBC = libc
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None
