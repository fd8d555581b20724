"""HTTP forward-proxy pieces, sans-I/O.

h11 (imported lazily, only by :func:`client_side` and :func:`upstream_side`)
parses and frames the messages; this module decides what a request means for a
proxy and how headers are rewritten:

* ``CONNECT host:port`` (authority form) opens a tunnel.
* ``GET http://host[:port]/path`` (absolute form, any method but CONNECT) is
  forwarded. Only ``http://`` is accepted: HTTPS goes through CONNECT.
* Origin form (``GET /path``), asterisk form and userinfo (``user@host``) are
  refused with 400.

Forwarding policy: the client connection may be kept alive (h11 decides from
the client's headers), and so may its upstream connection, for the client's
next request to the same host and port (``keeps_alive``), if that request may
be sent twice (``replayable``: the upstream may have closed the connection
meanwhile, and the proxy then sends it on a new one). Every request is
checked against the rules on its own; an upstream connection is never shared
between client connections nor destinations.
Hop-by-hop headers (RFC 9110 section 7.6.1 plus any named in ``Connection``)
and every ``Proxy-*`` header are removed in both directions; ``Expect`` is
answered by the proxy itself; the body framing is re-derived by h11.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    import h11

__all__ = [
    "CONNECT_ESTABLISHED",
    "MAX_HEAD",
    "HTTPRequestError",
    "Target",
    "client_side",
    "error_response",
    "forward_request_headers",
    "forward_response_headers",
    "has_body",
    "keeps_alive",
    "parse_target",
    "replayable",
    "split_authority",
    "upstream_side",
]

MAX_HEAD: Final = 65536

CONNECT_ESTABLISHED: Final = b"HTTP/1.1 200 Connection established\r\n\r\n"

HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

_REASONS: Final = {
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class HTTPRequestError(Exception):
    """A request the proxy refuses before any network access."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Target:
    """What a request asks for. ``host`` is as written (IPv6 without
    brackets); ``authority`` is the ``Host`` header value to send upstream."""

    kind: Literal["connect", "forward"]
    host: str
    port: int
    path: str
    authority: str


