"""The status lines' JSON (``wire.status_dumps`` / ``status_loads``): the
usual lines (numbers only) without the ``json`` module, everything else
with it, and the same values either way. Pure: no kernel needed."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanobox._linux import wire

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


def _same(a: object, b: object) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@given(st.dictionaries(st.text(), values, max_size=6) | st.lists(values, max_size=6))
def test_a_status_line_is_what_json_writes(value: object) -> None:
    line = wire.status_dumps(value)
    assert line == json.dumps(value, separators=(",", ":")).encode()
    assert b"\n" not in line  # one line on the status pipe
    assert _same(wire.status_loads(line), json.loads(line))


@given(values)
def test_any_json_is_read_as_json_reads_it(value: object) -> None:
    for text in (json.dumps(value), json.dumps(value, separators=(",", ":"))):
        assert _same(wire.status_loads(text.encode()), json.loads(text))


def test_the_usual_lines_are_written_compactly() -> None:
    info = {"init": 7, "cmd": 0, "start": 12.5, "degraded": [], "x": None, "ok": True}
    line = wire.status_dumps(info)
    assert line == b'{"init":7,"cmd":0,"start":12.5,"degraded":[],"x":null,"ok":true}'
    assert wire.status_loads(line + b"\n") == info
    assert wire.status_dumps([0.25, 1e-06]) == b"[0.25,1e-06]"
    assert wire.status_loads(b"[0.25,1e-06]") == [0.25, 1e-06]


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"{",
        b'{"a":}',
        b'{"a":1,}',
        b"[1,,2]",
        b'{"a":--1}',
        b'{"a":1e}',
        b'{"a":"b}',
        b"{a:1}",
        b"nonsense",
        b'{"a":1}x',
    ],
)
def test_a_malformed_line_is_a_value_error(line: bytes) -> None:
    with pytest.raises(ValueError):
        wire.status_loads(line)


def test_duplicate_keys_and_odd_numbers_are_left_to_json() -> None:
    assert wire.status_loads(b'{"a":1,"a":2}') == {"a": 2}
    assert wire.status_loads(b'{"a":-0.0,"b":-5,"c":5E+3}') == {"a": -0.0, "b": -5, "c": 5e3}


def test_non_finite_numbers_go_as_json_writes_them() -> None:
    line = wire.status_dumps({"a": math.inf, "b": math.nan})
    assert line == b'{"a":Infinity,"b":NaN}'
    back = wire.status_loads(line)
    assert back["a"] == math.inf and math.isnan(back["b"])


def test_odd_values_are_written_as_json_writes_them() -> None:
    import collections
    import enum

    class Name(str, enum.Enum):
        A = "a"

    Pair = collections.namedtuple("Pair", "x y")
    odd = {
        "k": Name.A,
        "t": (1, 2),
        "o": collections.OrderedDict(b=1),
        "p": Pair(1, "z"),
        7: None,
        2.5: [],
        True: 0,
        None: 1,
        Name.A: 3,
    }
    assert wire.status_dumps(odd) == json.dumps(odd, separators=(",", ":")).encode()
    for bad in ({(1,): 2}, {"a": object()}, [b"x"]):
        with pytest.raises(TypeError):
            wire.status_dumps(bad)
        with pytest.raises(TypeError):
            json.dumps(bad)


@given(st.text(alphabet="0123456789-+.eE_x \x1c", max_size=8))
def test_numbers_are_read_as_json_reads_them(text: str) -> None:
    """The simple reader takes exactly JSON's numbers (and leaves the rest
    to ``json``, which refuses what is not JSON)."""
    for line in (f"[{text}]", f'{{"a":{text}}}'):
        try:
            expected = json.loads(line)
        except ValueError:
            with pytest.raises(ValueError):
                wire.status_loads(line.encode())
        else:
            got = wire.status_loads(line.encode())
            assert got == expected and repr(got) == repr(expected), line


def test_the_status_lines_need_no_json_module() -> None:
    """Writing any line, reading the usual ones (an error's line is read by
    the server, which may import ``json`` then)."""
    code = (
        "import sys\n"
        "from nanobox._linux import wire\n"
        "wire.status_dumps({'step': 'x', 'message': 'caf\\u00e9 q\\n\\U0001f600', 'errno': 2})\n"
        "line = wire.status_dumps({'init': 3, 'start': 1.5, 'degraded': []})\n"
        "assert wire.status_loads(line) == {'init': 3, 'start': 1.5, 'degraded': []}\n"
        "assert wire.status_loads(wire.status_dumps([0.0, 2.0])) == [0.0, 2.0]\n"
        "print(sorted(m for m in ('json', 're') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout == "[]\n", out


def test_a_placement_key_ignores_key_order_and_sequence_kind() -> None:
    from nanobox._linux import forkserver

    one = {"version": 1, "bases": {"memory": "/m", "cpuacct": "/c"}, "controllers": ("memory",)}
    two = {
        "controllers": ["memory"],
        "bases": {"cpuacct": "/c", "memory": "/m"},
        "version": 1,
        "unused": {},
    }
    assert forkserver._placement_key(one) == forkserver._placement_key(two)
    back = forkserver._placement(forkserver._placement_key(two))
    assert (back.version, back.bases, back.controllers, back.unused) == (
        1,
        {"cpuacct": "/c", "memory": "/m"},
        ("memory",),
        {},
    )
    other = {**one, "unused": {"pids": "/p"}}
    assert forkserver._placement_key(other) != forkserver._placement_key(one)
