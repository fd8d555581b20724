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
    """Record the directories the scan lists (``os.scandir`` calls)."""
    calls: list[str] = []
    real = os.scandir

    def spy(path: str) -> object:
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(gitscan.os, "scandir", spy)
    return calls


def _fresh(root: Path) -> list[str]:
    """What a scan with nothing remembered finds."""
    saved = dict(gitscan._memory)
    gitscan.forget()
    try:
        return sorted(gitscan.find_repos(str(root))[0])
    finally:
        gitscan._memory.update(saved)


def _scan(root: Path) -> list[str]:
    repos = sorted(gitscan.find_repos(str(root))[0])
    assert repos == _fresh(root)  # the same answer as listing everything
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


def test_recent_changes_are_listed_again(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory changed within RACY_NS of its listing is not trusted
    next time: a second change in the same clock tick would leave its
    ctime as it was."""
    monkeypatch.setattr(gitscan, "RACY_NS", 3_600 * 10**9)
    (tree / "a" / "new").mkdir()  # a and the rest: older than TICK, not an hour
    gitscan.find_repos(str(tree))
    calls = _listed(monkeypatch)
    gitscan.find_repos(str(tree))
    assert len(calls) == 8  # all of them (with a/new)


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

    monkeypatch.setattr(gitscan.os, "stat", stat)
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
    gitscan.forget()
