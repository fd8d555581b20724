"""Sockets for the fork chain, on ``_socket`` rather than ``socket``.

Importing ``socket`` converts its constants into enums (``AddressFamily``,
``SocketKind``, ``MsgFlag``, ``AddressInfo``) and imports ``selectors``:
~4 ms of CPU here, paid by the CLI and by its fork server on the way to a
cold run, where the two processes' imports fill both cores. The fork chain
only needs unix socket pairs, ``sendmsg``/``recvmsg`` with fds and a few
constants, which ``_socket`` has. (``nanobox.net``, the proxy, uses
``socket`` and asyncio; it is imported only for the allowlist.)
"""

from __future__ import annotations

import _socket
import sys

AF_INET = _socket.AF_INET
AF_UNIX = _socket.AF_UNIX
SOCK_DGRAM = _socket.SOCK_DGRAM
SOCK_STREAM = _socket.SOCK_STREAM
SOCK_SEQPACKET = _socket.SOCK_SEQPACKET
SOL_SOCKET = _socket.SOL_SOCKET
SO_REUSEADDR = _socket.SO_REUSEADDR
SCM_RIGHTS = _socket.SCM_RIGHTS
MSG_DONTWAIT = _socket.MSG_DONTWAIT
MSG_PEEK = _socket.MSG_PEEK
MSG_CMSG_CLOEXEC = _socket.MSG_CMSG_CLOEXEC
CMSG_LEN = _socket.CMSG_LEN
sethostname = _socket.sethostname


class Socket(_socket.socket):
    """``_socket.socket`` with ``with`` support. ``Socket(fileno=fd)`` takes
    over an open socket fd (its family and type read from the kernel)."""

    __slots__ = ()

    def __enter__(self) -> Socket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_INT = 4  # sizeof(int): an fd in SCM_RIGHTS (``array`` would load a shared library)


def socketpair(family: int = AF_UNIX, kind: int = SOCK_SEQPACKET) -> tuple[Socket, Socket]:
    """A connected pair, close-on-exec (as every socket Python makes)."""
    a, b = _socket.socketpair(family, kind, 0)
    return Socket(fileno=a.detach()), Socket(fileno=b.detach())


def send_fds(sock: _socket.socket, buffers: list[bytes], fds: list[int], flags: int = 0) -> int:
    """``socket.send_fds``: ``buffers`` as one message, with ``fds``."""
    data = b"".join(fd.to_bytes(_INT, sys.byteorder, signed=True) for fd in fds)
    return sock.sendmsg(buffers, [(SOL_SOCKET, SCM_RIGHTS, data)], flags)


def recv_fds(sock: _socket.socket, bufsize: int, maxfds: int) -> tuple[bytes, list[int]]:
    """One message and the fds passed with it, received close-on-exec
    (``socket.recv_fds`` ignores its ``flags`` before Python 3.12, and an
    fd received without the flag would leak into every exec'd program)."""
    fds: list[int] = []
    msg, ancdata, _flags, _addr = sock.recvmsg(bufsize, CMSG_LEN(maxfds * _INT), MSG_CMSG_CLOEXEC)
    for level, kind, data in ancdata:
        if level == SOL_SOCKET and kind == SCM_RIGHTS:
            for i in range(0, len(data) - _INT + 1, _INT):
                fds.append(int.from_bytes(data[i : i + _INT], sys.byteorder, signed=True))
    return msg, fds
