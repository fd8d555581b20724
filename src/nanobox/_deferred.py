"""Standard modules loaded on first use, for the CLI's start-up path.

``typing`` costs the CLI's start ~3 ms here and ``inspect`` ~8 ms, while a
``nanobox run`` needs neither: the public modules name ``typing``'s types
only in their annotations (strings, ``from __future__ import
annotations``), which nothing reads unless a caller asks for them
(``typing.get_type_hints``: by then ``typing`` is imported anyway).
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # not ``typing``'s (see above)
if TYPE_CHECKING:
    from types import ModuleType as _Module
else:
    _Module = type(sys)  # ``types.ModuleType``, without importing ``types``


class Deferred(_Module):
    """A stand-in for the module of its name: the first attribute read
    imports the real one and copies its namespace in, so later reads cost
    nothing more."""

    def __getattr__(self, name: str) -> object:
        me = str(self.__name__)
        if sys.modules.get(me) is self:
            sys.modules.pop(me, None)  # (another thread may be here too)
        __import__(me)
        real = sys.modules[me]
        self.__dict__.update(real.__dict__)
        return getattr(real, name)


def provide_typing(namespace: dict[str, object]) -> None:
    """Bind ``typing`` in a module's ``namespace``: the module itself if it
    is imported already, else a stand-in that imports it when a type hint
    is read.

    For the public modules on the CLI's path before its run is sent
    (``policy``, ``errors``), which write ``typing.Any`` in their
    annotations and import ``typing`` for the type checkers only (an
    assignment would hide from them what the name is). Not put in
    ``sys.modules``: ``dataclasses`` looks there to tell whether ``typing``
    is in use, and would load it at once. So these modules must not use
    ``typing.ClassVar`` in a dataclass: without ``typing`` loaded,
    ``dataclasses`` would not recognise it and make it a field."""
    namespace["typing"] = sys.modules.get("typing") or Deferred(
        "typing", "loaded on first use (nanobox._deferred)"
    )


def defer_inspect() -> None:
    """Import :mod:`inspect` only when something uses it.

    ``dataclasses`` (the public policy and result types) imports it, and
    with it ``ast``, ``dis`` and ``tokenize``: ~8 ms of the CLI's start here,
    for a module that Python 3.10 and 3.11 use only for a dataclass without
    a docstring (3.12 and later use it for every dataclass, so there the
    real module is loaded at the first one). A stand-in takes its place in
    ``sys.modules`` (only in the CLI's process)."""
    if "inspect" not in sys.modules:
        sys.modules["inspect"] = Deferred("inspect", "loaded on first use (nanobox._deferred)")
