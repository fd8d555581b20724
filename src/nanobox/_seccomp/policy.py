"""Syscall policies: what a seccomp filter decides, stated without BPF.

A :class:`Policy` is a default action plus an ordered list of :class:`Rule`\\ s.
Each rule names one system call, an action, and optional argument conditions
(:class:`Cond`) that must all hold.  For a given call the rules naming it are
tried in order and the first whose conditions hold decides; a rule without
conditions always matches.  Calls no rule matches get the default action.

Three cases sit outside the rules and are the same for every policy:

* a call from another ABI (``seccomp_data.arch`` is not the native
  ``AUDIT_ARCH``: i386 ``int 0x80`` on x86_64, AArch32 on arm64) kills the
  process;
* on x86_64, an x32 ABI call (``nr`` in ``0x40000000..0x7fffffff``) gets
  :attr:`Policy.x32`, which may only be a kill or an errno, never an allow: x32
  calls share the x86_64 arch token, so a deny-list that forgot them would be
  bypassed by ``syscall(nr | 0x40000000)``.  The default is KILL_PROCESS, the
  same treatment as a foreign ABI: no program nanobox runs is an x32 binary
  (distributions boot with x32 disabled, where every x32 call fails anyway),
  so an x32 call is a probe, and a SIGSYS kill makes it visible (exit status,
  audit log) instead of letting it continue quietly;
* a number that is in no table (gaps, numbers above the newest syscall these
  tables know, negative numbers) gets :attr:`Policy.unknown`, ``ENOSYS`` by
  default: newer syscalls are unreviewed, and ``ENOSYS`` is what makes libc
  fall back to an older call (``clone3`` to ``clone``).

:func:`decide` is the executable form of these semantics.  The compiler must
agree with it on every input, which the property tests check.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass, field
from typing import Final, Literal, TypeAlias

from . import bpf, syscalls_aarch64, syscalls_x86_64
from .bpf import SeccompData

__all__ = [
    "ALLOW",
    "ARCHES",
    "KILL_PROCESS",
    "LOG",
    "NOTIFY",
    "Action",
    "Allow",
    "ArchInfo",
    "Cond",
    "Errno",
    "KillProcess",
    "Log",
    "Notify",
    "Op",
    "Policy",
    "Rule",
    "SeccompPolicyError",
    "UnsupportedArchError",
    "arch_info",
    "decide",
    "native_arch",
]


class SeccompPolicyError(ValueError):
    """A policy that cannot be compiled: unknown syscall, bad condition, too big."""


class UnsupportedArchError(SeccompPolicyError):
    """The machine (or requested) architecture has no syscall table here."""


# -- actions ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Allow:
    """Let the call run."""

    @property
    def ret(self) -> int:
        return bpf.SECCOMP_RET_ALLOW


@dataclass(frozen=True, slots=True)
class Errno:
    """Skip the call and make it fail with ``-errno``."""

    errno: int

    def __post_init__(self) -> None:
        # The kernel clamps larger values to MAX_ERRNO (4095).
        if not 0 <= self.errno <= 4095:
            raise SeccompPolicyError(f"errno must be 0..4095, not {self.errno}")

    @property
    def ret(self) -> int:
        return bpf.SECCOMP_RET_ERRNO | self.errno


@dataclass(frozen=True, slots=True)
class KillProcess:
    """Kill the whole process with SIGSYS (core dump, audit log entry)."""

    @property
    def ret(self) -> int:
        return bpf.SECCOMP_RET_KILL_PROCESS


@dataclass(frozen=True, slots=True)
class Log:
    """Let the call run but log it to the audit log (``SECCOMP_RET_LOG``)."""

    @property
    def ret(self) -> int:
        return bpf.SECCOMP_RET_LOG


@dataclass(frozen=True, slots=True)
class Notify:
    """Suspend the call and ask the supervisor (``SECCOMP_RET_USER_NOTIF``).

    The supervisor answers through the listener fd returned by
    :func:`nanobox._seccomp.loader.install` with ``new_listener=True``; with no
    listener attached the kernel fails the call with ``ENOSYS``.
    """

    @property
    def ret(self) -> int:
        return bpf.SECCOMP_RET_USER_NOTIF


Action: TypeAlias = Allow | Errno | KillProcess | Log | Notify

ALLOW: Final = Allow()
KILL_PROCESS: Final = KillProcess()
LOG: Final = Log()
NOTIFY: Final = Notify()
_ENOSYS: Final = Errno(errno.ENOSYS)


# -- conditions and rules -----------------------------------------------------------

Op = Literal["eq", "ne", "lt", "le", "gt", "ge", "masked_eq"]
OPS: Final[tuple[Op, ...]] = ("eq", "ne", "lt", "le", "gt", "ge", "masked_eq")

_U64: Final = bpf.U64_MAX
_U32: Final = bpf.U32_MAX


@dataclass(frozen=True, slots=True)
class Cond:
    """A test on one 64-bit syscall argument, compared unsigned.

    ``masked_eq`` holds when ``arg & mask == value``.  The kernel reads many
    arguments as 32-bit ``int``\\ s and ignores the upper half of the register,
    so a test of such an argument must not depend on the upper half either:
    use a mask within the low 32 bits (:meth:`eq32`) — otherwise
    ``ioctl(fd, TIOCSTI | 1 << 32)`` slips past an ``eq TIOCSTI`` deny rule
    while the kernel still runs TIOCSTI (CVE-2019-10063).

    Negative values are taken as their 64-bit two's complement.
    """

    arg: int
    op: Op
    value: int
    mask: int = _U64

    def __post_init__(self) -> None:
        if not 0 <= self.arg < bpf.N_ARGS:
            raise SeccompPolicyError(f"argument index must be 0..5, not {self.arg}")
        if self.op not in OPS:
            raise SeccompPolicyError(f"unknown comparison {self.op!r}; use one of {OPS}")
        for name in ("value", "mask"):
            number = getattr(self, name)
            if not -(1 << 63) <= number <= _U64:
                raise SeccompPolicyError(f"{name} {number} does not fit in 64 bits")
            object.__setattr__(self, name, number & _U64)
        if self.op != "masked_eq" and self.mask != _U64:
            raise SeccompPolicyError(f"a mask only applies to masked_eq, not {self.op}")
        if self.value & ~self.mask:
            raise SeccompPolicyError(
                f"masked_eq value {self.value:#x} has bits outside mask {self.mask:#x}: "
                "it can never match"
            )

    @classmethod
    def eq(cls, arg: int, value: int) -> Cond:
        return cls(arg, "eq", value)

    @classmethod
    def ne(cls, arg: int, value: int) -> Cond:
        return cls(arg, "ne", value)

    @classmethod
    def lt(cls, arg: int, value: int) -> Cond:
        return cls(arg, "lt", value)

    @classmethod
    def le(cls, arg: int, value: int) -> Cond:
        return cls(arg, "le", value)

    @classmethod
    def gt(cls, arg: int, value: int) -> Cond:
        return cls(arg, "gt", value)

    @classmethod
    def ge(cls, arg: int, value: int) -> Cond:
        return cls(arg, "ge", value)

    @classmethod
    def masked_eq(cls, arg: int, mask: int, value: int) -> Cond:
        return cls(arg, "masked_eq", value, mask)

    @classmethod
    def eq32(cls, arg: int, value: int) -> Cond:
        """Equality on the low 32 bits only, for arguments the kernel reads as int."""
        return cls(arg, "masked_eq", value & _U32, _U32)

    def holds(self, args: tuple[int, ...]) -> bool:
        x = args[self.arg] & _U64
        op, v = self.op, self.value
        if op == "eq":
            return x == v
        if op == "ne":
            return x != v
        if op == "lt":
            return x < v
        if op == "le":
            return x <= v
        if op == "gt":
            return x > v
        if op == "ge":
            return x >= v
        return x & self.mask == v


def _known_anywhere(name: str) -> bool:
    return any(name in info.syscalls for info in ARCHES.values())


@dataclass(frozen=True, slots=True)
class Rule:
    """Apply *action* to calls of *syscall* whose arguments satisfy all *conds*.

    *reason* documents why the rule exists; it does not affect the filter.
    """

    syscall: str
    action: Action
    conds: tuple[Cond, ...] = ()
    reason: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "conds", tuple(self.conds))
        if not _known_anywhere(self.syscall):
            tables = " or ".join(ARCHES)
            raise SeccompPolicyError(
                f"unknown syscall {self.syscall!r}: not in the {tables} syscall tables"
            )

    def matches(self, args: tuple[int, ...]) -> bool:
        return all(cond.holds(args) for cond in self.conds)


@dataclass(frozen=True, slots=True)
class Policy:
    """A default action plus ordered rules; see the module docstring."""

    default: Action
    rules: tuple[Rule, ...] = ()
    x32: Action = KILL_PROCESS
    unknown: Action = _ENOSYS

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))
        if not isinstance(self.x32, (KillProcess, Errno)):
            raise SeccompPolicyError(f"the x32 action must be KillProcess or Errno, not {self.x32}")

    def rules_for(self, syscall: str) -> tuple[Rule, ...]:
        """The rules naming *syscall*, in policy order."""
        return tuple(rule for rule in self.rules if rule.syscall == syscall)


# -- architectures --------------------------------------------------------------------


@dataclass(frozen=True)
class ArchInfo:
    """One architecture's ABI facts, from the generated tables."""

    name: str
    audit_arch: int
    syscalls: dict[str, int]
    x32_bit: int | None = None
    names: dict[int, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", {nr: name for name, nr in self.syscalls.items()})

    @property
    def max_nr(self) -> int:
        return max(self.names)


ARCHES: Final[dict[str, ArchInfo]] = {
    "x86_64": ArchInfo(
        "x86_64",
        syscalls_x86_64.AUDIT_ARCH,
        syscalls_x86_64.SYSCALLS,
        syscalls_x86_64.X32_SYSCALL_BIT,
    ),
    "aarch64": ArchInfo("aarch64", syscalls_aarch64.AUDIT_ARCH, syscalls_aarch64.SYSCALLS),
}

_MACHINE_ALIASES: Final = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64",
                           "arm64": "aarch64"}  # fmt: skip


