"""The public value types are frozen dataclasses whose methods are written
once (``nanobox._valuetype``) instead of generated per class at import:
each is compared here with a twin that ``dataclasses`` makes from the same
fields, so that a field added to a class but not to its ``__init__``, or a
method that drifts from ``dataclasses``' semantics, fails."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle
import sys
import types
from collections.abc import Callable
from typing import Any

import pytest

import nanobox
from nanobox._valuetype import FACTORY, field, fill, value_type
from nanobox.events import Event
from nanobox.result import Outcome, Result, Violation

CLASSES = [nanobox.Limits, nanobox.Network, nanobox.Filesystem, nanobox.Policy]
CLASSES += [Result, Violation, Event]


def twin(cls: type) -> Any:
    """The class as ``@dataclass(frozen=True)`` makes it from the same fields."""
    fields = dataclasses.fields(cls)
    ns: dict[str, Any] = {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "__annotations__": dict(cls.__annotations__),
    }
    for f in fields:
        if f.default_factory is not dataclasses.MISSING:
            ns[f.name] = dataclasses.field(default_factory=f.default_factory)
        elif f.default is not dataclasses.MISSING:
            ns[f.name] = f.default
    if "__post_init__" in vars(cls):
        ns["__post_init__"] = vars(cls)["__post_init__"]
    bases = vars(cls).get("__orig_bases__", ())
    made = types.new_class(cls.__name__, bases, exec_body=lambda d: d.update(ns))
    kw_only = all(f.kw_only for f in fields)
    return dataclasses.dataclass(frozen=True, kw_only=kw_only)(made)


def samples(cls: type) -> list[dict[str, Any]]:
    """Keyword arguments for a few instances of each class."""
    if cls is Result:
        base: dict[str, Any] = dict(
            id="r1",
            args=("true",),
            returncode=0,
            stdout=b"",
            stderr=b"",
            outcome=Outcome.EXITED,
            exit_code=0,
            signal=None,
            wall_time_s=0.5,
            cpu_time_s=0.25,
            user_time_s=0.125,
            system_time_s=0.125,
            peak_memory_bytes=1 << 20,
            stdout_bytes=0,
            stderr_bytes=0,
            stdout_truncated=False,
            stderr_truncated=False,
        )
        return [base, {**base, "returncode": 1}, {**base, "degraded": ("cgroups",)}]
    if cls is Violation:
        return [dict(kind="k", detail="d"), dict(kind="k", detail="d", data={"a": 1})]
    if cls is Event:
        return [dict(run_id="r", kind="start", time=1.5), dict(run_id="r", kind="exit", time=2.0)]
    if cls is nanobox.Policy:
        return [{}, dict(hostname="box"), dict(limits=nanobox.Limits(memory="64M"))]
    if cls is nanobox.Limits:
        return [{}, dict(memory="64M"), dict(wall_time="2s", pids=10)]
    if cls is nanobox.Network:
        return [{}, dict(allowed=("example.org",)), dict(max_connections=3)]
    return [{}, dict(read_only=("/opt",)), dict(landlock=False)]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_signature_and_fields_match_dataclasses(cls: type) -> None:
    other = twin(cls)
    mine = inspect.signature(cls).replace(return_annotation=inspect.Signature.empty)
    theirs = inspect.signature(other).replace(return_annotation=inspect.Signature.empty)
    assert str(mine) == str(theirs)

    def key(f: dataclasses.Field[Any]) -> tuple[object, ...]:
        return (f.name, f.type, f.default, f.default_factory, f.kw_only, f.init)

    assert [key(f) for f in dataclasses.fields(cls)] == [key(f) for f in dataclasses.fields(other)]
    assert cls.__match_args__ == other.__match_args__  # type: ignore[attr-defined]
    params = cls.__dataclass_params__  # type: ignore[attr-defined]
    for name in type(params).__slots__:
        assert getattr(params, name) == getattr(other.__dataclass_params__, name), name
    # Nothing generated from source text at import (what this module saves).
    for name in ("__init__", "__repr__", "__eq__", "__hash__", "__setattr__", "__delattr__"):
        assert getattr(cls, name).__code__.co_filename != "<string>", name
    assert other.__init__.__code__.co_filename == "<string>"  # (what is detected)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_behaviour_matches_dataclasses(cls: type) -> None:
    other = twin(cls)
    made = [(cls(**kw), other(**kw)) for kw in samples(cls)]
    for mine, theirs in made:
        assert repr(mine) == repr(theirs)
        assert dataclasses.asdict(mine) == dataclasses.asdict(theirs)
        try:
            expected = hash(theirs)
        except TypeError:  # a field's value is a dict
            with pytest.raises(TypeError):
                hash(mine)
        else:
            assert hash(mine) == expected
        field = dataclasses.fields(cls)[0].name
        for obj in (mine, theirs):
            with pytest.raises(dataclasses.FrozenInstanceError) as info:
                setattr(obj, field, 1)
            errors = [str(info.value)]
            with pytest.raises(dataclasses.FrozenInstanceError) as info:
                delattr(obj, field)
            errors.append(str(info.value))
            with pytest.raises(dataclasses.FrozenInstanceError) as info:
                obj.not_a_field = 1
            errors.append(str(info.value))
            assert errors == [
                f"cannot assign to field {field!r}",
                f"cannot delete field {field!r}",
                "cannot assign to field 'not_a_field'",
            ]
        assert (mine == mine, mine != mine, mine == theirs) == (True, False, False)
        assert mine.__eq__(theirs) is NotImplemented
        assert theirs.__eq__(mine) is NotImplemented
        assert copy.copy(mine) == mine and copy.deepcopy(mine) == mine
        assert pickle.loads(pickle.dumps(mine)) == mine
    for (a, b), (c, d) in zip(made, made[1:] + made[:1], strict=True):
        assert (a == c) == (b == d) and (a != c) == (b != d)
        assert (a == c) is False
    first = made[0][0]
    assert dataclasses.replace(first) == first
    assert dataclasses.replace(first) is not first


def test_defaults_from_factories_are_fresh_objects() -> None:
    for make in (nanobox.Policy, nanobox.Network):
        a, b = make(), make()
        assert a == b
    assert nanobox.Policy().env is not nanobox.Policy().env
    assert nanobox.Policy().limits is not nanobox.Policy().limits
    assert Violation("k", "d").data is not Violation("k", "d").data
    before = Event("r", "start").time
    assert before <= Event("r", "start").time


def test_errors_for_bad_calls_match_dataclasses() -> None:
    other = twin(nanobox.Limits)
    for call in (lambda c: c(1), lambda c: c(bogus=1), lambda c: c(memory="1M", **{"memory": 2})):
        with pytest.raises(TypeError):
            call(nanobox.Limits)
        with pytest.raises(TypeError):
            call(other)
    with pytest.raises(TypeError, match="required keyword-only argument"):
        Result(id="x")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'detail'"):
        Violation("k")  # type: ignore[call-arg]


def test_a_recursive_value_shows_dots() -> None:
    data: dict[str, Any] = {}
    v = Violation("k", "d", data)
    data["self"] = v
    assert repr(v) == "Violation(kind='k', detail='d', data={'self': ...})"


def test_subclasses_behave_as_with_a_frozen_dataclass() -> None:
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Mine(nanobox.Limits):
        extra: int = 0

    m = Mine(memory="2M", extra=3)
    assert m.memory == 2 * 1024 * 1024 and m.extra == 3
    assert m == Mine(memory="2M", extra=3) and m != nanobox.Limits(memory="2M")
    assert hash(m) == hash(Mine(memory="2M", extra=3))
    assert repr(m).startswith("test_subclasses_behave_as_with_a_frozen_dataclass.<locals>.Mine(")
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.extra = 4  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.memory = 4  # type: ignore[misc]
    with pytest.raises(nanobox.PolicyError):
        Mine(memory="1K")  # the base's validation runs

    messages = []
    for base in (nanobox.Limits, twin(nanobox.Limits)):
        with pytest.raises(TypeError) as info:
            dataclasses.dataclass(type("Thawed", (base,), {}))
        messages.append(str(info.value))
    assert messages[0] == messages[1] == "cannot inherit non-frozen dataclass from a frozen one"

    class Plain(nanobox.Limits):  # not a dataclass: its own attributes may be set
        pass

    p = Plain()
    p.note = "x"  # type: ignore[attr-defined]
    assert p.note == "x"  # type: ignore[attr-defined]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.memory = 1  # type: ignore[misc]
    del p.note  # type: ignore[attr-defined]


def test_value_type_refuses_what_it_would_overwrite() -> None:
    def define(body: dict[str, Callable[..., Any]]) -> None:
        value_type(frozen=True)(type("T", (), {"__annotations__": {"a": "int"}, **body}))

    with pytest.raises(TypeError, match="must define __init__"):
        define({})
    init = lambda self, a: None  # noqa: E731
    define({"__init__": init})
    for name in ("__repr__", "__eq__", "__hash__", "__setattr__", "__delattr__"):
        with pytest.raises(TypeError, match=f"must not define {name}"):
            define({"__init__": init, name: lambda self, *a: None})
    with pytest.raises(ValueError, match="frozen classes only"):
        value_type(frozen=False)
    assert repr(FACTORY) == "<factory>"


def test_the_cli_path_does_not_compile_dataclass_methods() -> None:
    """The policy types are made without generated methods: a fresh
    interpreter that imports them compiles no method's source text
    (``compile`` is what ``exec`` of a string costs; Python 3.13 still execs
    an empty function per class)."""
    import subprocess

    code = (
        "import builtins, sys\n"
        "calls = []\n"
        "real = builtins.exec\n"
        "def spy(src, *a, **k):\n"
        "    calls.append(src if isinstance(src, str) and ' def ' in src else '')\n"
        "    return real(src, *a, **k)\n"
        "builtins.exec = spy\n"
        "import nanobox.policy, nanobox.result, nanobox.events\n"
        "nanobox.policy.Policy()\n"
        "print(len([c for c in calls if c]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0", out.stderr


def _fresh_value_type(n: int) -> type:
    def __init__(self: Any, a: int = 0, b: Any = FACTORY) -> None:
        fill(self, a=a, b=b)

    ns: dict[str, Any] = {
        "__annotations__": {"a": "int", "b": "list[int]"},
        "__doc__": "A fresh value type.",
        "__init__": __init__,
        "__module__": __name__,
        "a": 0,
        "b": field(default_factory=list),
    }
    return value_type(frozen=True)(type(f"Fresh{n}", (), ns))


def test_made_a_dataclass_once_whatever_the_threads_see() -> None:
    """Threads that read a fresh value type's fields at the same moment all
    see a finished dataclass: none sees it without fields, or not frozen
    (``dataclasses`` making a frozen subclass reads the params directly)."""
    import threading

    errors: list[str] = []
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for n in range(150):
            cls = _fresh_value_type(n)
            start = threading.Barrier(4)

            def read(cls: type = cls, start: threading.Barrier = start) -> None:
                start.wait()
                try:
                    if not dataclasses.is_dataclass(cls):
                        errors.append("not a dataclass")
                    if [f.name for f in dataclasses.fields(cls)] != ["a", "b"]:
                        errors.append("fields")
                    if not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
                        errors.append("not frozen")
                except Exception as exc:
                    errors.append(repr(exc))

            threads = [threading.Thread(target=read) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        sys.setswitchinterval(old)
    assert errors == []
    made = _fresh_value_type(999)
    assert made(a=2) == made(a=2) and made().b is not made().b
    assert dataclasses.replace(made(a=1), a=3).a == 3


@pytest.mark.parametrize("kind", ["ClassVar[int]", "typing.ClassVar[typing.Any]", " ClassVar"])
def test_special_annotations_are_refused(kind: str) -> None:
    ns = {"__annotations__": {"a": "int", "c": kind}, "__init__": lambda self, a: None}
    with pytest.raises(TypeError, match="not supported"):
        value_type(frozen=True)(type("T", (), ns))
