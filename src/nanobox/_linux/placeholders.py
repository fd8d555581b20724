"""Placeholders: empty stand-ins for protected names that do not exist.

A protected name (``.bashrc``, ``.vscode``, ...) that is missing from a
writable root gets an empty file (or directory) for the duration of a run,
which the sandbox's init mounts read-only onto itself: the command can
then neither create the name nor anything below it. Runs of one server in
the same workspace share a placeholder, and the last one removes it.

Servers share them too (two processes running sandboxes in one workspace,
e.g. two ``nanobox run`` at once). Removing a name on the host detaches
every mount on it, in every mount namespace (Linux unmounts what is
mounted on a dentry that is unlinked): a sandbox whose protection sat on
another server's placeholder could then create the protected file. So
every server that protects a name holds a shared ``flock`` on it while one
of its runs does, and a placeholder is removed only by its maker (or, once
the maker is gone, by the sweep of its record) under an exclusive lock
taken without waiting. A placeholder still held elsewhere stays recorded
("lingering") and is removed later: by its maker at its next acquire,
release or idle tick, or by the sweep that the last server holding it
runs when it lets go.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time

from . import cgroups
from . import sys as k
from .fds import write_all

TYPE_CHECKING = False  # not ``typing``'s: the fork server starts without it
if TYPE_CHECKING:
    from typing import Any

# How long to wait for a name another process holds exclusively (a server
# removing it holds it for microseconds; a sandbox can take only a shared
# lock on what it protects, since its server holds one all along, but any
# other process of the user's could hold one for good): then fail closed.
LOCK_WAIT_S = 1.0
_KINDS = (stat.S_IFREG, stat.S_IFDIR)


class PlaceholderError(OSError):
    """A protected name could not be held for a run (locked elsewhere)."""


class _Held:
    """One name this server protects: an fd with a shared lock on it."""

    __slots__ = ("empty", "fd", "ino", "made", "users")

    def __init__(self, fd: int, ino: int, made: bool, empty: bool = True) -> None:
        self.fd = fd
        self.ino = ino
        self.made = made  # a placeholder of this server's (else another's, or the user's)
        self.empty = empty  # as a placeholder is (else nobody's to remove)
        self.users = 1


class Placeholders:
    """The names this server's runs protect (see the module's docstring)."""

    def __init__(self, ident: str = "") -> None:
        self.refs: dict[str, _Held] = {}
        self.lingering: dict[str, int] = {}  # made here, still held elsewhere: path -> inode
        # A record on disk of what this server made, so that placeholders of a
        # server that was SIGKILLed (or that exited while others held them)
        # are removed by a later server (see sweep_placeholders).
        self.record = _state_file(f"placeholders.{ident}") if ident else None
        self.stale = False  # the last write of the record failed: write it next time

    def _recorded(self) -> list[tuple[int, str]]:
        made = [(h.ino, path) for path, h in self.refs.items() if h.made]
        return made + [(ino, path) for path, ino in self.lingering.items()]

    def save(self) -> None:
        if self.record is None:
            return
        self.stale = True
        entries = self._recorded()
        try:
            if not entries:
                os.unlink(self.record)
            else:
                tmp = self.record + ".tmp"
                text = "".join(f"{ino}\t{path}\n" for ino, path in entries)
                try:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                    try:
                        write_all(fd, os.fsencode(text))
                    finally:
                        os.close(fd)
                    os.replace(tmp, self.record)
                except OSError:
                    try:
                        os.unlink(tmp)  # (a full disk): no half-written file left behind
                    except OSError:
                        pass
                    raise
            self.stale = False
        except FileNotFoundError:
            self.stale = bool(entries)  # no record to unlink is as good as unlinked
        except OSError:
            pass

    def acquire(self, specs: Any, skipped: list[int] | None = None) -> list[str]:
        """Hold (making it where missing) every name ``specs`` lists, as
        ``(path, kind)``. A name that cannot be made because the sandbox
        could not create it either (``uncreatable``) is left out and its
        index added to ``skipped``, when given (else the error is raised)."""
        taken: list[str] = []
        changed = self.retry()
        try:
            for index, (path, kind) in enumerate(specs):
                held = self.refs.get(path)
                if held is not None:
                    held.users += 1
                    taken.append(path)
                    continue
                try:
                    held = self._hold(path, kind)
                except PlaceholderError:
                    raise
                except OSError as exc:
                    if skipped is None or not uncreatable(exc, path):
                        name = os.path.basename(path)
                        raise OSError(
                            exc.errno,
                            f"cannot create {path}, the empty stand-in that keeps the sandbox "
                            f"from creating the protected name {name!r}: {exc.strerror}; make "
                            f"its directory writable, or list {path!r} in filesystem.unprotect",
                        ) from None
                    skipped.append(index)
                    continue
                if held is None:
                    continue  # nothing nanobox makes or removes: protected as it is
                self.refs[path] = held
                taken.append(path)
                changed = changed or held.made
            if changed or self.stale:
                self.save()
        except BaseException:
            self.release(taken)
            raise
        return taken

    def _hold(self, path: str, kind: str) -> _Held | None:
        """Make the placeholder, or take a shared lock on what is there."""
        deadline = time.monotonic() + LOCK_WAIT_S
        for _attempt in range(1000):  # (made and removed elsewhere over and over: give up)
            made = _make(path, kind)
            if made is not None:
                return made
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue  # removed since: make it
            if stat.S_IFMT(st.st_mode) not in _KINDS:
                return None
            directory = stat.S_ISDIR(st.st_mode)
            try:
                fd = os.open(path, _open_flags(directory))
            except FileNotFoundError:
                continue
            except OSError as exc:
                if not directory and st.st_size == 0 and st.st_uid != os.geteuid():
                    # Empty, as a placeholder is, another user's and unreadable
                    # here: that user's nanobox may have made it and remove it.
                    # (A directory that cannot be listed cannot be told from a
                    # user's own: protected as it is, as before.)
                    raise PlaceholderError(
                        exc.errno,
                        f"cannot hold {path} for the run ({exc.strerror}): an empty name "
                        "that another user's nanobox may remove while this sandbox protects "
                        f"it; remove it, or list {path!r} in filesystem.unprotect",
                    ) from None
                return None  # not empty: no placeholder, so nanobox never removes it
            try:
                if not _lock(fd, fcntl.LOCK_SH, deadline, path):
                    raise PlaceholderError(
                        errno.EWOULDBLOCK,
                        f"cannot hold {path} for the run: another process keeps it locked "
                        f"(a sandbox of another nanobox in this workspace?); retry, or list "
                        f"{path!r} in filesystem.unprotect",
                    )
                ino = os.fstat(fd).st_ino
                if os.lstat(path).st_ino != ino:
                    os.close(fd)  # removed (and made again) meanwhile: start over
                    continue
            except FileNotFoundError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            mine = self.lingering.get(path) == ino
            if mine:
                del self.lingering[path]  # this server's own, held again
            return _Held(fd, ino, made=mine, empty=directory or st.st_size == 0)
        raise PlaceholderError(
            errno.EAGAIN, f"cannot hold {path} for the run: it keeps being made and removed"
        )

    def release(self, taken: list[str]) -> None:
        changed = False
        borrowed: set[str] = set()
        try:
            for path in taken:
                held = self.refs[path]
                held.users -= 1
                if held.users:
                    continue
                del self.refs[path]
                try:
                    if held.made:
                        changed = True
                        if not _remove(path, held.ino, held.fd):
                            self.lingering[path] = held.ino
                    elif held.empty:
                        borrowed.add(path)
                finally:
                    os.close(held.fd)
            changed = self.retry() or changed
        finally:
            if changed or self.stale:
                self.save()
        if borrowed:
            # Another server's placeholder, perhaps, that it could not remove
            # while this one held it: remove it now if nobody holds it (its
            # maker's record says so; the maker finds it gone, and is fine).
            sweep_placeholders(borrowed)

    def tidy(self) -> None:
        """Between runs: ``retry``, and the record rewritten if it changed."""
        if self.lingering and self.retry():
            self.save()

    def retry(self) -> bool:
        """Remove the lingering placeholders nobody holds any more (and
        forget those that are gone). Whether the record changed."""
        done = [path for path, ino in self.lingering.items() if remove_placeholder(path, ino)]
        for path in done:
            del self.lingering[path]
        return bool(done)


def _open_flags(directory: bool) -> int:
    # O_NONBLOCK: opening never waits (not that a file or directory would).
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    return flags | os.O_DIRECTORY if directory else flags


def _make(path: str, kind: str) -> _Held | None:
    """A new placeholder, held; None where the name exists. Made in its
    directory as reached without following a symbolic link (the plan's
    paths are canonical; a directory on the way swapped for a link since,
    by a sandbox writing there, would make this create the name elsewhere):
    such a path fails (ELOOP)."""
    parent, name = os.path.split(path)
    dirfd = k.open_path_nofollow(parent)
    try:
        if kind == "dir":
            os.mkdir(name, 0o700, dir_fd=dirfd)
            try:
                fd = os.open(name, _open_flags(True), dir_fd=dirfd)
            except OSError:
                try:
                    os.rmdir(name, dir_fd=dirfd)
                except OSError:
                    pass
                raise
        else:
            flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW
            fd = os.open(name, flags, 0o600, dir_fd=dirfd)
    except FileExistsError:
        return None
    finally:
        os.close(dirfd)
    try:
        # A new inode: nobody else can hold it exclusively yet (but anyone
        # could open it and try: the same bounded wait as for a name found).
        if not _lock(fd, fcntl.LOCK_SH, time.monotonic() + LOCK_WAIT_S, path):
            raise PlaceholderError(errno.EWOULDBLOCK, f"cannot hold {path}: locked elsewhere")
        return _Held(fd, os.fstat(fd).st_ino, made=True)
    except BaseException:
        os.close(fd)
        _unmake(path, kind)
        raise


def _unmake(path: str, kind: str) -> None:
    try:
        if kind == "dir":
            os.rmdir(path)
        else:
            os.unlink(path)
    except OSError:
        pass


def _lock(fd: int, op: int, deadline: float, path: str) -> bool:
    """``flock`` without blocking, retried until ``deadline``. A filesystem
    that cannot lock fails closed: the lock is what keeps another nanobox
    from removing the name while this sandbox protects it."""
    delay = 0.0005
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        except OSError as exc:
            raise PlaceholderError(
                exc.errno,
                f"cannot lock {path} ({exc.strerror}): without the lock another nanobox "
                "in this workspace could remove the name while this sandbox protects it; "
                f"list {path!r} in filesystem.unprotect to run without its protection",
            ) from None


def _remove(path: str, ino: int, fd: int) -> bool:
    """Remove the placeholder ``fd`` holds, unless another process holds
    it too (False: it stays, for later). Anything else (gone, replaced,
    no longer empty) counts as done: it is not ours to remove."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        # Held elsewhere; or no exclusive lock to be had here (NFS emulates
        # flock with byte-range locks, which need a writable fd): later.
        return False
    try:
        st = os.lstat(path)
        if st.st_ino != ino:
            return True
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(path)  # fails (and stays) if something was put inside
        elif st.st_size == 0:
            os.unlink(path)
    except OSError:
        pass
    return True


