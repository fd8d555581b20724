"""Raw Linux syscalls through ctypes, in one place.

Only what the standard library lacks: ``unshare`` (``os.unshare`` is 3.12+),
``mount``/``umount2``, the new mount API (``open_tree``, ``move_mount``,
``mount_setattr``), ``prctl`` and ``capset``. Every wrapper raises
``OSError`` with the errno and the syscall's name.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

_MACHINE = os.uname().machine
# Numbers that differ between the two supported arches; the new mount API
# numbers (>= 424) are shared by every arch.
if _MACHINE in ("x86_64", "amd64"):
    SYS_CAPSET = 126
    SYS_SECCOMP = 317
elif _MACHINE in ("aarch64", "arm64"):
    SYS_CAPSET = 91
    SYS_SECCOMP = 277
else:  # pragma: no cover - unsupported arch
    SYS_CAPSET = -1
    SYS_SECCOMP = -1
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_FSOPEN = 430
SYS_FSCONFIG = 431
SYS_FSMOUNT = 432
SYS_OPENAT2 = 437
SYS_MOUNT_SETATTR = 442

# clone/unshare flags
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# mount(2) flags
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_STRICTATIME = 1 << 24

# new mount API
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
AT_FDCWD = -100
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
AT_SYMLINK_NOFOLLOW = 0x100
FSOPEN_CLOEXEC = 1
FSMOUNT_CLOEXEC = 1
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
MOUNT_ATTR_IDMAP = 0x100000
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8

# prctl
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_SET_CHILD_SUBREAPER = 36
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15

# securebits: NOROOT, NO_SETUID_FIXUP, NO_CAP_AMBIENT_RAISE, each with its lock,
# and KEEP_CAPS_LOCKED (KEEP_CAPS itself stays off): uid 0 grants nothing.
SECBITS_LOCKED_DOWN = 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x80

_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _check(result: int, name: str, *detail: object) -> int:
    if result < 0:
        err = ctypes.get_errno()
        what = f"{name}({', '.join(str(d) for d in detail)})" if detail else name
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _b(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def statfs_type(path: str) -> int:
    """The type of the filesystem holding ``path`` (``statfs``'s ``f_type``,
    a magic number such as 0xEF53 for ext4)."""
    # struct statfs: 120 bytes, f_type a long first (x86_64, aarch64).
    buf = ctypes.create_string_buffer(256)
    _check(_libc.statfs(_b(path), buf), "statfs", path)
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


# statfs f_type of the kernel's interfaces (no files of anyone's, nothing
# to protect in them, and a host's would show the host): proc, sysfs,
# devpts, mqueue, cgroup, cgroup2, debugfs, tracefs, securityfs, bpf,
# pstore, efivarfs, configfs, fusectl, binfmt_misc.
KERNEL_FS = frozenset(
    {
        0x9FA0,
        0x62656572,
        0x1CD1,
        0x19800202,
        0x27E0EB,
        0x63677270,
        0x64626720,
        0x74726163,
        0x73636673,
        0xCAFE4A11,
        0x6165676C,
        0xDE5E81E4,
        0x62656570,
        0x65735543,
        0x42494E4D,
    }
)


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare", hex(flags))


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns", hex(nstype))


def mount(
    source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    r = _libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data))
    _check(r, "mount", target)


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), ctypes.c_int(flags)), "umount2", target)


def open_tree(path: str, flags: int, dirfd: int = AT_FDCWD) -> int:
    r = _syscall(ctypes.c_long(SYS_OPEN_TREE), ctypes.c_int(dirfd), _b(path), ctypes.c_uint(flags))
    return _check(r, "open_tree", path)


def move_mount(from_fd: int, to_path: str, *, to_fd: int | None = None) -> None:
    """Attach the detached mount ``from_fd`` at ``to_path`` (or at the O_PATH
    fd ``to_fd``, resolved safely beforehand)."""
    flags = MOVE_MOUNT_F_EMPTY_PATH
    if to_fd is not None:
        flags |= MOVE_MOUNT_T_EMPTY_PATH
    r = _syscall(
        ctypes.c_long(SYS_MOVE_MOUNT),
        ctypes.c_int(from_fd),
        b"",
        ctypes.c_int(AT_FDCWD if to_fd is None else to_fd),
        b"" if to_fd is not None else _b(to_path),
        ctypes.c_uint(flags),
    )
    _check(r, "move_mount", to_path)


def openat2(path: str, flags: int, resolve: int, dirfd: int = AT_FDCWD, mode: int = 0) -> int:
    """``openat2(2)``: open ``path`` with ``RESOLVE_*`` restrictions."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    r = _syscall(
        ctypes.c_long(SYS_OPENAT2),
        ctypes.c_int(dirfd),
        _b(path),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    return _check(r, "openat2", path)


