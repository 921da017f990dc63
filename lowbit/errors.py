"""The one exception type users see: a message that says what is wrong and what to do.

Lower layers (formats/, kernels/, nn/, ...) raise ``ValueError`` for bad arguments: they do not
know which option of the user's a value came from. The public entry points (the api façade, a
config's validation, the CLI's commands) turn the ValueErrors that bad user input can cause into
a LowbitError naming the option and the fix, with :func:`user_input` around the one call where
the option is known. Nothing converts other exceptions: an internal bug stays a traceback.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path


class LowbitError(Exception):
    """Bad input or an impossible request. The CLI prints it as one line and exits with 2."""


@contextlib.contextmanager
def user_input(option: str, fix: str = "") -> Iterator[None]:
    """Turn a ``ValueError`` raised inside the block into a LowbitError
    ``"{option}: {message}; {fix}"`` (``fix`` left out when empty: the lower layer's message
    already says what to do). Only ValueError: any other exception passes through unchanged.
    Usable as a decorator too (``@user_input("--act-format", "use int8 or fp8_e4m3")``).

    Put it around the call that checks one option's value, where that option is known (a
    config's ``__post_init__``, an api function, a CLI command), not around a whole run: a
    ValueError from elsewhere inside it would be reported as that option's fault.
    """
    try:
        yield
    except ValueError as exc:
        message = " ".join(str(exc).split())  # one line: the CLI prints it as one
        raise LowbitError(f"{option}: {message}" + (f"; {fix}" if fix else "")) from exc


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
