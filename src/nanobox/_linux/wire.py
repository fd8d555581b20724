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
newline-delimited, and a marshalled value may hold a newline), but they
are written here without the ``json`` module (``status_dumps``: stage A
and the command's process write them from inside the sandbox, where a
module may not be importable), and the usual ones of a run with namespaces
(numbers only) are read without it (``status_loads``; an error's line, or
a run without namespaces, has ``json`` imported in the server): ``json``
imports ``re``, and with it ``enum``, ``functools`` and ``collections``,
~5-10 ms of the fork server's start, which is on a cold ``nanobox run``'s
critical path.
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


def status_dumps(value: Any) -> bytes:
    """``value`` as JSON (as ``json.dumps`` writes it, ASCII only), for a
    status line. Written here, without the ``json`` module: stage A and the
    command's process write these lines from inside the sandbox, where a
    module may not be importable any more (an error's line included)."""
    out: list[str] = []
    _write(value, out)
    return "".join(out).encode("ascii")


def _write(value: Any, out: list[str]) -> None:
    kind = type(value)
    if kind is str:
        out.append(_string(value))
    elif value is None:
        out.append("null")
    elif kind is bool:
        out.append("true" if value else "false")
    elif kind is int:
        out.append(str(value))
    elif kind is float:
        out.append(_float(value))
    elif kind is list or kind is tuple:
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write(item, out)
        out.append("]")
    elif kind is dict or isinstance(value, dict):
        out.append("{")
        for i, (key, item) in enumerate(value.items()):
            if i:
                out.append(",")
            out.append(_string(_key(key)))
            out.append(":")
            _write(item, out)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        _write(list(value), out)
    elif isinstance(value, str):  # (subclasses: as the plain value, as json does)
        out.append(_string(str.__str__(value)))
    elif isinstance(value, int):
        out.append(int.__repr__(value))
    elif isinstance(value, float):
        out.append(_float(float(value)))
    else:
        raise TypeError(f"Object of type {kind.__name__} is not JSON serializable")


_INF = float("inf")


def _key(key: object) -> str:
    """A dict key as ``json`` writes it."""
    if isinstance(key, str):
        return str.__str__(key)
    if key is None or isinstance(key, bool):
        return {None: "null", True: "true", False: "false"}[key]
    if isinstance(key, int):
        return int.__repr__(key)
    if isinstance(key, float):
        return _float(float(key))
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")


def _float(value: float) -> str:
    if value != value:
        return "NaN"
    if value == _INF:
        return "Infinity"
    if value == -_INF:
        return "-Infinity"
    return repr(value)


def _string(text: str) -> str:
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif code > 0xFFFF:
            code -= 0x10000
            out.append(f"\\u{0xD800 | code >> 10:04x}\\u{0xDC00 | code & 0x3FF:04x}")
        else:
            out.append(_ESCAPES.get(ch) or f"\\u{code:04x}")
    out.append('"')
    return "".join(out)


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


def status_loads(data: bytes) -> Any:
    """Decode ``status_dumps``'s JSON (or any JSON, with ``json``); raises
    ``ValueError`` on a malformed line."""
    text = data.decode("utf-8", "surrogateescape").strip(" \t\n\r")  # (JSON's whitespace)
    try:
        return _parse_simple(text)
    except ValueError:
        pass  # (a string, a nested value: not one of ours, or not simple)
    import json

    return json.loads(text)


def _is_name(key: str) -> bool:
    return key.isascii() and key.isidentifier()


_CONSTANTS: dict[str, Any] = {"null": None, "true": True, "false": False}
_DIGITS = frozenset("0123456789")


def _parse_simple(text: str) -> Any:
    """``status_dumps``'s own output: a flat dict or list of scalars."""
    if text.startswith("{") and text.endswith("}"):
        body = text[1:-1]
        out: dict[str, Any] = {}
        for item in body.split(",") if body else ():
            key, colon, value = item.partition(":")
            if not colon or len(key) < 3 or key[0] != '"' or key[-1] != '"':
                raise ValueError(item)
            name = key[1:-1]
            if not _is_name(name) or name in out:
                raise ValueError(item)
            out[name] = _parse_scalar(value)
        return out
    if text.startswith("[") and text.endswith("]"):
        body = text[1:-1]
        return [_parse_scalar(v) for v in body.split(",")] if body else []
    raise ValueError(text)


def _parse_scalar(text: str) -> Any:
    if text in _CONSTANTS:
        return _CONSTANTS[text]
    if text == "[]":
        return []
    whole, fraction, exponent = _number_parts(text)
    if not fraction and not exponent:
        return int(whole)
    value = float(text)
    if not -_INF < value < _INF:
        raise ValueError(text)
    return value


def _number_parts(text: str) -> tuple[str, str, str]:
    """A JSON number's integer, fraction and exponent parts (``-12``,
    ``.5``, ``e-3``); ``ValueError`` if ``text`` is not one."""
    digits = text[1:] if text.startswith("-") else text
    end = len(digits)
    i = 0
    while i < end and digits[i] in _DIGITS:
        i += 1
    if i == 0 or (i > 1 and digits[0] == "0"):
        raise ValueError(text)  # (no digits, or a leading zero)
    whole, rest = text[: len(text) - end + i], digits[i:]
    fraction = exponent = ""
    if rest.startswith("."):
        j = 1
        while j < len(rest) and rest[j] in _DIGITS:
            j += 1
        if j == 1:
            raise ValueError(text)
        fraction, rest = rest[:j], rest[j:]
    if rest[:1] in ("e", "E"):
        j = 2 if rest[1:2] in ("+", "-") else 1
        k = j
        while k < len(rest) and rest[k] in _DIGITS:
            k += 1
        if k == j:
            raise ValueError(text)
        exponent, rest = rest[:k], rest[k:]
    if rest:
        raise ValueError(text)
    return whole, fraction, exponent


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