def open_path_nofollow(path: str) -> int:
    """An O_PATH fd of ``path`` reached without following any symlink (the
    path was canonicalised beforehand, so a symlink now means a swap)."""
    return openat2(path, os.O_PATH, RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)


def fsmount_tmpfs(options: dict[str, str], attrs: int = 0) -> int:
    """A new, detached tmpfs mount (fsopen/fsconfig/fsmount)."""
    return fsmount_new("tmpfs", options, attrs)


def fsmount_new(fstype: str, options: dict[str, str], attrs: int = 0) -> int:
    """A new, detached mount of ``fstype`` (fsopen/fsconfig/fsmount). A
    procfs made so shows the caller's pid namespace, wherever it is
    attached later (and by whom)."""
    fs = _check(
        _syscall(ctypes.c_long(SYS_FSOPEN), fstype.encode(), ctypes.c_uint(FSOPEN_CLOEXEC)),
        "fsopen",
        fstype,
    )
    try:
        for key, value in options.items():
            r = _syscall(
                ctypes.c_long(SYS_FSCONFIG),
                ctypes.c_int(fs),
                ctypes.c_uint(FSCONFIG_SET_STRING),
                key.encode(),
                value.encode(),
                ctypes.c_int(0),
            )
            _check(r, "fsconfig", key)
        r = _syscall(
            ctypes.c_long(SYS_FSCONFIG),
            ctypes.c_int(fs),
            ctypes.c_uint(FSCONFIG_CMD_CREATE),
            None,
            None,
            ctypes.c_int(0),
        )
        _check(r, "fsconfig", "create")
        r = _syscall(
            ctypes.c_long(SYS_FSMOUNT),
            ctypes.c_int(fs),
            ctypes.c_uint(FSMOUNT_CLOEXEC),
            ctypes.c_uint(attrs),
        )
        return _check(r, "fsmount", fstype)
    finally:
        os.close(fs)


