"""The per-run event stream.

Every run emits :class:`Event` objects (setup steps, violations, limit hits,
exit). Subscribers registered with :func:`subscribe` see every run's events;
a ``Sandbox(on_event=...)`` callback sees that sandbox's. Each event is also
logged to the ``nanobox.events`` logger at DEBUG level with the event as
``extra={"nanobox_event": ...}``; nanobox never configures logging handlers.
"""

from __future__ import annotations

import _thread
import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ._valuetype import FACTORY, fill

if TYPE_CHECKING:
    from dataclasses import dataclass as value_type  # what the class is
    from dataclasses import field
else:
    from ._valuetype import field, value_type  # the same, without generated code

__all__ = ["Event", "subscribe", "unsubscribe"]


def _logger() -> Any:
    """The ``nanobox.events`` logger, or None when nothing in this process
    imported :mod:`logging` (then nothing could have configured a handler,
    and the CLI's start-up does not pay for importing it)."""
    logging = sys.modules.get("logging")
    return None if logging is None else logging.getLogger("nanobox.events")


@value_type(frozen=True)
class Event:
    """One thing that happened in a run. ``kind`` is one of ``start``,
    ``setup``, ``violation``, ``limit``, ``exit``, ``error``."""

    run_id: str
    kind: str
    data: Mapping[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def __init__(
        self, run_id: str, kind: str, data: Mapping[str, Any] = FACTORY, time: float = FACTORY
    ) -> None:
        fill(
            self,
            run_id=run_id,
            kind=kind,
            data=data,
            time=time,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "kind": self.kind, "time": self.time, **self.data}


Subscriber = Callable[[Event], None]
_subscribers: list[Subscriber] = []
_lock = _thread.allocate_lock()


def subscribe(callback: Subscriber) -> None:
    """Call ``callback(event)`` for every event of every run in this process."""
    with _lock:
        _subscribers.append(callback)


def unsubscribe(callback: Subscriber) -> None:
    with _lock:
        if callback in _subscribers:
            _subscribers.remove(callback)


def emit(event: Event, local: Subscriber | None = None) -> None:
    """Deliver ``event``; a failing subscriber is logged, never propagated."""
    log = _logger()
    if log is not None and log.isEnabledFor(10):  # logging.DEBUG
        log.debug("%s %s", event.kind, dict(event.data), extra={"nanobox_event": event.to_dict()})
    targets = list(_subscribers)
    if local is not None:
        targets.append(local)
    for callback in targets:
        try:
            callback(event)
        except Exception:  # a subscriber must not break a run
            import logging

            logging.getLogger("nanobox.events").exception("event subscriber %r failed", callback)
