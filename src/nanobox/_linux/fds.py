"""Small fd helpers shared by the fork chain."""

from __future__ import annotations

import errno
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
    """All of ``data`` to ``fd``, waiting where it is non-blocking."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            import select

            poller = select.poll()  # (not select(): any descriptor number)
            poller.register(fd, select.POLLOUT)
            poller.poll()
            continue
        if n == 0:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        view = view[n:]
