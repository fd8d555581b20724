"""Human units: sizes (``512M``) and durations (``30s``). Pure functions.

Sizes: a non-negative integer with an optional suffix K, M, G or T (powers of
1024, case-insensitive, an optional trailing ``B``/``iB``). A plain int means
bytes. Durations: a non-negative number with an optional suffix ``ms``, ``s``,
``m`` or ``h``; a plain number means seconds.
"""

from __future__ import annotations

import re

__all__ = ["format_size", "parse_duration", "parse_size"]

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_MULT = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_DUR_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h|min)?\s*$", re.IGNORECASE)
_DUR_MULT = {"ms": 0.001, "s": 1.0, "": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}

SIZE_HELP = "a size like 1048576, '512K', '64M' or '2G' (powers of 1024)"
DURATION_HELP = "a duration like 5, 2.5, '500ms', '30s', '10m' or '1h'"


def parse_size(value: object) -> int:
    """Return ``value`` as a number of bytes, or raise ``ValueError``."""
    if isinstance(value, bool):
        raise ValueError(f"expected {SIZE_HELP}, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"expected {SIZE_HELP}, got negative {value}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            number = float(m.group(1))
            result = number * _SIZE_MULT[m.group(2).lower()]
            if result == int(result):
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
        m = _DUR_RE.match(value)
        if m:
            return float(m.group(1)) * _DUR_MULT[(m.group(2) or "").lower()]
    raise ValueError(f"expected {DURATION_HELP}, got {value!r}")


def format_size(n: int) -> str:
    """Format a byte count compactly (``64M``)."""
    for suffix, mult in (("T", 1024**4), ("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{suffix}"
    return str(n)
