"""The scan for git repositories below a writable root, and what it
remembers between runs (``_linux/gitscan.py``). No sandbox here: the scan
runs in the caller; ``test_filesystem`` checks the protection it feeds.

The remembered listings are only trusted for directories whose ctime is
older than ``RACY_NS``; these tests lower it to 0 and wait a few clock
ticks between a scan and the change after it instead of 2 s."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nanobox._linux import gitscan
from nanobox.errors import PolicyError

TICK = 0.03  # > the kernel's timestamp granularity (a jiffy: 1-10 ms)


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """root/{a/b, c/d/e, f}: a/b and the root are repositories."""
    monkeypatch.setattr(gitscan, "RACY_NS", 0)
    gitscan.forget()
    root = tmp_path / "root"
    for d in ("a/b/.git", "c/d/e", "f", ".git"):
        (root / d).mkdir(parents=True)
    (root / "c" / "file").write_text("x")
    time.sleep(TICK)
    yield root
    gitscan.forget()


def _listed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the directories the scan lists (opened to be listed, or
    listed by path)."""
    calls: list[str] = []
    real_open, real_scandir = os.open, os.scandir

    def open_(path: str, flags: int, *args: int) -> int:
        if flags & os.O_DIRECTORY:
            calls.append(str(path))
        return real_open(path, flags, *args)

    def scandir(path: object = ".") -> object:
        if isinstance(path, str):
            calls.append(path)
        return real_scandir(path)  # type: ignore[call-overload]

    monkeypatch.setattr(gitscan.os, "open", open_)
    monkeypatch.setattr(gitscan.os, "scandir", scandir)
    return calls


def _fresh(root: Path) -> list[str]:
    """What a scan with nothing remembered finds."""
    saved = dict(gitscan._memory)
    gitscan.forget()
    try:
        return sorted(gitscan.find_repos(str(root)))
    finally:
        gitscan._memory.update(saved)


def _scan(root: Path) -> list[str]:
    """Scan (the first scan of a root only marks it seen, the second
    remembers what it listed: scan again then)."""
    repos = sorted(gitscan.find_repos(str(root)))
    assert repos == _fresh(root)  # the same answer as listing everything
    if not gitscan._memory.get((str(root), os.geteuid())):
        gitscan.find_repos(str(root))
    time.sleep(TICK)
    return repos


