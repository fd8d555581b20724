"""Which files git runs or reads for a repository, read from disk: its
git directories, its configuration files and the ones they include, the
user's global ones, and the ``core.hooksPath`` they set (``gitconfig``
reads the syntax). ``fsplan.protect_ops`` protects those inside a
writable root (``GitConfigs``).

Every read is of a regular file, opened without waiting (a FIFO left where
a configuration is looked for is skipped, as git would hang on it, not
this), and parsed files are kept per process while a ``stat`` says they
did not change.
"""

from __future__ import annotations

import errno
import os
import stat
import time

from .gitscan import RACY_NS


class GitConfigs:
    """What git's configuration makes it run or read (``gitconfig``), for
    ``protect_ops``: read once per plan, the global files' for every root
    and repository."""

    def __init__(self, home: str, wanted: list[str]) -> None:
        self.home = home
        self.hooks = "hooks" in wanted
        self.config = "config" in wanted
        self.global_files: list[str] = []
        self.global_hooks: list[str] = []
        if not (self.hooks or self.config):
            return
        for path in global_config_files(home):
            hooks, included = hooks_and_includes(path, home)
            self.global_files += [path, *included]
            self.global_hooks += hooks

    def global_paths(self) -> list[str]:
        """The global configuration files (and what they include): a
        command must not set a hook path or fsmonitor there; and a global
        hook path given as an absolute one (it applies to every
        repository, wherever it is)."""
        out = list(self.global_files) if self.config else []
        if self.hooks:
            out += [hooks_dir(h, "/") for h in self.global_hooks if os.path.isabs(h)]
        return out

    def repo_paths(self, repo: str, dirs: list[str]) -> list[str]:
        """The hooks directory and included configuration files of the
        repository at ``repo`` (``dirs``: its ``git_dirs``); its own hooks
        directory where it is missing (``git init --template=``: a command
        could make it), and ``config.worktree`` where the configuration
        reads it (``extensions.worktreeConfig``, as ``git sparse-checkout``
        sets)."""
        if not (self.hooks or self.config):
            return []
        hooks = list(self.global_hooks)
        included: list[str] = []
        worktree_config = False
        for path in repo_config_files(dirs):
            its_hooks, its_includes = hooks_and_includes(path, self.home)
            hooks += its_hooks
            included += its_includes
            entries = config_entries(path) or []
            worktree_config = worktree_config or any(
                name == "extensions.worktreeconfig"
                and value.lower() in ("", "true", "yes", "on", "1")
                for name, value in entries
            )
        out = included if self.config else []
        if self.config and dirs and worktree_config:
            out.append(os.path.join(dirs[0], "config.worktree"))
        if self.hooks:
            out += [hooks_dir(h, repo) for h in hooks]
            if dirs:
                out.append(os.path.join(dirs[-1], "hooks"))  # (a worktree's: its main one's)
        return out


def hooks_dir(value: str, repo: str) -> str:
    """The directory to protect for a ``core.hooksPath`` of ``value`` in the
    repository at ``repo`` (a relative one is relative to its worktree's
    top). For husky's ``.husky/_`` (9+), whose hooks run the scripts in the
    directory above it, that directory (unless it is the worktree's top)."""
    path = os.path.normpath(os.path.join(repo, value))
    if os.path.basename(path) == "_" and os.path.dirname(path) != repo:
        return os.path.dirname(path)
    return path


def hooks_and_includes(path: str, home: str) -> tuple[list[str], list[str]]:
    """``gitconfig.hooks_and_includes`` of the file at ``path``, or nothing
    where there is no such file (without importing ``gitconfig``: the cold
    CLI in a directory that is no repository reads no configuration)."""
    if config_entries(path) is None:
        return [], []
    from . import gitconfig

    return gitconfig.hooks_and_includes(path, config_entries, home)


def global_config_files(home: str) -> list[str]:
    """The files git reads as its system and global configuration (as the
    caller's environment has them)."""
    env = os.environ
    out = []
    if not env.get("GIT_CONFIG_NOSYSTEM"):
        out.append(env.get("GIT_CONFIG_SYSTEM") or "/etc/gitconfig")
    if env.get("GIT_CONFIG_GLOBAL"):
        out.append(env["GIT_CONFIG_GLOBAL"])
    else:
        xdg = env.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
        out += [os.path.join(xdg, "git", "config"), os.path.join(home, ".gitconfig")]
    return [os.path.normpath(p) for p in out if os.path.isabs(p)]


def repo_config_files(dirs: list[str]) -> list[str]:
    """The configuration files of a repository whose ``git_dirs`` are
    ``dirs``: its git directory's ``config`` and ``config.worktree``, and
    its common directory's ``config`` (a worktree's is the main
    repository's)."""
    if not dirs:
        return []
    out = [os.path.join(dirs[0], "config"), os.path.join(dirs[0], "config.worktree")]
    return out + [os.path.join(d, "config") for d in dirs[1:]]


# path -> (its stat key, its entries): a process that runs many sandboxes
# parses a configuration file again only when it changed (a stat tells, as
# in gitscan; not a file changed less than gitscan.RACY_NS ago).
_parsed: dict[str, tuple[tuple[int, ...], list[tuple[str, str]]]] = {}
_MAX_PARSED = 256


