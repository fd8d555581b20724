"""What the ``nanobox`` command runs (``scripts/nanobox``, or ``python -m
nanobox``).

``nanobox run`` forks its fork server before anything else is imported: the
server's start-up (its imports, the first stage A and its cgroups) then runs
on the other core while this process imports the CLI and the policy types
and builds the plan. Everything else is in :mod:`nanobox.cli`.
"""

from __future__ import annotations

import gc
import os
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
        from ._deferred import defer_inspect

        defer_inspect()


def stdio_open() -> None:
    """Make a closed stdin, stdout or stderr (``nanobox run ... >&-``)
    /dev/null: else the first descriptor nanobox opens takes its number,
    and the command's output went into the fork server's socket."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def entry() -> None:
    # No garbage collection while the CLI and its fork server import their
    # modules: the collector would run over and over on objects that all
    # stay (~2 % of a cold run's CPU here). Each process freezes what it
    # has imported and turns it back on once its imports are done.
    gc.disable()
    stdio_open()
    start_server_early(sys.argv[1:])
    from .cli import entry as cli_entry

    cli_entry()


if __name__ == "__main__":
    entry()
