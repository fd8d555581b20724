"""``gitconfig``: git's configuration syntax, read without a kernel, and
checked against git's own ``config --list`` where git is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanobox._linux import gitconfig

SAMPLE = r"""
# a comment
[core]
	repositoryformatversion = 0
	hooksPath = .husky/_   ; a comment after the value
	bare
[Core "Sub Section"]
	HooksPath = "a b"
[include]
	path = ../shared.cfg # another
[includeIf "gitdir:~/work/"]
	path = ~/extra.cfg
[a.B]
	k = "q\"uo\\te" tail
	cont = one \
two
	tabbed = x\ty
[core] hookspath=.githooks
"""


def test_parse_reads_what_git_reads(tmp_path: Path) -> None:
    entries = gitconfig.parse(SAMPLE)
    assert ("core.hookspath", ".husky/_") in entries
    assert ("core.Sub Section.hookspath", "a b") in entries
    assert ("includeif.gitdir:~/work/.path", "~/extra.cfg") in entries
    assert ("a.b.cont", "one two") in entries and ("core.bare", "") in entries
    assert entries[-1] == ("core.hookspath", ".githooks")  # (the last one wins in git)
    if shutil.which("git") is None:
        pytest.skip("git is not installed: compared with the expected values only")
    cfg = tmp_path / "config"
    cfg.write_text(SAMPLE)
    listed = subprocess.run(
        ["git", "config", "--file", str(cfg), "--list"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    ours = [f"{name}={value}" if value else name for name, value in entries]
    assert ours == listed


def test_hooks_and_includes_follow_includes(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "cfg").mkdir(parents=True)
    repo_cfg = tmp_path / "repo" / ".git" / "config"
    repo_cfg.parent.mkdir(parents=True)
    repo_cfg.write_text(
        '[include]\n\tpath = ../shared.cfg\n[includeIf "onbranch:x"]\n\tpath = ~/cfg/a\n'
    )
    (tmp_path / "repo" / "shared.cfg").write_text("[core]\n\thooksPath = .githooks\n")
    (home / "cfg" / "a").write_text("[include]\n\tpath = b\n[core]\n\thooksPath = ~/hooks\n")
    (home / "cfg" / "b").write_text("[include]\n\tpath = a\n")  # a cycle: followed once

    def entries(path: str) -> list[tuple[str, str]] | None:
        try:
            return gitconfig.parse(Path(path).read_text())
        except OSError:
            return None

    hooks, included = gitconfig.hooks_and_includes(str(repo_cfg), entries, str(home))
    assert hooks == [".githooks", f"{home}/hooks"]
    assert included == [
        str(tmp_path / "repo" / "shared.cfg"),
        f"{home}/cfg/a",
        f"{home}/cfg/b",
        f"{home}/cfg/a",
    ]


def test_includes_stop_at_gits_depth() -> None:
    def entries(path: str) -> list[tuple[str, str]]:
        return [("include.path", path + "x")]  # every file includes the next

    _hooks, included = gitconfig.hooks_and_includes("/c", entries, "/h")
    assert len(included) == gitconfig.MAX_INCLUDE_DEPTH + 1


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parse_never_raises(text: str) -> None:
    for name, value in gitconfig.parse(text):
        assert isinstance(name, str) and isinstance(value, str)


_TOKENS = [
    "[core]",
    '[core "Sub"]',
    "[a.B]",
    "[include]",
    "\n",
    "\n",
    "\t",
    " ",
    "hooksPath",
    "path",
    "k-2",
    " = ",
    "=",
    '"',
    "\\",
    "\\t",
    "\\n",
    "#",
    ";",
    "x",
    "y z",
    "\u00a0",
    "\ufeff",
    "\r",
    "[core]\n",
    "\thooksPath = ",
    '"a b"',
    "\\\n",
    "[include]\n",
    "path=~/p",
    '[includeIf "gitdir:~/w/"]\n',
    '\\"',
    "k\n",
]


@pytest.mark.skipif(shutil.which("git") is None, reason="compared with git's own reading")
@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(_TOKENS), max_size=30))
def test_parse_agrees_with_git(tmp_path_factory: pytest.TempPathFactory, tokens: list[str]) -> None:
    """Where git reads a file without an error, ``parse`` reads the same
    names and values (``git config --list -z``)."""
    text = "".join(tokens)
    cfg = tmp_path_factory.mktemp("cfg") / "config"
    cfg.write_text(text, encoding="utf-8")
    p = subprocess.run(["git", "config", "--file", str(cfg), "--list", "-z"], capture_output=True)
    if p.returncode != 0:
        return  # (git refuses the file: what parse makes of it does not matter)
    listed = []
    for item in p.stdout.decode("utf-8", "surrogateescape").split("\0")[:-1]:
        name, _, value = item.partition("\n")  # (no newline: a boolean, "" here)
        listed.append((name, value))
    assert gitconfig.parse(text) == listed, text
