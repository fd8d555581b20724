"""The sandbox's network namespace: loopback up (two ioctls, no netlink),
and the proxy's listeners bound inside it."""

from __future__ import annotations

import fcntl
import struct

from . import socks, wire

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def loopback_up() -> None:
    with socks.Socket(socks.AF_INET, socks.SOCK_DGRAM) as s:
        req = struct.pack("16sh14x", b"lo", 0)
        flags = struct.unpack("16sh14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sh14x", b"lo", flags | IFF_UP))


def send_listeners(chan_fd: int, ports: list[int]) -> None:
    """Bind the proxy's listeners inside the sandbox's network namespace and
    hand them to the caller, before the command exists: no start-up race,
    and the command never holds them."""
    listeners: list[socks.Socket] = []
    try:
        for port in ports:
            s = socks.Socket(socks.AF_INET, socks.SOCK_STREAM)
            listeners.append(s)
            s.setsockopt(socks.SOL_SOCKET, socks.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen(1024)
        chan = socks.Socket(fileno=chan_fd)
        try:
            socks.send_fds(chan, [wire.LISTENERS], [s.fileno() for s in listeners])
        finally:
            chan.close()
    finally:
        for s in listeners:
            s.close()
