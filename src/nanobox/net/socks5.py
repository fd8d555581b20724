"""SOCKS5 server side (RFC 1928), sans-I/O: no authentication, CONNECT only.

Feed bytes with :meth:`Socks5Server.receive_data` and pull events with
:meth:`Socks5Server.next_event`::

    hs = Socks5Server()
    while True:
        event = hs.next_event()
        if event is NEED_DATA:
            hs.receive_data(read())
        elif isinstance(event, Greeting):
            write(hs.select_method())
        else:  # a Request
            break
    write(hs.reply(Reply.SUCCEEDED)); tunnel(hs.trailing_data)

Malformed input raises :class:`Socks5Error`; its ``reply`` is the reply code
to send (``None`` when the peer is not speaking SOCKS5 and should just be
disconnected). Builders for the replies are :func:`method_selection` and
:func:`build_reply`.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "NEED_DATA",
    "AddressType",
    "Command",
    "Greeting",
    "Reply",
    "Request",
    "Socks5Error",
    "Socks5Server",
    "build_reply",
    "method_selection",
    "parse_greeting",
    "parse_request",
]

VERSION: Final = 5
METHOD_NO_AUTH: Final = 0x00
METHOD_NONE_ACCEPTABLE: Final = 0xFF


class Command(enum.IntEnum):
    CONNECT = 1
    BIND = 2
    UDP_ASSOCIATE = 3


class AddressType(enum.IntEnum):
    IPV4 = 1
    DOMAIN = 3
    IPV6 = 4


class Reply(enum.IntEnum):
    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class Socks5Error(Exception):
    """A protocol error; send ``build_reply(reply)`` (if not ``None``) and close."""

    def __init__(self, message: str, reply: Reply | None) -> None:
        super().__init__(message)
        self.reply = reply


class _Need(enum.Enum):
    NEED_DATA = "need data"


NEED_DATA: Final = _Need.NEED_DATA


@dataclass(frozen=True)
class Greeting:
    methods: tuple[int, ...]


@dataclass(frozen=True)
class Request:
    """A request; ``host`` is the raw domain text for ATYP 3, else an address."""

    command: int
    address_type: AddressType
    host: str | ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int


def parse_greeting(buf: bytes | bytearray) -> tuple[Greeting, int] | None:
    """Parse the client greeting at the start of ``buf``: ``(greeting,
    bytes_used)``, or ``None`` if more bytes are needed."""
    if not buf:
        return None
    if buf[0] != VERSION:
        raise Socks5Error(f"not a SOCKS5 greeting (version byte {buf[0]:#04x})", None)
    if len(buf) < 2:
        return None
    count = buf[1]
    if count == 0:
        raise Socks5Error("SOCKS5 greeting offers no methods", None)
    if len(buf) < 2 + count:
        return None
    return Greeting(tuple(buf[2 : 2 + count])), 2 + count


def parse_request(buf: bytes | bytearray) -> tuple[Request, int] | None:
    """Parse a request at the start of ``buf``: ``(request, bytes_used)``, or
    ``None`` if more bytes are needed. Unknown commands and address types
    raise with the matching reply code."""
    if not buf:
        return None
    if buf[0] != VERSION:
        raise Socks5Error(f"bad SOCKS version {buf[0]:#04x} in request", None)
    if len(buf) < 4:
        if len(buf) >= 2 and buf[1] not in (1, 2, 3):
            raise Socks5Error(f"unknown command {buf[1]:#04x}", Reply.COMMAND_NOT_SUPPORTED)
        return None
    command, reserved, atyp = buf[1], buf[2], buf[3]
    if command not in (1, 2, 3):
        raise Socks5Error(f"unknown command {command:#04x}", Reply.COMMAND_NOT_SUPPORTED)
    if reserved != 0:
        raise Socks5Error("reserved byte is not zero", Reply.GENERAL_FAILURE)
    host: str | ipaddress.IPv4Address | ipaddress.IPv6Address
    if atyp == AddressType.IPV4:
        end = 4 + 4
        if len(buf) < end + 2:
            return None
        host = ipaddress.IPv4Address(bytes(buf[4:end]))
    elif atyp == AddressType.IPV6:
        end = 4 + 16
        if len(buf) < end + 2:
            return None
        host = ipaddress.IPv6Address(bytes(buf[4:end]))
    elif atyp == AddressType.DOMAIN:
        if len(buf) < 5:
            return None
        length = buf[4]
        if length == 0:
            raise Socks5Error("empty domain name", Reply.GENERAL_FAILURE)
        end = 5 + length
        if len(buf) < end + 2:
            return None
        try:
            host = bytes(buf[5:end]).decode("utf-8")
        except UnicodeDecodeError:
            raise Socks5Error("domain name is not UTF-8", Reply.GENERAL_FAILURE) from None
    else:
        raise Socks5Error(f"unknown address type {atyp:#04x}", Reply.ADDRESS_TYPE_NOT_SUPPORTED)
    (port,) = struct.unpack_from("!H", buf, end)
    return Request(command, AddressType(atyp), host, port), end + 2


def method_selection(method: int) -> bytes:
    """The server's method-selection message."""
    return bytes((VERSION, method))