def remove_placeholder(path: str, ino: int) -> bool:
    """Remove a placeholder if it is still the one made (same inode), empty
    and held by nobody. False where another process holds it: try again
    later."""
    try:
        st = os.lstat(path)
    except OSError:
        return True
    if st.st_ino != ino or stat.S_IFMT(st.st_mode) not in _KINDS:
        return True
    directory = stat.S_ISDIR(st.st_mode)
    try:
        try:
            # Writable where possible: an exclusive lock on NFS needs it.
            writable = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(path, _open_flags(True) if directory else writable)
        except PermissionError:
            fd = os.open(path, _open_flags(directory))
    except FileNotFoundError:
        return True
    except OSError:
        return False  # (cannot check who holds it: keep it recorded)
    try:
        if os.fstat(fd).st_ino != ino:
            return True
        return _remove(path, ino, fd)
    finally:
        os.close(fd)


# statfs f_type of filesystems whose permission checks are the kernel's own,
# from the mode and ACLs it shows: ext2/3/4, xfs, btrfs, tmpfs, overlayfs,
# f2fs, zfs.
LOCAL_FS = frozenset(
    {0xEF53, 0x58465342, 0x9123683E, 0x01021994, 0x794C7630, 0xF2F52010, 0x2FC12FC1}
)


