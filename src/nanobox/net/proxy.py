"""The egress proxy: HTTP (CONNECT and absolute-form) and SOCKS5 on asyncio.

The sandbox binds the listeners inside its network namespace and hands the
listening sockets over; :meth:`Proxy.serve` accepts on them (never re-binding)
and dials out from the supervisor's namespace after the allowlist checks of
:class:`~nanobox.net.rules.Ruleset`:

1. the requested host is canonicalised and checked by name (deny rules first);
2. names are resolved here, every resolved address is checked (special ranges
   need an explicit IP/CIDR allow), and the proxy connects to exactly the
   addresses it checked, so a second DNS answer can never be used;
3. for tunnels to port 443 (HTTP CONNECT and SOCKS5) the TLS ClientHello's SNI
   must name the same host (``check_sni``), without decrypting anything.

Raw tunnels and plain-HTTP bodies of a known length are relayed with
``os.splice`` through a pipe per direction (``use_splice``, the default on
Linux: the bytes never enter the proxy's memory), or by copying, with at
most one buffer in flight per direction (a buffer that grows to 1 MiB while
a transfer fills it); either way a slow reader stops the proxy from reading
the other side (no unbounded buffering). When one side finishes sending,
the proxy shuts down the write half of the other and keeps relaying the
opposite direction until it ends too, so nothing is truncated; on a reset
or an error the other side is reset as well, so failures are never silent.

Plain HTTP is parsed and framed by h11 (imported on the first HTTP
connection). A client connection that stays open keeps its upstream
connection for its next request to the same destination (checked again),
when that request may be sent twice (``replayable``): the upstream may have
closed the connection meanwhile, and then the request goes on a new one.
Upstream connections are never shared between client connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from nanobox.net import socks5, tls
from nanobox.net.events import ConnectionEvent, NetStats, Protocol
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
    raw_body_length,
    replayable,
    upstream_side,
)
from nanobox.net.rules import (
    Decision,
    Host,
    IPAddress,
    Ruleset,
    canonical_host,
    format_host,
    unmap,
)

if TYPE_CHECKING:
    import h11

__all__ = ["Proxy", "ProxyThread", "Resolver"]

_log = logging.getLogger("nanobox.net")

Resolver = Callable[[str], Awaitable[Sequence["IPAddress | str"]]]
EventCallback = Callable[[ConnectionEvent], None]
_T = TypeVar("_T")

_RECV = 65536
_RAW_BUF = 1 << 20  # large plain-HTTP bodies are copied in chunks of this size
_BUFFER = 1 << 20  # a copied tunnel's buffer grows up to this, per direction
_BUFFER_START = 64 * 1024
_PIPE_SIZE = 1024 * 1024
_MAX_ADDRESSES = 32
_CLOSE_DRAIN_SECONDS = 2.0
_CLOSE_DRAIN_BYTES = 1024 * 1024
_TLS_ALERT_ACCESS_DENIED = b"\x15\x03\x03\x00\x02\x02\x31"
_F_SETPIPE_SZ = 1031
_F_GETPIPE_SZ = 1032
_USE_SPLICE_DEFAULT = True  # faster than copying on loopback (docs/BENCHMARKS.md)

# failure kind -> (HTTP status, SOCKS5 reply)
_FAILURES: dict[str, tuple[int, int]] = {
    "denied": (403, socks5.Reply.NOT_ALLOWED),
    "timeout": (504, socks5.Reply.TTL_EXPIRED),
    "refused": (502, socks5.Reply.CONNECTION_REFUSED),
    "host-unreachable": (502, socks5.Reply.HOST_UNREACHABLE),
    "network-unreachable": (502, socks5.Reply.NETWORK_UNREACHABLE),
    "error": (502, socks5.Reply.GENERAL_FAILURE),
}
_ERRNO_KIND = {
    errno.ECONNREFUSED: "refused",
    errno.EHOSTUNREACH: "host-unreachable",
    errno.EHOSTDOWN: "host-unreachable",
    errno.ENETUNREACH: "network-unreachable",
    errno.ENETDOWN: "network-unreachable",
    errno.ETIMEDOUT: "timeout",
}


async def _default_resolver(host: str) -> Sequence[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def static_resolver(hosts: Mapping[str, Sequence[str]]) -> Resolver:
    """A resolver that answers names in ``hosts`` itself (like ``curl
    --resolve`` or an ``/etc/hosts`` entry for this proxy only) and asks the
    system for the rest. The answers still go through every check."""
    table: dict[str, list[str]] = {}
    for name, addrs in hosts.items():
        key = canonical_host(name)  # (as the names asked for are: IDNA, lower case)
        table[str(key)] = list(addrs)

    async def resolve(host: str) -> Sequence[str]:
        try:
            found = table.get(str(canonical_host(host)))
        except ValueError:
            found = None
        if found is not None:
            return found
        return await _default_resolver(host)

    return resolve


_HEAD_TIMEOUT = 60.0  # for a request head (each, on a kept-alive connection) or a SOCKS handshake


def _fd_budget() -> int:
    """How many descriptors the proxies of this process take at once, all
    runs together: half of its soft limit, the other half left to the code
    they share the process with. Each connection takes two (the client's
    socket, the upstream's); a spliced relay two more per pipe, where they
    fit (else it copies)."""
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(32, soft // 2)


class _Share:
    """The descriptors of every proxy in this process (a Sandbox has one
    each, on a thread of its own), against ``_fd_budget``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open = 0
        self.budget: int | None = None

    def take(self, n: int) -> bool:
        with self.lock:
            if self.budget is None:
                self.budget = _fd_budget()
            if self.open + n > self.budget:
                return False
            self.open += n
            return True

    def give_back(self, n: int) -> None:
        with self.lock:
            self.open -= n


_SHARE = _Share()


def _shown_host(flow: _Flow) -> str:
    """The destination as results show it: IPv6 in brackets, and a host that
    was no host cut to 255 characters."""
    if flow.canon is not None:
        return format_host(flow.canon)
    return flow.host if len(flow.host) <= 255 else flow.host[:255] + "..."


def _uncancel() -> None:
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):
        task.uncancel()


