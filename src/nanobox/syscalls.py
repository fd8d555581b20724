"""Syscall filtering policy (the public side of the seccomp compiler).

``Policy(syscalls=...)`` takes ``"default"`` (nanobox's deny-list, see
``nanobox._seccomp.default``), ``"none"`` (no filter: an explicit opt-out,
reported in ``Result.degraded``) or a :class:`Syscalls` object:

    Syscalls(base="default", deny=("socket",))        # default list + more
    Syscalls(base="deny", allow=("read", "write", ...)) # an allow-list
    Syscalls(rules=(SyscallRule("personality", "errno", errno="EINVAL",
                                args=(Arg(0, "ne", 0),)),))

``base``: ``"default"`` (start from the default policy), ``"allow"`` (allow
everything not listed) or ``"deny"`` (deny everything not allowed: every
unlisted syscall fails with ``EPERM``). ``deny`` names fail with EPERM,
``allow`` names are allowed; ``rules`` (checked first, in order) give a
per-syscall action with argument conditions. Unknown syscall names are an
error naming the name. The same structure loads from TOML
(:func:`load_syscalls`, ``--seccomp FILE``).

Whatever the policy, non-native architectures (i386 ``int 0x80``) are
killed, x32 numbers are killed on x86_64, and syscalls newer than the
tables fail with ``ENOSYS``.
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .errors import PolicyError

__all__ = ["Arg", "SyscallRule", "Syscalls", "load_syscalls"]

_OPS = ("eq", "ne", "lt", "le", "gt", "ge", "masked_eq")
_ACTIONS = ("allow", "errno", "kill", "log")


def _errno_value(field: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 4095:
        return value
    if isinstance(value, str) and hasattr(_errno, value.upper()):
        return int(getattr(_errno, value.upper()))
    raise PolicyError(field, f"expected an errno name like 'EPERM' or a number, got {value!r}")


@dataclass(frozen=True)
class Arg:
    """A condition on argument ``index`` (0-5), compared as unsigned 64-bit;
    ``masked_eq`` means ``arg & mask == value``."""

    index: int
    op: Literal["eq", "ne", "lt", "le", "gt", "ge", "masked_eq"]
    value: int
    mask: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.index, int) or not 0 <= self.index <= 5:
            raise PolicyError("syscalls.rules.args.index", f"expected 0-5, got {self.index!r}")
        if self.op not in _OPS:
            raise PolicyError("syscalls.rules.args.op", f"expected one of {_OPS}, got {self.op!r}")
        if not isinstance(self.value, int):
            raise PolicyError(
                "syscalls.rules.args.value", f"expected an integer, got {self.value!r}"
            )
        if (self.op == "masked_eq") != (self.mask is not None):
            raise PolicyError("syscalls.rules.args.mask", "mask goes with op 'masked_eq' only")


@dataclass(frozen=True)
class SyscallRule:
    """``action`` for calls of ``syscall`` whose arguments meet all ``args``."""

    syscall: str
    action: Literal["allow", "errno", "kill", "log"] = "errno"
    errno: int | str = "EPERM"
    args: tuple[Arg, ...] = ()

    def __post_init__(self) -> None:
        if self.action not in _ACTIONS:
            raise PolicyError(
                "syscalls.rules.action", f"expected one of {_ACTIONS}, got {self.action!r}"
            )
        object.__setattr__(self, "errno", _errno_value("syscalls.rules.errno", self.errno))
        object.__setattr__(self, "args", tuple(self.args))


@dataclass(frozen=True, kw_only=True)
class Syscalls:
    base: Literal["default", "allow", "deny"] = "default"
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    rules: tuple[SyscallRule, ...] = ()

    def __post_init__(self) -> None:
        if self.base not in ("default", "allow", "deny"):
            raise PolicyError(
                "syscalls.base", f"expected 'default', 'allow' or 'deny', got {self.base!r}"
            )
        for name in ("allow", "deny", "rules"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        known = _known_names()
        for field_name in ("allow", "deny"):
            for sc in getattr(self, field_name):
                if sc not in known:
                    raise PolicyError(f"syscalls.{field_name}", f"unknown syscall {sc!r}")
        for rule in self.rules:
            if not isinstance(rule, SyscallRule):
                raise PolicyError("syscalls.rules", f"expected SyscallRule, got {rule!r}")
            if rule.syscall not in known:
                raise PolicyError("syscalls.rules", f"unknown syscall {rule.syscall!r}")


def _known_names() -> frozenset[str]:
    from ._seccomp import syscalls_aarch64, syscalls_x86_64

    return frozenset(syscalls_x86_64.SYSCALLS) | frozenset(syscalls_aarch64.SYSCALLS)


S_ISUID_ISGID = 0o6000
O_CREAT_TMPFILE = 0o100 | 0o20000000  # O_CREAT | __O_TMPFILE (x86_64 and aarch64)

# (syscall, index of the mode argument, index of the flags argument or None)
_MODE_ARGS = (
    ("chmod", 1, None),
    ("fchmod", 1, None),
    ("fchmodat", 2, None),
    ("fchmodat2", 2, None),
    ("mknod", 1, None),
    ("mknodat", 2, None),
    ("mkdir", 1, None),
    ("mkdirat", 2, None),
    ("creat", 1, None),
    ("open", 2, 1),
    ("openat", 3, 2),
)


def no_setid_rules() -> list[Any]:
    """Refuse setting the setuid/setgid bits: a file planted in a writable
    root must not become a privileged program on the host (with a root
    caller's idmapped workspace it would even be owned by root). ``openat2``
    keeps its mode in memory BPF cannot read: it gets ENOSYS (callers fall
    back to ``openat``)."""
    from . import _seccomp as sc

    rules: list[Any] = []
    for name, mode_arg, flags_arg in _MODE_ARGS:
        if flags_arg is not None:
            rules.append(
                sc.Rule(
                    name,
                    sc.ALLOW,
                    (sc.Cond.masked_eq(flags_arg, O_CREAT_TMPFILE, 0),),
                    "not creating: the mode is ignored",
                )
            )
        rules.append(
            sc.Rule(
                name,
                sc.ALLOW,
                (sc.Cond.masked_eq(mode_arg, S_ISUID_ISGID, 0),),
                "no setuid/setgid bit",
            )
        )
        rules.append(
            sc.Rule(
                name, sc.Errno(_errno.EPERM), (), "setuid/setgid bits are refused in the sandbox"
            )
        )
    rules.append(
        sc.Rule(
            "openat2",
            sc.Errno(_errno.ENOSYS),
            (),
            "its mode is in memory BPF can't read; ENOSYS -> openat",
        )
    )
    return rules


def to_seccomp_policy(spec: str | Syscalls) -> Any:
    """Translate into the compiler's policy model."""
    from . import _seccomp as sc
    from ._seccomp.default import DEFAULT_RULES

    if spec == "default":
        spec = Syscalls()
    assert isinstance(spec, Syscalls)

    def action(rule: SyscallRule) -> Any:
        if rule.action == "allow":
            return sc.ALLOW
        if rule.action == "kill":
            return sc.KILL_PROCESS
        if rule.action == "log":
            return sc.LOG
        return sc.Errno(int(rule.errno))

    def cond(arg: Arg) -> Any:
        if arg.op == "masked_eq":
            return sc.Cond.masked_eq(arg.index, int(arg.mask or 0), arg.value)
        return sc.Cond(arg.index, arg.op, arg.value)

    rules: list[Any] = [
        sc.Rule(r.syscall, action(r), tuple(cond(a) for a in r.args)) for r in spec.rules
    ]
    rules += [sc.Rule(name, sc.Errno(_errno.EPERM)) for name in spec.deny]
    rules += [sc.Rule(name, sc.ALLOW) for name in spec.allow]
    if spec.base == "default":
        rules += list(DEFAULT_RULES)
        rules += no_setid_rules()
    default = sc.Errno(_errno.EPERM) if spec.base == "deny" else sc.ALLOW
    return sc.Policy(default=default, rules=tuple(rules))


def syscalls_from_mapping(data: Mapping[str, Any], where: str = "syscalls") -> Syscalls:
    if not isinstance(data, Mapping):
        raise PolicyError(where, f"expected a table, got {data!r}")
    allowed = {"base", "allow", "deny", "rule", "rules"}
    for key in data:
        if key not in allowed:
            raise PolicyError(
                f"{where}.{key}", f"unknown key (valid keys: {', '.join(sorted(allowed))})"
            )
    rules = []
    for i, raw in enumerate(list(data.get("rule", ())) + list(data.get("rules", ()))):
        if not isinstance(raw, Mapping):
            raise PolicyError(f"{where}.rule[{i}]", f"expected a table, got {raw!r}")
        unknown = set(raw) - {"syscall", "action", "errno", "args"}
        if unknown:
            raise PolicyError(f"{where}.rule[{i}].{sorted(unknown)[0]}", "unknown key")
        if "syscall" not in raw:
            raise PolicyError(f"{where}.rule[{i}].syscall", "missing")
        args = []
        for a in raw.get("args", ()):
            if not isinstance(a, Mapping) or set(a) - {"index", "op", "value", "mask"}:
                raise PolicyError(
                    f"{where}.rule[{i}].args", f"expected {{index, op, value[, mask]}}, got {a!r}"
                )
            args.append(Arg(**a))
        rules.append(
            SyscallRule(
                raw["syscall"], raw.get("action", "errno"), raw.get("errno", "EPERM"), tuple(args)
            )
        )
    return Syscalls(
        base=data.get("base", "default"),
        allow=tuple(data.get("allow", ())),
        deny=tuple(data.get("deny", ())),
        rules=tuple(rules),
    )


def load_syscalls(path: str | os.PathLike[str]) -> Syscalls:
    """Read a seccomp policy TOML file (the format of ``--seccomp FILE``)."""
    from ._toml import read_toml

    data = read_toml(path, "seccomp")
    return syscalls_from_mapping(data, "seccomp")
