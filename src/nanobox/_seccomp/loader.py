"""Attach a compiled seccomp filter to the calling process, through ctypes.

:func:`install` runs in the freshly forked, single-threaded stage-2 process just
before ``execve``.  So it imports only ``ctypes`` and ``os``, resolves the libc
functions and builds the ``struct sock_fprog`` once at import time, and at call
time only fills in two fields and makes two system calls: no libseccomp, no
allocation beyond what ctypes needs to pass the arguments.

The filter survives ``execve`` and is inherited by every child; nothing inside
can remove it.  ``PR_SET_NO_NEW_PRIVS`` is set first: the kernel refuses an
unprivileged filter without it, and it keeps setuid binaries from gaining
privileges the filter could not see.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["SECCOMP_SYSCALL_NR", "available", "install"]

PR_SET_NO_NEW_PRIVS = 38
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_LOG = 1 << 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3

SECCOMP_SYSCALL_NR = {"x86_64": 317, "aarch64": 277}
"""``__NR_seccomp``; glibc has no wrapper before 2.41, so it goes through syscall(2)."""

_MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
_REQUIRED_ACTIONS = ("kill_process", "errno", "allow")
_ACTIONS_AVAIL = "/proc/sys/kernel/seccomp/actions_avail"


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_prctl.restype = ctypes.c_int
_syscall = _libc.syscall
_syscall.argtypes = (ctypes.c_long, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_void_p)
_syscall.restype = ctypes.c_long
_fprog = _SockFprog()
_fprog_ref = ctypes.byref(_fprog)
_NR_SECCOMP = SECCOMP_SYSCALL_NR.get(_MACHINES.get(os.uname().machine.lower(), ""), -1)


def _raise_errno(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def install(program: bytes, *, log: bool = False, new_listener: bool = False) -> int | None:
    """Attach *program* (packed ``struct sock_filter`` array) as a seccomp filter.

    Sets ``PR_SET_NO_NEW_PRIVS`` first (idempotent).  With *log*, actions other
    than ALLOW are logged (``SECCOMP_FILTER_FLAG_LOG``).  With *new_listener*,
    returns the user-notification listener fd (close-on-exec) that receives the
    filter's ``SECCOMP_RET_USER_NOTIF`` calls; otherwise returns ``None``.

    Raises :class:`OSError` with the kernel's errno on failure (``EINVAL`` for a
    program the kernel rejects, ``EFAULT``, ``ENOMEM``, ``EBUSY`` when another
    listener already exists), and :class:`ValueError` for a malformed program.
    """
    count, rest = divmod(len(program), 8)
    if rest or not 0 < count <= 4096:
        raise ValueError(
            f"a seccomp program is 1..4096 8-byte instructions, got {len(program)} bytes"
        )
    if _NR_SECCOMP < 0:
        raise OSError(0, f"seccomp: unsupported architecture {os.uname().machine!r}")
    if _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        _raise_errno("prctl(PR_SET_NO_NEW_PRIVS)")
    flags = (SECCOMP_FILTER_FLAG_LOG if log else 0) | (
        SECCOMP_FILTER_FLAG_NEW_LISTENER if new_listener else 0
    )
    buffer = ctypes.c_char_p(program)  # points into the bytes object: no copy
    _fprog.len = count
    _fprog.filter = ctypes.cast(buffer, ctypes.c_void_p).value
    result = int(_syscall(_NR_SECCOMP, SECCOMP_SET_MODE_FILTER, flags, _fprog_ref))
    _fprog.filter = None
    if result < 0:
        _raise_errno("seccomp(SECCOMP_SET_MODE_FILTER)")
    return result if new_listener else None


def available() -> tuple[bool, str]:
    """Whether :func:`install` can work here, and why (not).

    Checks the architecture and the kernel's list of filter actions (present
    since Linux 4.14, which also introduced KILL_PROCESS).
    """
    if _NR_SECCOMP < 0:
        return False, f"no seccomp support for architecture {os.uname().machine!r}"
    try:
        with open(_ACTIONS_AVAIL, encoding="ascii") as f:
            actions = f.read().split()
    except OSError as exc:
        return False, (
            f"cannot read {_ACTIONS_AVAIL} ({exc.strerror}): the kernel lacks seccomp "
            "filters or is older than 4.14"
        )
    missing = [name for name in _REQUIRED_ACTIONS if name not in actions]
    if missing:
        return False, f"the kernel's seccomp lacks actions: {', '.join(missing)}"
    notify = "with" if "user_notif" in actions else "without"
    return True, f"seccomp filters available ({notify} user notification)"
