"""Noticing host changes under a sandbox built ahead (inotify).

A sandbox built ahead of its run holds mounts on host dentries: read-only
binds over protected paths, covers over hidden ones, binds of the
workspace and other sources. If the host renames or deletes such a path
before the run starts (git rewrites ``.git/config`` with a rename; a tool
rotates ``~/.aws/credentials`` the same way), the kernel detaches the mount
from the old dentry, and the new file would be unprotected or visible in a
view built earlier. So before the plan goes to stage A, the server watches
every directory on the way to each such path (following each symlink on
the way) for that one name being created, deleted or moved; any such event
(or an overflow, a watched directory going away, or a change of the host's
mount table) makes the sandbox stale, and the run gets a fresh one.
Unrelated names in the same directories are ignored. The watches of one
round serve the next round of the same paths while nothing has happened.
"""

from __future__ import annotations

import ctypes
import os
import select
import stat
import struct

TYPE_CHECKING = False  # not ``typing``'s: the fork server starts without it
if TYPE_CHECKING:
    from typing import Any

IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_MASK = IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF
_ALARM = IN_Q_OVERFLOW | IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF
_EVENT = struct.Struct("iIII")
_MAX_HOPS = 40  # symlinks followed per path (the kernel's limit)

_libc = ctypes.CDLL(None, use_errno=True)


class Blind(OSError):
    """A path could not be watched: the sandbox must not be built ahead."""


class Watcher:
    """One inotify instance for the server's life (closing one waits for an
    SRCU grace period: milliseconds), watching the names on the way to the
    paths of the sandbox built ahead (one at a time), and the host's mount
    table (``/proc/self/mountinfo`` polls with POLLPRI when it changes:
    a mount the sandbox's private copy would not have)."""

    def __init__(self) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise Blind(err, f"inotify: {os.strerror(err)}")
        self.fd: int = fd
        self.names: dict[int, set[str]] = {}  # watch -> names of interest now
        self.hit = False  # since ``watch``: the sandbox built ahead is stale
        # The paths of the last full round of watches, while nothing has
        # happened to them since (else None): the next ``watch`` of the same
        # paths may keep them (re-adding costs ~1 ms: ~50 paths, ~200 calls).
        self.paths: list[str] | None = None
        self.epoll = select.epoll()  # readable when the inotify fd or mountinfo is
        self.epoll.register(fd, select.EPOLLIN)
        self.mountinfo = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        self.epoll.register(self.mountinfo, select.EPOLLPRI | select.EPOLLERR)

    def fileno(self) -> int:
        return self.epoll.fileno()

    def close(self) -> None:
        self.epoll.close()
        os.close(self.mountinfo)
        os.close(self.fd)

    def watch(self, paths: list[str]) -> None:
        """Start over with ``paths`` (absolute). Every directory is watched
        anew (a watch follows its directory, not the path: after a rename
        the path may be another directory now), unless these are the paths
        of the last round and no event has come for them since: then every
        path still leads through the same watched directories to the same
        names, and the watches stand as they are."""
        self.changed()  # events of the previous paths are not these
        self.hit = False
        if self.paths is not None and self.paths == paths:
            return
        old = set(self.names)
        self.names = {}
        self.paths = None
        for path in paths:
            self._add(path)
        for wd in old - set(self.names):
            _libc.inotify_rm_watch(self.fd, wd)
        self.paths = list(paths)

    def stop(self) -> None:
        """The sandbox watched for is gone. The watches stay (and events
        still count against them) for the next ``watch``."""
        self.hit = False

    def _add(self, path: str, hops: int = 0) -> None:
        """Watch each directory on the way to ``path`` for the next name,
        following every symlink on the way (each hop's own path is watched
        too, so retargeting any link in a chain is seen)."""
        directory = "/"
        names = [p for p in path.split("/") if p]
        for i, name in enumerate(names):
            wd = _libc.inotify_add_watch(self.fd, os.fsencode(directory), _MASK | IN_ONLYDIR)
            if wd < 0:
                err = ctypes.get_errno()
                raise Blind(err, f"cannot watch {directory}: {os.strerror(err)}")
            self.names.setdefault(wd, set()).add(name)
            here = os.path.join(directory, name)
            try:
                mode = os.lstat(here).st_mode
            except OSError:
                return  # missing (or unreachable): its creation is watched above
            if stat.S_ISLNK(mode):
                if hops >= _MAX_HOPS:
                    raise Blind(40, f"too many symlinks on the way to {path}")  # ELOOP
                try:
                    target = os.readlink(here)
                except OSError:
                    return
                rest = "/".join([os.path.join(directory, target), *names[i + 1 :]])
                self._add(rest, hops + 1)  # ".." is resolved by the kernel
                return
            if not stat.S_ISDIR(mode):
                return  # a file
            directory = here

    def changed(self) -> bool:
        """Did anything happen to a watched name (or to the mount table)
        since ``watch``?"""
        for fd, _events in self.epoll.poll(0):
            if fd == self.mountinfo:
                self.hit = True  # polling it again re-arms it
                # A mount over a directory on the way hides the watched one:
                # the next ``watch`` adds every watch anew.
                self.paths = None
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return self.hit
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                raw = data[offset + _EVENT.size : offset + _EVENT.size + length]
                offset += _EVENT.size + length
                name = os.fsdecode(raw.split(b"\0", 1)[0])
                alarm = mask & _ALARM and (wd in self.names or wd == -1)
                if alarm or name in self.names.get(wd, ()):
                    self.hit = True
                    self.paths = None  # the next ``watch`` adds every watch anew


def view_paths(plan: dict[str, Any]) -> list[str]:
    """The host paths a view built from ``plan`` depends on: every
    operation's destination and source, and every path with a Landlock rule
    (a rule holds the file that was there when it was made), but the
    placeholders (their protection is done when the run starts, and the
    server itself creates and removes them)."""
    view = plan["view"]
    skip = {path for path, _kind in plan.get("placeholders", ())}
    out: dict[str, None] = {}
    for op in view.get("ops", ()):
        # ("host": where a protected path of a writable root bound elsewhere
        # is on the host; "dst" is where the sandbox sees it.)
        for key in ("host" if "host" in op else "dst", "src"):
            path = op.get(key)
            if isinstance(path, str):
                out[path] = None
    ll = plan.get("landlock") or {}
    for key in ("read", "write", "list", "exec"):
        for path in ll.get(key, ()) or ():
            if isinstance(path, str):
                out[path] = None
    return [path for path in out if path not in skip and os.path.isabs(path)]


def missing_mount_points(plan: dict[str, Any]) -> list[str]:
    """Destinations of binds and tmpfs mounts that do not exist on the host:
    building the view would create them (in the workspace) or copy their
    read-only parent's entries; neither may happen before the run."""
    out = []
    for op in plan["view"].get("ops", ()):
        if op.get("t") in ("bind", "robind", "tmpfs") and not os.path.lexists(op["dst"]):
            out.append(op["dst"])
    return out
