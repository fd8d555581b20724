"""Human units: sizes (``512M``) and durations (``30s``). Pure functions.

Sizes: a non-negative integer with an optional suffix K, M, G or T (powers of
1024, case-insensitive, an optional trailing ``B``/``iB``). A plain int means
bytes. Durations: a non-negative number with an optional suffix ``ms``, ``s``,
``m`` or ``h``; a plain number means seconds.

Parsed by hand, not with a regular expression: ``re`` (with ``enum``,
``functools`` and ``collections``) costs a cold ``nanobox run`` ~5-10 ms
here, and the CLI needs it for nothing else. The grammar is that of the
expressions once used (``tests/test_units_policy.py`` holds both):
``\\s*(\\d+(\\.\\d+)?)\\s*([kmgt]?)(i?b)?\\s*`` for a size and
``\\s*(\\d+(\\.\\d+)?|\\.\\d+)\\s*(ms|s|m|h|min)?\\s*`` for a duration, any
Unicode whitespace and decimal digits, the suffixes' ASCII letters in either
case.
"""

from __future__ import annotations

__all__ = ["format_size", "parse_duration", "parse_size"]

_SIZE_MULT = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE_SUFFIXES = {unit + b: mult for unit, mult in _SIZE_MULT.items() for b in ("", "b", "ib")}
_DUR_MULT = {"ms": 0.001, "s": 1.0, "": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}

SIZE_HELP = "a size like 1048576, '512K', '64M' or '2G' (powers of 1024)"
DURATION_HELP = "a duration like 5, 2.5, '500ms', '30s', '10m' or '1h'"


def _number(text: str, *, bare_fraction: bool) -> tuple[str, str] | None:
    """Split ``text`` (stripped) into its leading number (digits, then
    optionally ``.`` and digits; with ``bare_fraction``, also ``.`` and
    digits alone) and the rest, lowercased (ASCII) and stripped; None if
    there is no number or the rest is not ASCII letters."""
    end = len(text)
    i = 0
    while i < end and text[i].isdecimal():
        i += 1
    whole = i
    if i < end and text[i] == ".":
        j = i + 1
        while j < end and text[j].isdecimal():
            j += 1
        if j > i + 1:
            i = j
    if whole == 0 and (not bare_fraction or i == 0):
        return None
    rest = text[i:].lstrip()
    if rest and not (rest.isascii() and rest.isalpha()):
        return None
    return text[:i], rest.lower()


def parse_size(value: object) -> int:
    """Return ``value`` as a number of bytes, or raise ``ValueError``."""
    if isinstance(value, bool):
        raise ValueError(f"expected {SIZE_HELP}, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"expected {SIZE_HELP}, got negative {value}")
        return value
    if isinstance(value, str):
        split = _number(value.strip(), bare_fraction=False)
        if split is not None and split[1] in _SIZE_SUFFIXES:
            result = float(split[0]) * _SIZE_SUFFIXES[split[1]]
            if result - result == 0 and result == int(result):  # (not infinite)
                return int(result)
    raise ValueError(f"expected {SIZE_HELP}, got {value!r}")


def parse_duration(value: object) -> float:
    """Return ``value`` as seconds (float), or raise ``ValueError``."""
    if isinstance(value, bool):
        raise ValueError(f"expected {DURATION_HELP}, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0 or value - value != 0:  # (negative, infinite or NaN; no ``math``)
            raise ValueError(f"expected {DURATION_HELP}, got {value!r}")
        try:
            return float(value)
        except OverflowError:  # (an int beyond any float)
            raise ValueError(f"expected {DURATION_HELP}, got {value!r}") from None
    if isinstance(value, str):
        split = _number(value.strip(), bare_fraction=True)
        if split is not None and split[1] in _DUR_MULT:
            return float(split[0]) * _DUR_MULT[split[1]]
    raise ValueError(f"expected {DURATION_HELP}, got {value!r}")


def format_size(n: int) -> str:
    """Format a byte count compactly (``64M``)."""
    for suffix, mult in (("T", 1024**4), ("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{suffix}"
    return str(n)
