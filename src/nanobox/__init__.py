"""nanobox: a fast, rootless process sandbox for running untrusted code.

    >>> import nanobox
    >>> r = nanobox.run(["python3", "-c", "print(42)"], timeout=5)
    >>> r.stdout
    b'42\\n'

Public names are imported lazily so that ``import nanobox`` (and the CLI)
start fast.
"""

from __future__ import annotations

from ._version import __version__

# Not ``typing.TYPE_CHECKING``: importing ``typing`` costs the CLI's start-up
# a few ms (type checkers treat this name the same way).
TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import Any

    from .errors import (
        PolicyError,
        SandboxedProcessError,
        SandboxError,
        SetupError,
        UnsupportedError,
    )
    from .events import Event
    from .policy import Filesystem, Limits, Network, Policy, load_policy
    from .result import Outcome, Result, Violation
    from .sandbox import Sandbox, run, run_async
    from .syscalls import Arg, SyscallRule, Syscalls, load_syscalls

__all__ = [
    "Arg",
    "SyscallRule",
    "Syscalls",
    "load_syscalls",
    "Event",
    "Filesystem",
    "Limits",
    "Network",
    "Outcome",
    "Policy",
    "PolicyError",
    "Result",
    "Sandbox",
    "SandboxError",
    "SandboxedProcessError",
    "SetupError",
    "UnsupportedError",
    "Violation",
    "__version__",
    "check",
    "load_policy",
    "run",
    "run_async",
]

_LAZY = {
    "PolicyError": "errors",
    "SandboxedProcessError": "errors",
    "SandboxError": "errors",
    "SetupError": "errors",
    "UnsupportedError": "errors",
    "Event": "events",
    "Filesystem": "policy",
    "Limits": "policy",
    "Network": "policy",
    "Policy": "policy",
    "load_policy": "policy",
    "Outcome": "result",
    "Result": "result",
    "Violation": "result",
    "Sandbox": "sandbox",
    "run": "sandbox",
    "run_async": "sandbox",
    "check": "check",
    "Arg": "syscalls",
    "SyscallRule": "syscalls",
    "Syscalls": "syscalls",
    "load_syscalls": "syscalls",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nanobox' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