def _nodelay(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _reset_on_close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Closed(Exception):
    """The client went away."""


class _Stale(Exception):
    """A kept upstream connection ended before any of the response came."""


class _Watchdog:
    """Cancels a task after ``timeout`` seconds without I/O (``touch``)."""

    __slots__ = ("expired", "handle", "head_by", "last", "loop", "paused", "task", "timeout")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.last = loop.time()
        self.task: asyncio.Task[Any] | None = None
        self.handle: asyncio.TimerHandle | None = None
        self.expired = False
        self.paused = False
        # While a request head or a SOCKS handshake is awaited: when it must
        # have come, however the bytes trickle in (a client sending one byte
        # a second kept its connection, and its slot, for ever).
        self.head_by: float | None = None

    def start(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.handle = self.loop.call_later(self.timeout, self._fire)

    def touch(self) -> None:
        self.last = self.loop.time()

    def await_head(self, within: float | None) -> None:
        """Start (``within`` seconds) or end (None) the wait for a head."""
        if within is None:
            self.head_by = None
            return
        self.head_by = head_by = self.loop.time() + within
        if self.handle is not None and self.handle.when() > head_by:
            self.handle.cancel()
            self.handle = self.loop.call_at(head_by, self._fire)

    def _fire(self) -> None:
        now = self.loop.time()
        remaining = self.last + self.timeout - now
        if self.head_by is not None and not self.paused:
            if now >= self.head_by:
                remaining = 0.0
            else:
                remaining = min(remaining, self.head_by - now)
        if self.paused or remaining > 0:
            delay = self.timeout if self.paused else remaining
            self.handle = self.loop.call_later(delay, self._fire)
            return
        self.handle = None
        self.expired = True
        if self.task is not None:
            self.task.cancel()

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


class _Run:
    __slots__ = (
        "closed",
        "listeners",
        "main",
        "run_id",
        "stats",
        "stopped",
        "tasks",
    )

    def __init__(
        self, run_id: str, listeners: list[tuple[socket.socket, Literal["http", "socks5"]]]
    ) -> None:
        self.run_id = run_id
        self.listeners = listeners
        self.stats = NetStats()
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = False
        self.stopped = asyncio.Event()
        self.main: asyncio.Task[None] | None = None


class _Flow:
    """One destination request (one event)."""

    __slots__ = (
        "address",
        "addresses",
        "allowed",
        "bytes_down",
        "bytes_up",
        "canon",
        "error",
        "failure",
        "host",
        "method",
        "port",
        "protocol",
        "reason",
        "response_started",
        "rule",
        "run",
        "started",
        "status",
    )

    def __init__(
        self, run: _Run, protocol: Protocol, host: str, port: int, method: str | None
    ) -> None:
        self.run = run
        self.protocol: Protocol = protocol
        self.host = host
        self.port = port
        self.method = method
        self.canon: Host | None = None
        self.address: str | None = None
        self.addresses: list[IPAddress] = []  # those checked, to connect to
        self.allowed: bool | None = None
        self.rule: str | None = None
        self.reason = ""
        self.error: str | None = None
        self.failure: str | None = None
        self.status: int | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.started = time.time()
        self.response_started = False

    def count_up(self, n: int) -> None:
        self.bytes_up += n
        if not self.run.closed:
            self.run.stats.bytes_up += n

    def count_down(self, n: int) -> None:
        self.bytes_down += n
        if not self.run.closed:
            self.run.stats.bytes_down += n

    def fail_status(self, kind: str) -> int:
        http_status, reply = _FAILURES[kind]
        return reply if self.protocol == "socks5" else http_status


class _Kept:
    """An upstream connection left reusable by a plain-HTTP response, kept
    for its client connection's next request (see ``_http_forward``)."""

    __slots__ = ("address", "addresses", "canon", "h", "port", "rule", "sock")

    def __init__(self, sock: socket.socket, h: h11.Connection, flow: _Flow) -> None:
        self.sock = sock
        self.h = h
        self.canon = flow.canon
        self.port = flow.port
        self.address = flow.address
        self.addresses = flow.addresses
        self.rule = flow.rule

    def idle(self) -> bool:
        """Nothing arrived on it since its response: not closed (nor
        reset) by the upstream, which also sent nothing unasked."""
        try:
            self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False


class _Lookup:
    """A name's lookup under way, shared by the requests that wait for it."""

    __slots__ = ("started", "task", "waiters")

    def __init__(self, task: asyncio.Task[list[IPAddress]], started: float) -> None:
        self.task = task
        self.started = started
        self.waiters = 0


class _Conn:
    __slots__ = ("flow", "kind", "run", "sock", "watchdog")

    def __init__(
        self, run: _Run, sock: socket.socket, kind: Literal["http", "socks5"], watchdog: _Watchdog
    ) -> None:
        self.run = run
        self.sock = sock
        self.kind = kind
        self.watchdog = watchdog
        self.flow: _Flow | None = None


# --------------------------------------------------------------------------- relay


def _client_lost(conn: _Conn, flow: _Flow, exc: OSError) -> bool:
    """A client gone mid-body: say so (not the upstream's fault)."""
    flow.error = f"client connection lost: {exc}"
    _reset_on_close(conn.sock)
    return False


_splice_usable: bool | None = None


def _splice_works() -> bool:
    """Can this process splice from a socket into a pipe? (Not where a
    seccomp profile or a user-space kernel refuses it: then copy.) Tried
    once per process, on a socket pair of its own."""
    global _splice_usable
    if _splice_usable is None:
        ok = False
        try:
            a, b = socket.socketpair()
            try:
                pipe = _SplicePipe()
                try:
                    a.send(b"x")
                    ok = pipe.fill(b.fileno(), 1) == 1
                finally:
                    pipe.close()
            finally:
                a.close()
                b.close()
        except OSError as exc:
            _log.debug("splice unusable here (%s): the proxy copies", exc)
        _splice_usable = ok
    return _splice_usable


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _wait_fd(loop: asyncio.AbstractEventLoop, fd: int, *, writer: bool) -> None:
    """Until ``fd`` is writable (``writer``) or readable."""
    ready = loop.create_future()
    if writer:
        loop.add_writer(fd, _set_once, ready)
    else:
        loop.add_reader(fd, _set_once, ready)
    try:
        await ready
    finally:
        if writer:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


class _SplicePipe:
    """A non-blocking pipe for ``os.splice``, enlarged to ``_PIPE_SIZE``
    where the limits allow. Raises ``OSError`` when it cannot be made."""

    __slots__ = ("cap", "r", "w")

    def __init__(self) -> None:
        self.r = self.w = -1
        if not _SHARE.take(2):  # (then the caller copies instead)
            raise OSError(errno.EMFILE, "the proxies' share of this process's descriptors")
        try:
            self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except BaseException:
            _SHARE.give_back(2)
            raise
        import fcntl  # Linux only, like splice

        with contextlib.suppress(OSError):  # (EPERM past the user's pipe quota)
            fcntl.fcntl(self.w, _F_SETPIPE_SZ, _PIPE_SIZE)
        try:
            self.cap: int = fcntl.fcntl(self.w, _F_GETPIPE_SZ)
        except OSError:
            self.cap = 65536

    def fill(self, src: int, size: int) -> int | None:
        """Bytes moved from the socket ``src`` into the pipe (0 at its end),
        or None when it has none now or the pipe has no room."""
        try:
            return os.splice(src, self.w, size, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
        except (BlockingIOError, InterruptedError):
            return None

    def drain(self, dst: int, size: int) -> int | None:
        """Bytes moved from the pipe to the socket ``dst``, or None when
        it has no room now."""
        try:
            return os.splice(self.r, dst, size, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
        except (BlockingIOError, InterruptedError):
            return None

    def close(self) -> None:
        if self.r < 0:
            return
        for fd in (self.r, self.w):
            os.close(fd)
        self.r = self.w = -1
        _SHARE.give_back(2)


class _Pump:
    """One direction of a spliced tunnel, driven by loop reader/writer
    callbacks: ``os.splice`` from the source socket into a pipe and from the
    pipe to the destination, never more than the pipe in flight."""

    __slots__ = (
        "cap",
        "count",
        "done",
        "dst",
        "eof",
        "loop",
        "pending",
        "pipe",
        "pipe_full",
        "reading",
        "relay",
        "src",
        "writing",
    )

    def __init__(
        self,
        relay: _Relay,
        src: socket.socket,
        dst: socket.socket,
        count: Callable[[int], None],
    ) -> None:
        self.relay = relay
        self.loop = relay.loop
        self.src = src
        self.dst = dst
        self.count = count
        self.pending = 0
        self.eof = False
        self.done = False
        self.reading = False
        self.writing = False
        self.pipe_full = False
        # (OSError, e.g. EMFILE, goes to the caller, which copies instead)
        self.pipe = _SplicePipe()
        self.cap = self.pipe.cap

    # -- registration

    def _want(self) -> None:
        if self.done:
            return
        can_read = not self.eof and not self.pipe_full and self.pending < self.cap
        if can_read != self.reading:
            if can_read:
                self.loop.add_reader(self.src.fileno(), self.on_readable)
            else:
                self.loop.remove_reader(self.src.fileno())
            self.reading = can_read

    def _set_writing(self, on: bool) -> None:
        if on != self.writing:
            if on:
                self.loop.add_writer(self.dst.fileno(), self.on_writable)
            else:
                self.loop.remove_writer(self.dst.fileno())
            self.writing = on

    def begin(self) -> None:
        self._want()

    def stop(self) -> None:
        """Unregister callbacks and free the pipe (sockets stay open)."""
        if self.reading:
            self.loop.remove_reader(self.src.fileno())
            self.reading = False
        if self.writing:
            self.loop.remove_writer(self.dst.fileno())
            self.writing = False
        self.done = True
        self.pipe.close()

    # -- data movement

    def on_readable(self) -> None:
        try:
            n = self.pipe.fill(self.src.fileno(), self.cap - self.pending)
        except OSError as exc:
            self.relay.fail(exc)
            return
        if n is None:
            if self.pending > 0:
                self.pipe_full = True  # EAGAIN with data in the pipe: out of pipe slots
                self._flush()
            return
        if n == 0:
            self.eof = True
        else:
            self.pending += n
            self.relay.watchdog.touch()
        self._flush()

    def on_writable(self) -> None:
        self._flush()

    def _flush(self) -> None:
        while self.pending:
            try:
                n = self.pipe.drain(self.dst.fileno(), self.pending)
            except OSError as exc:
                self.relay.fail(exc)
                return
            if n is None:
                self._set_writing(True)
                break
            self.pending -= n
            self.pipe_full = False
            self.count(n)
            self.relay.watchdog.touch()
        else:
            self._set_writing(False)
        if self.eof and not self.pending:
            self._finish()
            return
        self._want()

    def _finish(self) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            self.dst.shutdown(socket.SHUT_WR)
        self.relay.direction_done()


class _Relay:
    """A tunnel relayed with ``os.splice`` (see :class:`_Pump`). Raises
    ``OSError`` when its pipes cannot be made (then :class:`_CopyRelay`)."""

    __slots__ = ("down", "error", "future", "loop", "up", "watchdog")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: socket.socket,
        upstream: socket.socket,
        flow: _Flow,
        watchdog: _Watchdog,
    ) -> None:
        self.loop = loop
        self.watchdog = watchdog
        self.error: OSError | None = None
        self.future: asyncio.Future[None] = loop.create_future()
        self.up = _Pump(self, client, upstream, flow.count_up)
        try:
            self.down = _Pump(self, upstream, client, flow.count_down)
        except BaseException:
            self.up.stop()
            raise

    async def run(self) -> None:
        try:
            self.up.begin()
            self.down.begin()
            await self.future
        finally:
            self.up.stop()
            self.down.stop()

    def direction_done(self) -> None:
        if self.up.done and self.down.done:
            _set_once(self.future)

    def fail(self, exc: OSError) -> None:
        if self.error is None:
            self.error = exc
        self.up.stop()
        self.down.stop()
        _set_once(self.future)


class _CopyRelay:
    """A tunnel relayed by copying: per direction one coroutine that reads
    into a buffer and sends all of it before reading again, so a slow
    reader stops the proxy from reading the other side. The buffer grows
    (up to ``_BUFFER``) while reads fill it and goes back to its first size
    when they do not, so an idle or chatty tunnel holds little and a bulk
    transfer moves large chunks; after each chunk the other tunnels get
    the event loop. Used without ``use_splice``, or when no pipe can be
    made."""

    __slots__ = ("client", "error", "flow", "loop", "upstream", "watchdog")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: socket.socket,
        upstream: socket.socket,
        flow: _Flow,
        watchdog: _Watchdog,
    ) -> None:
        self.loop = loop
        self.client = client
        self.upstream = upstream
        self.flow = flow
        self.watchdog = watchdog
        self.error: Exception | None = None

    async def _pump(
        self, src: socket.socket, dst: socket.socket, count: Callable[[int], None]
    ) -> None:
        size = _BUFFER_START
        buf = memoryview(bytearray(size))
        small = 0  # reads in a row that used under a quarter of a grown buffer
        while True:
            n = await self.loop.sock_recv_into(src, buf)
            if not n:
                break
            self.watchdog.touch()
            await self._send_all(dst, buf[:n], count)
            if n == size and size < _BUFFER:
                size = min(size * 4, _BUFFER)
                buf = memoryview(bytearray(size))
            elif size > _BUFFER_START and n < size // 4:
                small += 1
                if small == 16:  # the burst is over: give the memory back
                    size, small = _BUFFER_START, 0
                    buf = memoryview(bytearray(size))
            else:
                small = 0
            # Both calls above return at once while data and room last:
            # let the loop run the other tunnels, timers and cancellations.
            await asyncio.sleep(0)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)  # the other direction goes on

    async def _send_all(
        self, dst: socket.socket, view: memoryview, count: Callable[[int], None]
    ) -> None:
        """``sock_sendall``, but every part the kernel takes is counted and
        counts as traffic for the idle watchdog, as each drain of the splice
        relay does."""
        while view:
            try:
                n = dst.send(view)
            except (BlockingIOError, InterruptedError):
                n = 0
            if n:
                view = view[n:]
                count(n)
                self.watchdog.touch()
                continue
            await _wait_fd(self.loop, dst.fileno(), writer=True)

    async def run(self) -> None:
        pumps = [
            asyncio.ensure_future(self._pump(self.client, self.upstream, self.flow.count_up)),
            asyncio.ensure_future(self._pump(self.upstream, self.client, self.flow.count_down)),
        ]
        try:
            for done in asyncio.as_completed(pumps):
                try:
                    await done
                except Exception as exc:  # noqa: BLE001 - a reset, or anything else:
                    self.error = exc  # end both directions, and the caller resets both
                    break
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)