def uncreatable(exc: OSError, path: str) -> bool:
    """Whether the sandbox cannot create ``path`` either, given that this
    server just failed to with ``exc`` (so that it needs no placeholder).
    The errno alone is not trusted (a security module or a network file
    system may have its own reasons): what it says is checked.

    A read-only mount (``EROFS``, and ``statvfs`` says so) stays read-only
    in the sandbox: the view never clears the flag, and in a user
    namespace the kernel locks it. Denied by permissions (``EACCES``,
    ``EPERM``) only where the sandbox acts with this server's identity and
    no privilege (a caller that is not root), the directory is not the
    caller's own (an owner could ``chmod`` it writable first), its mode
    grants this identity no write (no ACL to weigh) and the filesystem is a
    local one (``LOCAL_FS``: on NFS or FUSE the server decides, and may see
    the caller as the owner of what shows as nobody's). Everything else (a
    root caller's denial, say) fails closed."""
    parent = os.path.dirname(path)
    try:
        if exc.errno == errno.EROFS:
            return bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
        if exc.errno not in (errno.EACCES, errno.EPERM) or os.geteuid() == 0:
            return False
        if k.statfs_type(parent) not in LOCAL_FS:
            return False  # (NFS, FUSE: the server decides, whatever the mode shows)
        st = os.stat(parent)
        if st.st_uid == os.geteuid() or st.st_mode & stat.S_IWOTH:
            return False
        if st.st_mode & stat.S_IWGRP and (st.st_gid == os.getegid() or st.st_gid in os.getgroups()):
            return False
        try:
            os.getxattr(parent, "system.posix_acl_access")
            return False  # an ACL may grant what the mode does not show
        except OSError:
            return True
    except OSError:
        return False


