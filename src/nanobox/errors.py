"""Exception hierarchy.

Every exception nanobox raises derives from :class:`SandboxError` and carries
context: the setup ``step`` that failed, the ``syscall`` involved and its
``errno`` where there is one.
"""

from __future__ import annotations

import errno as _errno
import os

# The package, not ``.result``: its ``Result`` is imported when something
# reads a type hint that names it, not with this module (the CLI sends its
# run's plan before it imports the Result, see ``_prepare``).
import nanobox

from ._deferred import provide_typing

TYPE_CHECKING = False
if TYPE_CHECKING:
    import typing

    from .result import Result
# The name ``typing`` in the annotations, for ``typing.get_type_hints``:
# a stand-in that imports ``typing`` when it is read (see ``_deferred``).
provide_typing(globals())

__all__ = [
    "PolicyError",
    "SandboxError",
    "SandboxedProcessError",
    "SetupError",
    "UnsupportedError",
]


class SandboxError(Exception):
    """Base class of every nanobox error."""

    def __init__(
        self,
        message: str,
        *,
        step: str | None = None,
        syscall: str | None = None,
        errno: int | None = None,
    ) -> None:
        # Not super(): in SandboxedProcessError the next class is
        # CalledProcessError, whose __init__ wants (returncode, cmd).
        Exception.__init__(self, message)
        self.message = message
        self.step = step
        self.syscall = syscall
        self.errno = errno

    def __str__(self) -> str:
        parts = [self.message]
        if self.syscall:
            detail = self.syscall
            if self.errno:
                name = _errno.errorcode.get(self.errno, str(self.errno))
                detail += f": {name} ({os.strerror(self.errno)})"
            parts.append(f"[{detail}]")
        return " ".join(parts)


class PolicyError(SandboxError, ValueError):
    """A policy value (or CLI option) is invalid.

    ``field`` is the dotted name of the offending field, e.g. ``limits.memory``.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", step="policy")
        self.field = field
        self._reason = message

    def __reduce__(self) -> tuple[typing.Any, ...]:
        # (Pickling and copying rebuild an exception from ``args``, which
        # holds the joined message, not the two arguments.)
        return (type(self), (self.field, self._reason), self.__dict__)


class UnsupportedError(SandboxError):
    """A requested protection cannot be enforced on this host (fail closed)."""


class SetupError(SandboxError):
    """The sandbox could not be set up; the command never ran."""

    result: nanobox.Result[typing.Any] | None = None


if TYPE_CHECKING:
    import subprocess

    class SandboxedProcessError(SandboxError, subprocess.CalledProcessError):
        """Raised by ``Result.check()`` (or ``check=True``) for a failed command."""

        result: Result[typing.Any]

        def __init__(self, result: Result[typing.Any]) -> None: ...


def _make_sandboxed_process_error() -> type:
    """The class is built on first use: it subclasses
    ``subprocess.CalledProcessError``, and importing :mod:`subprocess` would
    cost the CLI's start-up ~2 ms that it rarely needs."""
    import subprocess

    class SandboxedProcessError(SandboxError, subprocess.CalledProcessError):
        """Raised by ``Result.check()`` (or ``check=True``) for a failed command."""

        def __init__(self, result: nanobox.Result[typing.Any]) -> None:
            subprocess.CalledProcessError.__init__(
                self, result.returncode, list(result.args), result.stdout, result.stderr
            )
            SandboxError.__init__(
                self,
                f"command {list(result.args)!r} ended with outcome "
                f"{result.outcome.value} (returncode {result.returncode})",
                step="run",
            )
            self.result = result

        def __str__(self) -> str:
            return self.message

        def __reduce__(self) -> tuple[typing.Any, ...]:
            # (Rebuilt from its Result: ``args`` holds only the message.)
            return (type(self), (self.result,), self.__dict__)

    SandboxedProcessError.__module__ = __name__
    SandboxedProcessError.__qualname__ = "SandboxedProcessError"  # pickled by name
    return SandboxedProcessError


def __getattr__(name: str) -> typing.Any:
    if name == "SandboxedProcessError":
        # setdefault: two threads asking at once get the same class.
        return globals().setdefault(name, _make_sandboxed_process_error())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