def build_reply(
    reply: int,
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None,
    port: int = 0,
) -> bytes:
    """A reply message. The bound address defaults to ``0.0.0.0:0`` so the
    sandbox never learns the host's addresses."""
    if address is None:
        address = ipaddress.IPv4Address(0)
    atyp = AddressType.IPV4 if address.version == 4 else AddressType.IPV6
    return bytes((VERSION, reply, 0, atyp)) + address.packed + struct.pack("!H", port)


_State = Literal["greeting", "method", "request", "ready", "closed"]


class Socks5Server:
    """The server half of the SOCKS5 handshake.

    Events from :meth:`next_event`: :data:`NEED_DATA`; a :class:`Greeting`
    (answer with :meth:`select_method`); a :class:`Request` (answer with
    :meth:`reply`). After the request, :attr:`trailing_data` holds any bytes the
    client sent early (they belong to the tunnel).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.state: _State = "greeting"
        self.request: Request | None = None
        self._offered: tuple[int, ...] = ()

    def receive_data(self, data: bytes) -> None:
        if self.state == "closed":
            raise Socks5Error("connection already closed", None)
        self._buf += data

    @property
    def trailing_data(self) -> bytes:
        return bytes(self._buf) if self.state == "ready" else b""

    def next_event(self) -> Greeting | Request | Literal[_Need.NEED_DATA]:
        try:
            if self.state == "greeting":
                greeting = parse_greeting(self._buf)
                if greeting is None:
                    return NEED_DATA
                del self._buf[: greeting[1]]
                self.state = "method"
                self._offered = greeting[0].methods
                return greeting[0]
            if self.state == "request":
                parsed = parse_request(self._buf)
                if parsed is None:
                    return NEED_DATA
                del self._buf[: parsed[1]]
                self.state = "ready"
                self.request = parsed[0]
                return parsed[0]
        except Socks5Error:
            self.state = "closed"
            raise
        raise Socks5Error(f"next_event() called in state {self.state!r}", None)

    def select_method(self) -> bytes:
        """Answer the greeting: no-auth if offered, else 'no acceptable
        methods' (and the handshake is over: close after sending)."""
        if self.state != "method":
            raise Socks5Error(f"select_method() called in state {self.state!r}", None)
        if METHOD_NO_AUTH in self._offered:
            self.state = "request"
            return method_selection(METHOD_NO_AUTH)
        self.state = "closed"
        return method_selection(METHOD_NONE_ACCEPTABLE)

    def reply(
        self,
        code: int,
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None,
        port: int = 0,
    ) -> bytes:
        """The reply to the request; any code but 0 ends the handshake."""
        if code != Reply.SUCCEEDED:
            self.state = "closed"
        return build_reply(code, address, port)


Event = Greeting | Request | Literal[_Need.NEED_DATA]
