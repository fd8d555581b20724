"""The ``nanobox`` console script.

``nanobox run`` forks its fork server before anything else is imported: the
server's start-up (its imports, the first stage A and its cgroups) then runs
on the other core while this process imports the CLI and the policy types
and builds the plan. Everything else is in :mod:`nanobox.cli`.
"""

from __future__ import annotations

import gc
import sys


def start_server_early(args: list[str]) -> None:
    """For ``nanobox run``: fork the server now. It starts (and prepares the
    run's first stage) on the other core while the CLI parses the options
    and builds the plan; after a usage error it just goes away again."""
    if (
        args[:1] == ["run"]
        and sys.platform.startswith("linux")
        and "-h" not in args
        and "--help" not in args
    ):
        from ._linux import early

        early.fork_oneshot()  # once per process; client.get_server adopts it
        defer_inspect()


def defer_inspect() -> None:
    """Import :mod:`inspect` only when something uses it.

    ``dataclasses`` (the public policy and result types) imports it, and
    with it ``ast``, ``dis`` and ``tokenize``: ~8 ms of the CLI's start here,
    for a module that Python 3.10 and 3.11 use only for a dataclass without
    a docstring (3.12 and later use it for every dataclass, so there the
    real module is loaded at the first one). A stand-in module takes its
    place in ``sys.modules`` and loads it on first attribute access."""
    if "inspect" in sys.modules:
        return
    import types

    class _Deferred(types.ModuleType):
        def __getattr__(self, name: str) -> object:
            if sys.modules.get("inspect") is self:
                sys.modules.pop("inspect", None)  # (another thread may be here too)
            import importlib

            real = importlib.import_module("inspect")
            self.__dict__.update(real.__dict__)  # later lookups: no detour
            return getattr(real, name)

    sys.modules["inspect"] = _Deferred("inspect", "loaded on first use (nanobox._entry)")


def entry() -> None:
    # No garbage collection while the CLI and its fork server import their
    # modules: the collector would run over and over on objects that all
    # stay (~2 % of a cold run's CPU here). Each process freezes what it
    # has imported and turns it back on once its imports are done.
    gc.disable()
    start_server_early(sys.argv[1:])
    from .cli import entry as cli_entry

    cli_entry()


if __name__ == "__main__":
    entry()
