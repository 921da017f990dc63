"""Process memory: the resident-set high-water mark, resettable on Linux.

``reset_peak_rss()`` clears the kernel's high-water mark (``/proc/self/clear_refs``, value 5) so
that ``peak_rss_mb()`` afterwards measures one phase (e.g. training) rather than the whole
process; where that is not possible the peak covers the whole process so far.
"""

from __future__ import annotations

import resource
from pathlib import Path


def reset_peak_rss() -> bool:
    """Start a new high-water mark; False when the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """Peak resident memory since the last reset (or process start), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
