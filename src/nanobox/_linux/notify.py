"""Seeing which syscall was refused: seccomp user notifications.

Refusals nanobox wants to report (the deny rules' ``EPERM``,
``EAFNOSUPPORT``... but not the ``ENOSYS`` answers that make libc fall back,
which happen in normal operation) are compiled as ``SECCOMP_RET_USER_NOTIF``
instead of ``SECCOMP_RET_ERRNO``. The command's process hands the listener
fd to the sandbox init, which receives each refused call, looks up the errno
the policy gives it (``table``: syscall number -> ordered
``(conditions, errno)``), answers the call with that error (the call never
runs), and records a violation (syscall name, number, arch, pid). If the
init is gone the kernel fails the call with ``ENOSYS``: still refused.
"""

from __future__ import annotations

import fcntl
import select
import struct

# Imported now (in the fork server), not lazily: inside the sandbox's view
# the interpreter's library may be unreachable.
from .unixconnect import ConnectBroker

TYPE_CHECKING = False  # not ``typing``'s: the fork server starts without it
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101
_NOTIF = struct.Struct("=QII iI Q 6Q")  # id, pid, flags, nr, arch, ip, args[6]
_RESP = struct.Struct("=Qqii")  # id, val, error, flags
_U64 = (1 << 64) - 1
MAX_RECORDED = 100


def _holds(cond: list[Any], args: tuple[int, ...]) -> bool:
    index, op, value, mask = cond
    x = args[index] & _U64
    if op == "eq":
        return bool(x == value)
    if op == "ne":
        return bool(x != value)
    if op == "lt":
        return bool(x < value)
    if op == "le":
        return bool(x <= value)
    if op == "gt":
        return bool(x > value)
    if op == "ge":
        return bool(x >= value)
    return bool(x & mask == value)


class Listener:
    """The init's side: answer notifications, remember what was refused."""

    def __init__(
        self,
        fd: int,
        spec: dict[str, Any],
        connect_allowed: list[str] | None = None,
        *,
        broker: Any = None,
        pid_of: Callable[[int], int] | None = None,
        shared_net: bool = False,
    ) -> None:
        self.fd = fd
        self.connect_nr: int | None = spec.get("connect")
        self.broker = broker
        if self.connect_nr is not None and broker is None:
            self.broker = ConnectBroker(connect_allowed or [], refuse_abstract=shared_net)
        # How a notification's pid (in the listener's pid namespace) reads
        # in the sandbox's.
        self.pid_of = pid_of
        self.table: dict[str, list[list[Any]]] = spec["table"]
        self.default: int | None = spec.get("default")
        self.arch: str = spec["arch"]
        self.recorded: list[dict[str, Any]] = []
        self.count = 0

    def errno_for(self, nr: int, args: tuple[int, ...]) -> int:
        for conds, err in self.table.get(str(nr), ()):
            if all(_holds(c, args) for c in conds):
                return int(err)
        return int(self.default) if self.default is not None else 1  # EPERM

    def respond(self, nid: int, err: int) -> bool:
        """Answer notification ``nid``: success (0) or the error ``err``;
        False if it had no one waiting any more (its caller gave up)."""
        while True:
            try:
                fcntl.ioctl(self.fd, SECCOMP_IOCTL_NOTIF_SEND, _RESP.pack(nid, 0, -err, 0))
                return True
            except InterruptedError:  # (a signal to this thread: not an answer)
                continue
            except OSError:
                return False

    def handle(self) -> bool:
        """Answer one pending notification; False when the listener is dead.

        Never blocks: RECV waits for the next notification, and a listener
        whose filter has no users left (the command is gone) polls as
        readable (POLLHUP) with none to come."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        ready = poller.poll(0)
        mask = ready[0][1] if ready else 0
        if not mask & select.POLLIN:
            return not mask & (select.POLLHUP | select.POLLERR | select.POLLNVAL)
        buf = bytearray(_NOTIF.size)
        try:
            fcntl.ioctl(self.fd, SECCOMP_IOCTL_NOTIF_RECV, buf, True)
        except InterruptedError:
            return True
        except OSError as exc:
            return exc.errno == 2  # ENOENT: the caller died meanwhile
        nid, pid, _flags, nr, _arch, _ip, *args = _NOTIF.unpack(buf)
        if nr == self.connect_nr and self.broker is not None:
            self.broker.handle(self.fd, nid, pid, tuple(args), self.respond)
            return True
        err = self.errno_for(nr, tuple(args))
        try:
            fcntl.ioctl(self.fd, SECCOMP_IOCTL_NOTIF_SEND, _RESP.pack(nid, 0, -err, 0))
        except OSError:
            pass  # the call was interrupted or its process died
        self.count += 1
        if len(self.recorded) < MAX_RECORDED:
            self.recorded.append(
                {
                    "syscall": syscall_name(self.arch, nr),
                    "nr": nr,
                    "arch": self.arch,
                    "pid": self.pid_of(pid) if self.pid_of is not None else pid,
                    "errno": err,
                }
            )
        return True


_NAMES: dict[str, dict[int, str]] = {}


def syscall_name(arch: str, nr: int) -> str:
    """The name of system call ``nr`` on ``arch``, from the generated tables
    (loaded on the first violation: they are not shipped in every plan)."""
    names = _NAMES.get(arch)
    if names is None:
        names = {}
        if arch in ("x86_64", "aarch64"):
            import importlib

            table = importlib.import_module(f"nanobox._seccomp.syscalls_{arch}")
            names = {nr: name for name, nr in table.SYSCALLS.items()}
        _NAMES[arch] = names
    return names.get(nr, f"syscall_{nr}")


def reporting_policy(
    policy: Any, *, broker_connect: bool = True, arch: str | None = None
) -> tuple[Any, dict[str, Any]]:
    """Turn reportable Errno actions of ``policy`` (a compiler Policy) into
    Notify; return it with the table the init answers from."""
    import errno as _errno

    from .. import _seccomp as sc
    from .._seccomp.policy import arch_info, native_arch

    quiet = {_errno.ENOSYS, _errno.EOPNOTSUPP}
    arch = arch or native_arch()
    info = arch_info(arch)
    table: dict[str, list[list[Any]]] = {}
    rules = []
    for rule in policy.rules:
        act = rule.action
        if isinstance(act, sc.Errno) and act.errno not in quiet:
            nr = info.syscalls.get(rule.syscall)
            if nr is not None:
                conds = [[c.arg, c.op, c.value, c.mask] for c in rule.conds]
                table.setdefault(str(nr), []).append([conds, act.errno])
            rule = sc.Rule(rule.syscall, sc.NOTIFY, rule.conds, rule.reason)
        rules.append(rule)
    default = policy.default
    default_errno = None
    if isinstance(default, sc.Errno) and default.errno not in quiet:
        default_errno = default.errno
        default = sc.NOTIFY
    spec: dict[str, Any] = {"table": table, "default": default_errno, "arch": arch}
    if broker_connect:
        # Every connect() goes to the init, which performs it (unixconnect).
        rules.insert(0, sc.Rule("connect", sc.NOTIFY, (), "pathname unix sockets: see unixconnect"))
        spec["connect"] = info.syscalls["connect"]
    new = sc.Policy(default=default, rules=tuple(rules), x32=policy.x32, unknown=policy.unknown)
    return new, spec
