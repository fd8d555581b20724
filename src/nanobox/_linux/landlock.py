"""Landlock through raw syscalls: unprivileged, stackable access control.

Landlock lets an unprivileged process restrict itself (and every process it
later creates) with a *ruleset*: a set of *handled* access rights, which are
denied by default once the ruleset is enforced, plus *rules* that grant some
of them back beneath given directories or files, or on given TCP ports. The
three syscalls are ``landlock_create_ruleset`` (444), ``landlock_add_rule``
(445) and ``landlock_restrict_self`` (446), with the same numbers on x86_64
and aarch64. Enforcing needs ``no_new_privs`` (or ``CAP_SYS_ADMIN``), which
:func:`apply` sets; it restricts the calling thread only, which is why the
sandbox applies it in a freshly forked, single-threaded child just before
``execve``. Domains stack: a sandboxed program can restrict itself further,
never less.

Best effort per ABI
    Each kernel reports an ABI version and knows only the rights of its ABI
    and older; naming an unknown right makes ``create_ruleset`` fail with
    ``EINVAL``. A :class:`LandlockPlan` is therefore written once, in terms of
    intent ("these paths are readable, these writable"), and :func:`apply`
    masks every right to what the running kernel understands, then returns
    the ABI it enforced so the caller can report it. A plan that must not run
    with a weaker enforcement sets ``min_abi``. Rights by ABI:

    * 1 -- the thirteen basic filesystem rights (execute, read/write files,
      read dirs, remove, make each kind of node). ABI 1 has no ``REFER``
      right, so **every cross-directory rename or hard link is denied**
      (``EXDEV``), even between two writable directories: Landlock could not
      otherwise stop a file from moving somewhere it would gain rights.
    * 2 -- ``REFER``: reparenting is allowed when both sides grant it and the
      file gains no rights by moving.
    * 3 -- ``TRUNCATE`` (``truncate``, ``ftruncate``, ``open(O_TRUNC)``).
    * 4 -- TCP ``BIND_TCP`` and ``CONNECT_TCP``. Rules match a **port only**,
      never an address, and UDP (and every other protocol) is never covered:
      pair them with a network namespace or seccomp filtering of
      ``socket()``. Binding port 0 (an ephemeral port) needs a rule for port
      0; a ``connect`` that implicitly binds is not checked.
    * 5 -- ``IOCTL_DEV``: ``ioctl`` on character and block devices opened
      beneath the rule (a few generic commands such as ``FIONBIO`` stay
      allowed). A terminal not granted it answers ``isatty() == False``.
    * 6 -- scopes: ``ABSTRACT_UNIX_SOCKET`` forbids connecting to (or
      sending to) abstract unix sockets created outside the sandbox's
      Landlock domain, and ``SIGNAL`` forbids signalling processes outside
      it (``EPERM``). Processes inside the same domain (or a nested one) are
      unaffected, so the sandbox can still signal its own children.
    * 7 -- audit logging flags for ``restrict_self``; no new rights. We pass
      no flags, the kernel's default.

What Landlock does not cover (up to ABI 7): metadata changes (``chmod``,
``chown``, ``utimes``, xattrs), ``stat``/``chdir``, fds opened before
enforcement, and mount topology. The sandbox pairs it with its read-only
mount view and seccomp.

Rules are attached to inodes: a rule on a directory covers everything beneath
it, wherever it is reached from (bind mounts included); a symlink is followed
when the rule is added, so the rule lands on the target. A rule on anything
that is not a directory may carry only file rights (``EXECUTE``,
``WRITE_FILE``, ``READ_FILE``, ``TRUNCATE``, ``IOCTL_DEV``); the kernel
rejects directory rights there with ``EINVAL``, so :func:`apply` checks each
path's type.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import stat as _stat

TYPE_CHECKING = False  # not ``typing``'s: the fork server starts without it
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

__all__ = [
    "ABSTRACT_UNIX_SOCKET",
    "BIND_TCP",
    "CONNECT_TCP",
    "EXECUTE",
    "FILE_RIGHTS",
    "IOCTL_DEV",
    "MAKE_BLOCK",
    "MAKE_CHAR",
    "MAKE_DIR",
    "MAKE_FIFO",
    "MAKE_REG",
    "MAKE_SOCK",
    "MAKE_SYM",
    "MAX_KNOWN_ABI",
    "READ_DIR",
    "READ_FILE",
    "REFER",
    "REMOVE_DIR",
    "REMOVE_FILE",
    "SIGNAL",
    "TRUNCATE",
    "WRITE_FILE",
    "LandlockError",
    "LandlockPlan",
    "abi_version",
    "apply",
    "describe",
    "fs_rights_for_abi",
    "net_rights_for_abi",
    "read_access",
    "ruleset_size",
    "scope_rights_for_abi",
    "write_access",
]

# Syscall numbers (shared by every architecture since 5.13).
SYS_CREATE_RULESET = 444
SYS_ADD_RULE = 445
SYS_RESTRICT_SELF = 446

CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1
RULE_NET_PORT = 2
PR_SET_NO_NEW_PRIVS = 38

# The newest ABI whose rights this module knows.
MAX_KNOWN_ABI = 7

# Filesystem rights.
EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5

# Network rights (ABI 4).
BIND_TCP = 1 << 0
CONNECT_TCP = 1 << 1

# Scopes (ABI 6).
ABSTRACT_UNIX_SOCKET = 1 << 0
SIGNAL = 1 << 1

_FS_ABI1 = (1 << 13) - 1
# The only rights a rule on a non-directory may carry.
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
_READ_RIGHTS = READ_FILE | READ_DIR | EXECUTE


def fs_rights_for_abi(abi: int) -> int:
    """Every filesystem right the given ABI knows (0 for ABI 0)."""
    if abi < 1:
        return 0
    rights = _FS_ABI1
    if abi >= 2:
        rights |= REFER
    if abi >= 3:
        rights |= TRUNCATE
    if abi >= 5:
        rights |= IOCTL_DEV
    return rights


def net_rights_for_abi(abi: int) -> int:
    """Every network right the given ABI knows."""
    return BIND_TCP | CONNECT_TCP if abi >= 4 else 0


def scope_rights_for_abi(abi: int) -> int:
    """Every scope the given ABI knows."""
    return ABSTRACT_UNIX_SOCKET | SIGNAL if abi >= 6 else 0


def read_access(abi: int, is_dir: bool) -> int:
    """The rights a ``read`` path gets: read files, list dirs, execute."""
    rights = _READ_RIGHTS & fs_rights_for_abi(abi)
    return rights if is_dir else rights & FILE_RIGHTS


def write_access(abi: int, is_dir: bool) -> int:
    """The rights a ``write`` path gets: everything handled at the ABI."""
    rights = fs_rights_for_abi(abi)
    return rights if is_dir else rights & FILE_RIGHTS


def describe(abi: int) -> str:
    """One line for ``nanobox check`` saying what the ABI lets us enforce."""
    if abi < 1:
        return "Landlock unavailable"
    extras = [
        name for need, name in ((2, "refer"), (3, "truncate"), (5, "ioctl_dev")) if abi >= need
    ]
    if extras:
        parts = [f"filesystem (with {', '.join(extras)})"]
    else:
        parts = ["filesystem (no cross-directory rename/link)"]
    if abi >= 4:
        parts.append("TCP bind/connect")
    if abi >= 6:
        parts.append("scopes (abstract unix sockets, signals)")
    text = f"ABI {abi}: {', '.join(parts)}"
    if abi > MAX_KNOWN_ABI:
        text += f" (rights newer than ABI {MAX_KNOWN_ABI} unused)"
    return text


class LandlockError(OSError):
    """A Landlock step failed; ``step`` names it (``create_ruleset``,
    ``add_rule <path>``, ``add_rule tcp <port>``, ``open <path>``,
    ``no_new_privs``, ``restrict_self`` or ``abi``)."""

    def __init__(self, err: int, step: str, detail: str | None = None) -> None:
        super().__init__(err, f"{step}: {detail or os.strerror(err)}")
        self.step = step
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.errno, self.step, self.detail))


def _check_paths(name: str, value: object) -> None:
    if not isinstance(value, tuple) or not all(isinstance(p, str) and p for p in value):
        raise TypeError(f"LandlockPlan.{name} must be a tuple of non-empty strings")
    if any("\0" in p for p in value):
        raise ValueError(f"LandlockPlan.{name} has a path containing NUL")


def _check_ports(name: str, value: object) -> None:
    if not isinstance(value, tuple) or not all(
        isinstance(p, int) and not isinstance(p, bool) for p in value
    ):
        raise TypeError(f"LandlockPlan.{name} must be a tuple of ints")
    for port in value:
        if not 0 <= port <= 65535:
            raise ValueError(f"LandlockPlan.{name}: port {port} is out of range")


class LandlockPlan:
    """What the sandbox may touch, computed in the caller, applied in the child.

    ``read`` paths get read, list and execute; ``list`` directories only
    listing (``READ_DIR``, for the ancestors of hidden paths); ``write`` paths get every
    filesystem right the kernel handles. Either may name a directory (the
    rights cover everything beneath it) or a single file or device (file
    rights only). Missing paths are skipped when applying. Everything not
    granted is denied. ``restrict_tcp`` denies TCP bind/connect except on the
    listed ports (the port lists are ignored without it).
    """

    # A plain immutable class rather than a dataclass: the fork server and
    # the command's process import this module, and ``dataclasses`` (with
    # ``inspect``) would add ~10 ms to the server's start.
    __slots__ = (
        "allowed_bind_ports",
        "allowed_connect_ports",
        "list",
        "min_abi",
        "read",
        "restrict_tcp",
        "scope_abstract_unix",
        "scope_signal",
        "write",
    )
    read: tuple[str, ...]
    write: tuple[str, ...]
    list: tuple[str, ...]
    scope_abstract_unix: bool
    scope_signal: bool
    restrict_tcp: bool
    allowed_connect_ports: tuple[int, ...]
    allowed_bind_ports: tuple[int, ...]
    min_abi: int

    def __init__(
        self,
        read: tuple[str, ...] = (),
        write: tuple[str, ...] = (),
        list: tuple[str, ...] = (),
        scope_abstract_unix: bool = False,
        scope_signal: bool = False,
        restrict_tcp: bool = False,
        allowed_connect_ports: tuple[int, ...] = (),
        allowed_bind_ports: tuple[int, ...] = (),
        min_abi: int = 1,
    ) -> None:
        values = {
            "read": read,
            "write": write,
            "list": list,
            "scope_abstract_unix": scope_abstract_unix,
            "scope_signal": scope_signal,
            "restrict_tcp": restrict_tcp,
            "allowed_connect_ports": allowed_connect_ports,
            "allowed_bind_ports": allowed_bind_ports,
            "min_abi": min_abi,
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)
        self._check()

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"LandlockPlan is immutable (cannot set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"LandlockPlan is immutable (cannot delete {name!r})")

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in _FIELDS)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, LandlockPlan)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in _FIELDS)
        return f"LandlockPlan({fields})"

    def _check(self) -> None:
        _check_paths("read", self.read)
        _check_paths("write", self.write)
        _check_paths("list", self.list)
        _check_ports("allowed_connect_ports", self.allowed_connect_ports)
        _check_ports("allowed_bind_ports", self.allowed_bind_ports)
        for name in ("scope_abstract_unix", "scope_signal", "restrict_tcp"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"LandlockPlan.{name} must be a bool")
        if not isinstance(self.min_abi, int) or isinstance(self.min_abi, bool):
            raise TypeError("LandlockPlan.min_abi must be an int")
        if self.min_abi < 0:
            raise ValueError("LandlockPlan.min_abi must be >= 0")

    def to_json(self) -> dict[str, Any]:
        """Plain dicts, lists, strings, ints and bools (for ``json.dumps``)."""
        return {
            "read": list(self.read),
            "write": list(self.write),
            "list": list(self.list),
            "scope_abstract_unix": self.scope_abstract_unix,
            "scope_signal": self.scope_signal,
            "restrict_tcp": self.restrict_tcp,
            "allowed_connect_ports": list(self.allowed_connect_ports),
            "allowed_bind_ports": list(self.allowed_bind_ports),
            "min_abi": self.min_abi,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LandlockPlan:
        """The inverse of :meth:`to_json`; unknown keys are an error."""
        unknown = set(data) - _PLAN_KEYS
        if unknown:
            raise ValueError(f"unknown LandlockPlan keys: {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            kwargs[key] = tuple(value) if key in _TUPLE_KEYS else value
        return cls(**kwargs)


_FIELDS = (
    "read",
    "write",
    "list",
    "scope_abstract_unix",
    "scope_signal",
    "restrict_tcp",
    "allowed_connect_ports",
    "allowed_bind_ports",
    "min_abi",
)
_PLAN_KEYS = frozenset(_FIELDS)
_TUPLE_KEYS = frozenset(("read", "write", "list", "allowed_connect_ports", "allowed_bind_ports"))


# --- ctypes plumbing, built once at import ---------------------------------


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),  # ABI 1
        ("handled_access_net", ctypes.c_uint64),  # ABI 4
        ("scoped", ctypes.c_uint64),  # ABI 6
    ]


class _PathBeneathAttr(ctypes.Structure):
    # Packed in the UAPI header: 12 bytes. ``_layout_`` keeps 3.14+ from
    # warning that ``_pack_`` alone implies the MSVC layout (ignored before).
    _layout_ = "ms"
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPortAttr(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


# Sizes of the ruleset attribute by the last field filled.
_SIZE_FS = 8
_SIZE_NET = 16
_SIZE_SCOPED = 24
assert ctypes.sizeof(_RulesetAttr) == _SIZE_SCOPED
assert ctypes.sizeof(_PathBeneathAttr) == 12
assert ctypes.sizeof(_NetPortAttr) == 16

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_prctl = _libc.prctl
_prctl.restype = ctypes.c_int
_NULL = ctypes.c_void_p(None)
_ZERO = ctypes.c_long(0)

_abi_cache: int | None = None


def abi_version() -> int:
    """The running kernel's Landlock ABI, or 0 when Landlock is unavailable
    (not built in, disabled at boot, or the syscall is filtered). Cached."""
    global _abi_cache
    if _abi_cache is None:
        r = int(
            _syscall(
                ctypes.c_long(SYS_CREATE_RULESET),
                _NULL,
                _ZERO,
                ctypes.c_long(CREATE_RULESET_VERSION),
            )
        )
        _abi_cache = r if r > 0 else 0
    return _abi_cache


def _fail(step: str) -> LandlockError:
    return LandlockError(ctypes.get_errno(), step)


def ruleset_size(handled_net: int, scoped: int) -> int:
    """The attribute size matching the fields actually filled."""
    if scoped:
        return _SIZE_SCOPED
    if handled_net:
        return _SIZE_NET
    return _SIZE_FS


def _add_path(ruleset_fd: int, path: str, abi: int, write: bool, list_only: bool = False) -> None:
    # Read and list rules are planned around hidden paths, never on a link
    # (a rule is for where the link leads): one found here now (swapped in
    # since the plan) is skipped. Write rules follow links (/var/run).
    follow = write
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return  # missing, or unreachable anyway (DAC): nothing to grant
    except OSError as exc:
        raise LandlockError(exc.errno or _errno.EIO, f"open {path}") from None
    try:
        st = os.fstat(fd)
        if _stat.S_ISLNK(st.st_mode):
            return
        is_dir = _stat.S_ISDIR(st.st_mode)
        access = write_access(abi, is_dir) if write else read_access(abi, is_dir)
        if list_only:
            if not is_dir:
                return
            access = READ_DIR
        attr = _PathBeneathAttr(access, fd)
        r = _syscall(
            ctypes.c_long(SYS_ADD_RULE),
            ctypes.c_long(ruleset_fd),
            ctypes.c_long(RULE_PATH_BENEATH),
            ctypes.byref(attr),
            _ZERO,
        )
        if r < 0:
            raise _fail(f"add_rule {path}")
    finally:
        os.close(fd)


def _add_port(ruleset_fd: int, port: int, access: int) -> None:
    attr = _NetPortAttr(access, port)
    r = _syscall(
        ctypes.c_long(SYS_ADD_RULE),
        ctypes.c_long(ruleset_fd),
        ctypes.c_long(RULE_NET_PORT),
        ctypes.byref(attr),
        _ZERO,
    )
    if r < 0:
        raise _fail(f"add_rule tcp {port}")


def apply(plan: LandlockPlan, *, max_abi: int | None = None) -> int:
    """Enforce ``plan`` on the calling thread and its future children.

    Rights are masked to the running ABI (capped at ``max_abi`` when given,
    which tests use to emulate older kernels). Returns the ABI enforced (0
    when Landlock is unavailable and ``plan.min_abi`` is 0, in which case
    nothing happens). Raises :class:`LandlockError` when the ABI is below
    ``plan.min_abi`` or a step fails; every fd opened here is closed.
    """
    ruleset_fd, abi = prepare(plan, max_abi=max_abi)
    if ruleset_fd >= 0:
        restrict(ruleset_fd)
    return abi


def prepare(plan: LandlockPlan, *, max_abi: int | None = None) -> tuple[int, int]:
    """The first half of :func:`apply`: the ruleset with ``plan``'s rules,
    not enforced yet (a sandbox built ahead makes it before its run). Returns
    ``(ruleset fd, abi)``; the fd is -1 when there is nothing to enforce."""
    abi = min(abi_version(), MAX_KNOWN_ABI)
    if max_abi is not None:
        abi = min(abi, max_abi)
    if abi < plan.min_abi:
        raise LandlockError(
            _errno.EOPNOTSUPP,
            "abi",
            f"Landlock ABI {abi} is below the required ABI {plan.min_abi}",
        )
    if abi < 1:
        return -1, 0
    handled_fs = fs_rights_for_abi(abi)
    handled_net = net_rights_for_abi(abi) if plan.restrict_tcp else 0
    scoped = scope_rights_for_abi(abi) & (
        (ABSTRACT_UNIX_SOCKET if plan.scope_abstract_unix else 0)
        | (SIGNAL if plan.scope_signal else 0)
    )
    attr = _RulesetAttr(handled_fs, handled_net, scoped)
    ruleset_fd = int(
        _syscall(
            ctypes.c_long(SYS_CREATE_RULESET),
            ctypes.byref(attr),
            ctypes.c_long(ruleset_size(handled_net, scoped)),
            _ZERO,
        )
    )
    if ruleset_fd < 0:
        raise _fail("create_ruleset")
    try:
        for path in plan.read:
            _add_path(ruleset_fd, path, abi, write=False)
        for path in plan.write:
            _add_path(ruleset_fd, path, abi, write=True)
        for path in plan.list:
            _add_path(ruleset_fd, path, abi, write=False, list_only=True)
        if handled_net:
            for port in plan.allowed_connect_ports:
                _add_port(ruleset_fd, port, CONNECT_TCP)
            for port in plan.allowed_bind_ports:
                _add_port(ruleset_fd, port, BIND_TCP)
    except BaseException:
        os.close(ruleset_fd)
        raise
    return ruleset_fd, abi


def restrict(ruleset_fd: int) -> None:
    """The second half of :func:`apply`: no_new_privs, then enforce the
    ruleset on the calling thread (and its future children); closes it."""
    try:
        if (
            _prctl(
                ctypes.c_int(PR_SET_NO_NEW_PRIVS),
                ctypes.c_ulong(1),
                ctypes.c_ulong(0),
                ctypes.c_ulong(0),
                ctypes.c_ulong(0),
            )
            != 0
        ):
            raise _fail("no_new_privs")
        if _syscall(ctypes.c_long(SYS_RESTRICT_SELF), ctypes.c_long(ruleset_fd), _ZERO) < 0:
            raise _fail("restrict_self")
    finally:
        os.close(ruleset_fd)
