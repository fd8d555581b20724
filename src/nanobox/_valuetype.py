"""Frozen dataclasses without per-class generated code, for the public value
types on the CLI's start-up path (``Limits``, ``Network``, ``Filesystem``,
``Policy``, ``Result``, ``Violation``, ``Event``).

``dataclasses.dataclass(frozen=True)`` writes the source of ``__init__``,
``__repr__``, ``__eq__``, ``__hash__``, ``__setattr__`` and ``__delattr__``
for every class and compiles each with ``exec`` (Python 3.10 to 3.12 one
by one): ~1.3 ms per class of ten fields here, ~9 ms for the seven classes a
``nanobox run`` creates, every time the CLI starts. This module does the
same job with code written once:

- ``__init__`` is written out in each class's body (so it is compiled into
  the module's bytecode cache like any other method) and hands its
  arguments to :func:`fill`; the tests check that its signature is the one
  ``dataclasses`` would generate;
- ``__repr__``, ``__eq__``, ``__hash__``, ``__setattr__`` and ``__delattr__``
  are closures made here, with ``dataclasses``' semantics (the tests compare
  each class with a twin made by ``dataclasses`` itself);
- the class is still made by ``dataclasses.dataclass`` (its fields,
  ``fields()``, ``replace()``, ``asdict()``, ``__match_args__``), told to
  generate nothing; its ``__dataclass_params__`` then says what the class
  is (frozen, with ``__init__``, ``__repr__`` and ``__eq__``), so that a
  user's subclass made with ``@dataclass(frozen=True)`` is accepted and a
  non-frozen one refused, as for any frozen dataclass.

Type checkers see ``dataclasses.dataclass`` itself (see the modules that use
this one), so they treat these classes as frozen dataclasses. (Python 3.13's
generated ``__eq__`` compares field by field after an identity check; the
tuple comparison here differs from it only for a value not equal to itself,
such as a NaN: the policy types refuse one, and nanobox puts none in the
others.)
"""

from __future__ import annotations

import _thread
import dataclasses
from dataclasses import FrozenInstanceError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar

    _T = TypeVar("_T", bound=type)

__all__ = ["FACTORY", "fill", "value_type"]


class _Factory:
    """The default shown in ``__init__``'s signature for a field with a
    ``default_factory`` (as ``dataclasses`` shows it)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<factory>"


FACTORY: Any = _Factory()


def fill(obj: object, /, **values: object) -> None:
    """What a value type's ``__init__`` does with its arguments, as the
    generated one would: a ``FACTORY`` argument becomes its field's
    ``default_factory()``, the fields are set, then ``__post_init__`` runs."""
    for name, make in type(obj).__value_factories__.items():  # type: ignore[attr-defined]
        if values[name] is FACTORY:
            values[name] = make()
    obj.__dict__.update(values)
    post = getattr(obj, "__post_init__", None)
    if post is not None:
        post()


_MADE = ("__repr__", "__eq__", "__hash__", "__setattr__", "__delattr__")


def value_type(*, frozen: bool = True, kw_only: bool = False) -> Callable[[_T], _T]:
    """The decorator: ``@value_type(frozen=True, kw_only=True)`` on a class
    whose body defines ``__init__`` (and ``__post_init__`` if it validates)."""
    if not frozen:
        raise ValueError("value_type makes frozen classes only")

    def wrap(cls: _T) -> _T:
        if "__init__" not in cls.__dict__:
            raise TypeError(f"{cls.__qualname__} must define __init__")
        for name in _MADE:
            if name in cls.__dict__:
                raise TypeError(f"{cls.__qualname__} must not define {name}: value_type makes it")
        dataclasses.dataclass(cls, init=False, repr=False, eq=False, kw_only=kw_only)
        _finish(cls)
        return cls

    return wrap


def _finish(cls: type) -> None:
    fields = dataclasses.fields(cls)
    names = frozenset(f.name for f in fields)
    shown = tuple(f.name for f in fields if f.repr)
    compared = tuple(f.name for f in fields if f.compare)
    hashed = tuple(f.name for f in fields if (f.compare if f.hash is None else f.hash))
    qualname = cls.__qualname__
    cls.__value_factories__ = {  # type: ignore[attr-defined]
        f.name: f.default_factory for f in fields if f.default_factory is not dataclasses.MISSING
    }

    def values(obj: object, which: tuple[str, ...]) -> tuple[object, ...]:
        return tuple([getattr(obj, name) for name in which])

    running: set[tuple[int, int]] = set()

    def __repr__(self: object) -> str:
        # ``dataclasses``' guard: a value that contains itself shows "...".
        key = (id(self), _thread.get_ident())
        if key in running:
            return "..."
        running.add(key)
        try:
            inner = ", ".join([f"{name}={getattr(self, name)!r}" for name in shown])
        finally:
            running.discard(key)
        return f"{self.__class__.__qualname__}({inner})"

    def __eq__(self: object, other: object) -> Any:
        if other.__class__ is self.__class__:
            return values(self, compared) == values(other, compared)
        return NotImplemented

    def __hash__(self: object) -> int:
        return hash(values(self, hashed))

    def __setattr__(self: object, name: str, value: object) -> None:
        if type(self) is cls or name in names:
            raise FrozenInstanceError(f"cannot assign to field {name!r}")
        super(cls, self).__setattr__(name, value)  # type: ignore[arg-type]

    def __delattr__(self: object, name: str) -> None:
        if type(self) is cls or name in names:
            raise FrozenInstanceError(f"cannot delete field {name!r}")
        super(cls, self).__delattr__(name)  # type: ignore[arg-type]

    for method in (__repr__, __eq__, __hash__, __setattr__, __delattr__):
        method.__qualname__ = f"{qualname}.{method.__name__}"
        method.__module__ = cls.__module__
        setattr(cls, method.__name__, method)
    params = cls.__dataclass_params__  # type: ignore[attr-defined]
    params.init = params.repr = params.eq = params.frozen = True
