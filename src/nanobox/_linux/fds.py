"""Small fd helpers shared by the fork chain."""

from __future__ import annotations

import array
import os
import socket

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


def recv_fds(sock: socket.socket, bufsize: int, maxfds: int) -> tuple[bytes, list[int]]:
    """One message and the fds passed with it, received close-on-exec
    (``socket.recv_fds`` ignores its ``flags`` before Python 3.12, and an
    fd received without the flag would leak into every exec'd program)."""
    fds = array.array("i")
    msg, ancdata, _flags, _addr = sock.recvmsg(
        bufsize, socket.CMSG_LEN(maxfds * fds.itemsize), socket.MSG_CMSG_CLOEXEC
    )
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    return msg, list(fds)