def arch_info(arch: str) -> ArchInfo:
    try:
        return ARCHES[arch]
    except KeyError:
        raise UnsupportedArchError(
            f"unsupported architecture {arch!r}; seccomp tables exist for {', '.join(ARCHES)}"
        ) from None


def native_arch() -> str:
    """The architecture of this process, as a key of :data:`ARCHES`.

    This is ``platform.machine()`` (read through ``os.uname()``, which is what
    ``platform`` does, without importing it), refined by the pointer size: a
    32-bit interpreter on a 64-bit kernel makes i386/AArch32 calls, which a
    64-bit filter would kill.
    """
    machine = os.uname().machine.lower()
    arch = _MACHINE_ALIASES.get(machine)
    if arch is None or struct.calcsize("P") != 8:
        bits = struct.calcsize("P") * 8
        raise UnsupportedArchError(
            f"unsupported architecture {machine!r} ({bits}-bit process); "
            f"seccomp tables exist for 64-bit {', '.join(ARCHES)}"
        )
    return arch


# -- the reference semantics ------------------------------------------------------------


def decide(policy: Policy, arch: str, data: SeccompData) -> int:
    """The seccomp return value *policy* prescribes for *data* on *arch*.

    Deliberately written as plainly as possible: it is the specification the
    BPF compiler is tested against, not a fast path.
    """
    info = arch_info(arch)
    if data.arch & _U32 != info.audit_arch:
        return bpf.SECCOMP_RET_KILL_PROCESS
    nr = data.unr
    if info.x32_bit is not None and info.x32_bit <= nr < 2 * info.x32_bit:
        return policy.x32.ret
    name = info.names.get(nr)
    if name is None:
        return policy.unknown.ret
    for rule in policy.rules:
        if rule.syscall == name and rule.matches(data.args):
            return rule.action.ret
    return policy.default.ret
