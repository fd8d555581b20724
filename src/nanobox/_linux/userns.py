"""The sandbox's user namespace: one uid and one gid mapped.

Called by the process that has just done ``unshare(CLONE_NEWUSER)``; it writes
its own maps, which the kernel allows for a single mapping of the caller's
own ids once ``setgroups`` is denied. The command keeps the caller's uid and
gid inside, so file ownership looks as it does outside.
"""

from __future__ import annotations

import os


def _write(path: str, data: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def map_self(outer_uid: int, outer_gid: int, inner_uid: int, inner_gid: int) -> None:
    """Map ``inner`` ids of the new namespace to the ``outer`` ids."""
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{inner_uid} {outer_uid} 1\n")
    _write("/proc/self/gid_map", f"{inner_gid} {outer_gid} 1\n")


def make_userns(uid_map: str, gid_map: str) -> int:
    """A user namespace with the given maps, as an fd (for ``setns`` and for
    ``MOUNT_ATTR_IDMAP``). Needs privilege over the ids in the maps (root).

    A short-lived child creates the namespace and waits; the caller writes
    its maps from the parent namespace, opens it, and kills the child. The
    child shares the caller's memory (``sys.spawn_userns_holder``); where
    that fails, a forked one does the same.
    """
    import signal

    from . import sys as k

    try:
        pid, pidfd = k.spawn_userns_holder(5)
    except OSError:
        return _make_userns_forked(uid_map, gid_map)
    try:
        fd = _map_and_open(pid, uid_map, gid_map)
        try:
            # Still ours (its sleep has not run out, so that pid is not
            # someone else's: a caller ignoring SIGCHLD has it reaped at once).
            signal.pidfd_send_signal(pidfd, 0)
        except ProcessLookupError:
            os.close(fd)
            raise
        return fd
    except OSError:
        # E.g. the holder's sleep ran out on a starved host: fork one.
        return _make_userns_forked(uid_map, gid_map)
    finally:
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(pidfd)
        # Not waited for here (it has yet to be scheduled to die): a caller
        # ignoring SIGCHLD has it reaped by the kernel, others call
        # ``reap_holders`` later.
        _holders.append(pid)


_holders: list[int] = []


def reap_holders() -> None:
    """Reap the killed namespace holders of ``make_userns``."""
    while _holders:
        pid = _holders.pop()
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def _map_and_open(pid: int, uid_map: str, gid_map: str) -> int:
    """Write the maps of ``pid``'s (new) user namespace; open it."""
    _write(f"/proc/{pid}/uid_map", uid_map)
    _write(f"/proc/{pid}/setgroups", "deny")
    _write(f"/proc/{pid}/gid_map", gid_map)
    return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)


def _make_userns_forked(uid_map: str, gid_map: str) -> int:
    from . import sys as k

    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            os.close(go_w)
            k.unshare(k.CLONE_NEWUSER)
            os.write(ready_w, b"1")
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(go_r)
    try:
        if os.read(ready_r, 1) != b"1":
            raise OSError(1, "could not create a user namespace for the id mapping")
        return _map_and_open(pid, uid_map, gid_map)
    finally:
        os.close(go_w)
        os.close(ready_r)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass  # reaped by the kernel: the caller ignores SIGCHLD


def idmapped_clone(path: str, userns_fd: int) -> tuple[int, list[tuple[str, int]]]:
    """A detached, recursive clone of ``path`` whose ownership is shifted
    through ``userns_fd`` (files of on-disk uid 0 belong to the namespace's
    root, i.e. the sandbox's unprivileged uid, and its writes land as uid 0),
    and the mounts to attach on it: none, unless a mount below ``path`` is
    of a filesystem that cannot be idmapped (or is idmapped already: the
    kernel then refuses the whole tree). Then the clone is of ``path``'s own
    mount only, and each mount below it comes (``(relative path, fd)``,
    shallow first) to attach where it was: idmapped where it can be, else
    read-only (-1: a kernel interface such as a chroot's /proc, covered by
    an empty directory, as the host's processes would show). Without them
    the sandbox would see, and write into, the directories under those
    mount points."""
    from . import sys as k

    tree = _idmapped_tree(path, userns_fd)
    if tree is not None:
        return tree, []
    fd = k.open_path_nofollow(path)
    try:
        tree = k.open_tree("", k.OPEN_TREE_CLONE | k.OPEN_TREE_CLOEXEC | k.AT_EMPTY_PATH, dirfd=fd)
    finally:
        os.close(fd)
    subs: list[tuple[str, int]] = []
    try:
        k.mount_setattr_idmap(tree, userns_fd)
        for point, fstype in mounts_below(path):
            if fstype in PSEUDO_FS:
                sub = -1
            else:
                mapped = _idmapped_tree(point, userns_fd)
                sub = mapped if mapped is not None else readonly_clone(point)
            subs.append((os.path.relpath(point, path), sub))
    except BaseException:
        for _rel, sub in subs:
            if sub >= 0:
                os.close(sub)
        os.close(tree)
        raise
    return tree, subs


