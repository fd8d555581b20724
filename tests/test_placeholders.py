"""Placeholders shared by fork servers of different processes.

A placeholder is the empty stand-in for a protected name (``.bashrc``) that
a workspace lacks; the sandbox's init mounts it read-only onto itself.
Removing the name on the host unmounts whatever is mounted on it in every
mount namespace, so a placeholder must outlive every sandbox that protects
it, whichever server made it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import PY, wait_until
from nanobox._linux import cgroups, placeholders


def _cli(ws: Path, script: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [PY, "-m", "nanobox", "run", "--", "sh", "-c", script],
        cwd=ws,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_a_sandbox_keeps_its_protection_when_another_nanobox_there_ends(
    workspace: Path,
) -> None:
    """Two `nanobox run` at once in one workspace (two fork servers): the
    first makes the ``.bashrc`` placeholder, the second protects that same
    file. The first ends, server and all, while the second runs: the second
    still cannot create ``.bashrc`` (it did, before: the first server's
    removal of its placeholder unmounted the second's protection), while
    it can write elsewhere in the workspace. Once both are done, nothing is
    left of the placeholder."""
    target = workspace / ".bashrc"

    def first_gone() -> None:
        assert target.exists()  # held by the second server: not removed

    second = _second_outlives_first(
        workspace,
        target,
        "echo pwned > .bashrc; echo bashrc=$?; echo x > other; echo other=$?",
        first_gone,
    )
    out, err = second.communicate(b"\n", timeout=60)
    assert second.returncode == 0, (out, err)
    assert b"other=0" in out, (out, err)  # the workspace is writable in there
    assert b"bashrc=" in out and b"bashrc=0" not in out, (out, err)
    assert sorted(os.listdir(workspace)) == ["other"]  # the placeholder went too


def _second_outlives_first(
    workspace: Path, target: Path, script: str, first_gone: Callable[[], None] = lambda: None
) -> subprocess.Popen[bytes]:
    """A first ``nanobox run`` that makes the placeholder ``target``, a
    second that starts while it runs and goes on to ``script`` (fed on
    stdin) once the first has ended, server and all (then ``first_gone``);
    the second, to communicate with (killed if anything failed)."""
    first = _cli(workspace, "read x")
    second = None
    try:
        assert wait_until(target.exists, timeout=30), "the first run made no placeholder"
        second = _cli(workspace, "echo ready; read x; " + script)
        assert second.stdout is not None
        assert second.stdout.readline() == b"ready\n"
        first_out = first.communicate(b"\n", timeout=60)
        assert first.returncode == 0, first_out
        first_gone()
        return second
    except BaseException:
        if second is not None and second.poll() is None:
            second.kill()
            second.communicate()
        raise
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()


def test_a_placeholder_held_elsewhere_stays_until_let_go(tmp_path: Path) -> None:
    """Two servers (two ``Placeholders``; their flocks conflict as two
    processes' would): the maker lets go first and keeps the placeholder,
    recorded, while the other holds it; the other, letting go last,
    removes it (the maker still runs: it may be about to exit without
    another look), and the maker's next look finds it gone."""
    maker = placeholders.Placeholders(cgroups.server_ident())  # alive: not swept
    other = placeholders.Placeholders(f"test-{uuid.uuid4().hex}")
    target = str(tmp_path / ".zshrc")
    try:
        mine = maker.acquire([(target, "file")])
        theirs = other.acquire([(target, "file")])
        assert maker.refs[target].made and not other.refs[target].made
        ino = os.lstat(target).st_ino
        maker.release(mine)
        assert os.path.exists(target) and maker.lingering == {target: ino}
        assert maker.record is not None
        with open(maker.record) as fh:
            assert fh.read() == f"{ino}\t{target}\n"
        assert not maker.retry()  # still held
        other.release(theirs)
        assert not os.path.exists(target)
        assert maker.retry() and maker.lingering == {}
        maker.save()
        assert not os.path.exists(maker.record)
    finally:
        for ph in (maker, other):
            if ph.record:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(ph.record)


def test_a_placeholder_made_again_by_its_maker_is_its_own(tmp_path: Path) -> None:
    """A lingering placeholder that its maker's next run wants is held as
    its own again (and removed by it at the end), not borrowed."""
    maker = placeholders.Placeholders()
    other = placeholders.Placeholders()
    target = str(tmp_path / ".envrc")
    first = maker.acquire([(target, "file")])
    theirs = other.acquire([(target, "file")])
    maker.release(first)
    assert target in maker.lingering
    again = maker.acquire([(target, "file")])
    assert maker.refs[target].made and not maker.lingering
    other.release(theirs)
    maker.release(again)
    assert not os.path.exists(target)


def test_a_user_file_is_held_but_never_removed(tmp_path: Path) -> None:
    target = tmp_path / ".profile"
    target.write_text("")  # empty, as a placeholder would be, but the user's
    ph = placeholders.Placeholders()
    taken = ph.acquire([(str(target), "file")])
    assert not ph.refs[str(target)].made
    ph.release(taken)
    assert target.exists()


def test_a_name_locked_elsewhere_fails_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held exclusively by another process for longer than the wait: the
    run fails, naming the file, rather than protect a name it cannot keep
    from being removed."""
    target = tmp_path / ".gitmodules"
    target.touch()
    fd = os.open(target, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        monkeypatch.setattr(placeholders, "LOCK_WAIT_S", 0.05)
        ph = placeholders.Placeholders()
        with pytest.raises(placeholders.PlaceholderError, match="keeps it locked"):
            ph.acquire([(str(target), "file")])
        assert ph.refs == {} and target.exists()
    finally:
        os.close(fd)


def test_a_filesystem_without_exclusive_locks_keeps_the_placeholder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NFS emulates flock with byte-range locks, and refuses an exclusive
    one on a read-only fd (EBADF): the maker keeps the placeholder for a
    later look instead of failing its run's release (and the server)."""
    maker = placeholders.Placeholders()
    target = str(tmp_path / ".idea")
    taken = maker.acquire([(target, "file")])
    real = fcntl.flock

    def nfs_like(fd: int, op: int) -> None:
        if op & fcntl.LOCK_EX:
            raise OSError(9, "Bad file descriptor")
        real(fd, op)

    monkeypatch.setattr(fcntl, "flock", nfs_like)
    maker.release(taken)
    assert os.path.exists(target) and target in maker.lingering
    monkeypatch.undo()
    assert maker.retry() and not os.path.exists(target)


def test_a_git_placeholder_of_another_nanobox_is_held_too(workspace: Path) -> None:
    """As above, for a name below ``.git``: the first server makes the
    missing ``.git/hooks`` (a directory), the second found it there and
    protected it as it was, holding nothing; the first's removal of its
    placeholder then unmounted the second's protection, and the second's
    command wrote a hook that git would run on the host. Now an empty
    protected name is held as a placeholder is."""
    subprocess.run(["git", "init", "-q", str(workspace)], check=True)
    subprocess.run(["rm", "-rf", str(workspace / ".git" / "hooks")], check=True)
    hooks = workspace / ".git" / "hooks"
    second = _second_outlives_first(
        workspace, hooks, "mkdir -p .git/hooks; echo exit 0 > .git/hooks/pre-commit; echo hook=$?"
    )
    out, err = second.communicate(b"\n", timeout=60)
    assert b"hook=" in out and b"hook=0" not in out, (out, err)
    assert not (hooks / "pre-commit").exists()
    assert not hooks.exists()  # the placeholder went too, once both were done
