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
import os
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
MSG_NOSIGNAL = _socket.MSG_NOSIGNAL
SHUT_RD = _socket.SHUT_RD
MSG_CMSG_CLOEXEC = _socket.MSG_CMSG_CLOEXEC
MSG_TRUNC = _socket.MSG_TRUNC
MSG_CTRUNC = _socket.MSG_CTRUNC
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
    msg, ancdata, _flags, _addr = sock.recvmsg(bufsize, CMSG_LEN(maxfds * _INT), MSG_CMSG_CLOEXEC)
    return msg, _fds(ancdata)


def _fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds of a message's SCM_RIGHTS data."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == SOL_SOCKET and kind == SCM_RIGHTS:
            for i in range(0, len(data) - _INT + 1, _INT):
                fds.append(int.from_bytes(data[i : i + _INT], sys.byteorder, signed=True))
    return fds


# The fork chain's messages (a run and its plan, a run's argv and
# environment, a reply) go over SOCK_SEQPACKET sockets, where one message
# must fit the sender's socket buffer (~208 KiB by default, less where an
# administrator says so): a run whose argv and environment were larger
# (the kernel lets a command have 2 MiB and more) failed with EMSGSIZE. And
# glibc serves a receive buffer of 128 KiB or more with mmap, mremap and
# munmap, ~20 us for every message received. So every such message is
# received into MSG_MAX bytes, and one longer than that travels in a memfd
# passed with it, the message itself being BIG.
MSG_MAX = 1 << 16
BIG = b"\xff\xffBIG"  # never a marshalled value (0xff is no type) nor a join_run'd run
BIG_MAX = 1 << 28  # what a receiver reads from a memfd at most (trusted peers only)
_EMSGSIZE = 90


class BadMessage(OSError):
    """``recv_msg``'s refusal of a message cut short or too long (its fds
    are closed): that message is lost, the socket is still good."""


_EINVAL = 22
_MFD_NOEXEC_SEAL = 0x0008


def send_msg(sock: _socket.socket, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
    """Send ``data`` (any length, but not empty: an empty message reads as
    EOF) and ``fds`` as one message for ``recv_msg``."""
    if len(data) <= MSG_MAX:
        try:
            if fds:
                send_fds(sock, [data], list(fds))
            else:
                sock.send(data)
            return
        except OSError as exc:
            if exc.errno != _EMSGSIZE:
                raise
    try:
        # Never executable (where vm.memfd_noexec=2, Linux 6.3+, a memfd
        # without this flag is refused); older kernels do not know it.
        big = os.memfd_create("nanobox-message", os.MFD_CLOEXEC | _MFD_NOEXEC_SEAL)
    except OSError as exc:
        if exc.errno != _EINVAL:
            raise
        big = os.memfd_create("nanobox-message", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(big, view) :]
        send_fds(sock, [BIG], [*fds, big])
    finally:
        os.close(big)


def recv_msg(sock: _socket.socket, maxfds: int) -> tuple[bytes, list[int]]:
    """One message of ``send_msg``'s and the fds passed with it (at most
    ``maxfds``; those beyond are closed). ``b""`` at EOF; ``BadMessage``
    for one cut short or too long."""
    msg, ancdata, flags, _addr = sock.recvmsg(
        MSG_MAX, CMSG_LEN((maxfds + 1) * _INT), MSG_CMSG_CLOEXEC
    )
    fds = _fds(ancdata)
    try:
        # (More fds than expected: the kernel closed those that did not fit.)
        if flags & MSG_TRUNC or (msg == BIG and flags & MSG_CTRUNC):
            raise BadMessage(_EMSGSIZE, "a message of the fork chain was cut short")
        if msg == BIG and fds:
            big = fds.pop()
            try:
                size = os.fstat(big).st_size
                if size > BIG_MAX:
                    raise BadMessage(_EMSGSIZE, f"a message of {size} bytes is too long")
                parts = []
                offset = 0
                while offset < size:
                    part = os.pread(big, size - offset, offset)
                    if not part:
                        break
                    parts.append(part)
                    offset += len(part)
                msg = b"".join(parts)
            finally:
                os.close(big)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    if len(fds) > maxfds:
        for fd in fds[maxfds:]:
            os.close(fd)
        del fds[maxfds:]
    return msg, fds
