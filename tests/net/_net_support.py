"""Local servers and clients for the proxy tests. Everything binds and
connects to 127.0.0.1 or ::1 only; names are resolved by a fake resolver."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import h11

from nanobox.net import ConnectionEvent, ProxyThread, Ruleset

LOOPBACK = "127.0.0.1"
TIMEOUT = 10.0
BLOCK = bytes(range(256)) * 4096  # 1 MiB pattern


def pattern(n: int) -> bytes:
    reps = n // len(BLOCK) + 1
    return (BLOCK * reps)[:n]


def assert_local(host: str) -> None:
    addr = ipaddress.ip_address(host)
    assert addr.is_loopback, f"tests may only use loopback, not {host}"


class FakeResolver:
    """Maps test names to addresses; counts calls; can sleep."""

    def __init__(self, table: dict[str, Sequence[str]], delay: float = 0.0) -> None:
        self.table = dict(table)
        self.delay = delay
        self.calls: list[str] = []

    async def __call__(self, host: str) -> Sequence[str]:
        self.calls.append(host)
        if self.delay:
            await asyncio.sleep(self.delay)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} not in the test resolver")
        return self.table[host]


DEFAULT_NAMES = {
    "allowed.test": ["127.0.0.1"],
    "other.test": ["127.0.0.1"],
    "v6.test": ["::1"],
    "meta.test": ["169.254.169.254"],
    "loop.test": ["127.0.0.1"],
    "mixed.test": ["192.0.2.1", "127.0.0.1"],  # never connected to: refused before dialing
    "private.test": ["10.1.2.3"],
}


def listening_socket(host: str = LOOPBACK, backlog: int = 512) -> socket.socket:
    assert_local(host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(backlog)
    return sock


def free_port() -> int:
    """A loopback port with nothing listening (bound then closed)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclass
class Harness:
    thread: ProxyThread
    http_port: int
    socks_port: int
    events: list[ConnectionEvent] = field(default_factory=list)
    run_id: str = "run-1"
    summary: dict[str, Any] | None = None

    def finish(self) -> dict[str, Any]:
        if self.summary is None:
            self.summary = self.thread.finish_run(self.run_id)
        return self.summary

    def wait_events(self, n: int, timeout: float = TIMEOUT) -> list[ConnectionEvent]:
        deadline = time.monotonic() + timeout
        while len(self.events) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.events)


@contextlib.contextmanager
def proxy_harness(
    allow: Sequence[str] = ("allowed.test", "127.0.0.1/32"),
    deny: Sequence[str] = (),
    resolver: FakeResolver | None = None,
    **options: Any,
) -> Iterator[Harness]:
    events: list[ConnectionEvent] = []
    options.setdefault("connect_timeout", 5.0)
    thread = ProxyThread(
        Ruleset(allow, deny),
        resolver=resolver or FakeResolver(DEFAULT_NAMES),
        on_event=events.append,
        **options,
    )
    thread.start()
    http_l, socks_l = listening_socket(), listening_socket()
    harness = Harness(thread, http_l.getsockname()[1], socks_l.getsockname()[1], events)
    try:
        thread.add_run(harness.run_id, http_l, socks_l)
        yield harness
        harness.finish()
    finally:
        thread.close()


# --------------------------------------------------------------------------- servers


