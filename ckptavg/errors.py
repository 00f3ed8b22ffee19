"""Every exception and warning ckptavg raises of its own, and the one check of integer settings.

Bad input is a ``ValueError`` naming the argument, field, file or key, raised before anything is
changed.
"""

from __future__ import annotations

import os


class CkptavgWarning(UserWarning, RuntimeWarning):
    """Something was refused or dropped while keeping stored data safe (a rejected snapshot, an
    unusable file, a missing file). Both a ``UserWarning`` and a ``RuntimeWarning``."""


class CorruptSnapshotError(OSError, ValueError):
    """A stored snapshot file is missing, truncated or fails its checksum. The message names it."""

    def __init__(self, path: str | os.PathLike[str], reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"snapshot file {self.path} is unusable: {reason}")

    def __str__(self) -> str:
        return f"snapshot file {self.path} is unusable: {self.reason}"


class FolderLockedError(RuntimeError):
    """A window folder already has a writer (another process, or another window in this one)."""


def check_int(value: object, what: str, *, minimum: int = 0, optional: bool = False) -> int | None:
    """``value`` if it is an ``int`` of at least ``minimum`` (a ``bool`` is not), else a
    ``ValueError`` naming ``what``; ``None`` passes when ``optional``.

    >>> check_int(3, "window", minimum=1)
    3
    >>> check_int(True, "window", minimum=1)
    Traceback (most recent call last):
    ...
    ValueError: window must be a positive integer, got True
    """
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer of at least {minimum}")
        raise ValueError(f"{what} must be {kind}{' or None' if optional else ''}, got {value!r}")
    return value
