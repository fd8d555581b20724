"""Records the proxy produces: one :class:`ConnectionEvent` per allowed or
denied connection (one per request for plain HTTP), and a per-run
:class:`NetStats` whose :meth:`~NetStats.summary` goes into the run result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["ConnectionEvent", "NetStats", "Protocol"]

Protocol = Literal["http", "connect", "socks5"]

_MAX_DENIED_LISTED = 50
OTHER_DESTINATIONS = "(other destinations)"


@dataclass(frozen=True)
class ConnectionEvent:
    """One connection attempt through the proxy, reported when it ends.

    ``decision`` is ``"allowed"`` or ``"denied"`` (by the rules, the
    special-range check, the SNI check or the connection limit); an allowed
    connection can still fail upstream, which ``error`` then describes.
    ``status`` is the HTTP status the client got, or the SOCKS5 reply code.
    ``bytes_up`` counts bytes sent to the destination, ``bytes_down`` bytes
    received from it.
    """

    run_id: str
    protocol: Protocol
    host: str
    port: int
    address: str | None
    decision: Literal["allowed", "denied"]
    rule: str | None
    reason: str
    bytes_up: int
    bytes_down: int
    error: str | None
    status: int | None
    method: str | None
    started: float
    duration: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class NetStats:
    """Running totals for one run."""

    __slots__ = ("allowed", "bytes_down", "bytes_up", "denied", "denied_destinations", "failed")

    def __init__(self) -> None:
        self.allowed = 0
        self.denied = 0
        self.failed = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.denied_destinations: dict[str, int] = {}

    def note_denied(self, destination: str) -> None:
        self.denied += 1
        listed = self.denied_destinations
        if destination not in listed and len(listed) >= _MAX_DENIED_LISTED:
            # Past the first 50, counted together: the total says how many
            # calls were refused, and this key that others were.
            destination = OTHER_DESTINATIONS
        listed[destination] = listed.get(destination, 0) + 1

    def summary(self, active: int = 0) -> dict[str, Any]:
        """The network part of a run result: ``allowed``, ``denied``,
        ``failed`` (allowed but the upstream could not be reached),
        ``bytes_up``, ``bytes_down``, ``active`` (connections still open when
        the run stopped) and ``denied_destinations`` (``host:port`` -> count,
        at most 50 entries, then ``(other destinations)`` for the rest)."""
        return {
            "connections": self.allowed + self.denied,
            "allowed": self.allowed,
            "denied": self.denied,
            "failed": self.failed,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "active": active,
            "denied_destinations": dict(self.denied_destinations),
        }
