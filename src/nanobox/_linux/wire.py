"""The encoding of the messages between the caller, its fork server and
stage A: plans, hellos, replies, a run's argv and environment.

``marshal``, not JSON: it is built into the interpreter, so the CLI sends
its run without importing ``json`` (~1.5 ms of its start here, on the cold
start's critical path), and it decodes a plan in half the time (stage A
decodes one per sandbox). Every peer is the same interpreter (the server is
forked, or exec'd from ``sys.executable``) and trusted: these messages never
come from a sandboxed command. Format 2 writes no back-references, so equal
values always encode to equal bytes (a plan's bytes decide whether a
sandbox built ahead fits the next run). Tuples stay tuples (JSON made them
lists): readers unpack them and never compare them with lists.
The status lines stage A writes to the server stay JSON (they are
newline-delimited, and a marshalled value may hold a newline).
"""

from __future__ import annotations

import marshal

TYPE_CHECKING = False  # not ``typing``'s: this module is on the CLI's start-up path
if TYPE_CHECKING:
    from typing import Any

_FORMAT = 2  # no back-references: equal values, equal bytes (see above)


# The channel's one message from stage A (the proxy's listeners, with their
# fds): fixed bytes, never decoded, as stage A sends it from inside the
# sandbox's namespaces.
LISTENERS = b"listeners"


def dumps(value: Any) -> bytes:
    try:
        return marshal.dumps(value, _FORMAT)
    except ValueError:
        # marshal writes only the exact built-in types: a caller's ``str``
        # subclass (an argv or env entry from a ``StrEnum``, a YAML
        # loader, ...) goes as the plain value, as JSON did.
        return marshal.dumps(_plain(value), _FORMAT)


def _plain(value: Any) -> Any:
    """``value`` with subclasses of the built-in types made plain."""
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if value is None or type(value) in (bool, int, float, str, bytes):
        return value
    if isinstance(value, str):
        return str.__str__(value)  # (``str(x)`` would call the subclass's __str__)
    if isinstance(value, bytes):
        return bytes(value)
    if isinstance(value, int):  # (an IntEnum member, ...; bool has no subclasses)
        return int(value)
    if isinstance(value, float):
        return float(value)
    raise ValueError(f"cannot send a {type(value).__name__} to the fork server")


def loads(data: bytes) -> Any:
    """Decode one message (raises ``ValueError`` on a truncated one)."""
    try:
        return marshal.loads(data)
    except (EOFError, TypeError) as exc:
        raise ValueError(f"bad message: {exc}") from None


def join_run(run: bytes, static: bytes) -> bytes:
    """A submitted run: its own part, then the plan's part that every run
    of one policy in one directory shares (passed on to stage A as is)."""
    return len(run).to_bytes(4, "little") + run + static


def split_run(msg: bytes) -> tuple[bytes, bytes]:
    """``join_run``'s two parts."""
    n = int.from_bytes(msg[:4], "little")
    if len(msg) < 4 + n:
        raise ValueError("bad message: truncated run")
    return msg[4 : 4 + n], msg[4 + n :]