def test_the_second_scan_lists_nothing_unchanged(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _scan(tree) == [str(tree), str(tree / "a" / "b")]
    calls = _listed(monkeypatch)
    gitscan.find_repos(str(tree))
    assert calls == []


@pytest.mark.parametrize(
    "change",
    [
        "mkdir c/d/e/.git",  # a new repository deep in an unchanged tree
        "touch f/.git",  # a worktree's or submodule's .git file
        "ln -s /elsewhere c/.git",
        "rm -rf a/b/.git",
        "mv a/b c/d/b",  # moved: found where it is now
        "mv a a2",
        "rm c/file && mkdir -p c/file/.git",  # a file replaced by a repository
        "mkdir -p f/g/h && sleep 0.03 && mkdir f/g/h/.git",
        "touch -r c/d/e ../was && mkdir c/d/e/.git && touch -r ../was c/d/e",
    ],
)
def test_a_change_is_seen_by_the_next_scan(tree: Path, change: str) -> None:
    """Each change makes the next scan list the changed directory again
    (its ctime moved), so it finds what a full scan finds. The last one
    puts the directory's mtime back as it was: its ctime cannot be."""
    before = _scan(tree)
    subprocess.run(["sh", "-c", change], cwd=tree, check=True)
    after = _scan(tree)
    assert after != before, change


def test_a_directory_made_unlistable_fails_closed(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() == 0:
        # Root lists any directory; check the listing happens instead.
        _scan(tree)
        (tree / "c").chmod(0)
        try:
            calls = _listed(monkeypatch)
            gitscan.find_repos(str(tree))
            assert calls == [str(tree / "c")]
        finally:
            (tree / "c").chmod(0o755)
        return
    _scan(tree)
    (tree / "c").chmod(0)
    try:
        with pytest.raises(PolicyError, match=r"cannot list .*/c "):
            gitscan.find_repos(str(tree))
    finally:
        (tree / "c").chmod(0o755)


@pytest.mark.skipif(os.geteuid() == 0, reason="root enters any directory")
def test_a_directory_listed_but_not_entered_fails_closed(tree: Path) -> None:
    """Mode 0600: its names can be read, nothing below it looked up, so
    the scan cannot see c/d's subtree -- and the command (same uid) could
    chmod c back and write hooks in a repository there."""
    _scan(tree)
    (tree / "c").chmod(0o600)
    try:
        with pytest.raises(PolicyError, match=r"cannot list .*/c/d "):
            gitscan.find_repos(str(tree))
    finally:
        (tree / "c").chmod(0o755)


def test_a_swap_during_the_scan_is_not_remembered(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Untrusted code may swap a directory on the way for a look-alike while
    a scan runs (here c, when the scan gets to c/d/e, which has a
    subdirectory s the look-alike lacks). Whatever the scan then sees, what
    it remembers of a directory must be one directory's key and entries:
    a key of the real c/d/e with the look-alike's entries would be trusted
    until c/d/e changes, and s (where a repository appears later) never
    looked at again."""
    (tree / "c" / "d" / "e" / "s").mkdir()
    (tree / "fake" / "d" / "e").mkdir(parents=True)
    time.sleep(TICK)
    target = str(tree / "c" / "d" / "e")
    swapped: list[bool] = []

    def swap() -> None:
        if not swapped:
            swapped.append(True)
            os.rename(tree / "c", tree / "c.real")
            os.rename(tree / "fake", tree / "c")

    gitscan.find_repos(str(tree))  # the root is known: the next scan remembers
    real_open, real_scandir = os.open, os.scandir

    def open_(path: str, flags: int, *args: int) -> int:
        if str(path) == target:
            swap()
        return real_open(path, flags, *args)

    def scandir(path: object = ".") -> object:
        if str(path) == target:
            swap()  # where the key comes from a stat of the path before
        return real_scandir(path)  # type: ignore[call-overload]

    monkeypatch.setattr(gitscan.os, "open", open_)
    monkeypatch.setattr(gitscan.os, "scandir", scandir)
    gitscan.find_repos(str(tree))
    monkeypatch.undo()
    assert swapped
    os.rename(tree / "c", tree / "fake")
    os.rename(tree / "c.real", tree / "c")
    time.sleep(TICK)
    (tree / "c" / "d" / "e" / "s" / ".git").mkdir()
    assert str(tree / "c" / "d" / "e" / "s") in gitscan.find_repos(str(tree))


def test_recent_changes_are_listed_again(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory changed within RACY_NS of its listing is not trusted
    next time: a second change in the same clock tick would leave its
    ctime as it was."""
    monkeypatch.setattr(gitscan, "RACY_NS", 3_600 * 10**9)  # all made seconds ago
    gitscan.find_repos(str(tree))
    gitscan.find_repos(str(tree))  # (keyed: would remember)
    calls = _listed(monkeypatch)
    gitscan.find_repos(str(tree))
    assert len(calls) == 7  # root, a, a/b, c, c/d, c/d/e, f


def test_only_trusted_filesystems(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernel does not keep the timestamps itself (network, FUSE),
    every scan lists everything."""
    monkeypatch.setattr(gitscan, "TRUSTED_FS", frozenset())
    _scan(tree)
    calls = _listed(monkeypatch)
    gitscan.find_repos(str(tree))
    assert len(calls) == 7  # root, a, a/b, c, c/d, c/d/e, f


def test_a_mount_below_the_root_is_always_listed(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another device below the root (a mount): its directories are listed
    every time (whether its timestamps can be trusted is not checked)."""
    real_stat = os.stat
    other = str(tree / "c")

    class Elsewhere:
        def __init__(self, st: os.stat_result) -> None:
            self.st_dev = st.st_dev + 1
            self.st_ino = st.st_ino
            self.st_ctime_ns = st.st_ctime_ns
            self.st_mtime_ns = st.st_mtime_ns

    def stat(path: str, *, follow_symlinks: bool = True) -> object:
        st = real_stat(path, follow_symlinks=follow_symlinks)
        return Elsewhere(st) if str(path).startswith(other) else st

    real_fstat = os.fstat

    def fstat(fd: int) -> object:
        st = real_fstat(fd)
        return Elsewhere(st) if os.readlink(f"/proc/self/fd/{fd}").startswith(other) else st

    monkeypatch.setattr(gitscan.os, "stat", stat)
    monkeypatch.setattr(gitscan.os, "fstat", fstat)
    _scan(tree)
    calls = _listed(monkeypatch)
    gitscan.find_repos(str(tree))
    assert sorted(calls) == [other, other + "/d", other + "/d/e"]


def test_memory_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gitscan, "RACY_NS", 0)
    gitscan.forget()
    for i in range(gitscan.MAX_ROOTS + 3):
        (tmp_path / str(i)).mkdir()
        gitscan.find_repos(str(tmp_path / str(i)))
    assert len(gitscan._memory) == gitscan.MAX_ROOTS
    monkeypatch.setattr(gitscan, "MAX_REMEMBERED", 2)
    gitscan.forget()
    (tmp_path / "big" / "a" / "b").mkdir(parents=True)
    time.sleep(TICK)
    gitscan.find_repos(str(tmp_path / "big"))
    gitscan.find_repos(str(tmp_path / "big"))
    # 3 directories: listed in full every time
    assert gitscan._memory == {(str(tmp_path / "big"), os.geteuid()): {}}


def test_too_many_directories_fail_closed(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scan that stopped early would miss a repository after the limit
    (a command can make that many directories): refuse the run instead."""
    monkeypatch.setattr(gitscan, "MAX_SCAN_ENTRIES", 3)
    with pytest.raises(PolicyError, match=r"more than 3 directories below"):
        gitscan.find_repos(str(tree))


def test_the_plans_realpath_answers_as_os_path_realpath(tmp_path: Path) -> None:
    """``fsplan.Realpath`` (each directory looked up once per plan) gives
    ``os.path.realpath``'s answer for every path, through symlinks
    (absolute, relative, dangling, looping, to '..'), missing components
    and files used as directories, asked in any order."""
    import itertools

    from nanobox._linux.fsplan import Realpath

    t = Path(os.path.realpath(tmp_path))  # no link on the way: the fast path is taken
    (t / "a" / "b" / "c").mkdir(parents=True)
    (t / "file").write_text("x")
    (t / "link_abs").symlink_to(t / "a")
    (t / "link_rel").symlink_to("a/b")
    (t / "chain").symlink_to("link_rel")
    (t / "dangling").symlink_to(t / "nowhere")
    (t / "loop1").symlink_to("loop2")
    (t / "loop2").symlink_to("loop1")
    (t / "a" / "up").symlink_to("..")
    (t / "a" / "b" / "self").symlink_to(".")
    names = [
        "a",
        "b",
        "c",
        "file",
        "link_abs",
        "link_rel",
        "chain",
        "dangling",
        "loop1",
        "up",
        "self",
        "missing",
    ]
    paths = [str(t)] + [
        os.path.join(str(t), *combo)
        for n in (1, 2, 3)
        for combo in itertools.product(names, repeat=n)
    ]
    paths += ["/", "/usr/bin", "/proc/self", "relative/path", str(t) + "/a/../file", "//x"]
    resolve = Realpath()
    for path in paths + paths[::-1]:
        assert resolve(path) == os.path.realpath(path), path
        assert resolve.lexists(path) == os.path.lexists(path), path