def config_entries(path: str) -> list[tuple[str, str]] | None:
    """``gitconfig.parse`` of the file at ``path``, None if unreadable."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # (a NUL in a name from a configuration)
        return None
    if not stat.S_ISREG(st.st_mode):
        return None  # (git reads no FIFO, device or directory either)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    cached = _parsed.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    text = read_config(path)
    if text is None:
        return None
    from . import gitconfig

    entries = gitconfig.parse(text)
    if time.time_ns() - st.st_ctime_ns > RACY_NS:
        if len(_parsed) >= _MAX_PARSED:
            _parsed.clear()
        _parsed[path] = (key, entries)
    return entries


def read_config(path: str) -> str | None:
    """A regular file's text (its first 1 MiB), None if there is none: a
    FIFO or a device (which a command could leave where a configuration
    or ``.git`` file is looked for) is not opened to wait on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with open(fd, "rb", closefd=False) as fh:
            return fh.read(1 << 20).decode("utf-8", "surrogateescape")
    except OSError:
        return None
    finally:
        os.close(fd)


def git_dirs(repo: str, paths: list[str] | None = None) -> list[str]:
    """The git directory of the repository at ``repo`` and, for a worktree,
    its common directory; [] where ``.git`` is not a directory nor a git
    link ("gitdir: PATH": a submodule's or a worktree's). ``paths``: its
    ``git_dir_paths``, where the caller has them already. Resolved through
    links, as git does (strbuf_realpath): "lnk/../g" is not "g" where lnk
    leads elsewhere."""
    dotgit = os.path.join(repo, ".git")
    if os.path.isdir(dotgit) and not os.path.islink(dotgit):
        return [dotgit]
    return [os.path.realpath(p) for p in (git_dir_paths(repo) if paths is None else paths)]


class TooManyGitDirs(OSError):
    """More entries under a git directory's ``worktrees`` and ``modules``
    than ``linked_git_dirs`` looks at."""


def linked_git_dirs(gitdir: str, limit: int = 2000) -> list[tuple[str, bool]]:
    """The git directories that ``gitdir`` (a repository's own or common
    one) keeps for checkouts that may be anywhere, or nowhere yet: each
    linked worktree's private directory (``worktrees/NAME``: True; git
    reads its ``commondir``, ``config.worktree``, and, without a
    ``commondir``, its own ``config`` and ``hooks``) and each submodule's
    (``modules/NAME``, a NAME may hold '/': False), and theirs in turn. A
    command that rewrote one of those files would have git run what it
    chose the next time the user works in that checkout. Directories that
    are symbolic links are not entered, nor directories git would not use
    (no ``HEAD``). More than ``limit`` entries raise ``TooManyGitDirs``
    (fail closed: a command could pad them to hide a real one)."""
    out: list[tuple[str, bool]] = []
    todo = [(gitdir, 0)]
    seen = 0
    while todo:
        top, depth = todo.pop()
        for sub, admin in (("worktrees", True), ("modules", False)):
            stack = [os.path.join(top, sub)]
            while stack:
                where = stack.pop()
                try:
                    with os.scandir(where) as it:
                        entries = [e for e in it if e.is_dir(follow_symlinks=False)]
                except OSError:
                    continue  # (missing, a link, or not a directory)
                seen += len(entries)
                if seen > limit:
                    raise TooManyGitDirs(
                        errno.E2BIG,
                        f"more than {limit} directories under {gitdir}'s worktrees and modules",
                    )
                for e in entries:
                    if os.path.lexists(os.path.join(e.path, "HEAD")):
                        out.append((e.path, admin))
                        if depth < 8:
                            todo.append((e.path, depth + 1))
                    elif not admin:
                        stack.append(e.path)  # (part of a submodule's name)
    return out


def git_dir_paths(repo: str) -> list[str]:
    """The paths, as written, by which the ``.git`` file of ``repo`` and
    its git directory's ``commondir`` lead to git directories (``git_dirs``
    gives them resolved): the links on the way are the command's to
    retarget, unless protected (``fsplan``)."""
    dotgit = os.path.join(repo, ".git")
    if os.path.isdir(dotgit) and not os.path.islink(dotgit):
        return []
    text = path_file(dotgit)
    if not text.startswith("gitdir: ") or len(text) == 8:
        return []  # (git refuses such a directory: "invalid gitfile format")
    raw = os.path.join(repo, text[8:])
    # (A submodule's git directory is its own common directory.)
    common = path_file(os.path.join(os.path.realpath(raw), "commondir"))
    return [raw, os.path.join(os.path.realpath(raw), common)] if common else [raw]


def path_file(path: str) -> str:
    """A file that holds a path, read as git reads ``.git`` files and
    ``commondir``: all of it, less trailing newlines (CR or LF) only, up
    to a NUL ("" if it is not a regular file). Not its first line,
    stripped: a ``.git`` of "gitdir: " and a path on the next line (or one
    ending in a space) is a link git follows to another directory."""
    return (read_config(path) or "").rstrip("\r\n").split("\0", 1)[0]


def undo_redirects(git_dirs: tuple[str, ...] | list[str]) -> list[str]:
    """After a run: a ``commondir`` made in one of ``git_dirs`` (git
    directories that had none when the run was planned) would have git read
    another directory's configuration and hooks, which the command could
    write (no git makes one in a repository's own git directory: only in a
    linked worktree's). It cannot be kept from being made without breaking
    git meanwhile (git fails on an empty one), so it is removed when the run
    ends. What was removed (or, for a directory, which git fails on and
    reads nothing from, found), one line each."""
    out = []
    for gitdir in git_dirs:
        path = os.path.join(gitdir, "commondir")
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            out.append(f"{path} was made during the run (a directory: git cannot use it)")
            continue
        try:
            os.unlink(path)
        except OSError as exc:
            out.append(f"{path} was made during the run and could not be removed: {exc.strerror}")
        else:
            out.append(
                f"{path} was made during the run (it would have had git read another "
                "directory's configuration and hooks): removed"
            )
    return out
