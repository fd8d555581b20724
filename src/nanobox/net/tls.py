"""Read the server name (SNI) from a TLS ClientHello, sans-I/O, no decryption.

:func:`extract_sni` takes the bytes a client sent first on a tunnel. It
reassembles the ClientHello from as many handshake records as it spans and
returns the ``host_name`` of the server_name extension, ``None`` if there is
none, or :data:`NEED_MORE` if the message is not complete yet. Anything that
is not a well-formed ClientHello, or one larger than ``limit`` bytes, raises
:class:`TLSError`.
"""

from __future__ import annotations

import enum
from typing import Final, Literal

__all__ = ["MAX_CLIENT_HELLO", "NEED_MORE", "TLSError", "extract_sni"]

MAX_CLIENT_HELLO: Final = 65536

_HANDSHAKE: Final = 0x16
_CLIENT_HELLO: Final = 0x01
_EXT_SERVER_NAME: Final = 0x0000
_MAX_RECORD: Final = 16384 + 2048


class TLSError(ValueError):
    """The bytes are not a well-formed TLS ClientHello."""


class _Need(enum.Enum):
    NEED_MORE = "need more"


NEED_MORE: Final = _Need.NEED_MORE


def extract_sni(
    data: bytes | bytearray | memoryview, *, limit: int = MAX_CLIENT_HELLO
) -> str | Literal[_Need.NEED_MORE] | None:
    """The SNI host name in the ClientHello at the start of ``data``."""
    view = memoryview(data)
    message = bytearray()
    need: int | None = None  # total handshake message size once known
    pos = 0
    while need is None or len(message) < need:
        if pos + 5 > len(view):
            return _more(len(view), limit)
        content_type, major, _minor, length = view[pos], view[pos + 1], view[pos + 2], 0
        if content_type != _HANDSHAKE:
            raise TLSError(f"not a TLS handshake record (content type {content_type:#04x})")
        if major != 3:
            raise TLSError(f"unsupported TLS record version {major}.{_minor}")
        length = int.from_bytes(view[pos + 3 : pos + 5], "big")
        if length == 0 or length > _MAX_RECORD:
            raise TLSError(f"bad TLS record length {length}")
        if pos + 5 + length > len(view):
            if pos + 5 + length > limit:
                raise TLSError(f"ClientHello larger than {limit} bytes")
            return NEED_MORE
        message += view[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if need is None and len(message) >= 4:
            if message[0] != _CLIENT_HELLO:
                raise TLSError(f"first handshake message is not a ClientHello ({message[0]})")
            need = 4 + int.from_bytes(message[1:4], "big")
            if need > limit:
                raise TLSError(f"ClientHello larger than {limit} bytes")
    return _parse_client_hello(memoryview(message)[4:need])


def _more(have: int, limit: int) -> Literal[_Need.NEED_MORE]:
    if have >= limit:
        raise TLSError(f"ClientHello larger than {limit} bytes")
    return NEED_MORE


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.buf):
            raise TLSError(f"ClientHello truncated in {what}")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def number(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def vector(self, size: int, what: str) -> memoryview:
        return self.take(self.number(size, what), what)

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos


def _parse_client_hello(body: memoryview) -> str | None:
    r = _Reader(body)
    r.take(2, "version")
    r.take(32, "random")
    if len(r.vector(1, "session id")) > 32:
        raise TLSError("session id longer than 32 bytes")
    suites = r.vector(2, "cipher suites")
    if not suites or len(suites) % 2:
        raise TLSError("bad cipher suite list")
    if not r.vector(1, "compression methods"):
        raise TLSError("empty compression method list")
    if r.left == 0:
        return None  # no extensions at all
    extensions = _Reader(r.vector(2, "extensions"))
    if r.left:
        raise TLSError("trailing bytes after ClientHello extensions")
    seen: set[int] = set()
    sni: str | None = None
    while extensions.left:
        ext_type = extensions.number(2, "extension type")
        ext_data = extensions.vector(2, "extension data")
        if ext_type in seen:
            raise TLSError(f"duplicate extension {ext_type}")
        seen.add(ext_type)
        if ext_type == _EXT_SERVER_NAME:
            sni = _parse_server_name(ext_data)
    return sni


def _parse_server_name(data: memoryview) -> str:
    r = _Reader(data)
    names = _Reader(r.vector(2, "server name list"))
    if r.left:
        raise TLSError("trailing bytes in server_name extension")
    host: str | None = None
    while names.left:
        name_type = names.number(1, "server name type")
        name = names.vector(2, "server name")
        if name_type != 0:
            continue
        if host is not None:
            raise TLSError("more than one host_name in server_name extension")
        raw = bytes(name)
        if not raw or not raw.isascii():
            raise TLSError("SNI host_name is empty or not ASCII")
        host = raw.decode("ascii")
    if host is None:
        raise TLSError("server_name extension without a host_name")
    return host
