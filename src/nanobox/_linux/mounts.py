"""The filesystem view, built by the sandbox's init inside its new mount
namespace (it holds CAP_SYS_ADMIN there, and only there).

The view is a list of operations computed from the policy on the caller's
side (``fsplan``); this module executes them:

1. ``/`` becomes recursively private: nothing propagates to the host.
2. Every source is cloned (``open_tree``) while the host view is intact:
   device nodes, bind sources (opened with ``RESOLVE_NO_SYMLINKS``), and the
   minimal root's directories.
3. The root: the host's, made read-only, ``nosuid``, ``nodev`` with one
   recursive ``mount_setattr``; or (``rootfs="minimal"``) a new tmpfs with
   only /usr, /bin, /lib*, /sbin and a few /etc files, entered with
   ``pivot_root``.
4. The operations, shallow to deep: tmpfs, read-write binds, read-only
   binds, protected paths, hidden paths. A missing destination is created
   as a mount point; under a read-only directory that needs a writable
   "shadow" (a tmpfs re-binding every entry of the directory).
5. ``/dev`` (tmpfs with the usual nodes, ``shm``, ``pts``), ``/proc``, and
   ``/sys`` (of the sandbox's network namespace, read-only).
"""

from __future__ import annotations

import errno
import os
import stat

from . import sys as k

TYPE_CHECKING = False  # not ``typing``'s: the fork server starts without it
if TYPE_CHECKING:
    from typing import Any

DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
_DEV_LINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
    "core": "/proc/kcore",
    "ptmx": "pts/ptmx",
}
MINIMAL_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
MINIMAL_ETC = (
    "alternatives",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "passwd",
    "group",
    "nsswitch.conf",
    "hosts",
    "host.conf",
    "localtime",
    "timezone",
    "ssl",
    "ca-certificates",
    "mime.types",
    "os-release",
    "debian_version",
    "services",
    "protocols",
    "locale.alias",
    "locale.gen",
    "bash.bashrc",
    "profile",
    "environment",
    "magic",
    "magic.mime",
    "gai.conf",
    "python3",
    "python3.11",
)
ATTR_SAFE = k.MOUNT_ATTR_NOSUID | k.MOUNT_ATTR_NODEV


class MountStepError(OSError):
    """A mount step failed; ``step`` names it."""

    def __init__(self, step: str, exc: OSError) -> None:
        super().__init__(exc.errno, f"{step}: {exc.strerror or exc}")
        self.step = step