class ThreadServer:
    """A threaded TCP server on loopback running ``handler(conn)`` per connection."""

    def __init__(self, handler: Callable[[socket.socket], None], host: str = LOOPBACK) -> None:
        self.sock = listening_socket(host)
        self.host = host
        self.port: int = self.sock.getsockname()[1]
        self.handler = handler
        self.conns: list[socket.socket] = []
        self.received: list[bytes] = []
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self.handler(conn)
        with contextlib.suppress(OSError):
            conn.close()

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.close()
        self._thread.join(5)

    def __enter__(self) -> ThreadServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def echo_handler(conn: socket.socket) -> None:
    """Echo until EOF, then close (so a half-close drains)."""
    while True:
        data = conn.recv(262144)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def record_handler(server_received: list[bytes]) -> Callable[[socket.socket], None]:
    def handler(conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        chunks = []
        while True:
            data = conn.recv(65536)
            if not data:
                break
            chunks.append(data)
        server_received.append(b"".join(chunks))

    return handler


def silent_handler(conn: socket.socket) -> None:
    """Accept and never answer (until the peer goes away)."""
    conn.settimeout(60)
    while conn.recv(65536):
        pass


def bulk_handler(conn: socket.socket) -> None:
    """Read an 8-byte size, send that many pattern bytes, close."""
    conn.settimeout(60)
    header = recv_exact(conn, 8)
    (size,) = struct.unpack("!Q", header)
    view = memoryview(BLOCK)
    left = size
    while left:
        n = min(left, len(BLOCK))
        conn.sendall(view[:n])
        left -= n
    conn.shutdown(socket.SHUT_WR)
    conn.recv(1)


def http_handler(conn: socket.socket) -> None:
    """A small HTTP/1.1 origin server, one request per connection (it closes
    the connection after answering, which the proxy, keeping it for the
    client's next request, finds out and replaces)."""
    conn.settimeout(30)
    h = h11.Connection(h11.SERVER)
    request: h11.Request | None = None
    body = hashlib.sha256()
    length = 0
    while True:
        event = h.next_event()
        if event is h11.NEED_DATA:
            h.receive_data(conn.recv(262144))
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body.update(event.data)
            length += len(event.data)
        elif isinstance(event, h11.EndOfMessage):
            break
        else:
            return
    assert request is not None
    path = request.target.decode()
    if path.startswith("/short/"):  # claims a length, sends less, closes
        claimed, sent = (int(x) for x in path.split("/")[2:4])
        head = [(b"content-length", str(claimed).encode())]
        conn.sendall(h.send(h11.Response(status_code=200, headers=head)) or b"")
        conn.sendall(BLOCK[:sent])
        h.send_failed()
        return
    if path.startswith("/bytes/"):
        size = int(path.split("/")[2])
        head = [(b"content-length", str(size).encode()), (b"keep-alive", b"timeout=5")]
        conn.sendall(h.send(h11.Response(status_code=200, headers=head)) or b"")
        if request.method == b"HEAD":
            return
        view = memoryview(BLOCK)
        left = size
        while left:
            n = min(left, len(BLOCK))
            conn.sendall(view[:n])
            left -= n
        h.send_failed()  # we bypassed h11 for the body
        return
    if path.startswith("/chunked/"):
        size = int(path.split("/")[2])
        head = [(b"transfer-encoding", b"chunked")]
        conn.sendall(h.send(h11.Response(status_code=200, headers=head)) or b"")
        data = pattern(size)
        for i in range(0, size, 10000):
            conn.sendall(h.send(h11.Data(data=data[i : i + 10000])) or b"")
        conn.sendall(h.send(h11.EndOfMessage()) or b"")
        return
    if path == "/headers":
        payload = json.dumps(
            [[k.decode(), v.decode()] for k, v in request.headers]
            + [["@method", request.method.decode()], ["@target", path]]
        ).encode()
    elif path == "/sha":
        payload = json.dumps({"sha256": body.hexdigest(), "length": length}).encode()
    else:
        payload = b"hello"
    head = [(b"content-length", str(len(payload)).encode()), (b"content-type", b"text/plain")]
    conn.sendall(h.send(h11.Response(status_code=200, headers=head)) or b"")
    conn.sendall(h.send(h11.Data(data=payload)) or b"")
    conn.sendall(h.send(h11.EndOfMessage()) or b"")


def keepalive_handler(
    log: list[tuple[int, str, bytes | None]], close_at: int | None = None
) -> Callable[[socket.socket], None]:
    """An HTTP/1.1 origin server that answers any number of requests on a
    connection (its body: the request's number on it), logging each as
    (connection number, "METHOD target", its Connection header). With
    ``close_at``: that request of a connection is read and the connection
    closed without an answer (an upstream dropping a kept connection just as
    the proxy reuses it)."""
    lock = threading.Lock()
    connections = [0]

    def handler(conn: socket.socket) -> None:
        with lock:
            number = connections[0]
            connections[0] += 1
        conn.settimeout(30)
        h = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        served = 0
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                h.receive_data(conn.recv(65536))
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                served += 1
                what = f"{request.method.decode()} {request.target.decode()}"
                log.append((number, what, dict(request.headers).get(b"connection")))
                if served == close_at:
                    return
                body = str(served).encode()
                head = [(b"content-length", str(len(body)).encode())]
                out = h.send(h11.Response(status_code=200, headers=head)) or b""
                if request.method != b"HEAD":
                    out += h.send(h11.Data(data=body)) or b""
                conn.sendall(out + (h.send(h11.EndOfMessage()) or b""))
                if h.our_state is not h11.DONE or h.their_state is not h11.DONE:
                    return
                h.start_next_cycle()
            elif not isinstance(event, h11.Data):
                return  # ConnectionClosed

    return handler


# --------------------------------------------------------------------------- clients


def connect(port: int, host: str = LOOPBACK) -> socket.socket:
    assert_local(host)
    sock = socket.create_connection((host, port), timeout=TIMEOUT)
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(262144)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def recv_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read an HTTP head (a request's or a response's): (the head, the bytes
    read past it). ``EOFError`` at EOF before its end."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise EOFError(f"EOF in the head: {buf!r}")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def read_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read an HTTP response head: (status, lower-case headers, extra bytes)."""
    head, rest = recv_head(sock)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, rest


def http_connect(port: int, authority: str) -> tuple[socket.socket, int, bytes]:
    """Send CONNECT; return (socket, status, body-or-extra)."""
    sock = connect(port)
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    status, headers, rest = read_head(sock)
    if status != 200:
        length = int(headers.get("content-length", "0"))
        rest += recv_exact(sock, length - len(rest)) if length > len(rest) else b""
    return sock, status, rest


def socks_connect(
    port: int, host: str | ipaddress.IPv4Address | ipaddress.IPv6Address, dport: int, cmd: int = 1
) -> tuple[socket.socket, int]:
    """SOCKS5 handshake; return (socket, reply code)."""
    sock = connect(port)
    sock.sendall(b"\x05\x01\x00")
    assert recv_exact(sock, 2) == b"\x05\x00"
    if isinstance(host, ipaddress.IPv4Address):
        addr = b"\x01" + host.packed
    elif isinstance(host, ipaddress.IPv6Address):
        addr = b"\x04" + host.packed
    else:
        raw = host.encode()
        addr = b"\x03" + bytes([len(raw)]) + raw
    sock.sendall(bytes([5, cmd, 0]) + addr + struct.pack("!H", dport))
    reply = recv_exact(sock, 4)
    assert reply[0] == 5
    atyp = reply[3]
    recv_exact(sock, {1: 4, 4: 16}[atyp] + 2)
    return sock, reply[1]


class H11Client:
    """An HTTP/1.1 client over one proxy connection, parsing with h11."""

    def __init__(self, port: int) -> None:
        self.sock = connect(port)
        self.h = h11.Connection(h11.CLIENT)

    def request(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]] = (),
        body: Sequence[bytes] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        hdrs = [(k.encode(), v.encode()) for k, v in headers]
        if not any(k.lower() == b"host" for k, _ in hdrs):
            hdrs.insert(0, (b"host", url.split("/")[2].encode()))
        self.sock.sendall(self.h.send(h11.Request(method=method, target=url, headers=hdrs)) or b"")
        for chunk in body or ():
            self.sock.sendall(self.h.send(h11.Data(data=chunk)) or b"")
        self.sock.sendall(self.h.send(h11.EndOfMessage()) or b"")
        status = 0
        response_headers: dict[str, str] = {}
        out = bytearray()
        while True:
            event = self.h.next_event()
            if event is h11.NEED_DATA:
                self.h.receive_data(self.sock.recv(262144))
            elif isinstance(event, h11.Response):
                status = event.status_code
                response_headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                out += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.InformationalResponse):
                continue
            else:
                raise EOFError(repr(event))
        if self.h.our_state is h11.DONE and self.h.their_state is h11.DONE:
            self.h.start_next_cycle()
        return status, response_headers, bytes(out)

    def close(self) -> None:
        self.sock.close()


def proxy_task_count(thread: ProxyThread) -> int:
    """Tasks alive on the proxy loop, not counting the one asking."""

    async def count() -> int:
        return len(asyncio.all_tasks()) - 1

    return thread._call(count(), 10.0)


def open_fds() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))
