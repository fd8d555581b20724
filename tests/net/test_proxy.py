"""The proxy end to end, with real sockets on loopback only.

Names are resolved by a fake resolver (``allowed.test`` -> 127.0.0.1 ...), and
loopback upstreams are reached through an explicit ``127.0.0.1/32`` allow rule,
which is exactly the "unless explicitly allowed" path of the address check.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import ssl
import struct
import threading
import time
import zlib

import h11
import pytest
from _net_support import (
    BLOCK,
    TIMEOUT,
    FakeResolver,
    H11Client,
    ThreadServer,
    bulk_handler,
    connect,
    echo_handler,
    free_port,
    http_connect,
    http_handler,
    keepalive_handler,
    listening_socket,
    open_fds,
    pattern,
    proxy_harness,
    proxy_task_count,
    read_head,
    record_handler,
    recv_all,
    recv_exact,
    recv_head,
    silent_handler,
    socks_connect,
)

from conftest import wait_until
from nanobox.net import Proxy, Ruleset
from nanobox.net import proxy as proxy_module

SPELLINGS_127 = [
    "127.0.0.1",
    "2130706433",
    "0x7f000001",
    "0x7f.1",
    "127.1",
    "127.0.1",
    "0177.0.0.1",
    "0177.0.0.01",
    "0x7F.0.0.1",
    "127.0.0.1.",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "0x7f.0x0.0x0.0x1",
]
SPELLINGS_METADATA = [
    "169.254.169.254",
    "2852039166",
    "0xa9fea9fe",
    "0xa9.0xfe.0xa9.0xfe",
    "0251.0376.0251.0376",
    "169.254.43518",
    "169.16689662",
    "[::ffff:169.254.169.254]",
    "[::ffff:a9fe:a9fe]",
]


@pytest.fixture(scope="module")
def echo_server():
    with ThreadServer(echo_handler) as server:
        yield server


@pytest.fixture(scope="module")
def http_server():
    with ThreadServer(http_handler) as server:
        yield server


@pytest.fixture(scope="module")
def bulk_server():
    with ThreadServer(bulk_handler) as server:
        yield server


def get_via_proxy(h, http_server, path: str) -> tuple[socket.socket, int, dict[str, str], bytes]:
    """GET ``path`` of the test's HTTP server through the proxy's HTTP port:
    the socket, the status, the headers and what came after the head."""
    sock = connect(h.http_port)
    url = f"http://allowed.test:{http_server.port}{path}"
    sock.sendall(f"GET {url} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    return (sock, *read_head(sock))


def echo_through_tunnel(h, echo_server, data: bytes) -> bytes:
    """``data`` through a CONNECT tunnel to the echo server (200 asserted),
    sent then half-closed: what came back."""
    sock, status, _ = http_connect(h.http_port, f"allowed.test:{echo_server.port}")
    assert status == 200
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    reply = recv_all(sock)
    sock.close()
    return reply


def last_event(harness, n=1):
    events = harness.wait_events(n)
    assert len(events) >= n, events
    return events[n - 1]


# --------------------------------------------------------------------------- HTTP CONNECT


def test_connect_allowed_end_to_end_with_half_close(echo_server):
    with proxy_harness() as h:
        sock, status, extra = http_connect(h.http_port, f"allowed.test:{echo_server.port}")
        assert status == 200 and extra == b""
        payload = pattern(3_000_000)
        sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(1)))
        sender.start()
        received = recv_all(sock)  # the echo server closes only after our EOF
        sender.join()
        sock.close()
        assert received == payload
        event = last_event(h)
        summary = h.finish()
    assert event.decision == "allowed" and event.protocol == "connect"
    assert event.host == "allowed.test" and event.address == "127.0.0.1"
    assert event.bytes_up == len(payload) and event.bytes_down == len(payload)
    assert event.rule == "allowed.test + 127.0.0.1"
    assert summary["allowed"] == 1 and summary["denied"] == 0
    assert summary["bytes_up"] == summary["bytes_down"] == len(payload)


def test_connect_denied_gives_403_and_event(echo_server):
    with proxy_harness(deny=["other.test"]) as h:
        sock, status, body = http_connect(h.http_port, f"evil.test:{echo_server.port}")
        sock.close()
        assert status == 403
        assert b"evil.test" in body and b"no allow rule" in body
        sock, status, body = http_connect(h.http_port, f"other.test:{echo_server.port}")
        sock.close()
        assert status == 403 and b"denied by rule other.test" in body
        events = h.wait_events(2)
        summary = h.finish()
    assert [e.decision for e in events] == ["denied", "denied"]
    assert events[1].rule == "other.test"
    assert summary["denied"] == 2 and summary["allowed"] == 0
    assert summary["denied_destinations"] == {
        f"evil.test:{echo_server.port}": 1,
        f"other.test:{echo_server.port}": 1,
    }


def test_deny_rule_beats_wildcard_allow(echo_server):
    with proxy_harness(allow=["*.test", "127.0.0.1/32"], deny=["other.test"]) as h:
        sock, status, _ = http_connect(h.http_port, f"allowed.test:{echo_server.port}")
        sock.close()
        assert status == 200
        sock, status, _ = http_connect(h.http_port, f"other.test:{echo_server.port}")
        sock.close()
        assert status == 403


@pytest.mark.parametrize("name", ["loop.test", "meta.test", "private.test", "mixed.test"])
def test_names_resolving_to_special_ranges_are_refused(name, echo_server):
    resolver = FakeResolver(
        {
            "loop.test": ["127.0.0.1"],
            "meta.test": ["169.254.169.254"],
            "private.test": ["10.1.2.3"],
            "mixed.test": ["192.0.2.1", "127.0.0.1"],
        }
    )
    # A name rule only: no IP/CIDR rule covers the resolved address.
    with proxy_harness(allow=["*.test"], resolver=resolver) as h:
        sock, status, body = http_connect(h.http_port, f"{name}:{echo_server.port}")
        sock.close()
        event = last_event(h)
    assert status == 403
    assert b"allow it explicitly with an IP/CIDR rule" in body
    assert event.decision == "denied" and event.address is not None


def test_explicit_ip_rule_allows_the_resolved_loopback(echo_server):
    with proxy_harness(allow=["*.test", f"127.0.0.1:{echo_server.port}"]) as h:
        sock, status, _ = http_connect(h.http_port, f"loop.test:{echo_server.port}")
        sock.sendall(b"ping")
        assert recv_exact(sock, 4) == b"ping"
        sock.close()
        assert status == 200
        sock, status, _ = http_connect(h.http_port, f"loop.test:{free_port()}")
        sock.close()
        assert status == 403  # the IP rule is for the echo port only


@pytest.mark.parametrize("spelling", SPELLINGS_127 + SPELLINGS_METADATA)
def test_numeric_spellings_refused_everywhere(spelling, echo_server):
    port = echo_server.port
    with proxy_harness(allow=["allowed.test", "*.test"]) as h:
        sock, status, body = http_connect(h.http_port, f"{spelling}:{port}")
        sock.close()
        assert status == 403, body
        client = H11Client(h.http_port)
        status, _, _ = client.request("GET", f"http://{spelling}:{port}/", [("host", "x")])
        client.close()
        assert status == 403
        host = spelling.strip("[]")
        sock, reply = socks_connect(h.socks_port, host, port)
        sock.close()
        assert reply == 0x02
        events = h.wait_events(3)
    canonical = {str(ipaddress.ip_address("127.0.0.1")), "169.254.169.254"}
    assert all(e.decision == "denied" and e.host in canonical for e in events), events


def test_numeric_spellings_allowed_by_ip_rule(echo_server):
    with proxy_harness(allow=["127.0.0.1/32"]) as h:
        for spelling in ("2130706433", "0x7f.1", "127.1", "0177.0.0.1", "[::ffff:127.0.0.1]"):
            sock, status, _ = http_connect(h.http_port, f"{spelling}:{echo_server.port}")
            sock.close()
            assert status == 200, spelling


def test_single_lookup_per_connection(echo_server):
    resolver = FakeResolver({"allowed.test": ["127.0.0.1"]})
    with proxy_harness(resolver=resolver) as h:
        sock, status, _ = http_connect(h.http_port, f"allowed.test:{echo_server.port}")
        sock.sendall(b"x")
        assert recv_exact(sock, 1) == b"x"
        sock.close()
    assert status == 200 and resolver.calls == ["allowed.test"]


def test_requests_for_a_name_being_looked_up_share_its_lookup(echo_server):
    """Ten tunnels to one name at once: one lookup (the system's resolver
    answers a few at a time), and every tunnel is made."""
    resolver = FakeResolver({"allowed.test": ["127.0.0.1"]}, delay=0.3)
    results: list[int] = []

    def tunnel() -> None:
        sock, status, _ = http_connect(h.http_port, f"allowed.test:{echo_server.port}")
        sock.sendall(b"x")
        results.append(status if recv_exact(sock, 1) == b"x" else -1)
        sock.close()

    with proxy_harness(resolver=resolver) as h:
        threads = [threading.Thread(target=tunnel) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
    assert results == [200] * 10
    assert resolver.calls == ["allowed.test"]


def test_a_lookup_past_the_connect_timeout_is_not_joined():
    """A lookup that has run for the connect timeout (still waited for by
    a request that joined it later) is not joined any more: a request that
    comes then starts one of its own, rather than wait for one that may
    never end. Requests at 0, 0.4 and 1.1 s, a timeout of 1 s: the second
    joins the first's lookup, the third does not."""
    resolver = FakeResolver({"allowed.test": ["127.0.0.1"]}, delay=30.0)
    statuses: list[int] = []

    def request(after: float) -> None:
        time.sleep(after)
        sock, status, _ = http_connect(h.http_port, "allowed.test:80")
        sock.close()
        statuses.append(status)

    with proxy_harness(resolver=resolver, connect_timeout=1.0) as h:
        threads = [threading.Thread(target=request, args=(t,)) for t in (0.0, 0.4, 1.1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
    assert statuses == [504, 504, 504] and resolver.calls == ["allowed.test"] * 2


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (OSError(101, "Network is unreachable"), "cannot resolve allowed.test"),
        (None, "bad resolver answer"),
        ([5], "bad resolver answer"),
    ],
    ids=["oserror", "none", "not-an-address"],
)
def test_a_failing_resolver_is_a_failed_lookup(answer, error):
    """A resolver's own OSError is a failed lookup, not a failed connection
    to 0.0.0.0 (reported as denied, and counted nowhere, before); an answer
    that is no list of addresses gets a 502 (the connection was dropped
    without one)."""

    async def resolver(host: str) -> object:
        if isinstance(answer, Exception):
            raise answer
        return answer

    with proxy_harness(resolver=resolver) as h:
        sock, status, body = http_connect(h.http_port, "allowed.test:80")
        sock.close()
        event = last_event(h)
        summary = h.finish()
    assert status == 502 and error.encode() in body
    assert event.decision == "allowed" and event.address is None and error in (event.error or "")
    assert (summary["allowed"], summary["denied"], summary["failed"]) == (1, 0, 1)


