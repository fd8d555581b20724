"""Small fd helpers shared by the fork chain."""

from __future__ import annotations

import os

MAXFD = 1 << 20


def close_all_except(keep: set[int] | tuple[int, ...] | list[int]) -> None:
    """Close every fd >= 3 that is not in ``keep`` (uses close_range)."""
    low = 3
    for fd in sorted(f for f in keep if f >= 3):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, MAXFD)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
