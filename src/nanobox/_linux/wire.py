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


def dumps(value: Any) -> bytes:
    return marshal.dumps(value, _FORMAT)


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