def test_connect_refused_gives_502():
    with proxy_harness() as h:
        sock, status, body = http_connect(h.http_port, f"allowed.test:{free_port()}")
        sock.close()
        event = last_event(h)
        summary = h.finish()
    assert status == 502 and b"failed" in body
    assert event.decision == "allowed" and "refused" in (event.error or "").lower()
    assert summary["failed"] == 1


def test_unresolvable_gives_502():
    with proxy_harness(allow=["*.test"]) as h:
        sock, status, _ = http_connect(h.http_port, "nowhere.test:80")
        sock.close()
    assert status == 502


def test_connect_timeout_gives_504():
    resolver = FakeResolver({"allowed.test": ["127.0.0.1"]}, delay=5.0)
    with proxy_harness(resolver=resolver, connect_timeout=0.3) as h:
        start = time.monotonic()
        sock, status, _ = http_connect(h.http_port, "allowed.test:80")
        sock.close()
        elapsed = time.monotonic() - start
        client = H11Client(h.http_port)
        status2, _, _ = client.request("GET", "http://allowed.test:80/")
        client.close()
        sock, reply = socks_connect(h.socks_port, "allowed.test", 80)
        sock.close()
    assert status == 504 and status2 == 504 and reply == 0x06
    assert elapsed < 3


def test_connect_tunnel_idle_timeout_closes():
    with ThreadServer(silent_handler) as silent, proxy_harness(idle_timeout=0.5) as h:
        sock, status, _ = http_connect(h.http_port, f"allowed.test:{silent.port}")
        assert status == 200
        start = time.monotonic()
        assert sock.recv(10) == b""
        assert 0.3 < time.monotonic() - start < 5
        sock.close()
        event = last_event(h)
    assert "idle timeout" in (event.error or "")


