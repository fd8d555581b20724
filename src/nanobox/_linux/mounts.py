"""The filesystem view, built by the sandbox's init inside its new mount
namespace (it holds CAP_SYS_ADMIN there, and only there).

Default view: the host root read-only (``nosuid``, ``nodev``), each writable
root bound read-write at its own path, a private ``/tmp`` and ``/run``
(tmpfs with a size cap), a minimal ``/dev``, and a fresh ``/proc`` for the
sandbox's pid namespace. Nothing propagates back to the host: ``/`` is made
recursively private first.

The view is described by a small JSON-able dict (``view``) computed from the
policy on the caller's side; this module only executes it.
"""

from __future__ import annotations

import os
from typing import Any

from . import sys as k

DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
_DEV_LINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
    "core": "/proc/kcore",
    "ptmx": "pts/ptmx",
}


class MountStepError(OSError):
    """A mount step failed; ``step`` names it."""

    def __init__(self, step: str, exc: OSError) -> None:
        super().__init__(exc.errno, f"{step}: {exc.strerror or exc}")
        self.step = step
        self.syscall = str(exc.strerror or "").split("(")[0] if exc.strerror else None


def _step(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except OSError as exc:
        raise MountStepError(name, exc) from exc


def build(view: dict[str, Any]) -> None:
    """Execute ``view`` in the current (new, private-to-us) mount namespace."""
    _step("make / private", k.mount, None, "/", None, k.MS_REC | k.MS_PRIVATE)

    # Clone what must stay writable (or usable as devices) before the
    # read-only pass, so the clones keep their original mount flags.
    dev_fds: dict[str, int] = {}
    if view.get("dev", True):
        for name in DEV_NODES:
            path = f"/dev/{name}"
            if os.path.exists(path):
                dev_fds[name] = _step(
                    f"clone {path}", k.open_tree, path, k.OPEN_TREE_CLONE | k.OPEN_TREE_CLOEXEC
                )
    rw_fds: list[tuple[int, str]] = []
    for src, dst in view.get("rw", ()):
        fd = _step(
            f"clone writable root {src}",
            k.open_tree,
            src,
            k.OPEN_TREE_CLONE | k.OPEN_TREE_CLOEXEC | k.AT_RECURSIVE,
        )
        _step(
            f"set nosuid,nodev on {src}",
            k.mount_setattr,
            "",
            k.MOUNT_ATTR_NOSUID | k.MOUNT_ATTR_NODEV,
            k.MOUNT_ATTR_RDONLY,
            dirfd=fd,
        )
        rw_fds.append((fd, dst))

    _step(
        "make the host root read-only",
        k.mount_setattr,
        "/",
        k.MOUNT_ATTR_RDONLY | k.MOUNT_ATTR_NOSUID | k.MOUNT_ATTR_NODEV,
        recursive=True,
    )

    # Private tmpfs mounts first: a writable root below /tmp (common for
    # tests) must land on top of the new /tmp, not be hidden by it.
    for dst, size, mode in view.get("tmpfs", ()):
        _step(
            f"mount tmpfs at {dst}",
            k.mount,
            "tmpfs",
            dst,
            "tmpfs",
            k.MS_NOSUID | k.MS_NODEV,
            f"mode={mode:o},size={size}",
        )

    for fd, dst in rw_fds:
        if not os.path.isdir(dst):
            _step(f"create mount point {dst}", os.makedirs, dst, 0o755, exist_ok=True)
        _step(f"mount writable root at {dst}", k.move_mount, fd, dst)
        os.close(fd)

    if view.get("dev", True):
        _build_dev(dev_fds, view.get("shm_size", 64 * 1024 * 1024))
    if view.get("sys", False):
        # A sysfs of the sandbox's own network namespace (so /sys/class/net
        # lists only its devices), read-only.
        _step(
            "mount /sys",
            k.mount,
            "sysfs",
            "/sys",
            "sysfs",
            k.MS_RDONLY | k.MS_NOSUID | k.MS_NODEV | k.MS_NOEXEC,
        )
    if view.get("proc", True):
        _step(
            "mount /proc",
            k.mount,
            "proc",
            "/proc",
            "proc",
            k.MS_NOSUID | k.MS_NODEV | k.MS_NOEXEC,
        )


def _build_dev(dev_fds: dict[str, int], shm_size: int) -> None:
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
