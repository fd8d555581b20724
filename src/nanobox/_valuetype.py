"""Frozen dataclasses without per-class generated code, made without
importing ``dataclasses``, for the public value types on the CLI's start-up
path (``Limits``, ``Network``, ``Filesystem``, ``Policy``, ``Result``,
``Violation``, ``Event``).

``dataclasses.dataclass(frozen=True)`` writes the source of ``__init__``,
``__repr__``, ``__eq__``, ``__hash__``, ``__setattr__`` and ``__delattr__``
for every class and compiles each with ``exec`` (Python 3.10 to 3.12 one
by one): ~1.3 ms per class of ten fields here, ~9 ms for the seven classes a
``nanobox run`` creates, every time the CLI starts; and importing
``dataclasses`` imports ``re`` (with ``enum``, ``functools``,
``collections``) and ``copy``: ~8-12 ms more. This module does the same job
with code written once:

- ``__init__`` is written out in each class's body (so it is compiled into
  the module's bytecode cache like any other method) and hands its
  arguments to :func:`fill`; the tests check that its signature is the one
  ``dataclasses`` would generate;
- ``__repr__``, ``__eq__``, ``__hash__``, ``__setattr__`` and ``__delattr__``
  are closures made here, with ``dataclasses``' semantics (the tests compare
  each class with a twin made by ``dataclasses`` itself);
- the fields are read from the class's annotations here (a field with a
  ``default_factory`` is declared with this module's :func:`field`), and
  ``__match_args__`` set;
- the class becomes a real dataclass when something first asks for its
  ``__dataclass_fields__`` or ``__dataclass_params__`` (``fields()``,
  ``replace()``, ``asdict()``, ``is_dataclass()``, a subclass made with
  ``@dataclass``): only then is ``dataclasses`` imported and told to make
  the class's fields, generating no method. Its ``__dataclass_params__``
  then says what the class is (frozen, with ``__init__``, ``__repr__`` and
  ``__eq__``), so that a user's subclass made with
  ``@dataclass(frozen=True)`` is accepted and a non-frozen one refused, as
  for any frozen dataclass. :func:`replace` and :func:`field_names` serve
  nanobox's own code without making it.

Type checkers see ``dataclasses.dataclass`` and ``dataclasses.field``
themselves (see the modules that use this one), so they treat these classes
as frozen dataclasses. (Python 3.13's generated ``__eq__`` compares field by
field after an identity check; the tuple comparison here differs from it
only for a value not equal to itself, such as a NaN: the policy types refuse
one, and nanobox puts none in the others.)
"""

from __future__ import annotations

import _thread
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar

    _T = TypeVar("_T", bound=type)
    _V = TypeVar("_V")

__all__ = ["FACTORY", "field", "field_names", "fill", "replace", "value_type"]


class _Factory:
    """The default shown in ``__init__``'s signature for a field with a
    ``default_factory`` (as ``dataclasses`` shows it)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<factory>"


FACTORY: Any = _Factory()


class _FieldSpec:
    """A field with a ``default_factory``, as declared in a value type's
    body (``dataclasses.field`` once the class is made a dataclass)."""

    __slots__ = ("default_factory",)

    def __init__(self, default_factory: Callable[[], object]) -> None:
        self.default_factory = default_factory


def field(*, default_factory: Callable[[], Any]) -> Any:
    """``dataclasses.field(default_factory=...)`` for a value type's body."""
    return _FieldSpec(default_factory)


def field_names(cls: type) -> tuple[str, ...]:
    """A value type's fields, in order (``dataclasses.fields``' names)."""
    names: tuple[str, ...] = cls.__dict__["__value_fields__"]
    return names