def split_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    """Split ``host[:port]`` / ``[v6][:port]``. Raises :class:`HTTPRequestError`."""
    if not authority:
        raise HTTPRequestError(400, "empty host")
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise HTTPRequestError(400, "unterminated IPv6 literal in host")
        host, rest = authority[1:close], authority[close + 1 :]
        if rest and not rest.startswith(":"):
            raise HTTPRequestError(400, "junk after IPv6 literal in host")
        port_text = rest[1:] if rest else None
        if not host:
            raise HTTPRequestError(400, "empty IPv6 literal")
    else:
        if authority.count(":") > 1:
            raise HTTPRequestError(400, "IPv6 literals must be in brackets")
        host, sep, port_part = authority.partition(":")
        port_text = port_part if sep else None
        if not host:
            raise HTTPRequestError(400, "empty host")
    if port_text is None or port_text == "":
        if default_port is None:
            raise HTTPRequestError(400, "a port is required")
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        raise HTTPRequestError(400, f"bad port {port_text!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise HTTPRequestError(400, f"port {port} out of range")
    return host, port


def parse_target(method: str, target: str) -> Target:
    """Interpret a request line for a forward proxy."""
    if method == "CONNECT":
        if "/" in target or "@" in target or "?" in target or "#" in target:
            raise HTTPRequestError(400, "CONNECT needs an authority-form target (host:port)")
        host, port = split_authority(target, None)
        return Target("connect", host, port, "", target)
    lowered = target[:8].lower()
    if lowered.startswith("https://"):
        raise HTTPRequestError(400, "https:// URLs must be requested with CONNECT")
    if not lowered.startswith("http://"):
        if target.startswith("/") or target == "*":
            raise HTTPRequestError(
                400, "this is a proxy: requests need an absolute http:// URL (or CONNECT)"
            )
        raise HTTPRequestError(400, "unsupported request target")
    rest = target[7:]
    end = len(rest)
    for ch in "/?#":
        i = rest.find(ch)
        if i >= 0:
            end = min(end, i)
    authority, path = rest[:end], rest[end:]
    if "#" in path:
        raise HTTPRequestError(400, "fragment in request target")
    if "@" in authority:
        raise HTTPRequestError(400, "credentials in the URL are not allowed")
    host, port = split_authority(authority, 80)
    if not path:
        path = "/"
    elif path.startswith("?"):
        path = "/" + path
    if authority.endswith(":"):
        authority = authority[:-1]
    if authority.endswith(":80") and port == 80:
        authority = authority[:-3]
    return Target("forward", host, port, path, authority)


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def _strip(
    headers: Iterable[tuple[bytes, bytes]], extra: frozenset[bytes]
) -> list[tuple[bytes, bytes]]:
    headers = list(headers)
    drop = HOP_BY_HOP | extra | _connection_tokens(headers)
    return [
        (name, value)
        for name, value in headers
        if name.lower() not in drop and not name.lower().startswith(b"proxy-")
    ]


def forward_request_headers(
    headers: Iterable[tuple[bytes, bytes]], authority: str, *, close: bool = True
) -> list[tuple[bytes, bytes]]:
    """Headers to send upstream: hop-by-hop, ``Proxy-*``, ``Host`` and
    ``Expect`` removed; ``Host`` set to ``authority``; body framing kept
    (chunked if the client sent chunked, else its Content-Length);
    ``Connection: close`` added unless ``close`` is false (the proxy then
    keeps the upstream connection for the client's next request)."""
    headers = list(headers)
    chunked = any(name.lower() == b"transfer-encoding" for name, _ in headers)
    out = [(b"Host", authority.encode("ascii"))]
    for name, value in _strip(headers, frozenset({b"host", b"expect"})):
        if chunked and name.lower() == b"content-length":
            continue
        out.append((name, value))
    if chunked:
        out.append((b"Transfer-Encoding", b"chunked"))
    if close:
        out.append((b"Connection", b"close"))
    return out


def keeps_alive(http_version: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a client's request leaves its connection open after the
    response (HTTP/1.1 without ``Connection: close``): then the proxy asks
    the upstream to keep its connection open too."""
    return http_version == b"1.1" and b"close" not in _connection_tokens(headers)


# Idempotent methods (RFC 9110, 9.2.2): a request that may be sent again.
_IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


def replayable(method: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a request may go on an upstream connection kept from the
    client's previous request: an idempotent method with no body and no
    ``Expect``. Such a connection may have been closed by the upstream
    meanwhile, and the request is then sent again on a new one, as
    RFC 9110 (9.2.2) allows for these, when nothing of a response came."""
    if method not in _IDEMPOTENT:
        return False
    headers = list(headers)
    return not has_body(headers) and all(name.lower() != b"expect" for name, _ in headers)


def has_body(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a request's framing announces a body (chunked, or a
    ``Content-Length`` other than 0); h11 has rejected a request whose
    framing is invalid before this is asked."""
    for name, value in headers:
        lname = name.lower()
        if lname == b"transfer-encoding":
            return True
        if lname == b"content-length" and value.strip() != b"0":
            return True
    return False


def forward_response_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Headers to send to the client: hop-by-hop and ``Proxy-*`` removed;
    Content-Length kept unless the upstream used chunked framing."""
    headers = list(headers)
    chunked = any(name.lower() == b"transfer-encoding" for name, _ in headers)
    extra = frozenset({b"content-length"}) if chunked else frozenset()
    return _strip(headers, extra)


# Response bodies at least this long are relayed as raw bytes (see
# ``raw_body_length``); smaller ones go through h11, keeping the connection.
RAW_BODY_MIN: Final = 1 << 20


def raw_body_length(method: str, status: int, headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The body length of a response the proxy may relay without re-framing
    (one valid ``Content-Length`` of at least ``RAW_BODY_MIN``, no
    ``Transfer-Encoding``, a method and status that carry a body), else
    None. Such a response is forwarded with ``Connection: close``: the
    proxy copies exactly that many bytes and then closes both sides."""
    if method == "HEAD" or status < 200 or status in (204, 304):
        return None
    lengths = set()
    for name, value in headers:
        lname = name.lower()
        if lname == b"transfer-encoding":
            return None
        if lname == b"content-length":
            lengths.add(value.strip())
    if len(lengths) != 1:
        return None
    value = lengths.pop()
    if not value.isdigit() or len(value) > 18:
        return None
    length = int(value)
    return length if length >= RAW_BODY_MIN else None


def error_response(status: int, message: str, *, close: bool = True) -> bytes:
    """A complete plain-text response from the proxy itself."""
    reason = _REASONS.get(status, "Error")
    body = f"nanobox proxy: {message}\n".encode("utf-8", "replace")
    head = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
    ]
    if status == 407:
        head.append('Proxy-Authenticate: Basic realm="nanobox"')
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


def client_side() -> h11.Connection:
    """An h11 connection for the sandbox side (we are the server)."""
    import h11

    return h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)


def upstream_side() -> h11.Connection:
    """An h11 connection for the upstream side (we are the client)."""
    import h11

    return h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