@pytest.mark.parametrize(
    ("sni", "ok"), [("allowed.test", True), ("other.test", False), ("ALLOWED.test.", True)]
)
def test_sni_must_match_connect_host(sni, ok):
    received: list[bytes] = []
    with ThreadServer(record_handler(received)) as server:
        with proxy_harness(allow=["*.test", "127.0.0.1/32"], tls_ports={server.port}) as h:
            sock, status, _ = http_connect(h.http_port, f"allowed.test:{server.port}")
            assert status == 200
            hello = client_hello(sni)
            sock.sendall(hello[:50])  # split across reads
            time.sleep(0.05)
            sock.sendall(hello[50:])
            if ok:
                sock.sendall(b"rest")
                sock.shutdown(socket.SHUT_WR)
            reply = recv_all(sock)
            sock.close()
            event = last_event(h)
            summary = h.finish()
        deadline = time.monotonic() + TIMEOUT
        while not received and time.monotonic() < deadline:
            time.sleep(0.01)
    if ok:
        assert received == [hello + b"rest"]
        assert event.decision == "allowed"
    else:
        assert reply.startswith(b"\x15\x03")  # a TLS alert
        assert received == [b""]  # nothing reached the server
        assert event.decision == "denied" and "SNI" in event.reason
        assert summary["denied"] == 1 and summary["allowed"] == 0


def test_sni_check_refuses_non_tls_on_tls_port():
    received: list[bytes] = []
    with ThreadServer(record_handler(received)) as server:
        with proxy_harness(tls_ports={server.port}) as h:
            sock, status, _ = http_connect(h.http_port, f"allowed.test:{server.port}")
            sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
            recv_all(sock)
            sock.close()
            event = last_event(h)
    assert status == 200 and event.decision == "denied" and "ClientHello" in event.reason


def client_hello(server_name: str) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    data = outgoing.read()
    assert server_name.encode() in data  # sent as given
    return data


# --------------------------------------------------------------------------- plain HTTP


def test_plain_http_get_keep_alive_and_header_stripping(http_server):
    with proxy_harness() as h:
        client = H11Client(h.http_port)
        url = f"http://allowed.test:{http_server.port}/headers"
        status, _, body = client.request(
            "GET",
            url,
            [
                ("Host", "ignored.example"),
                ("Proxy-Authorization", "Basic c2VjcmV0"),
                ("Proxy-Connection", "keep-alive"),
                ("Keep-Alive", "timeout=5"),
                ("Connection", "keep-alive, X-Hop"),
                ("X-Hop", "1"),
                ("TE", "trailers"),
                ("X-End-To-End", "kept"),
            ],
        )
        assert status == 200
        seen = json.loads(body)
        names = {k.lower(): v for k, v in seen}
        assert names["host"] == f"allowed.test:{http_server.port}"
        assert "connection" not in names  # (kept open for the next request: see below)
        assert names["x-end-to-end"] == "kept"
        for hop in ("proxy-authorization", "proxy-connection", "keep-alive", "x-hop", "te"):
            assert hop not in names
        assert names["@target"] == "/headers"
        # the same client connection again (keep-alive), a plain body this time
        status, headers, body = client.request("GET", f"http://allowed.test:{http_server.port}/x")
        assert (status, body) == (200, b"hello")
        assert "keep-alive" not in headers
        client.close()
        events = h.wait_events(2)
    assert [e.protocol for e in events] == ["http", "http"]
    assert all(e.status == 200 and e.method == "GET" for e in events)


def test_plain_http_keep_alive_keeps_the_upstream_connection():
    """Requests on one client connection to one destination go on one
    upstream connection (each still checked and reported on its own);
    another client connection gets its own; a client that asks to close
    gets its request sent with ``Connection: close``."""
    log: list[tuple[int, str, bytes | None]] = []
    with ThreadServer(keepalive_handler(log)) as server, proxy_harness() as h:
        url = f"http://allowed.test:{server.port}"
        client = H11Client(h.http_port)
        methods = ["GET", "GET", "HEAD"]
        answers = [client.request(method, f"{url}/{i}") for i, method in enumerate(methods)]
        assert [(status, body) for status, _, body in answers] == [
            (200, b"1"),
            (200, b"2"),
            (200, b""),
        ]
        other = H11Client(h.http_port)
        assert other.request("GET", f"{url}/other")[2] == b"1"  # a connection of its own
        other.close()
        status, headers, body = client.request("GET", f"{url}/last", [("Connection", "close")])
        assert (status, body, headers.get("connection")) == (200, b"4", "close")
        assert client.sock.recv(1) == b""
        client.close()
        events = h.wait_events(5)
    assert [(number, what) for number, what, _ in sorted(log, key=lambda entry: entry[0])] == [
        (0, "GET /0"),
        (0, "GET /1"),
        (0, "HEAD /2"),
        (0, "GET /last"),
        (1, "GET /other"),
    ]
    assert [close for _, _, close in sorted(log, key=lambda entry: entry[0])] == [
        None,
        None,
        None,
        b"close",
        None,
    ]
    assert len(events) == 5
    assert all(e.decision == "allowed" and e.status == 200 and not e.error for e in events)
    assert {e.address for e in events} == {"127.0.0.1"}


def test_plain_http_reuses_a_kept_connection_only_for_what_it_may_resend():
    """A POST (not idempotent), or a request with a body, goes on a new
    upstream connection (its response's connection is kept for the next
    request); so does a request to another host or port, even one that
    resolves to the same address."""
    log: list[tuple[int, str, bytes | None]] = []
    with (
        ThreadServer(keepalive_handler(log)) as server,
        ThreadServer(keepalive_handler(log)) as second,
        proxy_harness(allow=("allowed.test", "other.test", "127.0.0.1/32")) as h,
    ):
        url = f"http://allowed.test:{server.port}"
        client = H11Client(h.http_port)
        steps = [
            ("GET", f"{url}/a", None),
            ("POST", f"{url}/b", None),
            ("GET", f"{url}/c", None),
            ("PUT", f"{url}/d", [b"data"]),
            ("GET", f"http://other.test:{server.port}/e", None),
            ("GET", f"http://allowed.test:{second.port}/f", None),
            ("GET", f"http://allowed.test:{second.port}/g", None),
        ]
        for method, target, body in steps:
            length = [("Content-Length", str(len(b"".join(body))))] if body else []
            assert client.request(method, target, length, body)[0] == 200
        client.close()
        h.wait_events(len(steps))
    by_request = {what: number for number, what, _ in log}
    connections = [by_request[f"{m} /{t.rsplit('/', 1)[1]}"] for m, t, _ in steps]
    a, b, c, d, e, f, g = connections
    assert a != b and b == c and d not in (a, b) and e not in (a, b, d) and f == g


def test_plain_http_a_kept_connection_closed_by_the_upstream_is_replaced():
    """The upstream reads the client's second request on the kept
    connection and closes it without an answer (as a server whose
    keep-alive timeout fell just then does): the proxy sends the request
    again on a new connection; the client sees only the answers."""
    log: list[tuple[int, str, bytes | None]] = []
    with ThreadServer(keepalive_handler(log, close_at=2)) as server, proxy_harness() as h:
        url = f"http://allowed.test:{server.port}"
        client = H11Client(h.http_port)
        bodies = [client.request("GET", f"{url}/{i}")[:3:2] for i in range(4)]
        client.close()
        events = h.wait_events(4)
        summary = h.finish()
    assert bodies == [(200, b"1"), (200, b"1"), (200, b"1"), (200, b"1")]
    assert [(number, what) for number, what, _ in sorted(log, key=lambda entry: entry[0])] == [
        (0, "GET /0"),
        (0, "GET /1"),  # read, and the connection closed
        (1, "GET /1"),
        (1, "GET /2"),
        (2, "GET /2"),
        (2, "GET /3"),
        (3, "GET /3"),
    ]
    assert len(events) == 4 and all(e.status == 200 and not e.error for e in events)
    assert summary["allowed"] == 4