def _step(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except OSError as exc:
        raise MountStepError(name, exc) from exc


def _clone(path: str, *, recursive: bool = True) -> int:
    """Clone the mount tree at ``path`` without following symlinks."""
    fd = k.open_path_nofollow(path)
    try:
        flags = k.OPEN_TREE_CLONE | k.OPEN_TREE_CLOEXEC | k.AT_EMPTY_PATH
        if recursive:
            flags |= k.AT_RECURSIVE
        return k.open_tree("", flags, dirfd=fd)
    finally:
        os.close(fd)


def _is_file(path: str) -> bool:
    """Exists and is neither a directory nor a symlink."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return not (stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode))


class _Builder:
    def __init__(self, view: dict[str, Any], proc: int | OSError | None = None) -> None:
        self.view = view
        # The sandbox's procfs, made by its PID 1 (a detached mount), or why
        # it could not be; None: mount one here (this process is in the pid
        # namespace itself).
        self.proc = proc
        self.shadows: list[str] = []
        self.null_fds: list[int] = []
        self.degraded: list[str] = []

    # -- mount points ------------------------------------------------------
    def ensure(self, dst: str, is_dir: bool) -> None:
        """Make ``dst`` exist as a directory or file to mount on."""
        self.reach(dst)
        if os.path.lexists(dst):
            return
        parent = os.path.dirname(dst)
        if not os.path.lexists(parent):
            self.ensure(parent, True)
        try:
            self._create(dst, is_dir)
        except OSError as exc:
            if exc.errno not in (30, 13, 1):  # EROFS, EACCES, EPERM
                raise
            self.shadow(parent)
            self._create(dst, is_dir)

    def reach(self, dst: str) -> None:
        """Make every directory above ``dst`` traversable for the sandbox.

        A root caller's sandbox runs as an unprivileged uid, which cannot
        pass through a directory only root may enter (``/root`` for a
        workspace in ``/root/project``). Such a directory is covered with an
        empty tmpfs -- its contents were unreachable anyway -- in which the
        path to ``dst`` is then created; the source was cloned beforehand by
        the fork server, so nothing needs to be reached through it."""
        path = "/"
        for part in [p for p in os.path.dirname(dst).split("/") if p]:
            path = os.path.join(path, part)
            if not os.path.isdir(path) or os.access(path, os.X_OK):
                continue
            _step(
                f"cover untraversable {path}",
                k.mount,
                "tmpfs",
                path,
                "tmpfs",
                k.MS_NOSUID | k.MS_NODEV,
                "mode=0755,size=1m",
            )
            self.shadows.append(path)

    @staticmethod
    def _create(dst: str, is_dir: bool) -> None:
        if is_dir:
            os.mkdir(dst, 0o755)
        else:
            os.close(os.open(dst, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o644))

    def shadow(self, directory: str) -> None:
        """Cover the read-only ``directory`` with a tmpfs that re-binds each
        of its entries, so new mount points can be created in it."""
        clone = _clone(directory)
        mode = stat.S_IMODE(os.stat(directory).st_mode)
        k.mount("tmpfs", directory, "tmpfs", k.MS_NOSUID | k.MS_NODEV, f"mode={mode:o},size=1m")
        listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=clone)
        try:
            names = os.listdir(listing)
        finally:
            os.close(listing)
        for name in names:
            st = os.lstat(name, dir_fd=clone)
            target = os.path.join(directory, name)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(name, dir_fd=clone), target)
                continue
            self._create(target, stat.S_ISDIR(st.st_mode))
            sub = k.open_tree(
                name,
                k.OPEN_TREE_CLONE | k.OPEN_TREE_CLOEXEC | k.AT_RECURSIVE | k.AT_SYMLINK_NOFOLLOW,
                dirfd=clone,
            )
            try:
                k.move_mount(sub, target)
            finally:
                os.close(sub)
        os.close(clone)
        self.shadows.append(directory)

    # -- hides -------------------------------------------------------------
    def hide(self, dst: str) -> None:
        """Cover ``dst``: a directory with an empty read-only tmpfs, a file
        with a ``nodev`` read-only bind of /dev/null (it fails to open).
        (Cloning out of a detached tmpfs would be neater, but kernels before
        6.15 refuse ``open_tree`` on a detached mount.)"""
        if os.path.isdir(dst):
            _step(
                f"hide {dst}",
                k.mount,
                "tmpfs",
                dst,
                "tmpfs",
                k.MS_RDONLY | k.MS_NOSUID | k.MS_NODEV | k.MS_NOEXEC,
                "mode=0755,size=4k",
            )
            return
        if not self.null_fds and os.path.exists("/dev/null"):
            # One more than counted up front (it became a file since).
            self.null_fds = [_step("clone /dev/null", _clone, "/dev/null", recursive=False)]
        if not self.null_fds:
            raise MountStepError(f"hide {dst}", OSError(19, "no /dev/null to hide files with"))
        fd = self.null_fds.pop()
        _step(
            f"hide {dst}",
            k.mount_setattr,
            "",
            k.MOUNT_ATTR_RDONLY | k.MOUNT_ATTR_NODEV | k.MOUNT_ATTR_NOSUID | k.MOUNT_ATTR_NOEXEC,
            dirfd=fd,
        )
        self.attach(fd, dst, f"hide {dst}")

    def attach(self, fd: int, dst: str, step: str) -> None:
        target = _step(f"open {dst}", k.open_path_nofollow, dst)
        try:
            _step(step, k.move_mount, fd, dst, to_fd=target)
        finally:
            os.close(target)
            os.close(fd)


def build(
    view: dict[str, Any],
    proc: int | OSError | None = None,
    late: list[dict[str, Any]] | None = None,
    deferred: frozenset[str] = frozenset(),
) -> list[str]:
    """Execute ``view`` in the current (new, private-to-us) mount namespace;
    return the degradations it had to accept (degraded mode only).

    With ``late`` (a sandbox built ahead of its run): the operations that
    depend on the moment the run starts are appended there instead of done,
    for ``build_late``: protecting the paths in ``deferred`` (placeholders,
    which the fork server creates only when the run starts) and hiding
    paths that do not exist yet (one may appear before the run starts)."""
    b = _Builder(view, proc)
    _step("make / private", k.mount, None, "/", None, k.MS_REC | k.MS_PRIVATE)

    # 2. clone every source while the host view is intact
    dev_fds: dict[str, int] = {}
    if view.get("dev", True):
        for name in DEV_NODES:
            path = f"/dev/{name}"
            if os.path.exists(path):
                dev_fds[name] = _step(f"clone {path}", _clone, path, recursive=False)
    # One /dev/null clone per file to hide now (``hide`` below: a missing
    # path is left for later, a directory gets a tmpfs): a clone closed
    # unused is dissolved, which waits for an RCU grace period (~0.4 ms).
    # (A hide where a bind shows a host directory elsewhere names the host
    # path too: its destination is not there yet.)
    hides = sum(
        1 for op in view["ops"] if op["t"] == "hide" and _is_file(op.get("host", op["dst"]))
    )
    if hides and os.path.exists("/dev/null"):
        b.null_fds = [
            _step("clone /dev/null", _clone, "/dev/null", recursive=False) for _ in range(hides)
        ]
    sources: dict[int, int] = {}
    for key, fd in view.get("premade", {}).items():
        sources[int(key)] = fd  # idmapped clones made by the fork server
    for i, op in enumerate(view["ops"]):
        if i in sources:
            continue
        if op["t"] in ("bind", "robind"):
            fd = _step(f"clone {op['src']}", _clone, op["src"])
            if op["t"] == "robind":
                _step(
                    f"make {op['src']} read-only",
                    k.mount_setattr,
                    "",
                    k.MOUNT_ATTR_RDONLY | ATTR_SAFE,
                    recursive=True,
                    dirfd=fd,
                )
            else:
                # On the mounts below it too. (A read-only source stays
                # read-only: in a user namespace the kernel refuses to clear
                # the flag anyway.)
                _step(
                    f"set nosuid,nodev on {op['src']}",
                    k.mount_setattr,
                    "",
                    ATTR_SAFE,
                    recursive=True,
                    dirfd=fd,
                )
            sources[i] = fd

    # 3. the root
    if view.get("rootfs") == "minimal":
        _minimal_root(b)
    elif view.get("mirror_root"):
        _mirror_root(b)
    else:
        _step(
            "make the host root read-only",
            k.mount_setattr,
            "/",
            k.MOUNT_ATTR_RDONLY | ATTR_SAFE,
            recursive=True,
        )

    # 4. the operations, shallow to deep
    for i, op in enumerate(view["ops"]):
        t, dst = op["t"], op["dst"]
        if t == "tmpfs":
            _step(f"create mount point {dst}", b.ensure, dst, True)
            _step(
                f"mount tmpfs at {dst}",
                k.mount,
                "tmpfs",
                dst,
                "tmpfs",
                k.MS_NOSUID | k.MS_NODEV,
                f"mode={op['mode']:o},size={op['size']}",
            )
        elif t in ("bind", "robind"):
            fd = sources[i]
            is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
            _step(f"create mount point {dst}", b.ensure, dst, is_dir)
            if os.path.isdir(dst) != is_dir:  # (else move_mount's bare EINVAL)
                kinds = ("a directory", "a file") if is_dir else ("a file", "a directory")
                raise MountStepError(
                    f"mount {op['src']} at {dst}",
                    OSError(
                        20 if is_dir else 21, f"{op['src']} is {kinds[0]} but {dst} is {kinds[1]}"
                    ),
                )
            b.attach(fd, dst, f"mount {op['src']} at {dst}")
            for rel, sub in view.get("premade_below", {}).get(str(i), ()):
                _attach_below(b, sub, os.path.join(dst, rel))
        elif t == "protect":
            if late is not None and dst in deferred:
                late.append(op)
                continue
            _protect(b, op)
        elif t == "hide":
            if not os.path.lexists(dst) or os.path.islink(dst):
                if late is not None:
                    late.append(op)
                continue
            b.hide(dst)
    for fd in b.null_fds:
        os.close(fd)

    # 5. /dev, /proc, /sys
    if view.get("dev", True):
        _build_dev(b, dev_fds, view.get("shm_size", 64 * 1024 * 1024))
    minimal = view.get("rootfs") == "minimal" or bool(view.get("mirror_root"))
    if view.get("sys", False) and not minimal:
        _step("create mount point /sys", b.ensure, "/sys", True)
        _step(
            "mount /sys",
            k.mount,
            "sysfs",
            "/sys",
            "sysfs",
            k.MS_RDONLY | k.MS_NOSUID | k.MS_NODEV | k.MS_NOEXEC,
        )
    if view.get("proc", True) and not minimal:
        _step("create mount point /proc", b.ensure, "/proc", True)
        _mount_proc(b, "/proc", view)
    for directory in b.shadows:
        _step(f"make {directory} read-only", k.mount_setattr, directory, k.MOUNT_ATTR_RDONLY)
    if view.get("rootfs") == "minimal" or view.get("mirror_root"):
        _step("make / read-only", k.mount_setattr, "/", k.MOUNT_ATTR_RDONLY)
    return b.degraded


def _attach_below(b: _Builder, fd: int, dst: str) -> None:
    """A mount below a root caller's writable root that could not be
    idmapped (see ``userns.idmapped_clone``): its read-only clone ``fd``,
    or (-1) an empty read-only directory, goes at ``dst``. Where the
    sandbox's uid cannot reach ``dst`` it cannot write under it either:
    nothing to do."""
    try:
        target = k.open_path_nofollow(dst)
    except PermissionError:
        if fd >= 0:
            os.close(fd)
        return
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
        raise MountStepError(f"open {dst}", exc) from exc
    try:
        if fd < 0:
            b.hide(dst)
        else:
            _step(f"mount {dst} (read-only)", k.move_mount, fd, dst, to_fd=target)
    finally:
        os.close(target)
        if fd >= 0:
            os.close(fd)


def placeholder_protects(plan: dict[str, Any], hosts: set[str] | None = None) -> frozenset[str]:
    """Where the sandbox sees the placeholders (``deferred`` for ``build``):
    the fork server creates them on the host (``plan["placeholders"]``)
    only when the run starts. ``hosts``: only these of them."""
    if hosts is None:
        hosts = {path for path, _kind in plan.get("placeholders", ())}
    return frozenset(
        op["dst"]
        for op in plan["view"].get("ops", ())
        if op["t"] == "protect" and op.get("host", op["dst"]) in hosts
    )


def build_late(
    view: dict[str, Any], late: list[dict[str, Any]], skip: frozenset[str] = frozenset()
) -> None:
    """The operations ``build`` left for the start of the run, in the
    finished view (same order: shallow to deep), but for protecting the
    paths in ``skip`` (placeholders the server did not make: names the
    sandbox cannot create)."""
    b = _Builder(view)
    for op in late:
        dst = op["dst"]
        if op["t"] == "protect":
            if dst in skip:
                continue
            _protect(b, op)
        elif os.path.lexists(dst) and not os.path.islink(dst):
            b.hide(dst)  # (clones /dev/null for a file)
    for fd in b.null_fds:
        os.close(fd)


def _mount_proc(b: _Builder, target: str, view: dict[str, Any]) -> None:
    """A new procfs for the sandbox's pid namespace. Inside some containers
    the kernel refuses one (their /proc has masked entries, so a new one
    would reveal more): then, only in degraded mode, an empty read-only
    /proc instead of the host's (which would show every host process)."""
    flags = k.MS_NOSUID | k.MS_NODEV | k.MS_NOEXEC
    try:
        if isinstance(b.proc, OSError):
            raise b.proc
        if b.proc is not None:
            k.move_mount(b.proc, target)
        else:
            k.mount("proc", target, "proc", flags)
        return
    except OSError as exc:
        if exc.errno not in (1, 13) or not view.get("proc_fallback"):
            raise MountStepError(
                "mount /proc",
                OSError(
                    exc.errno,
                    "the kernel refused a new procfs, as it does in containers whose "
                    "/proc has masked paths: run the container with an unmasked /proc (e.g. Docker "
                    "--security-opt systempaths=unconfined) or allow degraded mode",
                ),
            ) from exc
    _step(
        "mount an empty /proc",
        k.mount,
        "tmpfs",
        target,
        "tmpfs",
        k.MS_RDONLY | flags,
        "mode=0555,size=4k",
    )
    b.degraded.append("proc: the kernel refused a new /proc here; the command gets an empty one")


def _protect(b: _Builder, op: dict[str, Any]) -> None:
    """Bind ``dst`` read-only onto itself (or, with ``rw``, pin it as a mount
    point that cannot be renamed or removed). One O_PATH fd, reached
    without following a symlink, is both what is cloned and where the
    clone goes (a run's placeholders are protected on its critical path)."""
    dst = op["dst"]
    try:
        target = k.open_path_nofollow(dst)
    except PermissionError:
        # Below a directory the sandbox cannot search (e.g. another user's
        # 0700 directory in a root caller's workspace): the command cannot
        # reach it either, so there is nothing to protect.
        return
    except FileNotFoundError:  # the placeholder vanished: fail closed
        raise MountStepError(f"protect {dst}", FileNotFoundError(2, "no such file")) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink on the way: fail closed
            raise MountStepError(f"protect {dst}", OSError(40, "is a symlink")) from None
        raise MountStepError(f"open {dst}", exc) from exc
    try:
        flags = k.OPEN_TREE_CLONE | k.OPEN_TREE_CLOEXEC | k.AT_EMPTY_PATH | k.AT_RECURSIVE
        fd = _step(f"clone {dst}", k.open_tree, "", flags, dirfd=target)
        try:
            if op.get("rw"):
                _step(f"pin {dst}", k.mount_setattr, "", ATTR_SAFE, dirfd=fd)
            else:
                _step(
                    f"make {dst} read-only",
                    k.mount_setattr,
                    "",
                    k.MOUNT_ATTR_RDONLY | ATTR_SAFE,
                    recursive=True,
                    dirfd=fd,
                )
            _step(f"protect {dst}", k.move_mount, fd, dst, to_fd=target)
        finally:
            os.close(fd)
    finally:
        os.close(target)


def _minimal_root(b: _Builder) -> None:
    paths = list(MINIMAL_DIRS) + [f"/etc/{name}" for name in MINIMAL_ETC]
    _new_root(b, paths, "create the minimal root")


def _mirror_root(b: _Builder) -> None:
    """The host root rebuilt on a tmpfs (each top-level entry bound
    read-only), so new top-level mount points can be created."""
    skip = ("proc", "dev", "sys")
    paths = ["/" + name for name in sorted(os.listdir("/")) if name not in skip]
    _new_root(b, paths, "create the root")


def _new_root(b: _Builder, paths: list[str], what: str) -> None:
    clones: list[tuple[str, int | str]] = []  # (path, clone fd or symlink target)
    for path in paths:
        if os.path.islink(path):
            clones.append((path, os.readlink(path)))
        elif os.path.exists(path):
            fd = _step(f"clone {path}", _clone, path)
            k.mount_setattr("", k.MOUNT_ATTR_RDONLY | ATTR_SAFE, recursive=True, dirfd=fd)
            clones.append((path, fd))
    root = _step(what, k.fsmount_tmpfs, {"mode": "0755", "size": "16m"}, ATTR_SAFE)
    staging = "/tmp"
    _step("mount the minimal root", k.move_mount, root, staging)
    os.close(root)
    for d in ("etc", "tmp", "proc", "dev", "sys", "run", "home", "root", "var", "var/tmp"):
        os.makedirs(os.path.join(staging, d), exist_ok=True)
    for path, src in clones:
        target = staging + path
        if isinstance(src, str):
            os.symlink(src, target)
            continue
        if stat.S_ISDIR(os.fstat(src).st_mode):
            os.makedirs(target, exist_ok=True)
        else:
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
        _step(f"mount {path}", k.move_mount, src, target)
        os.close(src)
    # proc and sysfs can only be mounted while a fully visible instance
    # exists in this mount namespace: mount them before the host root goes.
    if isinstance(b.proc, OSError):
        raise MountStepError("mount /proc", b.proc)
    if b.proc is not None:
        _step("mount /proc", k.move_mount, b.proc, staging + "/proc")
    else:
        _step(
            "mount /proc",
            k.mount,
            "proc",
            staging + "/proc",
            "proc",
            k.MS_NOSUID | k.MS_NODEV | k.MS_NOEXEC,
        )
    if b.view.get("sys", False):
        _step(
            "mount /sys",
            k.mount,
            "sysfs",
            staging + "/sys",
            "sysfs",
            k.MS_RDONLY | k.MS_NOSUID | k.MS_NODEV | k.MS_NOEXEC,
        )
    os.chdir(staging)
    _step("pivot_root", k.pivot_root, ".", ".")
    _step("detach the host root", k.umount2, ".", 2)  # MNT_DETACH
    os.chdir("/")


def _build_dev(b: _Builder, dev_fds: dict[str, int], shm_size: int) -> None:
    _step("create mount point /dev", b.ensure, "/dev", True)
    _step(
        "mount /dev",
        k.mount,
        "tmpfs",
        "/dev",
        "tmpfs",
        k.MS_NOSUID | k.MS_NOEXEC,
        "mode=755,size=1m",
    )
    for name, fd in dev_fds.items():
        path = f"/dev/{name}"
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666))
        _step(f"bind {path}", k.move_mount, fd, path)
        os.close(fd)
    for name, target in _DEV_LINKS.items():
        os.symlink(target, f"/dev/{name}")
    os.mkdir("/dev/shm", 0o1777)
    _step(
        "mount /dev/shm",
        k.mount,
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        k.MS_NOSUID | k.MS_NODEV,
        f"mode=1777,size={shm_size}",
    )
    os.mkdir("/dev/pts", 0o755)
    _step(
        "mount /dev/pts",
        k.mount,
        "devpts",
        "/dev/pts",
        "devpts",
        k.MS_NOSUID | k.MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=620",
    )
    _step(
        "make /dev read-only",
        k.mount,
        None,
        "/dev",
        None,
        k.MS_REMOUNT | k.MS_BIND | k.MS_RDONLY | k.MS_NOSUID | k.MS_NOEXEC,
    )