def replace(obj: _V, /, **changes: Any) -> _V:
    """``dataclasses.replace`` for a value type's instance (a subclass's
    instance goes to ``dataclasses.replace``, which knows its fields)."""
    cls = type(obj)
    names = cls.__dict__.get("__value_fields__")
    if names is None:
        import dataclasses

        return dataclasses.replace(obj, **changes)  # type: ignore[type-var]
    for name in names:
        if name not in changes:
            changes[name] = getattr(obj, name)
    return cls(**changes)


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
_NOT_FIELDS = ("ClassVar", "InitVar", "KW_ONLY")  # (dataclasses' special annotations)
_MISSING = object()
_LAZY = ("__dataclass_fields__", "__dataclass_params__")
_lock = _thread.RLock()  # making a class a dataclass (see _Lazy)


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
        for base in cls.__mro__[1:]:
            if "__dataclass_fields__" in base.__dict__:
                raise TypeError(f"{cls.__qualname__}: a value type cannot extend a dataclass")
        names: list[str] = []
        factories: dict[str, Callable[[], object]] = {}
        # (Not inspect.get_annotations: importing inspect is what this
        # module avoids; on 3.10-3.13 a class's own are in its __dict__.)
        annotations = cls.__dict__.get("__annotations__")  # noqa: RUF063
        if annotations is None and "__annotate__" in cls.__dict__:
            # (Python 3.14 and later evaluate annotations lazily.)
            raise TypeError(f"{cls.__qualname__}: use 'from __future__ import annotations'")
        for name, kind in (annotations or {}).items():
            text = kind if isinstance(kind, str) else repr(kind)
            if any(special in text for special in _NOT_FIELDS):
                raise TypeError(f"{cls.__qualname__}.{name}: {text} is not supported here")
            default = cls.__dict__.get(name, _MISSING)
            if isinstance(default, _FieldSpec):
                factories[name] = default.default_factory
                delattr(cls, name)  # (as dataclasses does: no class attribute)
            elif default is not _MISSING and type(default).__hash__ is None:
                raise ValueError(
                    f"mutable default {type(default)} for field {name} is not allowed:"
                    " use default_factory"
                )
            names.append(name)
        for name, value in cls.__dict__.items():
            if isinstance(value, _FieldSpec):
                raise TypeError(f"{name!r} is a field but has no type annotation")
        cls.__value_fields__ = tuple(names)  # type: ignore[attr-defined]
        cls.__value_factories__ = factories  # type: ignore[attr-defined]
        cls.__value_kw_only__ = kw_only  # type: ignore[attr-defined]
        if "__match_args__" not in cls.__dict__:
            setattr(cls, "__match_args__", () if kw_only else tuple(names))  # noqa: B010
        for attr in _LAZY:
            setattr(cls, attr, _Lazy(cls, attr))
        if sys.version_info >= (3, 13) and "__replace__" not in cls.__dict__:
            cls.__replace__ = _replace_method  # type: ignore[attr-defined]
        _finish(cls, tuple(names))
        return cls

    return wrap


def _replace_method(self: _V, /, **changes: Any) -> _V:
    """``copy.replace`` (Python 3.13) calls this, as on any dataclass."""
    return replace(self, **changes)


_replace_method.__name__ = _replace_method.__qualname__ = "__replace__"


class _Lazy:
    """``__dataclass_fields__`` or ``__dataclass_params__`` of a value type
    that has not been made a dataclass yet: the first read makes it one
    (``_make_dataclass``), which puts the real attributes in place of these."""

    __slots__ = ("attr", "cls")

    def __init__(self, cls: type, attr: str) -> None:
        self.cls = cls
        self.attr = attr

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        _make_dataclass(self.cls)
        return self.cls.__dict__[self.attr]


def _make_dataclass(cls: type) -> None:
    """Give ``cls`` the ``__dataclass_fields__`` and ``__dataclass_params__``
    that ``dataclasses`` makes for it, without a moment in which another
    thread (one that reads them without going through ``_Lazy``, such as
    ``dataclasses`` making a subclass) could see neither or half of them:
    ``dataclasses`` works on a twin class with the same fields, and the
    results are set on ``cls`` at the end, the fields last."""
    with _lock:
        if not isinstance(cls.__dict__.get("__dataclass_fields__"), _Lazy):
            return  # (made by another thread meanwhile)
        import dataclasses

        factories: dict[str, Callable[[], object]] = cls.__value_factories__  # type: ignore[attr-defined]
        ns: dict[str, object] = {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
            "__annotations__": dict(cls.__dict__["__annotations__"]),  # noqa: RUF063
        }
        for name in cls.__value_fields__:  # type: ignore[attr-defined]
            if name in factories:
                ns[name] = dataclasses.field(default_factory=factories[name])
            elif name in cls.__dict__:
                ns[name] = cls.__dict__[name]
        twin = type(cls.__name__, (), ns)
        dataclasses.dataclass(
            twin,
            init=False,
            repr=False,
            eq=False,
            kw_only=cls.__value_kw_only__,  # type: ignore[attr-defined]
        )
        params = twin.__dataclass_params__  # type: ignore[attr-defined]
        params.init = params.repr = params.eq = params.frozen = True
        setattr(cls, "__dataclass_params__", params)  # noqa: B010
        setattr(cls, "__dataclass_fields__", twin.__dataclass_fields__)  # type: ignore[attr-defined]  # noqa: B010


def _frozen(message: str) -> BaseException:
    from dataclasses import FrozenInstanceError

    return FrozenInstanceError(message)


def _finish(cls: type, names_in_order: tuple[str, ...]) -> None:
    names = frozenset(names_in_order)
    shown = compared = hashed = names_in_order  # (no field says otherwise)
    qualname = cls.__qualname__

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
            raise _frozen(f"cannot assign to field {name!r}")
        super(cls, self).__setattr__(name, value)  # type: ignore[arg-type]

    def __delattr__(self: object, name: str) -> None:
        if type(self) is cls or name in names:
            raise _frozen(f"cannot delete field {name!r}")
        super(cls, self).__delattr__(name)  # type: ignore[arg-type]

    for method in (__repr__, __eq__, __hash__, __setattr__, __delattr__):
        method.__qualname__ = f"{qualname}.{method.__name__}"
        method.__module__ = cls.__module__
        setattr(cls, method.__name__, method)