def _state_dir() -> str | None:
    """A private directory for crash-recovery records (0700, ours)."""
    uid = os.getuid()
    base = "/run/nanobox" if uid == 0 else os.environ.get("XDG_RUNTIME_DIR") or ""
    path = os.path.join(base, "nanobox") if base and uid != 0 else base
    if not path:
        path = f"/tmp/nanobox-{uid}"
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        return None  # not ours (or not private): do not trust it
    return path


def _state_file(name: str) -> str | None:
    d = _state_dir()
    return os.path.join(d, name) if d else None


def sweep_placeholders(paths: set[str] | None = None) -> None:
    """Remove placeholders recorded by servers that no longer run, and
    their records (a record stays while one of its placeholders is still
    held by another server: a later sweep finishes it). With ``paths``,
    also those of these names recorded by servers that still run (their
    maker could not remove them while this server held them; nobody
    holding them now is checked by the lock). A server killed while it
    rewrote its record leaves the new one as ``.tmp``, possibly cut short:
    it may name placeholders the old record does not, so it is read too (a
    cut line names a path whose inode is not the recorded one, or
    nothing)."""
    d = _state_dir()
    if d is None:
        return
    try:
        names = os.listdir(d)
    except OSError:
        return
    for name in names:
        if not name.startswith("placeholders."):
            continue
        ident = name.split(".", 1)[1].removesuffix(".tmp")
        pid = ident.split("_", 1)[0]
        alive = pid.isdigit() and cgroups._alive(int(pid), ident)
        if alive and not paths:
            continue
        record = os.path.join(d, name)
        try:
            done = True
            with open(record, "rb") as fh:
                for raw in fh:
                    ino, _, path = os.fsdecode(raw).rstrip("\n").partition("\t")
                    if not ino.isdigit() or not path or (alive and path not in (paths or ())):
                        continue
                    if not remove_placeholder(path, int(ino)):
                        done = False
            if done and not alive:
                os.unlink(record)
        except OSError:
            pass
