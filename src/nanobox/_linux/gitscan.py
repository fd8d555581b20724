"""Finding the git repositories below a writable root, before every run.

Every run protects the hooks and config of each repository below its
writable roots (``fsplan.protect_ops``), so every run's plan looks for
them: one ``scandir`` per directory of the tree (3 ms in a checkout of
this project, 200 ms in a large home directory). A process that runs many
sandboxes in the same workspace lists again only the directories that
changed since its last scan, which a ``stat`` per directory tells:

- Adding, removing or renaming an entry in a directory updates its ctime
  (and mtime). No process can set a ctime (``utimensat`` sets mtime and
  atime, and the ctime to *now*; only stepping the clock back, which
  takes CAP_SYS_TIME on the host, could repeat one), so a directory whose
  device, inode, ctime and mtime are what they were when it was listed
  has the same entries. The key and the entries come from one open fd
  (a name on the way swapped meanwhile cannot pair one directory's key
  with another's entries), and the ``fstat`` comes first: a change during
  the listing shows as a different ctime next time.
- Timestamps are only as fine as the kernel's clock tick (or a second on
  some filesystems): a directory changed less than ``RACY_NS`` before it
  was listed is not remembered (a later change in the same tick could
  leave its ctime as it was; git's index has the same "racy" rule).
- Only on local filesystems whose timestamps the kernel keeps itself
  (``TRUSTED_FS``): network and FUSE filesystems report what a server
  says, and may cache it. Directories on another device than the root
  (mounts below it) are always listed.

The first scan of a root lists everything without keys (all a one-shot
caller such as the CLI ever does), the second one with keys; what is
remembered is per process, for the last ``MAX_ROOTS`` roots of at most
``MAX_REMEMBERED`` directories each (a few MB at most; larger trees are
listed in full every time).
"""

from __future__ import annotations

import _thread
import os
import time

from ..errors import PolicyError

TYPE_CHECKING = False  # not ``typing``'s: this module is on the CLI's start-up path
if TYPE_CHECKING:
    from collections.abc import Iterator

MAX_SCAN_ENTRIES = 200_000
SKIP_DIRS = frozenset({"node_modules", ".venv", "__pycache__", ".tox", ".mypy_cache"})
RACY_NS = 2_000_000_000
MAX_ROOTS = 4
MAX_REMEMBERED = 20_000
# statfs f_type: ext2/3/4, xfs, btrfs, tmpfs.
TRUSTED_FS = frozenset({0xEF53, 0x58465342, 0x9123683E, 0x01021994})

Key = tuple[int, int, int, int]  # st_dev, st_ino, st_ctime_ns, st_mtime_ns


class _Listing:
    __slots__ = ("below", "git", "key")

    def __init__(self, key: Key | None, git: bool, below: list[str]) -> None:
        self.key = key
        self.git = git  # holds a ".git" entry
        self.below = below  # subdirectories to scan, in order


_lock = _thread.allocate_lock()
_memory: dict[tuple[str, int], dict[str, _Listing]] = {}  # (root, euid) -> listings


def find_repos(root: str) -> list[str]:
    """Directories at or below ``root`` holding a ``.git`` entry (a
    directory, a file for a worktree or submodule, or a link). A directory
    that cannot be listed but belongs to the caller is an error
    (``PolicyError``): the command, which runs as the caller's uid, could
    make it listable again and write the hooks of a repository inside
    (fail closed); others' are skipped (the command cannot enter them
    either). So is a tree of more than ``MAX_SCAN_ENTRIES`` directories
    (a command could make that many to hide a repository after them)."""
    me = os.geteuid()
    with _lock:
        known = _memory.pop((root, me), None)
    # From the second scan of a root on a trusted filesystem: keyed listings.
    keyed = known is not None and _trusted(root)
    remember: dict[str, _Listing] = {}
    now = time.time_ns()
    root_dev = -1
    repos = []
    seen = 0
    stack = [root]
    while stack:
        directory = stack.pop()
        listing = None
        st: os.stat_result | None = None
        if keyed and known is not None and directory in known:
            try:
                st = os.stat(directory, follow_symlinks=directory == root)
            except OSError:
                st = None
            if st is not None and known[directory].key == _key(st):
                listing = known[directory]
        if listing is None:
            listing, st = _list(directory, directory == root, me, keyed)
            if listing is None:
                continue
        if st is not None:
            if directory == root:
                root_dev = st.st_dev
            if st.st_dev == root_dev and st.st_ctime_ns < now - RACY_NS:
                remember[directory] = listing
        if listing.git:
            repos.append(directory)
        seen += len(listing.below)
        if seen > MAX_SCAN_ENTRIES:
            raise PolicyError(
                "filesystem.protect",
                f"more than {MAX_SCAN_ENTRIES} directories below {root}: too many to look "
                "for git repositories to protect in; run elsewhere, or with "
                "filesystem.protect=False if no repository there needs protecting",
            )
        stack.extend(reversed(listing.below))
    if len(remember) > MAX_REMEMBERED:
        remember = {}
    with _lock:  # (an empty dict: scanned before, nothing to trust yet)
        _memory[(root, me)] = remember
        while len(_memory) > MAX_ROOTS:
            del _memory[next(iter(_memory))]
    return repos