def test_plain_http_a_request_sent_again_goes_to_the_address_it_was_allowed_to():
    """The request sent again after its kept connection was found closed
    goes to the address already checked: the name is not resolved again
    (here to an address the rules refuse), so the request is reported once,
    allowed, with the address it reached."""
    log: list[tuple[int, str, bytes | None]] = []
    answers = [["127.0.0.1"], ["10.1.2.3"]]

    class Changing(FakeResolver):
        async def __call__(self, host: str) -> list[str]:
            self.calls.append(host)
            return answers[0] if len(self.calls) == 1 else answers[1]

    resolver = Changing({})
    with (
        ThreadServer(keepalive_handler(log, close_at=2)) as server,
        proxy_harness(resolver=resolver) as h,
    ):
        client = H11Client(h.http_port)
        url = f"http://allowed.test:{server.port}"
        assert [client.request("GET", f"{url}/{i}")[:3:2] for i in range(2)] == [(200, b"1")] * 2
        client.close()
        events = h.wait_events(2)
        summary = h.finish()
    assert resolver.calls == ["allowed.test"]
    assert [(e.decision, e.status, e.address) for e in events] == [
        ("allowed", 200, "127.0.0.1")
    ] * 2
    assert (summary["allowed"], summary["denied"]) == (2, 0)
    assert [what for _, what, _ in log] == ["GET /0", "GET /1", "GET /1"]


def test_plain_http_a_request_sent_again_tries_every_address_it_was_allowed_to():
    """The upstream's first address drops the kept connection and takes no
    new one: the request sent again goes to the next address checked."""
    log: list[tuple[int, str, bytes | None]] = []
    names = {"multi.test": ["127.0.0.1", "127.0.0.2"]}
    with ThreadServer(keepalive_handler(log, close_at=2)) as first:
        second = socket.socket()
        second.bind(("127.0.0.2", first.port))
        second.listen(8)
        answer = keepalive_handler(log)

        def serve_second() -> None:
            conn, _ = second.accept()
            with conn:
                answer(conn)

        thread = threading.Thread(target=serve_second, daemon=True)
        thread.start()
        try:
            with proxy_harness(
                allow=("multi.test", "127.0.0.0/8"), resolver=FakeResolver(names)
            ) as h:
                client = H11Client(h.http_port)
                url = f"http://multi.test:{first.port}"
                assert client.request("GET", f"{url}/a")[:3:2] == (200, b"1")
                first.sock.shutdown(socket.SHUT_RDWR)  # (no new connection there)
                assert client.request("GET", f"{url}/b")[:3:2] == (200, b"1")
                client.close()
                events = h.wait_events(2)
        finally:
            second.close()
            thread.join(TIMEOUT)
    assert [(e.status, e.address) for e in events] == [(200, "127.0.0.1"), (200, "127.0.0.2")]


def test_a_lookup_whose_requests_all_gave_up_is_cancelled():
    """A lookup that does not end is cancelled once every request waiting
    for it has timed out, as each request's own lookup was."""
    running = []

    async def stuck(host: str) -> list[str]:
        running.append(host)
        try:
            await asyncio.sleep(3600)
        finally:
            running.remove(host)
        return []

    with proxy_harness(resolver=stuck, connect_timeout=0.2) as h:
        idle = proxy_task_count(h.thread)
        for _ in range(4):
            sock, status, _ = http_connect(h.http_port, "allowed.test:80")
            sock.close()
            assert status == 504
        assert running == []  # (each cancelled when its request timed out)
        assert wait_until(lambda: proxy_task_count(h.thread) == idle, timeout=5)


@pytest.mark.parametrize("timeout", [0.2, 30.0], ids=["timed-out", "pending"])
def test_closing_the_proxy_waits_for_its_lookups_to_end(timeout):
    """A lookup cancelled (its request timed out, or the proxy closes while
    it waits) gets to clean up before the proxy is closed."""
    cleaned = []

    async def slow_to_cancel(host: str) -> list[str]:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.3)
            cleaned.append(host)
        return []

    with proxy_harness(resolver=slow_to_cancel, connect_timeout=timeout) as h:
        sock = connect(h.http_port)
        sock.sendall(b"CONNECT allowed.test:80 HTTP/1.1\r\nHost: allowed.test:80\r\n\r\n")
        if timeout < 1:
            assert read_head(sock)[0] == 504
        else:
            time.sleep(0.2)  # (the lookup is under way)
    sock.close()
    assert cleaned == ["allowed.test"]


def test_plain_http_a_kept_connection_reset_as_the_request_goes_is_replaced(monkeypatch):
    """The upstream resets the kept connection just after the proxy looked
    at it (the look is made to miss it here): the request goes on a new
    connection, and the client's connection stays usable."""
    monkeypatch.setattr(proxy_module._Kept, "idle", lambda self: True)
    served = []

    def handler(conn: socket.socket) -> None:
        h = h11.Connection(h11.SERVER)
        conn.settimeout(30)
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = conn.recv(65536)
                except TimeoutError:  # idle for 0.3 s: reset the connection
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                h.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                served.append(event.target.decode())
            elif isinstance(event, h11.EndOfMessage):
                head = [(b"content-length", b"2")]
                out = h.send(h11.Response(status_code=200, headers=head)) or b""
                out += h.send(h11.Data(data=b"ok")) or b""
                conn.sendall(out + (h.send(h11.EndOfMessage()) or b""))
                h.start_next_cycle()
                conn.settimeout(0.3)
            else:
                return

    with ThreadServer(handler) as server, proxy_harness() as h:
        client = H11Client(h.http_port)
        url = f"http://allowed.test:{server.port}"
        assert client.request("GET", f"{url}/1")[:3:2] == (200, b"ok")
        time.sleep(0.6)  # reset by now
        assert client.request("GET", f"{url}/2")[:3:2] == (200, b"ok")
        assert client.request("GET", f"{url}/3")[:3:2] == (200, b"ok")
        client.close()
        events = h.wait_events(3)
    assert served == ["/1", "/2", "/3"]
    assert [(e.status, e.error) for e in events] == [(200, None)] * 3


