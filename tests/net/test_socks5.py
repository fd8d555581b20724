"""The sans-I/O SOCKS5 server handshake."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanobox.net.socks5 import (
    NEED_DATA,
    AddressType,
    Command,
    Greeting,
    Reply,
    Request,
    Socks5Error,
    Socks5Server,
    build_reply,
    parse_greeting,
    parse_request,
)


def feed_bytewise(hs: Socks5Server, data: bytes) -> list[object]:
    """Feed one byte at a time; collect the non-NEED_DATA events."""
    events: list[object] = []
    for i in range(len(data)):
        hs.receive_data(data[i : i + 1])
        while True:
            event = hs.next_event()
            if event is NEED_DATA:
                break
            events.append(event)
            if isinstance(event, Greeting):
                assert hs.select_method() == b"\x05\x00"
            else:
                return events
    return events


@pytest.mark.parametrize(
    ("raw", "host", "atyp"),
    [
        (b"\x01\x7f\x00\x00\x01", ipaddress.IPv4Address("127.0.0.1"), AddressType.IPV4),
        (b"\x04" + ipaddress.IPv6Address("::1").packed, ipaddress.IPv6Address("::1"), 4),
        (b"\x03\x0bexample.com", "example.com", AddressType.DOMAIN),
        (b"\x03\x0ab\xc3\xbccher.de", "bücher.de", AddressType.DOMAIN),
    ],
)
def test_connect_request_byte_by_byte(raw, host, atyp):
    hs = Socks5Server()
    message = b"\x05\x02\x02\x00" + b"\x05\x01\x00" + raw + b"\x01\xbb"
    events = feed_bytewise(hs, message)
    assert events[0] == Greeting((2, 0))
    assert events[1] == Request(Command.CONNECT, AddressType(atyp), host, 443)
    assert hs.request == events[1]
    assert hs.state == "ready" and hs.trailing_data == b""
    assert hs.reply(Reply.SUCCEEDED) == b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"


def test_pipelined_greeting_request_and_payload():
    hs = Socks5Server()
    hs.receive_data(b"\x05\x01\x00\x05\x01\x00\x03\x01a\x00\x50GET / HTTP/1.1\r\n")
    assert isinstance(hs.next_event(), Greeting)
    hs.select_method()
    request = hs.next_event()
    assert request == Request(1, AddressType.DOMAIN, "a", 80)
    assert hs.trailing_data == b"GET / HTTP/1.1\r\n"


@pytest.mark.parametrize("command", [Command.BIND, Command.UDP_ASSOCIATE])
def test_bind_and_udp_are_parsed_for_the_caller_to_refuse(command):
    hs = Socks5Server()
    hs.receive_data(b"\x05\x01\x00")
    hs.next_event()
    hs.select_method()
    hs.receive_data(bytes([5, command, 0, 1, 0, 0, 0, 0, 0, 0]))
    request = hs.next_event()
    assert isinstance(request, Request) and request.command == command
    assert hs.reply(Reply.COMMAND_NOT_SUPPORTED)[1] == 0x07
    assert hs.state == "closed"


def test_no_acceptable_method():
    hs = Socks5Server()
    hs.receive_data(b"\x05\x02\x01\x02")
    assert hs.next_event() == Greeting((1, 2))
    assert hs.select_method() == b"\x05\xff"
    assert hs.state == "closed"
    with pytest.raises(Socks5Error):
        hs.receive_data(b"x")


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (b"\x04\x01\x00\x50\x7f\x00\x00\x01", None),  # SOCKS4
        (b"GET / HTTP/1.1\r\n", None),
        (b"\x05\x00", None),  # no methods
    ],
)
def test_bad_greetings(data, reply):
    hs = Socks5Server()
    hs.receive_data(data)
    with pytest.raises(Socks5Error) as info:
        hs.next_event()
    assert info.value.reply is reply
    assert hs.state == "closed"


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50", None),
        (b"\x05\x09", Reply.COMMAND_NOT_SUPPORTED),
        (b"\x05\x00\x00\x01", Reply.COMMAND_NOT_SUPPORTED),
        (b"\x05\x01\x00\x02\x00\x00", Reply.ADDRESS_TYPE_NOT_SUPPORTED),
        (b"\x05\x01\x00\x05", Reply.ADDRESS_TYPE_NOT_SUPPORTED),
        (b"\x05\x01\x01\x01\x7f\x00\x00\x01\x00\x50", Reply.GENERAL_FAILURE),
        (b"\x05\x01\x00\x03\x00\x00\x50", Reply.GENERAL_FAILURE),  # empty name
        (b"\x05\x01\x00\x03\x02\xff\xfe\x00\x50", Reply.GENERAL_FAILURE),  # not UTF-8
    ],
)
def test_bad_requests(data, reply):
    with pytest.raises(Socks5Error) as info:
        parse_request(data)
    assert info.value.reply == reply


def test_incomplete_inputs_need_more():
    full_greeting = b"\x05\x02\x00\x01"
    for i in range(len(full_greeting)):
        assert parse_greeting(full_greeting[:i]) is None
    full_request = b"\x05\x01\x00\x03\x0bexample.com\x00\x50"
    for i in range(len(full_request)):
        assert parse_request(full_request[:i]) is None
    assert parse_request(full_request) == (
        Request(1, AddressType.DOMAIN, "example.com", 80),
        len(full_request),
    )


def test_reply_builder():
    assert build_reply(Reply.NOT_ALLOWED) == b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00"
    v6 = build_reply(0, ipaddress.IPv6Address("::1"), 1080)
    assert v6[:4] == b"\x05\x00\x00\x04" and len(v6) == 22 and v6[-2:] == b"\x04\x38"
    assert [r.value for r in Reply] == list(range(9))


def test_misuse_is_an_error():
    hs = Socks5Server()
    with pytest.raises(Socks5Error):
        hs.select_method()
    hs.receive_data(b"\x05\x01\x00")
    hs.next_event()
    with pytest.raises(Socks5Error):
        hs.next_event()  # the greeting must be answered first


@given(st.lists(st.binary(max_size=40), max_size=8))
def test_random_bytes_only_raise_socks5error(chunks):
    hs = Socks5Server()
    try:
        for chunk in chunks:
            hs.receive_data(chunk)
            while True:
                event = hs.next_event()
                if event is NEED_DATA:
                    break
                if isinstance(event, Greeting):
                    hs.select_method()
                    if hs.state == "closed":
                        return
                else:
                    assert isinstance(event, Request)
                    assert 0 <= event.port <= 65535
                    return
    except Socks5Error as exc:
        assert exc.reply is None or isinstance(exc.reply, Reply)