def mount_setattr(
    path: str, attr_set: int, attr_clr: int = 0, *, recursive: bool = False, dirfd: int = AT_FDCWD
) -> None:
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    if dirfd != AT_FDCWD and not path:
        flags |= AT_EMPTY_PATH
    r = _syscall(
        ctypes.c_long(SYS_MOUNT_SETATTR),
        ctypes.c_int(dirfd),
        _b(path),
        ctypes.c_uint(flags),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(r, "mount_setattr", path or dirfd)


def mount_setattr_idmap(tree_fd: int, userns_fd: int, *, recursive: bool = False) -> None:
    """Make the detached mount ``tree_fd`` (and, ``recursive``, every mount
    below it) idmapped through ``userns_fd`` (plus nosuid, nodev)."""
    attr = _MountAttr(MOUNT_ATTR_IDMAP | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0, userns_fd)
    r = _syscall(
        ctypes.c_long(SYS_MOUNT_SETATTR),
        ctypes.c_int(tree_fd),
        b"",
        ctypes.c_uint(AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(r, "mount_setattr(MOUNT_ATTR_IDMAP)")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    r = _libc.prctl(
        ctypes.c_int(option),
        ctypes.c_ulong(arg2),
        ctypes.c_ulong(arg3),
        ctypes.c_ulong(arg4),
        ctypes.c_ulong(arg5),
    )
    return _check(r, "prctl", option)


def set_name(name: bytes) -> None:
    """This thread's name (``comm``, what ``ps`` shows), at most 15 bytes;
    unlike writing /proc/self/comm it works after a uid change too."""
    buf = ctypes.create_string_buffer(name[:15])
    _check(_libc.prctl(ctypes.c_int(PR_SET_NAME), buf, None, None, None), "prctl", PR_SET_NAME)


def drop_all_capabilities() -> None:
    """Empty the bounding and ambient sets, lock securebits, then zero the
    effective, permitted and inheritable sets. Must run before ``execve``
    while CAP_SETPCAP is still held."""
    drop_bounding_and_ambient()
    drop_capabilities()


def drop_bounding_and_ambient() -> None:
    """The first half of ``drop_all_capabilities``: what a later ``execve``
    could gain. The process keeps its own capabilities (stage A drops these
    ahead, then still mounts at the claim)."""
    cap = 0
    while True:
        try:
            prctl(PR_CAPBSET_DROP, cap)
        except OSError as exc:
            if exc.errno == 22:  # EINVAL: past the last capability
                break
            if exc.errno == 1:  # EPERM: no CAP_SETPCAP (no user namespace): nothing to drop
                break
            raise
        cap += 1
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


def drop_capabilities() -> None:
    """The second half of ``drop_all_capabilities``: lock securebits, then
    zero the effective, permitted and inheritable sets."""
    try:
        prctl(PR_SET_SECUREBITS, SECBITS_LOCKED_DOWN)
    except OSError as exc:
        if exc.errno != 1:  # EPERM without CAP_SETPCAP: uid 0 grants nothing anyway then
            raise
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    r = _syscall(ctypes.c_long(SYS_CAPSET), ctypes.byref(header), ctypes.byref(data))
    _check(r, "capset")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(
        _libc.syscall(ctypes.c_long(155 if SYS_CAPSET == 126 else 41), _b(new_root), _b(put_old)),
        "pivot_root",
        new_root,
    )


# --- a process that holds a new user namespace, without copying this one ---
CLONE_VM = 0x00000100
CLONE_PIDFD = 0x00001000
_HOLDER_STACK = ctypes.create_string_buffer(16 * 1024)  # never freed: see below
_clone = _libc.clone
_clone.restype = ctypes.c_int
_clone.argtypes = [
    ctypes.c_void_p,  # fn
    ctypes.c_void_p,  # stack
    ctypes.c_int,  # flags
    ctypes.c_void_p,  # arg
    ctypes.POINTER(ctypes.c_int),  # parent_tid: where CLONE_PIDFD puts the pidfd
]
_sleep_fn: int | None = None


def libc_sleep() -> int:
    """libc's own ``sleep`` (not one an LD_PRELOAD library interposes,
    which might allocate or lock: the holder shares this process's heap).
    Looked up once per process (a ``dlopen``): the forker does it before
    it forks any stage A."""
    global _sleep_fn
    if _sleep_fn is None:
        try:
            libc = ctypes.CDLL("libc.so.6")  # glibc; a handle searches libc itself
        except OSError:
            libc = _libc  # e.g. musl
        _sleep_fn = ctypes.cast(libc.sleep, ctypes.c_void_p).value
    assert _sleep_fn is not None
    return _sleep_fn


def spawn_userns_holder(seconds: int) -> tuple[int, int]:
    """Start a child in a new user namespace that only sleeps (``seconds``
    at most) until it is killed; return its pid and a pidfd for it.

    It shares this process's memory (``CLONE_VM``): no page tables are
    copied and none of this process's pages become copy-on-write, unlike a
    ``fork`` of a Python process (~1 ms, and faults after it). It runs
    libc's ``sleep`` on a private stack and touches nothing else; every
    signal but SIGKILL/SIGSTOP is blocked in it (it inherits the mask set
    here), so no handler of this process ever runs on that stack. The
    sleep bounds its life should this process die before killing it; the
    pidfd (``CLONE_PIDFD``, Linux 5.2) lets it be killed without a pid that
    could have been reused. Single-threaded callers only (it shares this
    thread's TLS)."""
    from . import signals

    top = (ctypes.addressof(_HOLDER_STACK) + len(_HOLDER_STACK) - 64) & ~15
    fn = libc_sleep()
    pidfd = ctypes.c_int(-1)
    old = _block_signals()
    try:
        flags = CLONE_VM | CLONE_NEWUSER | CLONE_PIDFD | signals.SIGCHLD
        pid = _clone(fn, top, flags, seconds, ctypes.byref(pidfd))
        err = ctypes.get_errno()
    finally:
        _libc.pthread_sigmask(_SIG_SETMASK, old, None)
    if pid < 0:
        raise OSError(err, f"clone(CLONE_NEWUSER): {os.strerror(err)}")
    return int(pid), pidfd.value


_SIG_BLOCK = 0
_SIG_SETMASK = 2


def _block_signals() -> ctypes.Array[ctypes.c_char]:
    """Block every signal (the kernel keeps SIGKILL and SIGSTOP, glibc its
    two internal ones); return the mask to restore. libc's call, not
    ``signals.pthread_sigmask``: that one turns both sets into ``Signals``
    members, ~0.1 ms with ``valid_signals`` for every sandbox's holder."""
    every = _every_signal()
    old = ctypes.create_string_buffer(_SIGSET_BYTES)
    err = _libc.pthread_sigmask(_SIG_BLOCK, every, old)
    if err:
        raise OSError(err, f"pthread_sigmask: {os.strerror(err)}")
    return old


POSIX_SPAWN_SETSIGDEF = 0x04
POSIX_SPAWN_SETSIGMASK = 0x08
POSIX_SPAWN_SETSID = 0x80
_SIGSET_BYTES = 128  # glibc's sigset_t
_SPAWNATTR_BYTES = 1024  # >= glibc's posix_spawnattr_t (336 bytes on 64-bit)


def _every_signal() -> ctypes.Array[ctypes.c_char]:
    """A glibc ``sigset_t`` holding signals 1..64."""
    return ctypes.create_string_buffer(b"\xff" * 8, _SIGSET_BYTES)


def spawn(path: str, argv: list[str], env: dict[str, str]) -> int:
    """``posix_spawn`` (glibc: a vfork-like child that execs, sharing this
    process's memory until then) as a session leader with an empty signal
    mask and every signal's disposition at its default, *including* glibc's
    two internal ones (32 and 33), which glibc's child would otherwise leave
    ignored and ``os.posix_spawn`` cannot name. Returns the pid; raises
    OSError with the exec's errno."""

    def check(err: int, name: str) -> None:  # these return the error number
        if err:
            raise OSError(err, f"{name}: {os.strerror(err)}")

    attr = ctypes.create_string_buffer(_SPAWNATTR_BYTES)
    check(_libc.posix_spawnattr_init(attr), "posix_spawnattr_init")
    try:
        flags = POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSID
        check(_libc.posix_spawnattr_setflags(attr, ctypes.c_short(flags)), "spawnattr")
        every = _every_signal()
        check(_libc.posix_spawnattr_setsigdefault(attr, every), "spawnattr")
        empty = ctypes.create_string_buffer(_SIGSET_BYTES)
        check(_libc.posix_spawnattr_setsigmask(attr, empty), "spawnattr")
        c_argv = (ctypes.c_char_p * (len(argv) + 1))(*[os.fsencode(a) for a in argv], None)
        pairs = [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()]
        c_env = (ctypes.c_char_p * (len(pairs) + 1))(*pairs, None)
        pid = ctypes.c_int(0)
        err = _libc.posix_spawn(ctypes.byref(pid), os.fsencode(path), None, attr, c_argv, c_env)
        if err:
            raise OSError(err, os.strerror(err), path)
        return pid.value
    finally:
        _libc.posix_spawnattr_destroy(attr)
