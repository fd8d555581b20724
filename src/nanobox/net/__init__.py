"""Network allowlisting for sandboxes.

A sandbox lives in an empty network namespace; its only way out is nanobox's
proxy (HTTP/HTTPS forward proxy and SOCKS5), whose listeners are bound inside
the namespace and served from the supervisor. This package has:

* :mod:`nanobox.net.rules` - rule syntax, host canonicalisation and the
  allow/deny decisions (pure, cheap to import);
* :mod:`nanobox.net.socks5`, :mod:`nanobox.net.http`, :mod:`nanobox.net.tls` -
  sans-I/O protocol pieces;
* :mod:`nanobox.net.proxy` - the asyncio proxy (:class:`Proxy`) and a
  background-thread wrapper (:class:`ProxyThread`);
* :mod:`nanobox.net.events` - per-connection events and per-run totals.

Importing this package loads only the rules and event types; asyncio and h11
are imported when the proxy is used (``Proxy`` and ``ProxyThread`` are
resolved lazily on first access).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nanobox.net.events import ConnectionEvent, NetStats
from nanobox.net.rules import Decision, Rule, Ruleset, canonical_host, parse_rule

if TYPE_CHECKING:
    from nanobox.net.proxy import Proxy, ProxyThread

__all__ = [
    "ConnectionEvent",
    "Decision",
    "NetStats",
    "Proxy",
    "ProxyThread",
    "Rule",
    "Ruleset",
    "canonical_host",
    "parse_rule",
]


def __getattr__(name: str) -> Any:
    if name in ("Proxy", "ProxyThread"):
        from nanobox.net import proxy

        return getattr(proxy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
