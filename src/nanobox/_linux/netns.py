"""The sandbox's network namespace: loopback up (two ioctls, no netlink),
and the proxy's listeners bound inside it."""

from __future__ import annotations

import fcntl
import socket
import struct

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sh14x", b"lo", 0)
        flags = struct.unpack("16sh14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sh14x", b"lo", flags | IFF_UP))


def send_listeners(chan_fd: int, ports: list[int]) -> None:
    """Bind the proxy's listeners inside the sandbox's network namespace and
    hand them to the caller, before the command exists: no start-up race,
    and the command never holds them."""
    socks: list[socket.socket] = []
    try:
        for port in ports:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen(1024)
        chan = socket.socket(fileno=chan_fd)
        try:
            socket.send_fds(chan, [b'{"t": "listeners"}'], [s.fileno() for s in socks])
        finally:
            chan.close()
    finally:
        for s in socks:
            s.close()
