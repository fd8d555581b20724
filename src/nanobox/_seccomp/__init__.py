"""nanobox's own seccomp-BPF compiler and loader (pure Python, no libseccomp).

* :mod:`.policy`: what to decide (:class:`Policy`, :class:`Rule`, :class:`Cond`,
  actions) and :func:`decide`, the reference semantics;
* :mod:`.compiler`: :func:`compile` turns a policy into a BPF program for
  x86_64 or aarch64;
* :mod:`.default`: :func:`default_policy`, the deny-list nanobox applies;
* :mod:`.loader`: :func:`install` attaches a program to the calling process;
* :mod:`.bpf`, :mod:`.interp`: instruction encoding and an interpreter that
  runs programs without a kernel (tests, fuzzing);
* ``syscalls_<arch>``: generated syscall tables (``tools/gen_syscall_tables.py``).

The names above are imported lazily (on first use), so that the stage-2
process, which imports only :mod:`nanobox._seccomp.loader` (``ctypes`` and
``os``), does not pay for the compiler and the syscall tables.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not ``typing``'s: the fork server starts without it
if TYPE_CHECKING:
    from typing import Any

    from .compiler import compile, compile_insns, native_arch
    from .default import default_policy
    from .policy import (
        ALLOW,
        KILL_PROCESS,
        LOG,
        NOTIFY,
        Action,
        Allow,
        Cond,
        Errno,
        KillProcess,
        Log,
        Notify,
        Policy,
        Rule,
        SeccompPolicyError,
        UnsupportedArchError,
        decide,
    )

_HOMES = {
    "compile": "compiler",
    "compile_insns": "compiler",
    "native_arch": "compiler",
    "default_policy": "default",
}

__all__ = [
    "ALLOW",
    "KILL_PROCESS",
    "LOG",
    "NOTIFY",
    "Action",
    "Allow",
    "Cond",
    "Errno",
    "KillProcess",
    "Log",
    "Notify",
    "Policy",
    "Rule",
    "SeccompPolicyError",
    "UnsupportedArchError",
    "compile",
    "compile_insns",
    "decide",
    "default_policy",
    "native_arch",
]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # (``__import__``, not ``importlib``, which would import ``warnings``
    # too on the fork server's start-up path.)
    home = f"{__name__}.{_HOMES.get(name, 'policy')}"
    module = __import__(home, fromlist=[name])
    value = getattr(module, name)
    globals()[name] = value
    return value
