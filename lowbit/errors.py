"""The one exception type users see: a message that says what is wrong and what to do."""

from __future__ import annotations

import errno
from pathlib import Path


class LowbitError(Exception):
    """Bad input or an impossible request. The CLI prints it as one line and exits with 2."""


def write_error(target: str | Path, exc: OSError, what: str = "") -> LowbitError:
    """The LowbitError for an ``OSError`` raised while writing ``target`` (disk full, no
    permission, ...); ``what`` adds what became of the earlier contents."""
    note = f"; {what}" if what else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return LowbitError(
            f"no space left on the device while writing {target}{note}; free some space or "
            "write to another folder"
        )
    reason = exc.strerror or str(exc)
    return LowbitError(
        f"could not write {target}: {reason}{note}; check the folder's permissions and free "
        "space, or write to another folder"
    )