def test_plain_http_bytes_past_a_response_are_never_the_next_answer():
    """An upstream that sends more than its response (here a second,
    forged response) loses its connection: the client's next request goes
    on a new one and gets a real answer."""
    forged = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"
    served = []

    def handler(conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            served.append(recv_head(conn)[0])
        except EOFError:
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal" + forged)
        while conn.recv(65536):  # keep the connection open
            pass

    with ThreadServer(handler) as server, proxy_harness() as h:
        client = H11Client(h.http_port)
        url = f"http://allowed.test:{server.port}/"
        assert [client.request("GET", url)[2] for _ in range(3)] == [b"real"] * 3
        client.close()
    assert len(served) == 3  # each request on a connection of its own


def test_plain_http_chunked_upload_and_download(http_server):
    with proxy_harness() as h:
        client = H11Client(h.http_port)
        base = f"http://allowed.test:{http_server.port}"
        chunks = [pattern(100_000 + i) for i in range(20)]
        status, _, body = client.request(
            "POST", base + "/sha", [("Transfer-Encoding", "chunked")], chunks
        )
        import hashlib

        expected = hashlib.sha256(b"".join(chunks)).hexdigest()
        assert status == 200
        assert json.loads(body) == {"sha256": expected, "length": sum(map(len, chunks))}
        status, headers, body = client.request("GET", base + "/chunked/1234567")
        assert status == 200 and headers.get("transfer-encoding") == "chunked"
        assert body == pattern(1234567)
        # Expect: 100-continue is answered by the proxy
        status, _, body = client.request(
            "POST",
            base + "/sha",
            [("Content-Length", "5"), ("Expect", "100-continue")],
            [b"abcde"],
        )
        assert status == 200 and json.loads(body)["length"] == 5
        client.close()


def test_plain_http_refusals(http_server):
    with proxy_harness() as h:
        for request, code in [
            (b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n", 400),
            (b"GET https://allowed.test/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n", 400),
            (b"GET http://u:p@allowed.test/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n", 400),
            (b"GET http://evil.test/ HTTP/1.1\r\nHost: evil.test\r\n\r\n", 403),
            (f"GET http://allowed.test:{free_port()}/ HTTP/1.1\r\nHost: a\r\n\r\n".encode(), 502),
            (b"garbage\r\n\r\n", 400),
        ]:
            sock = connect(h.http_port)
            sock.sendall(request)
            status, _, _ = read_head(sock)
            sock.close()
            assert status == code, request


def test_plain_http_second_request_denied_on_same_connection(http_server):
    with proxy_harness() as h:
        client = H11Client(h.http_port)
        status, _, _ = client.request("GET", f"http://allowed.test:{http_server.port}/x")
        assert status == 200
        status, _, body = client.request("GET", f"http://evil.test:{http_server.port}/x")
        assert status == 403 and b"evil.test" in body
        client.close()


def test_plain_http_idle_upstream_gives_504():
    with ThreadServer(silent_handler) as silent, proxy_harness(idle_timeout=0.5) as h:
        client = H11Client(h.http_port)
        start = time.monotonic()
        status, _, body = client.request("GET", f"http://allowed.test:{silent.port}/")
        elapsed = time.monotonic() - start
        client.close()
        event = last_event(h)
    assert status == 504 and b"no response" in body
    assert 0.3 < elapsed < 5
    assert event.status == 504 and "idle" in (event.error or "")


def test_plain_http_client_leaving_early_releases_the_upstream():
    closed_at: list[float] = []

    def handler(conn: socket.socket) -> None:
        conn.settimeout(30)
        while conn.recv(65536):
            pass
        closed_at.append(time.monotonic())

    with ThreadServer(handler) as server, proxy_harness(idle_timeout=60) as h:
        sock = connect(h.http_port)
        url = f"http://allowed.test:{server.port}/slow"
        sock.sendall(f"POST {url} HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nabc".encode())
        time.sleep(0.2)
        left = time.monotonic()
        sock.close()
        deadline = time.monotonic() + TIMEOUT
        while not closed_at and time.monotonic() < deadline:
            time.sleep(0.01)
        event = last_event(h)
    assert closed_at and closed_at[0] - left < 2
    assert event.bytes_up > 0 and "not completed" in (event.error or "")


# --------------------------------------------------------------------------- SOCKS5


def test_socks5_domain_ipv4_ipv6(echo_server):
    with ThreadServer(echo_handler, host="::1") as echo6:
        with proxy_harness(allow=["allowed.test", "v6.test", "127.0.0.1/32", "[::1]"]) as h:
            targets = [
                ("allowed.test", echo_server.port),
                (ipaddress.IPv4Address("127.0.0.1"), echo_server.port),
                (ipaddress.IPv6Address("::1"), echo6.port),
                ("v6.test", echo6.port),
            ]
            for host, port in targets:
                sock, reply = socks_connect(h.socks_port, host, port)
                assert reply == 0
                sock.sendall(b"hello " + str(host).encode())
                sock.shutdown(socket.SHUT_WR)
                assert recv_all(sock) == b"hello " + str(host).encode()
                sock.close()
            events = h.wait_events(4)
    assert [e.protocol for e in events] == ["socks5"] * 4
    assert [e.address for e in events] == ["127.0.0.1", "127.0.0.1", "::1", "::1"]
    assert all(e.decision == "allowed" and e.status == 0 for e in events)


def test_socks5_refusals(echo_server):
    with proxy_harness() as h:
        sock, reply = socks_connect(h.socks_port, "evil.test", echo_server.port)
        sock.close()
        assert reply == 0x02
        for cmd in (2, 3):
            sock, reply = socks_connect(h.socks_port, "allowed.test", echo_server.port, cmd=cmd)
            sock.close()
            assert reply == 0x07
        sock, reply = socks_connect(h.socks_port, "allowed.test", free_port())
        sock.close()
        assert reply == 0x05
        sock, reply = socks_connect(h.socks_port, "nowhere.test", 80)
        sock.close()
        assert reply in (0x02, 0x04)
        # not a greeting at all: just closed
        sock = connect(h.socks_port)
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert recv_all(sock) == b""
        sock.close()
        # no acceptable method
        sock = connect(h.socks_port)
        sock.sendall(b"\x05\x01\x02")
        assert recv_all(sock) == b"\x05\xff"
        sock.close()
        events = h.wait_events(5)
    assert [e.status for e in events[:4]] == [2, 7, 7, 5]


def test_socks5_unresolvable_name_is_host_unreachable():
    with proxy_harness(allow=["*.test"]) as h:
        sock, reply = socks_connect(h.socks_port, "nowhere.test", 80)
        sock.close()
    assert reply == 0x04


# --------------------------------------------------------------------------- faults and load


def bulk_request(sock: socket.socket, size: int) -> None:
    sock.sendall(struct.pack("!Q", size))


def read_counting(
    sock: socket.socket, limit: int | None = None, start: bytes = b""
) -> tuple[int, int]:
    """Read to EOF (or ``limit`` bytes): (count, crc32), counting ``start`` first."""
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    total, crc = len(start), zlib.crc32(start)
    while limit is None or total < limit:
        n = sock.recv_into(view)
        if not n:
            break
        crc = zlib.crc32(view[:n], crc)
        total += n
    return total, crc


def expected_crc(size: int) -> int:
    crc = 0
    block_crc_count = size // len(BLOCK)
    for _ in range(block_crc_count):
        crc = zlib.crc32(BLOCK, crc)
    return zlib.crc32(BLOCK[: size % len(BLOCK)], crc)


@pytest.mark.parametrize("splice", [False, True], ids=["copy", "splice"])
def test_large_plain_http_body_is_copied_raw_then_closed(http_server, splice):
    """A response of at least RAW_BODY_MIN bytes with a Content-Length skips
    h11's re-framing: exactly that many bytes arrive, announced with
    ``Connection: close``, and the proxy then closes the connection."""
    size = 3 << 20
    with proxy_harness(use_splice=splice) as h:
        sock, status, headers, rest = get_via_proxy(h, http_server, f"/bytes/{size}")
        assert status == 200 and int(headers["content-length"]) == size
        assert headers.get("connection") == "close"
        assert read_counting(sock, limit=size, start=rest) == (size, expected_crc(size))
        assert sock.recv(1) == b""  # nothing more: the proxy closed
        sock.close()
        event = last_event(h)
        h.finish()
    assert event.decision == "allowed" and event.bytes_down >= size and not event.error


def test_head_of_a_large_resource_keeps_the_connection(http_server):
    size = 3 << 20
    with proxy_harness() as h:
        sock = connect(h.http_port)
        url = f"http://allowed.test:{http_server.port}/bytes/{size}"
        for method in ("HEAD", "GET"):
            target = url if method == "HEAD" else url.replace(str(size), "100")
            sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
            status, headers, rest = read_head(sock)
            assert status == 200, method
            if method == "HEAD":
                assert int(headers["content-length"]) == size and rest == b""
                assert headers.get("connection") != "close"
            else:
                assert rest + recv_exact(sock, 100 - len(rest)) == BLOCK[:100]
        sock.close()
        h.finish()


@pytest.mark.parametrize("splice", [False, True], ids=["copy", "splice"])
def test_large_body_cut_short_by_the_upstream_is_not_completed(http_server, splice):
    claimed, sent = 4 << 20, 1 << 20
    with proxy_harness(use_splice=splice) as h:
        sock, status, headers, rest = get_via_proxy(h, http_server, f"/short/{claimed}/{sent}")
        assert status == 200 and int(headers["content-length"]) == claimed
        try:
            got, _crc = read_counting(sock, start=rest)
        except ConnectionResetError:
            got = -1  # reset: the truncation is visible either way
        assert got < claimed
        sock.close()
        event = last_event(h)
        h.finish()
    assert event.error and "early" in event.error


def test_client_disconnect_mid_stream_does_not_disturb_others(bulk_server):
    size = 20_000_000
    with proxy_harness() as h:
        a, status_a, _ = http_connect(h.http_port, f"allowed.test:{bulk_server.port}")
        b, reply_b = socks_connect(h.socks_port, "allowed.test", bulk_server.port)
        assert status_a == 200 and reply_b == 0
        bulk_request(a, 500_000_000)
        bulk_request(b, size)
        read_counting(a, limit=1_000_000)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        a.close()  # abrupt reset mid-stream
        assert read_counting(b) == (size, expected_crc(size))
        b.close()
        events = h.wait_events(2)
    assert {e.protocol for e in events} == {"connect", "socks5"}
    aborted = next(e for e in events if e.protocol == "connect")
    assert aborted.error is not None and aborted.bytes_down < 500_000_000


def live_bytes_down(harness) -> int:
    async def read() -> int:
        return harness.thread.proxy._runs[harness.run_id].stats.bytes_down

    return harness.thread._call(read(), 10.0)


@pytest.mark.parametrize(
    "mode",
    ["connect-splice", "connect-copy", "socks-splice", "socks-copy", "http-splice", "http-copy"],
)
def test_slow_reader_bounds_buffering(mode, bulk_server, http_server):
    huge = 2_000_000_000
    with proxy_harness(use_splice=mode.endswith("splice")) as h:
        if mode.startswith("connect"):
            sock, _, _ = http_connect(h.http_port, f"allowed.test:{bulk_server.port}")
            bulk_request(sock, huge)
        elif mode.startswith("socks"):
            sock, _ = socks_connect(h.socks_port, "allowed.test", bulk_server.port)
            bulk_request(sock, huge)
        else:
            sock = connect(h.http_port)
            url = f"http://allowed.test:{http_server.port}/bytes/{huge}"
            sock.sendall(f"GET {url} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        time.sleep(0.5)
        first = live_bytes_down(h)
        time.sleep(0.5)
        second = live_bytes_down(h)
        # only kernel socket buffers and one proxy buffer are in flight
        assert second == first and second < 64_000_000, (first, second)
        # and reading resumes the flow
        got, _ = read_counting(sock, limit=second + 10_000_000)
        assert got >= second + 10_000_000
        sock.close()


def reset_handler(conn: socket.socket) -> None:
    """Send 300 kB, then reset the connection (SO_LINGER 0)."""
    conn.sendall(b"r" * 300_000)
    time.sleep(0.2)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.mark.parametrize("splice", [False, True], ids=["copy", "splice"])
def test_an_upstream_reset_mid_stream_resets_the_client(splice):
    """Never a clean end for a broken tunnel: the client gets what came,
    then a reset, not an EOF it could take for the whole response."""
    with ThreadServer(reset_handler) as upstream, proxy_harness(use_splice=splice) as h:
        sock, status, _ = http_connect(h.http_port, f"allowed.test:{upstream.port}")
        assert status == 200
        sock.settimeout(10)
        got = 0
        with pytest.raises(ConnectionResetError):
            while True:
                chunk = sock.recv(65536)
                assert chunk, f"a clean EOF after {got} bytes"
                got += len(chunk)
        assert got <= 300_000
        sock.close()
        assert "reset" in (last_event(h).error or "")


@pytest.mark.parametrize("splice", [False, True], ids=["copy", "splice"])
def test_a_client_gone_mid_body_is_recorded_and_the_proxy_goes_on(http_server, splice):
    """A plain-HTTP body: a client that resets mid-body ends its connection
    (recorded as the client's doing, not the upstream's), and the next
    request is served."""
    size = 200 << 20
    with proxy_harness(use_splice=splice) as h:
        sock, status, _, rest = get_via_proxy(h, http_server, f"/bytes/{size}")
        assert status == 200
        read_counting(sock, limit=4 << 20, start=rest)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset, so that the proxy's next write fails
        event = last_event(h)
        assert event.error and "client connection lost" in event.error, event
        assert event.bytes_down < size
        again, status, _, rest = get_via_proxy(h, http_server, f"/bytes/{3 << 20}")
        assert status == 200
        assert read_counting(again, limit=3 << 20, start=rest) == (3 << 20, expected_crc(3 << 20))
        again.close()
        h.finish()


def test_pipe_shortage_falls_back_to_copying_a_body(http_server, monkeypatch):
    import nanobox.net.proxy as proxy_module

    def no_pipes(flags: int) -> tuple[int, int]:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(proxy_module.os, "pipe2", no_pipes)
    size = 3 << 20
    with proxy_harness(use_splice=True) as h:
        sock, status, _, rest = get_via_proxy(h, http_server, f"/bytes/{size}")
        assert status == 200
        assert read_counting(sock, limit=size, start=rest) == (size, expected_crc(size))
        sock.close()
        h.finish()


def test_where_splice_is_refused_the_proxy_copies(echo_server, monkeypatch):
    """A seccomp profile or a user-space kernel may refuse splice(): the
    proxy finds out once, on a socket pair of its own, and copies."""
    import errno

    import nanobox.net.proxy as proxy_module

    def refused(*args: object, **kwargs: object) -> int:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(proxy_module.os, "splice", refused)
    monkeypatch.setattr(proxy_module, "_splice_usable", None)
    with proxy_harness(use_splice=True) as h:
        assert h.thread.proxy.use_splice is False
        assert echo_through_tunnel(h, echo_server, b"copied") == b"copied"


def test_pipe_shortage_falls_back_to_copying(echo_server, monkeypatch):
    import nanobox.net.proxy as proxy_module

    def no_pipes(flags: int) -> tuple[int, int]:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(proxy_module.os, "pipe2", no_pipes)
    with proxy_harness(use_splice=True) as h:
        assert echo_through_tunnel(h, echo_server, b"still works") == b"still works"


def test_200_parallel_connections(echo_server):
    n = 200
    # Each tunnel holds two fds (client, upstream; four more with splice)
    # and the test's own clients more: 200 of them exceed a default soft
    # limit of 1024, as an unprivileged user has. Raise it to the hard one.
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > 4096:
        hard = 4096
    if soft < hard:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (hard, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        )

    async def main(port: int) -> list[bytes]:
        established = 0
        all_up = asyncio.Event()

        async def one(i: int) -> bytes:
            nonlocal established
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            authority = f"allowed.test:{echo_server.port}"
            writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            established += 1
            if established == n:
                all_up.set()
            await asyncio.wait_for(all_up.wait(), 30)
            message = f"message {i} ".encode() * 50
            writer.write(message)
            await writer.drain()
            data = await reader.readexactly(len(message))
            writer.close()
            await writer.wait_closed()
            return data

        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), 60)

    with proxy_harness() as h:
        results = asyncio.run(main(h.http_port))
        assert results == [f"message {i} ".encode() * 50 for i in range(n)]
        h.wait_events(n)
        summary = h.finish()
    assert summary["allowed"] == n and summary["denied"] == 0


def test_stop_run_closes_everything_and_leaks_nothing(echo_server, bulk_server):
    time.sleep(0.2)  # let earlier tests' server-side sockets close
    baseline = open_fds()
    with proxy_harness() as h:
        # some finished traffic of every kind...
        sock, _, _ = http_connect(h.http_port, f"allowed.test:{echo_server.port}")
        sock.sendall(b"x")
        recv_exact(sock, 1)
        sock.close()
        sock, _ = socks_connect(h.socks_port, "evil.test", 80)
        sock.close()
        # ...and connections still open when the run stops
        live = []
        for _ in range(5):
            s, status, _ = http_connect(h.http_port, f"allowed.test:{bulk_server.port}")
            assert status == 200
            bulk_request(s, 10**12)
            live.append(s)
        idle = connect(h.http_port)  # mid-handshake
        summary = h.finish()
        assert summary["active"] >= 5
        assert proxy_task_count(h.thread) == 0
        assert h.thread.proxy.active_connections == 0
        for s in [*live, idle]:
            s.settimeout(TIMEOUT)
            try:
                while s.recv(1 << 20):
                    pass
            except ConnectionResetError:
                pass
            s.close()
        events = h.wait_events(7)
        assert sum(1 for e in events if e.error == "run stopped") >= 5
    deadline = time.monotonic() + TIMEOUT
    while open_fds() > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds() <= baseline


def test_serve_and_stop_run_in_one_loop(echo_server):
    """The asyncio API directly: serve() until stop_run()."""
    from _net_support import listening_socket

    async def main() -> dict:
        proxy = Proxy(
            Ruleset(["allowed.test", "127.0.0.1/32"]),
            resolver=FakeResolver({"allowed.test": ["127.0.0.1"]}),
        )
        listener = listening_socket()
        port = listener.getsockname()[1]
        serving = asyncio.create_task(proxy.serve(listener, None, "r"))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        authority = f"allowed.test:{echo_server.port}"
        writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\nabc".encode())
        await reader.readuntil(b"\r\n\r\n")
        assert await reader.readexactly(3) == b"abc"
        summary = proxy.stop_run("r")
        await serving
        assert await reader.read() == b""
        writer.close()
        assert listener.fileno() == -1
        await proxy.aclose()
        assert len(asyncio.all_tasks()) == 1
        return summary

    summary = asyncio.run(main())
    assert summary["allowed"] == 1 and summary["active"] == 1 and summary["bytes_up"] == 3


# --------------------------------------------------------------------------- throughput


@pytest.mark.slow
def test_200mb_through_connect_socks_and_http(bulk_server, http_server, capsys):
    size = 200_000_000
    want = (size, expected_crc(size))
    rates: dict[str, float] = {}

    def timed(label: str, sock: socket.socket, start: bytes = b"") -> None:
        began = time.perf_counter()
        result = read_counting(sock, limit=size, start=start)
        elapsed = time.perf_counter() - began
        sock.close()
        assert result == want, label
        rates[label] = size / elapsed / 1e6

    direct = connect(bulk_server.port)
    bulk_request(direct, size)
    timed("direct", direct)
    for splice in (True, False):
        mode = "splice" if splice else "copy"
        with proxy_harness(use_splice=splice) as h:
            sock, status, _ = http_connect(h.http_port, f"allowed.test:{bulk_server.port}")
            assert status == 200
            bulk_request(sock, size)
            timed(f"CONNECT ({mode})", sock)
            sock, reply = socks_connect(h.socks_port, "allowed.test", bulk_server.port)
            assert reply == 0
            bulk_request(sock, size)
            timed(f"SOCKS5 ({mode})", sock)
            sock, status, headers, rest = get_via_proxy(h, http_server, f"/bytes/{size}")
            assert status == 200 and int(headers["content-length"]) == size
            timed(f"plain HTTP ({mode})", sock, start=rest)
            summary = h.finish()
            assert summary["bytes_down"] >= 2 * size
    direct = connect(http_server.port)
    direct.sendall(f"GET /bytes/{size} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    _, _, rest = read_head(direct)
    timed("direct HTTP", direct, start=rest)
    with capsys.disabled():
        print()
        for label, rate in rates.items():
            print(f"    {label:<18} {rate:8.0f} MB/s")


def test_connection_cap_is_per_run():
    """``max_connections`` caps each run's connections (503 past it), and
    holds for each run: one run holding all of its
    connections (a client that trickles bytes) refused every other run of
    the same Sandbox, which shares the proxy."""
    with ThreadServer(silent_handler) as silent, proxy_harness(max_connections=2) as h:
        held = [http_connect(h.http_port, f"allowed.test:{silent.port}")[0] for _ in range(2)]
        other_http, other_socks = listening_socket(), listening_socket()
        h.thread.add_run("run-2", other_http, other_socks)
        sock, status, _ = http_connect(other_http.getsockname()[1], f"allowed.test:{silent.port}")
        assert status == 200
        sock.close()
        sock, status, body = http_connect(h.http_port, f"allowed.test:{silent.port}")
        sock.close()
        assert status == 503 and b"connection limit (2) reached" in body
        for s in held:
            s.close()
        assert h.thread.finish_run("run-2")["denied"] == 0
        assert h.finish()["denied"] == 1


def test_all_runs_together_keep_to_a_share_of_the_descriptors():
    """The proxy lives in its caller's process: its descriptors (two per
    connection, two more per spliced direction while they fit, else it
    copies) are capped at half the process's soft limit, so a run's tunnels
    cannot leave the caller's own code with EMFILE (250 tunnels did under
    the usual 1024)."""
    import resource

    from nanobox.net import proxy as proxy_mod

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        assert proxy_mod._fd_budget() == 512
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    # Two proxies (two Sandboxes) of one process share the budget.
    monkey = proxy_mod._SHARE.budget
    proxy_mod._SHARE.budget = proxy_mod._SHARE.open + 4  # (two connections, copied)
    try:
        with ThreadServer(silent_handler) as silent, proxy_harness() as h, proxy_harness() as g:
            held = [http_connect(h.http_port, f"allowed.test:{silent.port}")[0] for _ in range(2)]
            sock, status, body = http_connect(g.http_port, f"allowed.test:{silent.port}")
            sock.close()
            assert status == 503 and b"share of descriptors" in body
            for s in held:
                s.close()
    finally:
        proxy_mod._SHARE.budget = monkey


@pytest.mark.parametrize("kind", ["http", "socks5"])
def test_a_request_head_that_trickles_in_is_cut_off(kind, monkeypatch):
    """A byte a second kept a connection (and its slot) open for ever: the
    idle timeout sees traffic. Now the head, or the SOCKS handshake, must
    come whole within its deadline (60 s; 0.5 s here)."""
    from nanobox.net import proxy as proxy_mod

    monkeypatch.setattr(proxy_mod, "_HEAD_TIMEOUT", 0.5)
    with proxy_harness(idle_timeout=30) as h:
        sock = connect(h.http_port if kind == "http" else h.socks_port)
        greeting = b"\x05\xff" + bytes(255)  # (255 methods offered)
        trickle = b"GET http://allowed.test/ HTTP/1.1\r\n" if kind == "http" else greeting
        start = time.monotonic()
        closed = False
        for byte in trickle:
            try:
                sock.sendall(bytes([byte]))
                sock.settimeout(0.1)
                if sock.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
        sock.close()
        assert closed and time.monotonic() - start < 3, time.monotonic() - start


def test_a_kept_alive_connection_may_wait_between_requests_until_the_deadline(http_server):
    """The deadline is for each head, counted from the end of the last
    response: a second request right after the first is served."""
    with proxy_harness() as h:
        sock = connect(h.http_port)
        for _ in range(2):
            sock.sendall(
                f"GET http://allowed.test:{http_server.port}/x HTTP/1.1\r\n"
                f"Host: allowed.test:{http_server.port}\r\n\r\n".encode()
            )
            status, headers, rest = read_head(sock)
            assert status == 200
            length = int(headers.get("content-length", "0"))
            recv_exact(sock, length - len(rest)) if length > len(rest) else b""
        sock.close()


def test_denied_destinations_stay_short_and_unambiguous():
    """A host that is no host is cut to 255 characters (50 such made a 9 MB
    result), IPv6 is bracketed (``::1:80`` read either way), and past 50
    destinations the rest are counted together, not dropped unseen."""
    with proxy_harness(allow=("allowed.test",)) as h:
        sock, status, _ = http_connect(h.http_port, "[::1]:81")
        sock.close()
        assert status == 403
        for i in range(52):
            sock = connect(h.http_port)
            host = f"n{i:02d}" + "a" * 60000 + ".invalid"
            sock.sendall(f"GET http://{host}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            read_head(sock)
            sock.close()
        listed = h.finish()["denied_destinations"]
    assert "[::1]:81" in listed
    assert all(len(k) < 300 for k in listed), [len(k) for k in listed]
    assert listed.get("(other destinations)") == 3, list(listed)[-3:]
    assert len(listed) == 51


def test_pinned_international_names_are_found_in_any_spelling():
    """``resolve`` pins were looked up by the name as typed: a pin for
    ``bücher.test`` missed the ``xn--bcher-kva.test`` clients send, and the
    name went to the system's DNS."""
    from nanobox.net.proxy import static_resolver

    resolve = static_resolver({"Bücher.Test.": ["127.0.0.9"]})
    for spelling in ("xn--bcher-kva.test", "bücher.test", "XN--BCHER-KVA.TEST."):
        assert asyncio.run(resolve(spelling)) == ["127.0.0.9"], spelling


def test_a_socks_ipv4_mapped_address_is_reported_as_ipv4(echo_server):
    """A SOCKS request for ``::ffff:127.0.0.1`` (IPv6 address type) is the
    IPv4 address, as over HTTP: it was reported as ``::ffff:7f00:1``."""
    with proxy_harness(allow=("allowed.test",)) as h:
        sock, reply = socks_connect(
            h.socks_port, ipaddress.IPv6Address("::ffff:127.0.0.1"), echo_server.port
        )
        sock.close()
        assert reply == 2  # (not allowed by a rule)
        listed = h.finish()["denied_destinations"]
    assert list(listed) == [f"127.0.0.1:{echo_server.port}"], listed
