"""HTTP proxy request interpretation and header rewriting (pure)."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanobox.net.http import (
    CONNECT_ESTABLISHED,
    HTTPRequestError,
    Target,
    client_side,
    error_response,
    forward_request_headers,
    forward_response_headers,
    has_body,
    keeps_alive,
    parse_target,
    replayable,
    split_authority,
    upstream_side,
)


@pytest.mark.parametrize(
    ("method", "target", "expected"),
    [
        (
            "CONNECT",
            "example.com:443",
            Target("connect", "example.com", 443, "", "example.com:443"),
        ),
        ("CONNECT", "[::1]:8443", Target("connect", "::1", 8443, "", "[::1]:8443")),
        ("CONNECT", "127.1:22", Target("connect", "127.1", 22, "", "127.1:22")),
        ("GET", "http://example.com", Target("forward", "example.com", 80, "/", "example.com")),
        ("GET", "http://example.com/", Target("forward", "example.com", 80, "/", "example.com")),
        (
            "GET",
            "HTTP://Example.com:80/a",
            Target("forward", "Example.com", 80, "/a", "Example.com"),
        ),
        (
            "POST",
            "http://example.com:8080/a/b?x=1&y=/z",
            Target("forward", "example.com", 8080, "/a/b?x=1&y=/z", "example.com:8080"),
        ),
        ("GET", "http://example.com?q", Target("forward", "example.com", 80, "/?q", "example.com")),
        ("GET", "http://[::1]:81/x", Target("forward", "::1", 81, "/x", "[::1]:81")),
        ("GET", "http://example.com:/x", Target("forward", "example.com", 80, "/x", "example.com")),
    ],
)
def test_parse_target(method, target, expected):
    assert parse_target(method, target) == expected


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("CONNECT", "example.com"),  # no port
        ("CONNECT", "example.com:0"),
        ("CONNECT", "example.com:65536"),
        ("CONNECT", "example.com:https"),
        ("CONNECT", "http://example.com:443/"),
        ("CONNECT", "user@example.com:443"),
        ("CONNECT", "::1:443"),
        ("CONNECT", "[::1:443"),
        ("CONNECT", "[::1]x:443"),
        ("CONNECT", ":443"),
        ("GET", "/index.html"),  # origin form
        ("OPTIONS", "*"),
        ("GET", "https://example.com/"),
        ("GET", "ftp://example.com/"),
        ("GET", "http://user:pass@example.com/"),
        ("GET", "http://example.com/#frag"),
        ("GET", "http:///path"),
        ("GET", "http://[]/"),
        ("GET", "example.com:80"),
    ],
)
def test_parse_target_refusals(method, target):
    with pytest.raises(HTTPRequestError) as info:
        parse_target(method, target)
    assert info.value.status == 400 and info.value.message


def test_split_authority():
    assert split_authority("example.com", 80) == ("example.com", 80)
    assert split_authority("example.com:8080", None) == ("example.com", 8080)
    assert split_authority("[2001:db8::1]", 443) == ("2001:db8::1", 443)
    with pytest.raises(HTTPRequestError):
        split_authority("example.com", None)


def test_forward_request_headers_strip_hop_by_hop_and_proxy_headers():
    headers = [
        (b"Host", b"attacker.example"),
        (b"User-Agent", b"curl"),
        (b"Connection", b"keep-alive, X-Secret"),
        (b"X-Secret", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Authorization", b"Basic Zm9v"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"proxy-anything", b"x"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X-T"),
        (b"Upgrade", b"websocket"),
        (b"Expect", b"100-continue"),
        (b"Content-Length", b"5"),
        (b"Accept", b"*/*"),
    ]
    out = forward_request_headers(headers, "example.com:8080")
    assert out == [
        (b"Host", b"example.com:8080"),
        (b"User-Agent", b"curl"),
        (b"Content-Length", b"5"),
        (b"Accept", b"*/*"),
        (b"Connection", b"close"),
    ]


def test_forward_request_headers_chunked_framing():
    out = forward_request_headers(
        [(b"transfer-encoding", b"chunked"), (b"content-length", b"10")], "a"
    )
    assert (b"Transfer-Encoding", b"chunked") in out
    assert all(name.lower() != b"content-length" for name, _ in out)


def test_forward_request_headers_keep_the_upstream_open_when_asked():
    assert (b"Connection", b"close") not in forward_request_headers([], "a", close=False)
    assert (b"Connection", b"close") in forward_request_headers([], "a")


@pytest.mark.parametrize(
    ("version", "headers", "expected"),
    [
        (b"1.1", [], True),
        (b"1.1", [(b"connection", b"keep-alive, x-a")], True),
        (b"1.1", [(b"connection", b"x-a, Close")], False),
        (b"1.0", [], False),
        (b"1.0", [(b"connection", b"keep-alive")], False),
    ],
)
def test_keeps_alive(version, headers, expected):
    assert keeps_alive(version, headers) is expected


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        (b"GET", [], True),
        (b"HEAD", [(b"accept", b"*/*")], True),
        (b"DELETE", [(b"content-length", b"0")], True),
        (b"PUT", [(b"content-length", b" 0 ")], True),
        (b"GET", [(b"content-length", b"1")], False),
        (b"GET", [(b"transfer-encoding", b"chunked")], False),
        (b"GET", [(b"expect", b"100-continue")], False),
        (b"POST", [], False),
        (b"PATCH", [], False),
        (b"get", [], False),  # methods are case-sensitive: not the GET method
    ],
)
def test_replayable(method, headers, expected):
    assert replayable(method, headers) is expected


def test_has_body():
    assert not has_body([(b"content-length", b"0"), (b"host", b"a")])
    assert has_body([(b"Content-Length", b"12")])
    assert has_body([(b"Transfer-Encoding", b"chunked")])


def test_forward_response_headers():
    out = forward_response_headers(
        [
            (b"content-type", b"text/plain"),
            (b"transfer-encoding", b"chunked"),
            (b"content-length", b"3"),
            (b"connection", b"close, x-drop"),
            (b"x-drop", b"1"),
            (b"proxy-authenticate", b"Basic"),
            (b"keep-alive", b"timeout=1"),
            (b"set-cookie", b"a=b"),
        ]
    )
    assert out == [(b"content-type", b"text/plain"), (b"set-cookie", b"a=b")]
    kept = forward_response_headers([(b"content-length", b"3")])
    assert kept == [(b"content-length", b"3")]


@pytest.mark.parametrize("status", [400, 403, 405, 407, 502, 503, 504])
def test_error_responses_are_valid_http(status):
    raw = error_response(status, "why \u2013 because")
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(raw)
    response = client.next_event()
    assert isinstance(response, h11.Response) and response.status_code == status
    data = client.next_event()
    assert isinstance(data, h11.Data)
    assert "why \u2013 because" in bytes(data.data).decode()
    assert isinstance(client.next_event(), h11.EndOfMessage)
    headers = dict(response.headers)
    assert headers[b"connection"] == b"close"
    if status == 407:
        assert b"proxy-authenticate" in headers


def test_connect_established():
    assert CONNECT_ESTABLISHED.startswith(b"HTTP/1.1 200 ")
    assert CONNECT_ESTABLISHED.endswith(b"\r\n\r\n")


def test_client_side_parses_connect_and_keeps_early_bytes():
    h = client_side()
    h.receive_data(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n\x16\x03\x01")
    request = h.next_event()
    assert isinstance(request, h11.Request) and request.method == b"CONNECT"
    assert request.target == b"example.com:443"
    assert h.trailing_data[0] == b"\x16\x03\x01"


def test_client_side_rejects_smuggling_shapes():
    for raw in (
        b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX\r\n",
    ):
        h = client_side()
        h.receive_data(raw)
        with pytest.raises(h11.RemoteProtocolError):
            while True:
                event = h.next_event()
                if event is h11.NEED_DATA:
                    h.receive_data(b"")


def test_upstream_side_is_a_client():
    up = upstream_side()
    head = up.send(
        h11.Request(method="GET", target="/", headers=forward_request_headers([], "example.com"))
    )
    assert head is not None
    assert head.startswith(b"GET / HTTP/1.1\r\n")
    assert b"Connection: close" in head or b"connection: close" in head


@given(st.sampled_from(["GET", "CONNECT", "POST"]), st.text(max_size=60))
def test_parse_target_random_only_raises_its_error(method, target):
    try:
        result = parse_target(method, target)
    except HTTPRequestError as exc:
        assert exc.status == 400
        return
    assert 1 <= result.port <= 65535 and result.host


@given(st.binary(max_size=300))
def test_client_side_random_bytes_only_raise_h11_errors(data):
    h = client_side()
    h.receive_data(data)
    h.receive_data(b"")
    try:
        for _ in range(10):
            event = h.next_event()
            if isinstance(event, h11.Request):
                try:
                    parse_target(event.method.decode("ascii"), event.target.decode("ascii"))
                except HTTPRequestError:
                    pass
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                break
    except h11.RemoteProtocolError:
        pass


def test_raw_body_length_only_for_plain_large_bodies():
    from nanobox.net.http import RAW_BODY_MIN, raw_body_length

    big = str(RAW_BODY_MIN).encode()
    ok = [(b"Content-Length", big)]
    assert raw_body_length("GET", 200, ok) == RAW_BODY_MIN
    assert raw_body_length("POST", 201, ok) == RAW_BODY_MIN
    small = [(b"content-length", str(RAW_BODY_MIN - 1).encode())]
    assert raw_body_length("GET", 200, small) is None
    assert raw_body_length("HEAD", 200, ok) is None
    for status in (100, 204, 304):
        assert raw_body_length("GET", status, ok) is None
    assert raw_body_length("GET", 200, [*ok, (b"Transfer-Encoding", b"chunked")]) is None
    assert raw_body_length("GET", 200, [*ok, (b"content-length", big + b"0")]) is None
    assert raw_body_length("GET", 200, [*ok, (b"content-length", big)]) == RAW_BODY_MIN
    assert raw_body_length("GET", 200, [(b"content-length", b"-5")]) is None
    assert raw_body_length("GET", 200, [(b"content-length", b"1" * 30)]) is None
    assert raw_body_length("GET", 200, []) is None
