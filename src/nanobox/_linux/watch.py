"""Noticing host changes under a sandbox built ahead (inotify).

A sandbox built ahead of its run holds mounts on host dentries: read-only
binds over protected paths, covers over hidden ones, binds of the
workspace and other sources. If the host renames or deletes such a path
before the run starts (git rewrites ``.git/config`` with a rename; a tool
rotates ``~/.aws/credentials`` the same way), the kernel detaches the mount
from the old dentry, and the new file would be unprotected or visible in a
view built earlier. So before the plan goes to stage A, the server watches
every directory on the way to each such path for that one name being
created, deleted or moved; any such event (or an overflow, or a watched
directory going away) makes the sandbox stale, and the run gets a fresh one.
Unrelated names in the same directories are ignored.
"""

from __future__ import annotations

import ctypes
import os
import stat
import struct

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
MAX_DIRS = 4096

_libc = ctypes.CDLL(None, use_errno=True)


class Blind(OSError):
    """A path could not be watched: the sandbox must not be built ahead."""


class Watcher:
    """One inotify instance for the server's life (closing one waits for an
    SRCU grace period: milliseconds), watching the names on the way to the
    paths of the sandbox built ahead (one at a time)."""

    def __init__(self) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise Blind(err, f"inotify: {os.strerror(err)}")
        self.fd: int = fd
        self._wds: dict[str, int] = {}  # directory -> watch (kept: re-adding is free)
        self.names: dict[int, set[str]] = {}  # watch -> names of interest now
        self.hit = False

    def watch(self, paths: list[str]) -> None:
        """Start over with ``paths`` (absolute, canonical)."""
        self.changed()  # events of the previous paths are not these
        self.names = {}
        self.hit = False
        if len(self._wds) > MAX_DIRS:
            raise Blind(24, "too many directories watched")  # EMFILE
        for path in paths:
            self._add(path)

    def stop(self) -> None:
        self.names = {}

    def _add(self, path: str) -> None:
        directory = "/"
        for name in [p for p in path.split("/") if p]:
            wd = self._wds.get(directory)
            if wd is None:
                wd = _libc.inotify_add_watch(self.fd, directory.encode(), _MASK | IN_ONLYDIR)
                if wd < 0:
                    err = ctypes.get_errno()
                    raise Blind(err, f"cannot watch {directory}: {os.strerror(err)}")
                self._wds[directory] = wd
            self.names.setdefault(wd, set()).add(name)
            directory = os.path.join(directory, name)
            try:
                if not stat.S_ISDIR(os.lstat(directory).st_mode):
                    return  # a file (or a symlink), or
            except OSError:
                return  # missing (or unreachable): its creation is watched above

    def changed(self) -> bool:
        """Did anything happen to a watched name since ``watch``?"""
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
                name = raw.split(b"\0", 1)[0].decode(errors="surrogateescape")
                if mask & IN_IGNORED:  # the directory is gone: its watch too
                    self._wds = {d: w for d, w in self._wds.items() if w != wd}
                if (mask & _ALARM and (wd in self.names or wd == -1)) or name in self.names.get(
                    wd, ()
                ):
                    self.hit = True


def view_paths(plan: dict[str, object]) -> list[str]:
    """The host paths a view built from ``plan`` holds mounts on or from:
    every operation's destination and source, but the placeholders (their
    protection is done when the run starts, and the server itself creates
    and removes them)."""
    view = plan.get("view")
    assert isinstance(view, dict)
    skip = {path for path, _kind in plan.get("placeholders", ())}  # type: ignore[attr-defined]
    out: list[str] = []
    for op in view.get("ops", ()):
        for key in ("dst", "src"):
            path = op.get(key)
            if isinstance(path, str) and path not in skip and path not in out:
                out.append(path)
    return out
