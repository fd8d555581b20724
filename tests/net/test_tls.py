"""SNI extraction from TLS ClientHellos (pure)."""

from __future__ import annotations

import ssl
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanobox.net.tls import MAX_CLIENT_HELLO, NEED_MORE, TLSError, extract_sni


def real_client_hello(server_name: str | None) -> bytes:
    """A ClientHello from this Python's OpenSSL (memory BIOs, no network)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if server_name is None:
        ctx.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def vec(size: int, data: bytes) -> bytes:
    return len(data).to_bytes(size, "big") + data


def sni_extension(*names: tuple[int, bytes]) -> bytes:
    entries = b"".join(bytes([kind]) + vec(2, name) for kind, name in names)
    return struct.pack("!H", 0) + vec(2, vec(2, entries))


def hello_body(extensions: bytes | None) -> bytes:
    body = b"\x03\x03" + b"\x11" * 32 + vec(1, b"") + vec(2, b"\x13\x01") + vec(1, b"\x00")
    if extensions is not None:
        body += vec(2, extensions)
    return body


def handshake(body: bytes) -> bytes:
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(message: bytes, size: int = 16384) -> bytes:
    out = b""
    for i in range(0, len(message), size):
        out += b"\x16\x03\x01" + vec(2, message[i : i + size])
    return out


def make_hello(
    name: bytes | None = b"example.com", extra: bytes = b"", split: int = 16384
) -> bytes:
    ext = (sni_extension((0, name)) if name is not None else b"") + extra
    return records(handshake(hello_body(ext)), split)


@pytest.mark.parametrize("name", ["example.com", "a.b.example.org", "xn--bcher-kva.de"])
def test_real_client_hello(name):
    assert extract_sni(real_client_hello(name)) == name


def test_real_client_hello_without_sni():
    assert extract_sni(real_client_hello(None)) is None


def test_every_prefix_needs_more():
    data = real_client_hello("example.com")
    for i in range(len(data)):
        assert extract_sni(data[:i]) is NEED_MORE, i
    assert extract_sni(data + b"\x17\x03\x03garbage") == "example.com"


def test_hello_split_across_records():
    data = make_hello(
        b"split.example", extra=struct.pack("!H", 0x1234) + vec(2, b"x" * 3000), split=7
    )
    assert extract_sni(data) == "split.example"
    for i in (0, 5, 6, 12, len(data) - 1):
        assert extract_sni(data[:i]) is NEED_MORE


def test_no_extensions_and_other_extensions():
    assert extract_sni(records(handshake(hello_body(None)))) is None
    other = struct.pack("!H", 0x000A) + vec(2, b"\x00\x02\x00\x1d")
    assert extract_sni(make_hello(None, extra=other)) is None
    assert extract_sni(make_hello(b"x.example", extra=other)) == "x.example"


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x17\x03\x03\x00\x05hello",  # application data
        b"\x16\x02\x00\x00\x05hello",  # SSL 2-style version
        b"\x16\x03\x01\x00\x00",  # empty record
        b"\x16\x03\x01\x48\x01" + b"\x00" * 10,  # record too long
        records(b"\x02\x00\x00\x04abcd"),  # ServerHello, not ClientHello
        records(handshake(b"\x03\x03")),  # truncated body
        make_hello(b"a.example", extra=sni_extension((0, b"b.example"))),  # duplicate extension
        records(handshake(hello_body(sni_extension((0, b"a.example"), (0, b"b.example"))))),
        records(handshake(hello_body(sni_extension((1, b"x"))))),  # no host_name entry
        records(handshake(hello_body(sni_extension((0, b""))))),
        records(handshake(hello_body(sni_extension((0, "ä.example".encode()))))),
        records(handshake(hello_body(b"\x00\x00\x00\x10\x00"))),  # extension runs past the end
        records(handshake(hello_body(b"") + b"junk")),
        records(handshake(b"\x03\x03" + b"\x11" * 32 + vec(1, b"x" * 33) + b"\x00" * 8)),
        records(handshake(b"\x03\x03" + b"\x11" * 32 + vec(1, b"") + vec(2, b"\x13") + b"\x00")),
    ],
)
def test_malformed(data):
    with pytest.raises(TLSError):
        extract_sni(data)


def test_size_limit():
    huge = records(handshake(hello_body(struct.pack("!H", 0x1234) + vec(2, b"x" * 65500))))
    with pytest.raises(TLSError):
        extract_sni(huge)
    with pytest.raises(TLSError):
        extract_sni(huge[:40000], limit=1000)  # the declared size is known to be too big
    assert extract_sni(huge, limit=MAX_CLIENT_HELLO * 2) is None
    # without a length to go on, stop waiting once the limit is reached
    with pytest.raises(TLSError):
        extract_sni(b"\x16\x03\x01\x40\x00" + b"\x01\xff\xff\xff" + b"\x00" * 5000, limit=4096)


@given(st.binary(max_size=600))
def test_random_bytes_only_raise_tlserror(data):
    try:
        result = extract_sni(data)
    except TLSError:
        return
    assert result is NEED_MORE or result is None or isinstance(result, str)


_HELLO = real_client_hello("example.com")


@given(st.integers(0, len(_HELLO) - 1), st.integers(0, 255))
def test_mutated_hello_only_raises_tlserror(position, value):
    data = bytearray(_HELLO)
    data[position] = value
    try:
        extract_sni(bytes(data))
    except TLSError:
        pass