def _idmapped_tree(path: str, userns_fd: int) -> int | None:
    """A detached, recursive, idmapped clone of ``path``; None where the
    kernel refuses to idmap one of its mounts (EINVAL: a filesystem that
    cannot be; EPERM: a mount idmapped already)."""
    import errno

    from . import sys as k

    fd = k.open_path_nofollow(path)
    try:
        tree = k.open_tree(
            "", k.OPEN_TREE_CLONE | k.OPEN_TREE_CLOEXEC | k.AT_EMPTY_PATH | k.AT_RECURSIVE, dirfd=fd
        )
    finally:
        os.close(fd)
    try:
        k.mount_setattr_idmap(tree, userns_fd, recursive=True)
    except OSError as exc:
        os.close(tree)
        if exc.errno not in (errno.EINVAL, errno.EPERM):
            raise
        return None
    except BaseException:
        os.close(tree)
        raise
    return tree


PSEUDO_FS = frozenset(
    (
        "proc sysfs devpts mqueue cgroup cgroup2 debugfs tracefs securityfs bpf pstore "
        "efivarfs configfs fusectl binfmt_misc"
    ).split()
)


def mounts_below(path: str) -> list[tuple[str, str]]:
    """The mount points strictly below ``path`` (in this process's mount
    namespace) that are not below another of them, shallow first, with
    their filesystem types: only those that ``path`` shows (not one stacked
    under a later mount on the same point, nor one below a directory
    something else was mounted over)."""
    last: dict[str, tuple[int, str]] = {}  # mount point -> (mount id, type) of the top mount
    prefix = path.rstrip("/") + "/"
    with open("/proc/self/mountinfo", "rb") as fh:
        for line in fh:
            fields, _sep, rest = line.partition(b" - ")
            parts = fields.split(b" ")
            point = _unescape(parts[4])
            if point.startswith(prefix):
                last[point] = (int(parts[0]), os.fsdecode(rest.split(b" ")[0]))
    top: list[tuple[str, str]] = []
    for point in sorted(last, key=lambda p: (p.count("/"), p)):
        if any(point.startswith(t + "/") for t, _type in top):
            continue
        mnt_id, fstype = last[point]
        if _mount_id(point) != mnt_id:
            continue  # not what the path reaches (covered by another mount)
        top.append((point, fstype))
    return top


def _mount_id(path: str) -> int | None:
    """The id of the mount ``path`` reaches (not following a last symlink),
    as ``/proc/self/mountinfo`` numbers it; None if it cannot be told."""
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as fh:
            for line in fh:
                if line.startswith(b"mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    finally:
        os.close(fd)
    return None


def _unescape(field: bytes) -> str:
    """A mountinfo path: space, tab, newline and backslash come as octal."""
    out = bytearray()
    i = 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == 0x5C and len(code) == 3 and code.isdigit():
            out.append(int(code, 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return os.fsdecode(bytes(out))


def readonly_clone(path: str) -> int:
    """A detached, recursive, read-only (nosuid, nodev) clone of ``path``."""
    from . import sys as k

    fd = k.open_path_nofollow(path)
    try:
        tree = k.open_tree(
            "", k.OPEN_TREE_CLONE | k.OPEN_TREE_CLOEXEC | k.AT_EMPTY_PATH | k.AT_RECURSIVE, dirfd=fd
        )
    finally:
        os.close(fd)
    k.mount_setattr(
        "",
        k.MOUNT_ATTR_RDONLY | k.MOUNT_ATTR_NOSUID | k.MOUNT_ATTR_NODEV,
        recursive=True,
        dirfd=tree,
    )
    return tree