# --------------------------------------------------------------------------- proxy


class Proxy:
    """An allowlisting forward proxy (HTTP and SOCKS5) for one sandbox.

    ``resolver`` is an async callable ``host -> [address, ...]`` (default:
    ``loop.getaddrinfo``). ``connect_timeout`` bounds name resolution plus
    connecting; ``idle_timeout`` closes connections without traffic (and gives
    504 to an HTTP client still waiting for a response); ``max_connections``
    caps simultaneous client connections of each run (and all proxies of a
    process together take at most half of its descriptors, copying instead
    of splicing past that: ``_Share``); a
    client has ``_HEAD_TIMEOUT`` for each request head or SOCKS handshake.
    ``on_event`` receives
    a :class:`~nanobox.net.events.ConnectionEvent` per connection, on the
    proxy's event loop thread. With ``check_sni``, tunnels to ``tls_ports``
    must start with a TLS ClientHello whose SNI names the requested host
    (tunnels to IP literals are exempt: clients send no SNI for them).
    ``use_splice`` relays tunnels and plain-HTTP bodies of a known length
    with ``os.splice`` (Linux; the default where it exists) instead of
    copying them.
    All methods must be called on the loop's thread (see :class:`ProxyThread`
    for synchronous callers).
    """

    def __init__(
        self,
        ruleset: Ruleset,
        *,
        resolver: Resolver | None = None,
        connect_timeout: float = 30.0,
        idle_timeout: float = 300.0,
        max_connections: int = 256,
        check_sni: bool = True,
        on_event: EventCallback | None = None,
        tls_ports: Collection[int] = (443,),
        use_splice: bool | None = None,
    ) -> None:
        if connect_timeout <= 0 or idle_timeout <= 0 or max_connections < 1:
            raise ValueError("timeouts must be positive and max_connections at least 1")
        self.ruleset = ruleset
        self.resolver: Resolver = resolver or _default_resolver
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.check_sni = check_sni
        self.tls_ports = frozenset(tls_ports)
        self.on_event = on_event
        self.use_splice = (
            (_USE_SPLICE_DEFAULT if use_splice is None else use_splice)
            and hasattr(os, "splice")
            and _splice_works()
        )
        self._runs: dict[str, _Run] = {}
        self._active = 0
        self._closed = False
        self._lookups: dict[str, _Lookup] = {}  # name -> the lookup a request may join
        self._lookup_tasks: set[asyncio.Task[list[IPAddress]]] = set()  # every one not done

    # -- runs

    @property
    def active_connections(self) -> int:
        return self._active

    def start_run(
        self,
        run_id: str,
        http_listener: socket.socket | None,
        socks_listener: socket.socket | None,
    ) -> asyncio.Task[None]:
        """Start accepting on the given listening sockets (taking ownership of
        them) and return the task that finishes when the run is stopped and
        cleaned up. Must be called with the loop running."""
        if self._closed:
            raise RuntimeError("proxy is closed")
        if run_id in self._runs:
            raise ValueError(f"run {run_id!r} is already being served")
        listeners: list[tuple[socket.socket, Literal["http", "socks5"]]] = []
        if http_listener is not None:
            listeners.append((http_listener, "http"))
        if socks_listener is not None:
            listeners.append((socks_listener, "socks5"))
        for sock, kind in listeners:
            if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_ACCEPTCONN
            ):
                raise ValueError(f"the {kind} socket is not a listening stream socket")
        loop = asyncio.get_running_loop()
        run = _Run(run_id, listeners)
        self._runs[run_id] = run
        for sock, _ in listeners:
            sock.setblocking(False)
        run.main = loop.create_task(self._run_main(run))
        for sock, kind in listeners:
            loop.add_reader(sock.fileno(), self._on_acceptable, run, sock, kind)
        return run.main

    async def serve(
        self,
        http_listener: socket.socket | None,
        socks_listener: socket.socket | None,
        run_id: str,
    ) -> None:
        """Serve the listening sockets until :meth:`stop_run` (or until this
        coroutine is cancelled, which stops the run)."""
        main = self.start_run(run_id, http_listener, socks_listener)
        try:
            await asyncio.shield(main)
        except asyncio.CancelledError:
            if run_id in self._runs:
                self.stop_run(run_id)
            await main
            raise

    def stop_run(self, run_id: str) -> dict[str, Any]:
        """Stop serving ``run_id``: close its listeners and connections and
        return its network summary (see :meth:`NetStats.summary`). Cleanup
        finishes asynchronously; await :meth:`finish_run` to wait for it."""
        run = self._runs[run_id]
        active = len(run.tasks)
        if not run.closed:
            run.closed = True
            self._stop_accepting(run)
            for task in list(run.tasks):
                task.cancel()
            run.stopped.set()
        return run.stats.summary(active=active)

    async def finish_run(self, run_id: str) -> dict[str, Any]:
        """:meth:`stop_run` and wait until its sockets and tasks are gone."""
        run = self._runs[run_id]
        summary = self.stop_run(run_id)
        if run.main is not None:
            await asyncio.shield(run.main)
        return summary

    async def aclose(self) -> None:
        """Stop every run and wait for the cleanup."""
        self._closed = True
        mains = []
        for run_id, run in list(self._runs.items()):
            self.stop_run(run_id)
            if run.main is not None:
                mains.append(run.main)
        if mains:
            await asyncio.gather(*mains, return_exceptions=True)
        for lookup in self._lookups.values():
            lookup.task.cancel()
        # (Those given up by their last waiter were cancelled then, and may
        # still be cleaning up: waited for, not cancelled again.)
        lookups = list(self._lookup_tasks)
        if lookups:
            await asyncio.gather(*lookups, return_exceptions=True)

    async def _run_main(self, run: _Run) -> None:
        try:
            await run.stopped.wait()
        finally:
            run.closed = True
            self._stop_accepting(run)
            while run.tasks:
                for task in list(run.tasks):
                    task.cancel()
                await asyncio.gather(*list(run.tasks), return_exceptions=True)
                # gather() of finished tasks may return without yielding
                # (3.12+); yield so their done callbacks can run.
                await asyncio.sleep(0)
            for sock, _ in run.listeners:
                sock.close()
            self._runs.pop(run.run_id, None)

    def _stop_accepting(self, run: _Run) -> None:
        loop = asyncio.get_running_loop()
        for sock, _ in run.listeners:
            if sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())

    def _on_acceptable(
        self, run: _Run, listener: socket.socket, kind: Literal["http", "socks5"]
    ) -> None:
        # A reader callback rather than an accept task: a cancelled
        # loop.sock_accept() can drop a socket it has already accepted.
        loop = asyncio.get_running_loop()
        for _ in range(64):
            if run.closed:
                return
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    _log.warning("proxy accept failed (%s); pausing for 0.1 s", exc)
                    loop.remove_reader(listener.fileno())
                    loop.call_later(0.1, self._resume_accepting, run, listener, kind)
                    return
                if exc.errno in (errno.EPROTO, errno.ECONNRESET):
                    continue
                _log.error("proxy listener for run %s failed: %s", run.run_id, exc)
                loop.remove_reader(listener.fileno())
                return
            sock.setblocking(False)
            if len(run.tasks) >= self.max_connections:
                self._refuse_busy(run, sock, kind, f"connection limit ({self.max_connections})")
                continue
            if not _SHARE.take(2):
                # The proxies share their caller's process: a run's tunnels
                # took all its descriptors (EMFILE in the caller's own code).
                limit = f"the process's share of descriptors ({_SHARE.budget})"
                self._refuse_busy(run, sock, kind, limit)
                continue
            self._active += 1
            try:
                task = loop.create_task(self._connection(run, sock, kind))
            except BaseException:
                self._active -= 1
                _SHARE.give_back(2)
                sock.close()
                raise
            run.tasks.add(task)
            task.add_done_callback(functools.partial(self._connection_done, run, sock))

    def _resume_accepting(
        self, run: _Run, listener: socket.socket, kind: Literal["http", "socks5"]
    ) -> None:
        if not run.closed and listener.fileno() >= 0:
            asyncio.get_running_loop().add_reader(
                listener.fileno(), self._on_acceptable, run, listener, kind
            )

    def _connection_done(self, run: _Run, sock: socket.socket, task: asyncio.Task[None]) -> None:
        # A done callback rather than a finally: it also runs for a task that
        # was cancelled before it started.
        run.tasks.discard(task)
        sock.close()
        self._active -= 1
        _SHARE.give_back(2)

    def _refuse_busy(
        self, run: _Run, sock: socket.socket, kind: Literal["http", "socks5"], limit: str
    ) -> None:
        reason = f"{limit} reached"
        flow = _Flow(run, "http" if kind == "http" else "socks5", "", 0, None)
        flow.allowed = False
        flow.reason = reason
        if kind == "http":
            flow.status = 503
            with contextlib.suppress(OSError):
                sock.send(error_response(503, reason))
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        sock.close()
        if not run.closed:
            run.stats.note_denied("(connection limit)")
        self._emit(flow)

    async def _connection(
        self, run: _Run, sock: socket.socket, kind: Literal["http", "socks5"]
    ) -> None:
        loop = asyncio.get_running_loop()
        watchdog = _Watchdog(loop, self.idle_timeout)
        conn = _Conn(run, sock, kind, watchdog)
        task = asyncio.current_task()
        assert task is not None
        watchdog.start(task)
        _nodelay(sock)
        try:
            try:
                if kind == "http":
                    await self._serve_http(conn)
                else:
                    await self._serve_socks(conn)
            except asyncio.CancelledError:
                if not watchdog.expired or run.closed:
                    raise
                _uncancel()
                await self._on_idle(conn)
        except (OSError, _Closed) as exc:
            _log.debug("proxy connection ended: %r", exc)
            if conn.flow is not None and conn.flow.error is None:
                conn.flow.error = f"connection lost: {exc}"
        except Exception:  # noqa: BLE001 - logged; one connection must not stop the proxy
            _log.exception("proxy connection handler failed")
            if conn.flow is not None and conn.flow.error is None:
                conn.flow.error = "internal error"
        finally:
            watchdog.stop()
            if conn.flow is not None:
                if conn.flow.error is None and run.closed:
                    conn.flow.error = "run stopped"
                self._emit(conn.flow)
                conn.flow = None
            sock.close()

    async def _on_idle(self, conn: _Conn) -> None:
        flow = conn.flow
        if flow is None:
            return
        flow.error = f"idle timeout ({self.idle_timeout:g} s)"
        if flow.protocol == "http" and flow.response_started:
            _reset_on_close(conn.sock)  # the response is incomplete: say so
        elif flow.protocol == "http" and flow.allowed is not False:
            flow.status = 504
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(
                    asyncio.get_running_loop().sock_sendall(
                        conn.sock,
                        error_response(504, f"no response within {self.idle_timeout:g} s"),
                    ),
                    5.0,
                )

    # -- events and decisions

    def _emit(self, flow: _Flow) -> None:
        event = ConnectionEvent(
            run_id=flow.run.run_id,
            protocol=flow.protocol,
            host=flow.host,
            port=flow.port,
            address=flow.address,
            decision="allowed" if flow.allowed else "denied",
            rule=flow.rule,
            reason=flow.reason,
            bytes_up=flow.bytes_up,
            bytes_down=flow.bytes_down,
            error=flow.error,
            status=None if flow.status is None else int(flow.status),
            method=flow.method,
            started=flow.started,
            duration=time.time() - flow.started,
        )
        _log.debug(
            "%s %s %s:%s %s", event.protocol, event.decision, event.host, event.port, event.reason
        )
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # noqa: BLE001 - a subscriber must not break the proxy
                _log.exception("proxy on_event callback failed")

    def _deny(self, flow: _Flow, decision: Decision | None, reason: str | None = None) -> None:
        flow.allowed = False
        flow.failure = "denied"
        if decision is not None:
            flow.rule = decision.rule
            flow.reason = decision.reason
        if reason is not None:
            flow.reason = reason
        flow.status = flow.fail_status("denied")
        if not flow.run.closed:
            where = f"{_shown_host(flow)}:{flow.port}" if flow.port else "(invalid request)"
            flow.run.stats.note_denied(where)

    def _upstream_failed(self, flow: _Flow, kind: str, message: str) -> None:
        flow.failure = kind
        flow.error = message
        flow.status = flow.fail_status(kind)
        if not flow.run.closed:
            flow.run.stats.failed += 1

    def _allow(self, flow: _Flow) -> None:
        if flow.allowed:
            return  # (counted once: a request sent again on a new connection)
        flow.allowed = True
        if not flow.run.closed:
            flow.run.stats.allowed += 1

    async def _resolve(self, name: str) -> list[IPAddress]:
        """``name``'s addresses. A request for a name already being looked
        up waits for that lookup, unless it has taken ``connect_timeout``
        already: a client that opens many connections at once (npm, uv) asks
        for one name many times, and the system's resolver answers a few at
        a time (the event loop's executor threads, 6 on 2 cores), so the
        lookups of one slow name held every other lookup of the proxy."""
        loop = asyncio.get_running_loop()
        lookup = self._lookups.get(name)
        if lookup is None or loop.time() - lookup.started >= self.connect_timeout:
            lookup = _Lookup(loop.create_task(self._lookup(name)), loop.time())
            self._lookups[name] = lookup
            self._lookup_tasks.add(lookup.task)
            lookup.task.add_done_callback(functools.partial(self._looked_up, name, lookup))
        lookup.waiters += 1
        try:
            # (shield: a waiter that gives up does not cancel the others' lookup)
            return list(await asyncio.shield(lookup.task))
        finally:
            lookup.waiters -= 1
            if not lookup.waiters and not lookup.task.done():
                # The last waiter gave up (timed out, or its run stopped):
                # the lookup goes too, and no later request joins it.
                if self._lookups.get(name) is lookup:
                    del self._lookups[name]
                lookup.task.cancel()

    def _looked_up(self, name: str, lookup: _Lookup, task: asyncio.Task[list[IPAddress]]) -> None:
        self._lookup_tasks.discard(task)
        if self._lookups.get(name) is lookup:
            del self._lookups[name]
        if not task.cancelled():
            task.exception()  # (retrieved: every waiter may have gone)

    async def _lookup(self, name: str) -> list[IPAddress]:
        """The resolver's answer for ``name`` as addresses. Its failures are
        lookup failures (``gaierror``), any ``OSError`` included, which
        would otherwise be taken for a connection's; an answer that is not
        a list of addresses raises ``ValueError`` (a bad resolver answer)."""
        try:
            answers = await self.resolver(name)
        except (socket.gaierror, asyncio.TimeoutError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise socket.gaierror(socket.EAI_FAIL, f"resolver failed: {exc!r}") from exc
        try:
            items = iter(answers)
        except TypeError:
            raise ValueError(f"not a list of addresses: {answers!r:.100}") from None
        out: list[IPAddress] = []
        for item in items:
            if isinstance(item, str):
                addr = ipaddress.ip_address(item)
            elif isinstance(item, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
                addr = item
            else:
                raise ValueError(f"not an address: {item!r:.100}")
            if addr not in out:
                out.append(addr)
            if len(out) >= _MAX_ADDRESSES:
                break
        if not out:
            raise socket.gaierror(socket.EAI_NONAME, "no addresses")
        return out

    async def _open(
        self, conn: _Conn, flow: _Flow, raw_host: Host, again: bool = False
    ) -> socket.socket | None:
        """Check ``flow``'s destination and connect. ``None`` when refused or
        failed (the flow then says why and what to answer). ``again``: connect
        to the addresses ``flow`` was allowed to (a request sent again: not
        resolved a second time, whose answer could differ)."""
        canon: Host | None = flow.canon
        if not again:
            try:
                canon = canonical_host(raw_host) if isinstance(raw_host, str) else unmap(raw_host)
            except ValueError as exc:
                flow.host = _shown_host(flow)
                self._deny(flow, None, f"invalid host: {str(exc)[:300]}")
                return None
            flow.canon = canon
            flow.host = str(canon)
            decision = self.ruleset.decide_name(canon, flow.port)
            if not decision.allowed:
                self._deny(flow, decision)
                return None
            flow.rule = decision.rule
            flow.reason = decision.reason
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        conn.watchdog.paused = True
        try:
            if not again:
                checked = await self._checked_addresses(flow, canon)
                if checked is None:
                    return None
                flow.addresses = checked
            addresses = flow.addresses
            last: OSError | None = None
            for addr in addresses:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
                upstream = socket.socket(family, socket.SOCK_STREAM)
                try:
                    upstream.setblocking(False)
                    flow.address = str(addr)
                    await asyncio.wait_for(
                        loop.sock_connect(upstream, (str(addr), flow.port)), remaining
                    )
                except OSError as exc:
                    upstream.close()
                    last = exc
                    continue
                except BaseException:
                    upstream.close()
                    raise
                _nodelay(upstream)
                if conn.run.closed:
                    upstream.close()
                    raise asyncio.CancelledError
                return upstream
            assert last is not None
            raise last
        except asyncio.TimeoutError:
            if flow.allowed is None:
                self._allow(flow)
            self._upstream_failed(
                flow, "timeout", f"timed out after {self.connect_timeout:g} s resolving/connecting"
            )
        except socket.gaierror as exc:
            self._allow(flow)
            self._upstream_failed(flow, "host-unreachable", f"cannot resolve {canon}: {exc}")
        except OSError as exc:
            kind = _ERRNO_KIND.get(exc.errno or 0, "error")
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            where = f"{format_host(ipaddress.ip_address(flow.address or '0.0.0.0'))}:{flow.port}"
            self._upstream_failed(flow, kind, f"cannot connect to {where}: {why}")
        except ValueError as exc:  # the resolver returned something that is not an address
            self._allow(flow)
            self._upstream_failed(flow, "error", f"bad resolver answer: {exc}")
        finally:
            conn.watchdog.paused = False
            conn.watchdog.touch()
        return None

    async def _checked_addresses(self, flow: _Flow, canon: Host | None) -> list[IPAddress] | None:
        """``canon``'s addresses, each allowed (else None: the flow is denied)."""
        if isinstance(canon, str):
            addresses = await asyncio.wait_for(self._resolve(canon), self.connect_timeout)
        else:
            assert canon is not None
            addresses = [canon]
        for addr in addresses:
            verdict = self.ruleset.decide_address(addr, flow.port, isinstance(canon, str))
            if not verdict.allowed:
                flow.address = str(addr)
                self._deny(flow, verdict)
                return None
            if verdict.rule is not None and verdict.rule != flow.rule:
                flow.rule = f"{flow.rule} + {verdict.rule}"
        self._allow(flow)
        return addresses

    # -- shared I/O helpers

    async def _recv(self, conn: _Conn, size: int = _RECV) -> bytes:
        data = await asyncio.get_running_loop().sock_recv(conn.sock, size)
        conn.watchdog.touch()
        return data

    async def _send(self, conn: _Conn, sock: socket.socket, data: bytes | memoryview) -> None:
        await asyncio.get_running_loop().sock_sendall(sock, data)
        conn.watchdog.touch()

    async def _graceful_close(self, conn: _Conn) -> None:
        """Half-close and discard what the client still sends, briefly, so an
        error response is not destroyed by a reset."""
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_WR)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _CLOSE_DRAIN_SECONDS
        drained = 0
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            while drained < _CLOSE_DRAIN_BYTES:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                data = await asyncio.wait_for(loop.sock_recv(conn.sock, _RECV), remaining)
                if not data:
                    break
                drained += len(data)

    async def _tunnel(
        self, conn: _Conn, flow: _Flow, upstream: socket.socket, early: bytes
    ) -> None:
        try:
            if self.check_sni and flow.port in self.tls_ports and isinstance(flow.canon, str):
                checked = await self._check_sni(conn, flow, early)
                if checked is None:
                    return
                early = checked
            if early:
                await self._send(conn, upstream, early)
                flow.count_up(len(early))
            loop = asyncio.get_running_loop()
            relay: _Relay | _CopyRelay | None = None
            if self.use_splice:
                try:
                    relay = _Relay(loop, conn.sock, upstream, flow, conn.watchdog)
                except OSError as exc:  # e.g. EMFILE: copy instead
                    _log.debug("no pipe for splice (%s); copying instead", exc)
            if relay is None:
                relay = _CopyRelay(loop, conn.sock, upstream, flow, conn.watchdog)
            await relay.run()
            if relay.error is not None:
                flow.error = f"connection reset: {relay.error}"
                _reset_on_close(conn.sock)
                _reset_on_close(upstream)
        finally:
            upstream.close()

    async def _check_sni(self, conn: _Conn, flow: _Flow, early: bytes) -> bytes | None:
        buf = bytearray(early)
        while True:
            try:
                sni = tls.extract_sni(buf)
            except tls.TLSError as exc:
                reason = f"port 443 tunnel without a valid TLS ClientHello: {exc}"
                break
            if sni is not tls.NEED_MORE:
                if sni is None:
                    reason = f"TLS ClientHello without SNI for {flow.host}"
                    break
                try:
                    named = canonical_host(sni)
                except ValueError:
                    named = None
                if named == flow.canon:
                    return bytes(buf)
                reason = f"TLS SNI {sni!r} does not match the requested host {flow.host!r}"
                break
            data = await self._recv(conn, 16384)
            if not data:
                return None
            buf += data
        if flow.allowed and not flow.run.closed:
            flow.run.stats.allowed -= 1
        self._deny(flow, None, reason)
        with contextlib.suppress(OSError):
            conn.sock.send(_TLS_ALERT_ACCESS_DENIED)
        return None

    # -- SOCKS5

    async def _serve_socks(self, conn: _Conn) -> None:
        hs = socks5.Socks5Server()
        conn.watchdog.await_head(_HEAD_TIMEOUT)
        try:
            while True:
                event = hs.next_event()
                if event is socks5.NEED_DATA:
                    data = await self._recv(conn, 4096)
                    if not data:
                        return
                    hs.receive_data(data)
                elif isinstance(event, socks5.Greeting):
                    await self._send(conn, conn.sock, hs.select_method())
                    if hs.state == "closed":
                        return
                else:
                    request = event
                    conn.watchdog.await_head(None)
                    break
        except socks5.Socks5Error as exc:
            if exc.reply is not None:
                with contextlib.suppress(OSError):
                    await self._send(conn, conn.sock, socks5.build_reply(exc.reply))
                flow = _Flow(conn.run, "socks5", "", 0, None)
                self._deny(flow, None, f"SOCKS5 protocol error: {exc}")
                flow.status = exc.reply
                conn.flow = flow
            return
        host = request.host
        flow = _Flow(
            conn.run, "socks5", host if isinstance(host, str) else str(host), request.port, None
        )
        conn.flow = flow
        if request.command != socks5.Command.CONNECT:
            name = socks5.Command(request.command).name
            self._deny(flow, None, f"SOCKS5 {name} is not supported (CONNECT only)")
            flow.status = socks5.Reply.COMMAND_NOT_SUPPORTED
            await self._send(conn, conn.sock, hs.reply(socks5.Reply.COMMAND_NOT_SUPPORTED))
            return
        upstream = await self._open(conn, flow, host)
        if upstream is None:
            assert flow.status is not None
            await self._send(conn, conn.sock, hs.reply(flow.status))
            return
        try:
            flow.status = socks5.Reply.SUCCEEDED
            await self._send(conn, conn.sock, hs.reply(socks5.Reply.SUCCEEDED))
        except BaseException:
            upstream.close()
            raise
        await self._tunnel(conn, flow, upstream, hs.trailing_data)

    # -- HTTP

    async def _h11_next(self, conn: _Conn, h: h11.Connection) -> Any:
        import h11

        while True:
            event = h.next_event()
            if event is not h11.NEED_DATA:
                return event
            h.receive_data(await self._recv(conn))

    async def _serve_http(self, conn: _Conn) -> None:
        import h11

        h = client_side()
        kept: _Kept | None = None  # the previous request's upstream connection
        try:
            while True:
                conn.watchdog.await_head(_HEAD_TIMEOUT)
                try:
                    event = await self._h11_next(conn, h)
                except h11.RemoteProtocolError as exc:
                    if h.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        await self._send(
                            conn,
                            conn.sock,
                            error_response(exc.error_status_hint, f"bad request: {exc}"),
                        )
                        await self._graceful_close(conn)
                    return
                if not isinstance(event, h11.Request):
                    return  # ConnectionClosed (or a client that broke the protocol)
                conn.watchdog.await_head(None)
                method = event.method.decode("ascii")
                target_text = event.target.decode("ascii", "replace")
                try:
                    target = parse_target(method, target_text)
                    if target.kind == "connect" and any(
                        name in (b"content-length", b"transfer-encoding")
                        for name, _ in event.headers
                    ):
                        raise HTTPRequestError(400, "CONNECT with a request body")
                except HTTPRequestError as exc:
                    flow = _Flow(conn.run, "http", target_text[:256], 0, method)
                    self._deny(flow, None, f"bad request: {exc.message}")
                    flow.status = exc.status
                    conn.flow = flow
                    await self._send(conn, conn.sock, error_response(exc.status, exc.message))
                    await self._graceful_close(conn)
                    return
                if target.kind == "connect":
                    if kept is not None:
                        kept.sock.close()
                        kept = None
                    await self._http_connect(conn, h, target)
                    return
                keep_alive, kept = await self._http_forward(conn, h, event, target, kept)
                if not keep_alive:
                    await self._graceful_close(conn)
                    return
                h.start_next_cycle()
        finally:
            if kept is not None:
                kept.sock.close()

    async def _refuse_http(self, conn: _Conn, flow: _Flow, what: str) -> None:
        assert flow.status is not None
        where = f"{format_host(flow.canon if flow.canon is not None else flow.host)}:{flow.port}"
        if flow.failure == "denied":
            message = f"{what} {where} denied: {flow.reason}"
        else:
            message = f"{what} {where} failed: {flow.error}"
        await self._send(conn, conn.sock, error_response(flow.status, message))

    async def _http_connect(self, conn: _Conn, h: h11.Connection, target: Target) -> None:
        flow = _Flow(conn.run, "connect", target.host, target.port, "CONNECT")
        conn.flow = flow
        early = h.trailing_data[0]
        upstream = await self._open(conn, flow, target.host)
        if upstream is None:
            await self._refuse_http(conn, flow, "CONNECT")
            await self._graceful_close(conn)
            return
        try:
            await self._send(conn, conn.sock, CONNECT_ESTABLISHED)
            flow.status = 200
            flow.response_started = True
        except BaseException:
            upstream.close()
            raise
        await self._tunnel(conn, flow, upstream, early)

    async def _http_forward(
        self,
        conn: _Conn,
        h: h11.Connection,
        request: h11.Request,
        target: Target,
        kept: _Kept | None,
    ) -> tuple[bool, _Kept | None]:
        """Forward one request: whether the client connection can be reused,
        and the upstream connection to keep for its next request, if any.
        ``kept``, the previous request's, is used (or closed) here."""
        import h11

        method = request.method.decode("ascii")
        flow = _Flow(conn.run, "http", target.host, target.port, method)
        conn.flow = flow
        upstream: socket.socket | None = None
        up: h11.Connection | None = None
        body_read = not has_body(request.headers)
        if body_read:
            # (h11 has the end of a request without a body at once.)
            end = await self._h11_next(conn, h)
            if not isinstance(end, h11.EndOfMessage):
                raise _Closed("the client broke the protocol during the request")
        if kept is not None:
            if self._reuse(conn, flow, kept, request):
                upstream, up = kept.sock, kept.h
            else:
                kept.sock.close()
        sent_again = False
        while True:
            reused = upstream is not None
            if upstream is None:
                upstream = await self._open(conn, flow, target.host, again=sent_again)
                if upstream is None:
                    await self._refuse_http(conn, flow, method)
                    conn.flow = None
                    self._emit(flow)
                    return False, None
                up = upstream_side()
            assert up is not None
            try:
                keep_alive, reusable = await self._exchange(
                    conn, h, request, target, flow, upstream, up, reused, body_read
                )
            except _Stale:
                # Closed by the upstream while it was kept: the same request
                # (without a body: see ``replayable``) on a new connection to
                # the addresses it was allowed to.
                upstream.close()
                upstream = None
                sent_again = True
                continue
            except BaseException:
                upstream.close()
                raise
            break
        if reusable:
            kept = _Kept(upstream, up, flow)
        else:
            upstream.close()
            kept = None
        # On an exception the flow stays in conn.flow: _connection reports it
        # (after answering 504 if it was the idle timeout).
        conn.flow = None
        self._emit(flow)
        return keep_alive, kept

    def _reuse(self, conn: _Conn, flow: _Flow, kept: _Kept, request: h11.Request) -> bool:
        """Whether ``request`` goes on ``kept``: one that may be sent again
        (if the upstream closed ``kept`` meanwhile), to the same host and
        port, still allowed by name (its address was checked when ``kept``
        was opened), on a connection with nothing waiting on it."""
        if conn.run.closed or not replayable(request.method, request.headers):
            return False
        try:
            raw = flow.host
            canon = canonical_host(raw) if isinstance(raw, str) else unmap(raw)
        except ValueError:
            return False
        if canon != kept.canon or flow.port != kept.port or not kept.idle():
            return False
        decision = self.ruleset.decide_name(canon, flow.port)
        if not decision.allowed:
            return False
        flow.canon = canon
        flow.host = str(canon)
        flow.reason = decision.reason
        flow.rule = kept.rule
        flow.address = kept.address
        flow.addresses = kept.addresses
        self._allow(flow)
        return True

    async def _exchange(
        self,
        conn: _Conn,
        h: h11.Connection,
        request: h11.Request,
        target: Target,
        flow: _Flow,
        upstream: socket.socket,
        up: h11.Connection,
        reused: bool,
        body_read: bool,
    ) -> tuple[bool, bool]:
        """Send ``request`` on ``upstream`` and relay the response: whether
        the client connection can be reused, and whether ``upstream`` can
        (then ready for the next request). Raises ``_Stale`` where a
        ``reused`` connection ended before any of the response came.
        ``body_read``: the request has no body, and its end was read."""
        import h11

        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task[Any]] = []
        try:
            head = up.send(
                h11.Request(
                    method=request.method,
                    target=target.path.encode("ascii"),
                    headers=forward_request_headers(
                        request.headers,
                        target.authority,
                        close=not keeps_alive(request.http_version, request.headers),
                    ),
                )
            )
            assert head is not None
            try:
                await self._send(conn, upstream, head)
            except OSError:
                if reused:
                    raise _Stale from None
                raise
            flow.count_up(len(head))
            if body_read:
                up.send(h11.EndOfMessage())  # (nothing to send: no body)
                complete = await self._forward_response(conn, h, up, upstream, flow, reused)
                body_ok = True
            else:
                if h.they_are_waiting_for_100_continue:
                    info = h.send(h11.InformationalResponse(status_code=100, headers=[]))
                    assert info is not None
                    await self._send(conn, conn.sock, info)
                # Both directions at once: the upstream may answer before the
                # request body is complete.
                body_task = loop.create_task(self._forward_body(conn, h, up, upstream, flow))
                response_task = loop.create_task(
                    self._forward_response(conn, h, up, upstream, flow, reused)
                )
                tasks = [body_task, response_task]
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                if not response_task.done():
                    failure = None if body_task.cancelled() else body_task.exception()
                    if failure is not None:  # the client went away or broke the protocol
                        flow.error = f"request not completed: {failure}"
                        raise _Closed(flow.error)
                    await asyncio.wait([response_task])
                complete = response_task.result()
                if complete and not body_task.done():
                    # The response can finish before the body task has even
                    # run (a GET with data already waiting); give the rest
                    # of the request a moment so the client connection can
                    # be reused.
                    await asyncio.wait([body_task], timeout=1.0)
                body_ok = (
                    body_task.done() and not body_task.cancelled() and not body_task.exception()
                )
            keep_alive = (
                complete and body_ok and h.our_state is h11.DONE and h.their_state is h11.DONE
            )
            # (Nothing past the response: bytes no request asked for would be
            # taken for the next request's response.)
            reusable = (
                keep_alive
                and up.our_state is h11.DONE
                and up.their_state is h11.DONE
                and not up.trailing_data[0]
            )
            if reusable:
                up.start_next_cycle()
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        return keep_alive, reusable

    async def _forward_body(
        self,
        conn: _Conn,
        h: h11.Connection,
        up: h11.Connection,
        upstream: socket.socket,
        flow: _Flow,
    ) -> None:
        import h11

        while True:
            try:
                event = await self._h11_next(conn, h)
            except OSError as exc:
                raise _Closed(f"client connection failed: {exc}") from exc
            if isinstance(event, h11.Data):
                out = up.send(event)
            elif isinstance(event, h11.EndOfMessage):
                out = up.send(h11.EndOfMessage())
            else:
                raise _Closed("the client closed the connection during the request")
            if out:
                try:
                    await self._send(conn, upstream, out)
                except OSError:
                    return  # the upstream stopped reading; its response (or EOF) says why
                flow.count_up(len(out))
            if isinstance(event, h11.EndOfMessage):
                return

    async def _forward_response(
        self,
        conn: _Conn,
        h: h11.Connection,
        up: h11.Connection,
        upstream: socket.socket,
        flow: _Flow,
        stale: bool = False,
    ) -> bool:
        """Relay the response; False if it could not be completed. Raises
        ``_Stale`` if ``stale`` (a kept connection) and it ends before any
        of the response came. What the upstream sent at once goes to the
        client at once (one send for a small response's head and body)."""
        import h11

        loop = asyncio.get_running_loop()
        pending: list[bytes] = []

        async def flush() -> None:
            if pending:
                data = b"".join(pending)
                pending.clear()
                await self._send(conn, conn.sock, data)

        while True:
            try:
                event = up.next_event()
            except h11.RemoteProtocolError as exc:
                await flush()
                return await self._bad_gateway(conn, flow, f"bad response from upstream: {exc}")
            if event is h11.NEED_DATA:
                await flush()
                try:
                    data = await loop.sock_recv(upstream, _RECV)
                except OSError as exc:
                    if stale:
                        raise _Stale from None
                    return await self._bad_gateway(conn, flow, f"bad response from upstream: {exc}")
                if stale:
                    if not data:
                        raise _Stale
                    stale = False
                conn.watchdog.touch()
                flow.count_down(len(data))
                up.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse):
                if event.status_code in (100, 101):
                    if event.status_code == 101:
                        await flush()
                        return await self._bad_gateway(conn, flow, "unexpected 101 from upstream")
                    continue
                out = h.send(
                    h11.InformationalResponse(
                        status_code=event.status_code,
                        headers=forward_response_headers(event.headers),
                        reason=event.reason,
                    )
                )
            elif isinstance(event, h11.Response):
                headers = forward_response_headers(event.headers)
                raw = raw_body_length(flow.method or "", event.status_code, event.headers)
                if raw is not None:
                    headers = [(k, v) for k, v in headers if k.lower() != b"connection"]
                    headers.append((b"connection", b"close"))
                out = h.send(
                    h11.Response(
                        status_code=event.status_code, headers=headers, reason=event.reason
                    )
                )
                flow.status = event.status_code
                flow.response_started = True
                if raw is not None:
                    if out:
                        pending.append(out)
                    await flush()
                    return await self._relay_raw(conn, up, upstream, flow, raw)
            elif isinstance(event, h11.Data):
                out = h.send(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                out = h.send(h11.EndOfMessage())
                if out:
                    pending.append(out)
                await flush()
                return True
            else:  # ConnectionClosed before the end of the response
                await flush()
                return await self._bad_gateway(conn, flow, "upstream closed the connection early")
            if out:
                pending.append(out)

    async def _relay_raw(
        self, conn: _Conn, up: h11.Connection, upstream: socket.socket, flow: _Flow, length: int
    ) -> bool:
        """Copy a ``length``-byte body as it comes (no h11 framing, one
        buffer); the response was sent with ``Connection: close``."""
        import h11

        remaining = length
        while remaining:  # what h11 has already read past the head
            event = up.next_event()
            if not isinstance(event, h11.Data):
                break
            data = event.data[:remaining]
            await self._send(conn, conn.sock, data)
            remaining -= len(data)
        if remaining and self.use_splice:
            spliced = await self._splice_raw(conn, upstream, flow, remaining)
            if spliced is not None:
                return spliced
        loop = asyncio.get_running_loop()
        buf = memoryview(bytearray(min(remaining, _RAW_BUF) or 1))
        while remaining:
            try:
                n = await loop.sock_recv_into(upstream, buf[: min(len(buf), remaining)])
            except OSError as exc:
                return await self._bad_gateway(conn, flow, f"bad response from upstream: {exc}")
            if not n:
                return await self._bad_gateway(conn, flow, "upstream closed the connection early")
            conn.watchdog.touch()
            flow.count_down(n)
            try:
                await self._send(conn, conn.sock, buf[:n])
            except OSError as exc:
                return _client_lost(conn, flow, exc)
            remaining -= n
        return True

    async def _splice_raw(
        self, conn: _Conn, upstream: socket.socket, flow: _Flow, remaining: int
    ) -> bool | None:
        """:meth:`_relay_raw`'s loop with ``os.splice`` through a pipe: fill
        the pipe from the upstream, then drain it to the client, never more
        than the pipe in flight. None if no pipe can be made (then the body
        is copied)."""
        try:
            pipe = _SplicePipe()
        except OSError as exc:  # e.g. EMFILE
            _log.debug("no pipe for splice (%s); copying instead", exc)
            return None
        loop = asyncio.get_running_loop()
        src, dst = upstream.fileno(), conn.sock.fileno()
        pending = 0
        ended = False  # the upstream closed before the end of the body
        try:
            while (remaining and not ended) or pending:
                if remaining and not ended and pending < pipe.cap:
                    try:
                        n = pipe.fill(src, min(pipe.cap - pending, remaining))
                    except OSError as exc:
                        return await self._bad_gateway(
                            conn, flow, f"bad response from upstream: {exc}"
                        )
                    if n == 0:
                        ended = True  # deliver what came, then say so
                    elif n is not None:
                        remaining -= n
                        pending += n
                        flow.count_down(n)
                        conn.watchdog.touch()
                        continue  # fill while the upstream has data and the pipe room
                if pending:
                    try:
                        m = pipe.drain(dst, pending)
                    except OSError as exc:
                        return _client_lost(conn, flow, exc)
                    if m is None:
                        await _wait_fd(loop, dst, writer=True)
                    else:
                        pending -= m
                        conn.watchdog.touch()
                    continue
                await _wait_fd(loop, src, writer=False)  # the pipe is empty: wait for data
        finally:
            pipe.close()
        if ended:
            return await self._bad_gateway(conn, flow, "upstream closed the connection early")
        return True

    async def _bad_gateway(self, conn: _Conn, flow: _Flow, message: str) -> bool:
        flow.error = message
        if not flow.response_started:
            flow.status = 502
            await self._send(conn, conn.sock, error_response(502, message))
        else:
            _reset_on_close(conn.sock)  # mid-body: make the truncation visible
        return False


# --------------------------------------------------------------------------- thread wrapper


class ProxyThread:
    """Runs a :class:`Proxy` on its own event loop in a daemon thread, for
    synchronous callers. Every method is thread-safe."""

    def __init__(self, ruleset: Ruleset, **proxy_options: Any) -> None:
        self._ruleset = ruleset
        self._options = proxy_options
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._proxy: Proxy | None = None
        self._lock = threading.Lock()

    @property
    def proxy(self) -> Proxy:
        if self._proxy is None:
            raise RuntimeError("ProxyThread is not started")
        return self._proxy

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            proxy = Proxy(self._ruleset, **self._options)
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def main() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                try:
                    loop.run_forever()
                finally:
                    try:
                        loop.run_until_complete(loop.shutdown_asyncgens())
                        loop.run_until_complete(loop.shutdown_default_executor())
                    finally:
                        loop.close()

            thread = threading.Thread(target=main, name="nanobox-proxy", daemon=True)
            thread.start()
            ready.wait()
            self._proxy, self._loop, self._thread = proxy, loop, thread

    def _call(self, coro: Coroutine[Any, Any, _T], timeout: float | None) -> _T:
        loop = self._loop
        if loop is None:
            coro.close()
            raise RuntimeError("ProxyThread is not started")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    def add_run(
        self,
        run_id: str,
        http_sock: socket.socket | None,
        socks_sock: socket.socket | None,
    ) -> None:
        """Start serving the run's listening sockets (ownership passes to the proxy)."""
        proxy = self.proxy

        async def start() -> None:
            proxy.start_run(run_id, http_sock, socks_sock)

        self._call(start(), 30.0)

    def finish_run(self, run_id: str, timeout: float | None = 30.0) -> dict[str, Any]:
        """Stop the run, wait for its connections to close, return its summary."""
        return self._call(self.proxy.finish_run(run_id), timeout)

    def close(self) -> None:
        with self._lock:
            loop, thread, proxy = self._loop, self._thread, self._proxy
            if loop is None or thread is None or proxy is None:
                return
            try:
                asyncio.run_coroutine_threadsafe(proxy.aclose(), loop).result(30.0)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(30.0)
                self._loop = self._thread = self._proxy = None

    def __enter__(self) -> ProxyThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