def _key(st: os.stat_result) -> Key:
    return (st.st_dev, st.st_ino, st.st_ctime_ns, st.st_mtime_ns)


def _list(
    directory: str, follow: bool, me: int, keyed: bool
) -> tuple[_Listing | None, os.stat_result | None]:
    """List ``directory``; ``keyed``: through one fd, with its ``fstat``
    (returned), so that the key and the entries come from the same
    directory even if a name on the way is swapped meanwhile (a key of one
    and the entries of another would be remembered as matching); symlinks
    are not followed below the root. Unkeyed (a first scan, nothing to
    remember): ``scandir`` of the path, two system calls fewer."""
    fd = -1
    try:
        if keyed:
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
            fd = os.open(directory, flags if follow else flags | os.O_NOFOLLOW)
            st: os.stat_result | None = os.fstat(fd)
            entries = os.scandir(fd)
        else:
            st = None
            entries = os.scandir(directory)
    except PermissionError as exc:
        if fd >= 0:
            os.close(fd)
        _unlistable(directory, me, exc)
        return None, None
    except OSError:
        if fd >= 0:
            os.close(fd)
        return None, None  # gone meanwhile, or not a directory any more
    below = []
    git = False
    try:
        with entries:
            for entry in _entries(entries, directory, me):
                name = entry.name
                if name == ".git":
                    git = True
                elif name not in SKIP_DIRS:
                    try:
                        is_dir = entry.is_dir(follow_symlinks=False)
                    except PermissionError:
                        is_dir = True  # cannot tell: opening it decides (fail closed)
                    except OSError:
                        is_dir = False
                    if is_dir:
                        below.append(os.path.join(directory, name))
    finally:
        if fd >= 0:
            os.close(fd)
    return _Listing(_key(st) if st is not None else None, git, below), st


def _entries(
    entries: Iterator[os.DirEntry[str]], directory: str, me: int
) -> Iterator[os.DirEntry[str]]:
    """``entries``, where reading them may fail as opening did (a /proc
    directory opens, then refuses to be read, or its process is gone)."""
    try:
        yield from entries
    except PermissionError as exc:
        _unlistable(directory, me, exc)
    except OSError:
        if not _kernel_fs(directory):
            raise


def _unlistable(directory: str, me: int, exc: OSError) -> None:
    """A directory that cannot be listed: an error if it is the caller's
    (the command could make it listable), else nothing to look at."""
    if _owner(directory) == me and not _kernel_fs(directory):
        raise PolicyError(
            "filesystem.protect",
            f"cannot list {directory} ({exc.strerror}) to look for git repositories "
            "to protect; make it and the directories above it readable and "
            "searchable (chmod u+rx)",
        ) from None


def _owner(directory: str) -> int | None:
    """The owner of ``directory``, or where it cannot even be looked up
    (its parent is readable but not searchable), of its parent: either way
    one the command could ``chmod`` if it is the caller's."""
    try:
        return os.lstat(directory).st_uid
    except PermissionError:
        try:
            return os.lstat(os.path.dirname(directory)).st_uid
        except OSError:
            return None
    except OSError:
        return None


def _kernel_fs(directory: str) -> bool:
    """Whether ``directory`` is in a kernel interface (a chroot's /proc
    mounted in the workspace, say), where a directory that cannot be
    listed holds no repository (and is not one the command could make
    listable)."""
    from . import sys as k

    try:
        return k.statfs_type(directory) in k.KERNEL_FS
    except OSError:
        try:
            return k.statfs_type(os.path.dirname(directory)) in k.KERNEL_FS
        except OSError:
            return False


def _trusted(root: str) -> bool:
    """Whether ``root`` is on a filesystem in ``TRUSTED_FS``."""
    from . import sys as k  # ctypes: only once a root is scanned a second time

    try:
        return k.statfs_type(root) in TRUSTED_FS
    except OSError:
        return False


def forget() -> None:
    """Drop what earlier scans remembered (tests)."""
    with _lock:
        _memory.clear()
