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
    from . import signals
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
            signals.pidfd_send_signal(pidfd, 0)
        except ProcessLookupError:
            os.close(fd)
            raise
        return fd
    except OSError:
        # E.g. the holder's sleep ran out on a starved host: fork one.
        return _make_userns_forked(uid_map, gid_map)
    finally:
        try:
            signals.pidfd_send_signal(pidfd, signals.SIGKILL)
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
    mount only, and every mount below it comes on its own (``(relative
    path, fd)``, shallow first, to attach in that order where it was):
    idmapped where it can be, else read-only; -1 for a kernel interface
    such as a chroot's /proc, which an empty read-only directory covers (the
    host's processes would show), with nothing below it taken. Without them
    the sandbox would see, and write into, the directories under those
    mount points."""

    from . import sys as k

    tree = _clone_idmapped(path, userns_fd, recursive=True)
    if tree is not None:
        return tree, []
    tree = _clone_idmapped(path, userns_fd, recursive=False)
    if tree is None:
        raise OSError(22, f"{path} cannot be idmapped")  # EINVAL
    subs: list[tuple[str, int]] = []
    covered: list[str] = []
    try:
        for point in mounts_below(path):
            if any(point.startswith(c + "/") for c in covered):
                continue
            if k.statfs_type(point) in k.KERNEL_FS:
                covered.append(point)
                sub = -1
            else:
                mapped = _clone_idmapped(point, userns_fd, recursive=False)
                sub = mapped if mapped is not None else _readonly_mount(point)
            subs.append((os.path.relpath(point, path), sub))
    except BaseException:
        for _rel, sub in subs:
            if sub >= 0:
                os.close(sub)
        os.close(tree)
        raise
    return tree, subs


def _clone_idmapped(path: str, userns_fd: int, *, recursive: bool) -> int | None:
    """A detached, idmapped clone of the mount at ``path`` (and, with
    ``recursive``, of every mount below it); None where the kernel refuses
    to idmap one of them (EINVAL: a filesystem that cannot be; EPERM: a
    mount idmapped already)."""
    import errno

    from . import sys as k

    flags = k.OPEN_TREE_CLONE | k.OPEN_TREE_CLOEXEC | k.AT_EMPTY_PATH
    fd = k.open_path_nofollow(path)
    try:
        tree = k.open_tree("", flags | (k.AT_RECURSIVE if recursive else 0), dirfd=fd)
    finally:
        os.close(fd)
    try:
        k.mount_setattr_idmap(tree, userns_fd, recursive=recursive)
    except OSError as exc:
        os.close(tree)
        if exc.errno not in (errno.EINVAL, errno.EPERM):
            raise
        return None
    except BaseException:
        os.close(tree)
        raise
    return tree


def _readonly_mount(path: str) -> int:
    """A detached, read-only (nosuid, nodev) clone of the mount at ``path``
    alone."""
    from . import sys as k

    fd = k.open_path_nofollow(path)
    try:
        tree = k.open_tree("", k.OPEN_TREE_CLONE | k.OPEN_TREE_CLOEXEC | k.AT_EMPTY_PATH, dirfd=fd)
    finally:
        os.close(fd)
    try:
        k.mount_setattr(
            "", k.MOUNT_ATTR_RDONLY | k.MOUNT_ATTR_NOSUID | k.MOUNT_ATTR_NODEV, dirfd=tree
        )
    except BaseException:
        os.close(tree)
        raise
    return tree


def mounts_below(path: str) -> list[str]:
    """Every mount point strictly below ``path`` that ``path`` shows (the
    top one of mounts stacked on a directory; none on a directory another
    mount covers), shallow first (this process's mount namespace). What a
    mount point shows is asked of the kernel (the mount id of an O_PATH
    fd), not inferred from mountinfo's order."""
    ids: dict[int, str] = {}  # mount id -> mount point
    prefix = path.rstrip("/") + "/"
    with open("/proc/self/mountinfo", "rb") as fh:
        for line in fh:
            parts = line.split(b" ", 5)
            ids[int(parts[0])] = _unescape(parts[4])
    points = {point for point in ids.values() if point.startswith(prefix)}
    return [
        point
        for point in sorted(points, key=lambda p: (p.count("/"), p))
        # (else the path reaches another mount: this one is hidden)
        if (mnt_id := _mount_id(point)) is not None and ids.get(mnt_id) == point
    ]


def _mount_id(path: str) -> int | None:
    """The id of the mount ``path`` reaches (not following a last symlink),
    as ``/proc/self/mountinfo`` numbers it; None where nothing is there
    (a directory covered by another mount). Other errors raise."""
    import errno

    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as fh:
            for line in fh:
                if line.startswith(b"mnt_id:"):
                    return int(line.split()[1])
    finally:
        os.close(fd)
    raise OSError(61, f"no mount id for {path} in fdinfo")  # ENODATA


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
