"""Filesystem policy: read-only host, writable workspace, hidden secrets,
protected paths, escapes. Each claim is attempted inside a sandbox and, as a
control, outside it (where the caller could do it)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import nanobox
from conftest import IS_ROOT, SPY, nanobox_cli
from nanobox.policy import PROTECTED_TOP


def sh(cmd: str, **kw: object) -> nanobox.Result:
    return nanobox.run(["sh", "-c", cmd], timeout=30, **kw)  # type: ignore[arg-type]


def outside(cmd: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["sh", "-c", cmd], capture_output=True, timeout=30, cwd=cwd)


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fake $HOME with secrets in every default-hidden place (under
    /var/tmp: the sandbox's /tmp is private, so /tmp paths are invisible)."""
    h = Path(f"/var/tmp/nanobox-test-home-{uuid.uuid4().hex}")
    for d in (".ssh", ".gnupg", ".aws", ".azure", ".config/gcloud", ".kube", ".docker"):
        (h / d).mkdir(parents=True)
        (h / d / "secret").write_text("TOPSECRET")
    for f in (".netrc", ".git-credentials", ".npmrc", ".pypirc"):
        (h / f).write_text("TOPSECRET")
    (h / "notes.txt").write_text("public")
    monkeypatch.setenv("HOME", str(h))
    try:
        yield h
    finally:
        shutil.rmtree(h, ignore_errors=True)


# -- writes -------------------------------------------------------------------


def test_writes_outside_the_workspace_fail(workspace: Path, home: Path) -> None:
    name = f"nanobox-test-{uuid.uuid4().hex}"
    targets = ["/etc", str(home), "/usr", "/var", "/var/tmp", "/"]
    for d in targets:
        r = sh(f"echo x > {d}/{name} && echo WROTE")
        assert b"WROTE" not in r.stdout, d
        assert not os.path.exists(f"{d}/{name}"), d
    # /tmp is writable inside, but it is the sandbox's own.
    assert sh(f"echo x > /tmp/{name} && echo WROTE").stdout == b"WROTE\n"
    assert not os.path.exists(f"/tmp/{name}")
    # Control: the caller can write there (root everywhere; a user in $HOME and /tmp).
    for d in [*targets, "/tmp"]:
        if os.access(d, os.W_OK):
            p = outside(f"echo x > {d}/{name} && echo WROTE")
            try:
                assert p.stdout == b"WROTE\n", d
            finally:
                Path(f"{d}/{name}").unlink(missing_ok=True)


def test_workspace_and_tmp_are_writable(workspace: Path) -> None:
    marker = f"nanobox-test-{uuid.uuid4().hex}"
    r = sh(f"echo ws > out.txt && mkdir -p d/e && echo t > /tmp/{marker} && cat /tmp/{marker}")
    assert r.returncode == 0 and r.stdout == b"t\n", r.stderr
    assert (workspace / "out.txt").read_text() == "ws\n" and (workspace / "d/e").is_dir()
    assert not os.path.exists(f"/tmp/{marker}")  # the sandbox's /tmp is private


def test_host_tmp_is_not_visible(workspace: Path) -> None:
    marker = Path(f"/tmp/nanobox-test-{uuid.uuid4().hex}")
    marker.write_text("host")
    try:
        assert sh(f"cat {marker}").returncode != 0
        assert outside(f"cat {marker}").stdout == b"host"
    finally:
        marker.unlink()


def test_dot_dot_and_symlink_tricks_give_no_write_access(workspace: Path, home: Path) -> None:
    target = home / "notes.txt"
    r = sh(
        f"ln -s {home} link; echo bad > link/notes.txt; echo bad > ../../{target.name};"
        f"echo bad > {workspace}/../../../../{target}; ln -s /etc etc; echo bad > etc/x; true"
    )
    assert r.returncode == 0
    assert target.read_text() == "public"
    assert not Path("/etc/x").exists()


# -- hidden paths ---------------------------------------------------------------


def test_default_secrets_are_hidden(workspace: Path, home: Path) -> None:
    r = sh(
        "for f in .ssh/secret .gnupg/secret .aws/secret .azure/secret .config/gcloud/secret "
        ".kube/secret .docker/secret .netrc .git-credentials .npmrc .pypirc; do "
        "cat ~/$f 2>/dev/null; done; ls -A ~/.ssh ~/.aws; cat ~/notes.txt"
    )
    assert b"TOPSECRET" not in r.stdout
    assert b"secret" not in r.stdout  # directory listings are empty
    assert r.stdout.endswith(b"public")  # the rest of $HOME is readable
    assert outside(f"cat {home}/.ssh/secret").stdout == b"TOPSECRET"


def test_default_secrets_are_hidden_in_the_accounts_home_too(
    workspace: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``$HOME`` pointing elsewhere (a service, a CI job), the secrets
    in the account's own home (the user database's, here stood in for by
    ``home``) are hidden too."""
    from nanobox._linux import plan as planmod

    other = Path(f"/var/tmp/nanobox-test-otherhome-{uuid.uuid4().hex}")
    other.mkdir()
    try:
        monkeypatch.setenv("HOME", str(other))
        monkeypatch.setattr(planmod, "_ACCOUNT_HOME", {os.getuid(): str(home)})
        script = f"cat {home}/.ssh/secret {home}/.netrc {home}/.aws/secret; cat {home}/notes.txt"
        r = sh(script)
        assert b"TOPSECRET" not in r.stdout and r.stdout.endswith(b"public"), r.stdout
        fs = nanobox.Filesystem(default_hides=False)
        assert b"TOPSECRET" in sh(script, policy=nanobox.Policy(filesystem=fs)).stdout
    finally:
        other.rmdir()


@pytest.mark.parametrize("how", ["ro home", "rw home", "ro root"])
def test_secrets_stay_hidden_where_a_bind_shows_them_elsewhere(
    workspace: Path, home: Path, how: str
) -> None:
    """A bind that shows a host directory somewhere else (``~:/h``,
    ``/:/host``) shows what is hidden below it there too, unless that is
    hidden as well: before, ``--ro /var/tmp:/host`` read ~/.ssh at
    ``/host/...``."""
    kind, what = how.split()
    shown = "/h" if what == "home" else f"/host{home}"
    entry = f"{home}:/h" if what == "home" else "/:/host"
    binds = {"read_write" if kind == "rw" else "read_only": (entry,)}
    script = (
        f"cd {shown}; for f in .ssh/secret .aws/secret .config/gcloud/secret .netrc .npmrc; do "
        "cat $f 2>/dev/null; done; ls -A .ssh; cat notes.txt"
    )
    if kind == "rw":
        script += "; echo evil > .netrc; echo evil > .ssh/new; true"
    r = sh(script, policy=nanobox.Policy(filesystem=nanobox.Filesystem(**binds)))
    assert b"TOPSECRET" not in r.stdout and b"secret" not in r.stdout, r.stdout
    assert r.stdout.endswith(b"public"), (r.stdout, r.stderr)
    assert (home / ".netrc").read_text() == "TOPSECRET" and not (home / ".ssh/new").exists()
    # The same bind without the default hides shows them (the test can fail).
    fs = nanobox.Filesystem(default_hides=False, **binds)
    assert (
        b"TOPSECRET" in sh(f"cat {shown}/.ssh/secret", policy=nanobox.Policy(filesystem=fs)).stdout
    )


def test_secrets_stay_hidden_behind_symlinks(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A $HOME reached through a symlink (the workspace is the real home),
    and a hidden name that is itself a symlink (``~/.ssh -> keys/ssh``):
    hidden where they really are too. Before, the workspace's bind (of the
    real directory, mounted after a hide made through the link) covered the
    first, and the second was hidden only by name."""
    (workspace / ".aws").mkdir()
    (workspace / ".aws" / "secret").write_text("TOPSECRET")
    (workspace / "keys" / "ssh").mkdir(parents=True)
    (workspace / "keys" / "ssh" / "id").write_text("TOPSECRET")
    (workspace / ".ssh").symlink_to("keys/ssh")
    link = tmp_path / "home-link"
    link.symlink_to(workspace)
    monkeypatch.setenv("HOME", str(link))
    r = sh("cat .aws/secret keys/ssh/id .ssh/id; echo end")
    assert r.stdout == b"end\n", r
    assert outside("cat .aws/secret keys/ssh/id", cwd=workspace).stdout == b"TOPSECRETTOPSECRET"


def test_a_hidden_path_bound_by_name_is_shown(workspace: Path, home: Path) -> None:
    """Binding a hidden directory itself elsewhere asks for it by name."""
    fs = nanobox.Filesystem(read_only=(f"{home}/.ssh:/keys",))
    r = sh("cat /keys/secret; cat ~/.ssh/secret", policy=nanobox.Policy(filesystem=fs))
    assert r.stdout == b"TOPSECRET", (r.stdout, r.stderr)


def test_hide_option_and_no_default_hides(workspace: Path, home: Path) -> None:
    fs = nanobox.Filesystem(hide=("~/notes.txt", "/nonexistent/path"), default_hides=False)
    r = sh("cat ~/notes.txt; echo; cat ~/.ssh/secret", policy=nanobox.Policy(filesystem=fs))
    assert b"public" not in r.stdout and b"TOPSECRET" in r.stdout


def test_cli_hide_options(workspace: Path, home: Path) -> None:
    p = nanobox_cli("run", "--hide", str(home / "notes.txt"), "--", "cat", str(home / "notes.txt"))
    assert b"public" not in p.stdout
    p = nanobox_cli("run", "--no-default-hides", "--", "cat", str(home / ".netrc"))
    assert p.stdout == b"TOPSECRET"


def test_caller_environ_not_visible(workspace: Path) -> None:
    r = sh(f"cat /proc/{os.getppid()}/environ /proc/{os.getpid()}/environ 2>&1; ls /proc")
    assert b"PATH=" not in r.stdout


# -- protected paths ------------------------------------------------------------


@pytest.fixture
def repo(workspace: Path) -> Path:
    subprocess.run(["git", "init", "-q", str(workspace)], check=True)
    sub = workspace / "a" / "b"
    sub.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(sub)], check=True)
    (workspace / ".bashrc").write_text("# original\n")
    return workspace


ATTACKS = [
    "echo evil > .git/hooks/pre-commit",
    "echo evil >> .git/config",
    "rm -f .git/config",
    "mv .git/config .git/config.old",
    "mv .git/hooks .git/hooks.old",
    "rm -rf .git/hooks",
    "mv .git .git.old",
    "echo evil > a/b/.git/hooks/post-checkout",
    "mv a/b a/c",
    "mv a a2",
    "echo evil >> .bashrc",
    "rm -f .bashrc",
    "mv .bashrc bashrc.old",
    "echo evil > .zshrc",
    "echo evil > .profile",
    "mkdir -p .vscode && echo evil > .vscode/tasks.json",
    "mkdir -p .idea && echo evil > .idea/workspace.xml",
    "echo evil > .gitmodules",
    "ln .git/config hardlink",
    "ln -s /tmp/evil .zprofile",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_protected_paths_resist(repo: Path, attack: str) -> None:
    before = _snapshot(repo)
    sh(attack)
    assert _snapshot(repo) == before, attack


@pytest.mark.parametrize("attack", ATTACKS[:6] + ATTACKS[10:13])
def test_protected_attacks_work_outside(repo: Path, attack: str) -> None:
    before = _snapshot(repo)
    outside(attack, cwd=repo)
    assert _snapshot(repo) != before, attack


@pytest.fixture
def hooked(repo: Path) -> Path:
    """The workspace's repository with its hooks and part of its
    configuration in the worktree, where git's configuration says: husky's
    ``.husky/_`` (whose hooks run ``.husky/<hook>``), an included file, and
    in the nested repository a ``.githooks`` that does not exist yet."""
    _git("config", "core.hooksPath", ".husky/_", cwd=repo)
    _git("config", "include.path", "../shared.gitconfig", cwd=repo)
    (repo / ".husky" / "_").mkdir(parents=True)
    (repo / ".husky" / "pre-commit").write_text("npm test\n")
    (repo / "shared.gitconfig").write_text("[user]\n\tname = me\n")
    _git("config", "core.hooksPath", ".githooks", cwd=repo / "a" / "b")
    return repo


HOOK_ATTACKS = [
    "echo evil >> .husky/pre-commit",
    "echo evil > .husky/_/pre-commit",
    "mv .husky husky.old",
    "printf '[core]\\n\\tfsmonitor = evil\\n' >> shared.gitconfig",
    "rm -f shared.gitconfig",
    "mkdir -p a/b/.githooks && echo evil > a/b/.githooks/post-checkout",
    "mv a/b/.git/config a/b/.git/config.old",
]


@pytest.mark.parametrize("attack", HOOK_ATTACKS)
def test_hooks_and_configs_git_takes_from_the_worktree_resist(hooked: Path, attack: str) -> None:
    """What git runs or reads because its configuration says so (a
    ``core.hooksPath``, an ``include.path``) is protected like
    ``.git/hooks`` and ``.git/config`` where it is in the workspace: the
    command must not leave a hook that runs on the user's next commit."""
    before = _snapshot(hooked)
    sh(attack)
    assert _snapshot(hooked) == before, attack
    assert not (hooked / "a" / "b" / ".githooks").exists()  # (its placeholder is gone)


@pytest.mark.parametrize("attack", HOOK_ATTACKS[:2] + HOOK_ATTACKS[3:6])
def test_hook_attacks_work_outside(hooked: Path, attack: str) -> None:
    before = _snapshot(hooked)
    outside(attack, cwd=hooked)
    assert _snapshot(hooked) != before, attack


def test_a_global_git_config_in_the_workspace_is_protected(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A workspace that is $HOME holds git's global configuration: an
    ``fsmonitor`` or ``hooksPath`` set there would run in every repository
    the user opens. Protected, and kept from being created where missing."""
    monkeypatch.setenv("HOME", str(workspace))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("GIT_CONFIG_GLOBAL", raising=False)
    attack = (
        "echo '[core] fsmonitor = evil' > .gitconfig;"
        "mkdir -p .config/git && echo '[core] fsmonitor = evil' > .config/git/config; true"
    )
    sh(attack)
    assert not (workspace / ".gitconfig").exists() and not (workspace / ".config").exists()
    (workspace / ".gitconfig").write_text("[user]\n\tname = me\n")
    sh("echo '[core] fsmonitor = evil' >> .gitconfig")
    assert (workspace / ".gitconfig").read_text() == "[user]\n\tname = me\n"
    outside("echo '[core] fsmonitor = evil' >> .gitconfig", cwd=workspace)
    assert "fsmonitor" in (workspace / ".gitconfig").read_text()  # (the test can fail)
    # A dotfiles link cannot be protected (the command could replace it):
    # refused, as a linked .bashrc is, unless unprotected by path.
    (workspace / ".gitconfig").unlink()
    (workspace / ".gitconfig").symlink_to("/nonexistent/gitconfig")
    with pytest.raises(nanobox.PolicyError, match=r"\.gitconfig is a symlink"):
        sh("true")
    fs = nanobox.Filesystem(unprotect=(str(workspace / ".gitconfig"),))
    assert sh("true", policy=nanobox.Policy(filesystem=fs)).returncode == 0


def test_git_config_paths_through_links_are_followed_not_created_elsewhere(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A configured path that leads through a link: the link's directory is
    protected and, inside the workspace, what it leads to; nothing is made
    where it leads outside (an include through ``d/lnk -> elsewhere`` once
    had the server create a placeholder there). A linked global
    configuration (dotfiles) is protected at its target."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (repo / "d").mkdir()
    (repo / "d" / "lnk").symlink_to(elsewhere)
    _git("config", "include.path", str(repo / "d" / "lnk" / "outside" / "cfg"), cwd=repo)
    monkeypatch.setenv("HOME", str(repo))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("GIT_CONFIG_GLOBAL", raising=False)
    (repo / "dotfiles").mkdir()
    (repo / "dotfiles" / "gitconfig").write_text("[user]\n\tname = me\n")
    (repo / ".config" / "git").mkdir(parents=True)
    (repo / ".config" / "git" / "config").symlink_to("../../dotfiles/gitconfig")
    r = sh(
        "echo '[core] fsmonitor = evil' >> .config/git/config;"
        "rm -f .config/git/config; echo evil > d/new; echo ok"
    )
    assert r.stdout == b"ok\n", r
    assert (repo / "dotfiles" / "gitconfig").read_text() == "[user]\n\tname = me\n"
    assert (repo / ".config" / "git" / "config").is_symlink()
    assert not (repo / "d" / "new").exists()  # (the link's directory)
    assert list(elsewhere.iterdir()) == []


def test_a_missing_hooks_directory_and_a_read_worktree_config_are_protected(
    workspace: Path,
) -> None:
    """``git init --template=`` makes no ``.git/hooks``: the command could
    make it and leave a hook. ``extensions.worktreeConfig`` (``git
    sparse-checkout init`` sets it) has git read ``.git/config.worktree``,
    which is the repository's configuration as much as ``.git/config``."""
    subprocess.run(["git", "init", "-q", "--template=", str(workspace)], check=True)
    _git("config", "extensions.worktreeConfig", "true", cwd=workspace)
    attack = (
        "mkdir -p .git/hooks && echo evil > .git/hooks/pre-commit;"
        "printf '[core]\\n\\tfsmonitor = evil\\n' >> .git/config.worktree; true"
    )
    sh(attack)
    assert not (workspace / ".git" / "hooks").exists()
    assert not (workspace / ".git" / "config.worktree").exists()
    outside(attack, cwd=workspace)
    assert (workspace / ".git" / "hooks" / "pre-commit").exists()  # (the test can fail)
    assert "fsmonitor" in (workspace / ".git" / "config.worktree").read_text()


def test_a_commondir_made_in_a_run_is_removed_after_it(repo: Path) -> None:
    """``.git/commondir`` redirects git to another directory's config and
    hooks (here one the command wrote, with an fsmonitor): it cannot be kept
    from being made, so the run's end removes it and says so."""
    evil = (
        "mkdir -p .evil && cp -r .git/objects .git/refs .git/HEAD .evil/ && "
        "printf '[core]\\n\\trepositoryformatversion = 0\\n\\tfsmonitor = evil\\n' "
        "> .evil/config && echo ../.evil > .git/commondir"
    )
    r = sh(evil + "; echo ok")
    assert r.stdout == b"ok\n", r
    assert not (repo / ".git" / "commondir").exists()
    assert [v.kind for v in r.violations] == ["protect"], r.violations
    assert ".git/commondir" in r.violations[0].detail
    # Outside, the same makes git read the command's configuration.
    outside(evil, cwd=repo)
    common = subprocess.run(
        ["git", "rev-parse", "--git-common-dir"], cwd=repo, capture_output=True, text=True
    ).stdout.strip()
    assert common.endswith(".evil"), common


def test_a_global_absolute_hooks_path_in_a_writable_root_is_protected(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``core.hooksPath = ~/.config/git/hooks`` in the global configuration
    applies to every repository: a writable root holding it has it
    protected, with no repository of its own."""
    home = tmp_path / "home"
    (home / ".config" / "git").mkdir(parents=True)
    (home / ".gitconfig").write_text("[core]\n\thooksPath = ~/.config/git/hooks\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("GIT_CONFIG_GLOBAL", raising=False)
    fs = nanobox.Filesystem(read_write=(str(home / ".config"),))
    attack = f"mkdir -p {home}/.config/git/hooks && echo evil > {home}/.config/git/hooks/pre-commit"
    sh(attack, policy=nanobox.Policy(filesystem=fs))
    assert not (home / ".config" / "git" / "hooks").exists()
    outside(attack)
    assert (home / ".config" / "git" / "hooks" / "pre-commit").exists()  # (the test can fail)


def test_odd_git_configurations_neither_hang_nor_crash_the_plan(repo: Path, tmp_path: Path) -> None:
    """A command can leave any configuration in a repository it makes: a
    FIFO where a file is included (read without waiting), a NUL, a hook
    path through a file or of the root itself, a FIFO named ``.git``."""
    from nanobox._linux import fsplan

    os.mkfifo(repo / "fifo")
    (repo / "README").write_text("x")
    # (Written as a command would: git itself waits on such an include.)
    with open(repo / ".git" / "config", "a") as fh:
        fh.write(
            "[include]\n\tpath = ../fifo\n\tpath = ../README/x\n\tpath = a\\0b\n"
            "[core]\n\thooksPath = README/hooks\n"
        )
    with open(repo / "a" / "b" / ".git" / "config", "a") as fh:
        fh.write("[core]\n\thooksPath = ../..\n")  # (the workspace itself)
    view = fsplan.build(nanobox.Filesystem(), str(repo), str(tmp_path))
    assert any("runs hooks from the root itself" in n for n in view.notes), view.notes
    assert sh("echo ok").stdout == b"ok\n"
    # A FIFO named .git is no repository git could use: refused, as any
    # .git that cannot be read is, without waiting on it.
    (repo / "s").mkdir()
    os.mkfifo(repo / "s" / ".git")
    with pytest.raises(nanobox.PolicyError, match=r"filesystem\.protect"):
        sh("true")


def _snapshot(root: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if "/objects/" in rel or rel.startswith("new") or "/logs/" in rel:
            continue
        out[rel] = p.read_bytes() if p.is_file() and not p.is_symlink() else b"<dir>"
    return out


def _git(*args: str, cwd: Path) -> None:
    subprocess.run(
        [
            "git",
            "-c",
            "user.email=a@b",
            "-c",
            "user.name=n",
            "-c",
            "protocol.file.allow=always",
            *args,
        ],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


WORKTREE_ATTACKS = [
    "echo evil >> ../.git/config",  # the main repository's (shared) config
    "echo evil > ../.git/hooks/pre-commit",
    "echo 'gitdir: /tmp/evil' > .git",  # the link itself
]


@pytest.mark.parametrize("attack", WORKTREE_ATTACKS)
def test_a_worktree_checkout_in_the_workspace(repo: Path, attack: str) -> None:
    """In a worktree ``.git`` is a file ("gitdir: ..."): the run must not
    fail on it (it did: ENOTDIR looking for .git/hooks), and neither the
    link nor the hooks and config it leads to may be written."""
    _git("commit", "-q", "--allow-empty", "-m", "base", cwd=repo)
    _git("worktree", "add", "-q", "wt", cwd=repo)
    assert (repo / "wt" / ".git").is_file()
    _refused_inside_done_outside(repo, "cd wt && git status --short >/dev/null", attack)


def _refused_inside_done_outside(
    repo: Path,
    prelude: str,
    attack: str,
    *,
    policy: nanobox.Policy | None = None,
    host: str | None = None,
) -> None:
    """``attack`` after ``prelude`` is refused in a sandbox and changes
    nothing below ``repo``; run by the host in ``repo`` (``host``, default
    the same two) it does."""
    before = _snapshot(repo)
    r = sh(f"{prelude} && {{ {attack}; }} 2>/dev/null || echo refused", policy=policy)
    assert r.returncode == 0 and r.stdout == b"refused\n", r
    assert _snapshot(repo) == before
    outside(host or f"{prelude} && {attack}", cwd=repo)  # control: the host can
    assert _snapshot(repo) != before


SUBMODULE_ATTACKS = [
    "echo evil > ../.git/modules/sub/hooks/post-checkout",
    "echo evil >> ../.git/modules/sub/config",
    "echo 'gitdir: ../evil' > .git",
]


@pytest.mark.parametrize("attack", SUBMODULE_ATTACKS)
def test_a_submodule_checkout_in_the_workspace(repo: Path, tmp_path: Path, attack: str) -> None:
    """A submodule's hooks and config live in the superproject's
    .git/modules/NAME, which the .git file names: protected too."""
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    _git("init", "-q", cwd=upstream)
    _git("commit", "-q", "--allow-empty", "-m", "one", cwd=upstream)
    _git("submodule", "add", "-q", str(upstream), "sub", cwd=repo)
    assert (repo / "sub" / ".git").is_file()
    assert (repo / ".git" / "modules" / "sub" / "config").is_file()
    _refused_inside_done_outside(repo, "cd sub", attack)


def test_a_git_file_that_is_not_a_git_link(workspace: Path, tmp_path: Path) -> None:
    """A ``.git`` file without "gitdir: PATH" (a test's fixture, a file left
    by a tool) makes git refuse the directory, so a run there goes ahead
    (it was refused), and the file is kept as it is: the command cannot
    turn it into a link to a git directory with hooks it wrote."""
    junk = workspace / "f"
    junk.mkdir()
    (junk / ".git").write_text("not a link\n")
    r = outside("git status", cwd=junk)
    assert r.returncode != 0 and b"invalid gitfile format" in r.stderr, r
    evil = tmp_path / "evil"  # a git directory the command could have made
    subprocess.run(["git", "init", "-q", "--bare", str(evil)], check=True)
    attack = f"echo 'gitdir: {evil}' > .git"
    _refused_inside_done_outside(workspace, "cd f", attack)
    r = outside("git rev-parse --git-dir", cwd=junk)  # now a link git follows
    assert r.stdout.strip() == str(evil).encode(), r


LINKED_ATTACKS = [
    "echo /elsewhere > .git/worktrees/wt/commondir",  # (a git directory it made)
    "printf '[core]\\n\\tfsmonitor = x\\n' > .git/worktrees/wt/config.worktree",
    "echo evil > .git/modules/sub/hooks/post-checkout",
    "echo evil >> .git/modules/sub/config",
]


@pytest.mark.parametrize("attack", LINKED_ATTACKS)
def test_what_git_keeps_for_checkouts_elsewhere_is_protected(
    repo: Path, tmp_path: Path, attack: str
) -> None:
    """A repository's git directory keeps a private directory for each
    linked worktree (its ``commondir`` says where the repository's config
    and hooks are) and one for each submodule: the worktree or submodule
    checkout may be outside the workspace, or not checked out. A command
    that rewrote them had git run what it chose there the next time the
    user did (shown by the review: ``core.fsmonitor`` run by a ``git
    status`` in a worktree outside the workspace)."""
    _git("commit", "-q", "--allow-empty", "-m", "base", cwd=repo)
    _git("worktree", "add", "-q", str(tmp_path / "wt"), cwd=repo)
    subprocess.run(["git", "init", "-q", "--bare", str(repo / ".git/modules/sub")], check=True)
    assert (repo / ".git/worktrees/wt/commondir").is_file()
    _refused_inside_done_outside(repo, "true", attack)


def test_a_link_on_a_git_files_path_cannot_be_retargeted(workspace: Path, tmp_path: Path) -> None:
    """``.git`` = "gitdir: lnk/g", ``lnk`` a link in the workspace: the
    command could point ``lnk`` at a git directory it made (found by the
    third review: resolving the path through links left the link itself
    unprotected)."""
    repo = workspace / "r"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", "--bare", str(workspace / "other/g")], check=True)
    subprocess.run(["git", "init", "-q", "--bare", str(workspace / "evil/g")], check=True)
    (repo / "lnk").symlink_to("../other")
    (repo / ".git").write_text("gitdir: lnk/g\n")
    attack = "rm r/lnk && ln -s ../evil r/lnk"
    r = sh(f"{{ {attack}; }} 2>/dev/null || echo refused")
    assert r.stdout == b"refused\n", r
    assert os.readlink(repo / "lnk") == "../other"
    outside(attack, cwd=workspace)  # control: the host can
    assert os.readlink(repo / "lnk") == "../evil"


def test_a_commondir_made_in_a_submodules_git_directory_is_removed(repo: Path) -> None:
    """A submodule's git directory (or a worktree's without one) has no
    ``commondir``; one made during the run would send git to a config and
    hooks the command wrote: removed after the run, and reported."""
    sub = repo / ".git/modules/sub"
    subprocess.run(["git", "init", "-q", "--bare", str(sub)], check=True)
    r = sh("echo /elsewhere > .git/modules/sub/commondir")
    assert r.returncode == 0, r  # (it can be made: git fails on an empty one)
    assert not (sub / "commondir").exists()
    assert any(v.kind == "protect" and "modules/sub/commondir" in v.detail for v in r.violations)
    outside("echo /elsewhere > .git/modules/sub/commondir", cwd=repo)  # control: it stays
    assert (sub / "commondir").exists()


MORE_GIT_ATTACKS = [
    # a submodule's git directory where none is yet (.gitmodules names one,
    # or a branch, or a worktree's checkout elsewhere: found by the reviews)
    "mkdir -p .git/modules/sub/hooks",
    "mkdir -p .git/worktrees/wt/modules/sub/hooks",
    # read once git sparse-checkout turns extensions.worktreeConfig on
    "printf '[core]\\n\\tfsmonitor = x\\n' > .git/config.worktree",
]


@pytest.mark.parametrize("attack", MORE_GIT_ATTACKS)
def test_git_directories_git_adopts_later_cannot_be_made(
    repo: Path, tmp_path: Path, attack: str
) -> None:
    """No ``.gitmodules`` in this checkout: another branch, or a worktree
    elsewhere, may have one, and ``git submodule update --init`` there
    adopts a git directory the command made."""
    _git("commit", "-q", "--allow-empty", "-m", "base", cwd=repo)
    _git("worktree", "add", "-q", str(tmp_path / "wt"), cwd=repo)
    _refused_inside_done_outside(repo, "true", attack)


def test_too_many_worktree_directories_fail_closed(repo: Path) -> None:
    """A command could pad ``.git/worktrees`` so that a real one is not
    looked at, or every later run is slow: past the limit the run is
    refused, naming the cause."""
    for i in range(2001):
        d = repo / f".git/worktrees/w{i}"
        d.mkdir(parents=True)
        (d / "HEAD").write_text("ref: refs/heads/x\n")
    with pytest.raises(nanobox.PolicyError, match=r"too many to protect; remove what is not"):
        sh("true")


# .git files, and the directory name git takes from each (None: git refuses).
GIT_FILES = [
    ("gitdir: d\n", "d"),
    ("gitdir: d\r\n", "d"),
    ("gitdir: \nd\n", "\nd"),  # the path is all that follows, newlines within kept
    ("gitdir: d \n", "d "),  # and its spaces
    ("gitdir:d\n", None),  # "gitdir: " with its space, or no link
    ("gitdir: \n", None),
    ("not a link\n", None),
]


@pytest.mark.parametrize(("content", "name"), GIT_FILES)
def test_git_files_are_read_as_git_reads_them(
    tmp_path: Path, content: str, name: str | None
) -> None:
    """``gitfiles.git_dirs`` against git itself: which directory a ``.git``
    file leads to decides what is protected. It took the first line,
    stripped, so for the third and fourth git used a directory nanobox did
    not protect."""
    from nanobox._linux import gitfiles

    repo = tmp_path / "r"
    repo.mkdir()
    (repo / ".git").write_text(content, newline="")
    if name is not None:
        subprocess.run(["git", "init", "-q", "--bare", str(repo / name)], check=True)
    r = subprocess.run(
        ["git", "rev-parse", "--absolute-git-dir"], cwd=repo, capture_output=True, text=True
    )
    if name is None:
        assert r.returncode != 0 and gitfiles.git_dirs(str(repo)) == [], r
    else:
        assert r.stdout[:-1] == str(repo / name), r  # (git's own answer: the test can fail)
        assert gitfiles.git_dirs(str(repo)) == [str(repo / name)]


def test_a_git_link_through_a_symlink_is_resolved_as_git_does(tmp_path: Path) -> None:
    """git resolves a ``.git`` file's path physically (``lnk/..`` is the
    directory above where ``lnk`` leads); nanobox did it by the text, and
    protected another directory (found by the review)."""
    from nanobox._linux import gitfiles

    (tmp_path / "other" / "a").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "--bare", str(tmp_path / "other/g")], check=True)
    repo = tmp_path / "r"
    repo.mkdir()
    (repo / "lnk").symlink_to("../other/a")
    (repo / ".git").write_text("gitdir: lnk/../g\n")
    r = subprocess.run(
        ["git", "rev-parse", "--absolute-git-dir"], cwd=repo, capture_output=True, text=True
    )
    assert r.stdout[:-1] == str(tmp_path / "other/g"), r
    assert gitfiles.git_dirs(str(repo)) == [str(tmp_path / "other/g")]


@pytest.mark.parametrize("name", ["\nd", "d "])
def test_a_git_link_git_reads_differently_is_protected(workspace: Path, name: str) -> None:
    """A ``.git`` link to a git directory not made yet, named the way only
    git's own reading finds: the command cannot make it (with hooks)."""
    sub = workspace / "f"
    sub.mkdir()
    (sub / ".git").write_text(f"gitdir: {name}\n")
    quoted = name.replace("\n", "\\n")
    attack = f"git init -q --bare \"$(printf '{quoted}')\""
    _refused_inside_done_outside(workspace, "cd f", attack)
    assert (sub / name / "config").is_file()  # (made by the host)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any .git")
def test_an_unreadable_git_directory_fails_closed(repo: Path) -> None:
    """A command can chmod 000 its own .git; the next run must refuse (the
    hooks could not be checked), not run unprotected."""
    (repo / ".git").chmod(0)
    try:
        with pytest.raises(nanobox.PolicyError, match=r"filesystem\.protect"):
            sh("true")
    finally:
        (repo / ".git").chmod(0o755)


@pytest.mark.skipif(os.geteuid() == 0, reason="root lists any directory")
def test_an_unlistable_directory_of_the_caller_fails_closed(repo: Path) -> None:
    """A command can chmod 000 a directory holding a repository: the next
    run's scan would not see that repository (nor protect its hooks), and
    the command could chmod it back: refuse instead."""
    hidden = repo / "a"  # holds the nested repository a/b (see ``repo``)
    hidden.chmod(0)
    try:
        with pytest.raises(nanobox.PolicyError, match=r"cannot list .*/a "):
            sh("true")
    finally:
        hidden.chmod(0o755)
    assert sh("true").returncode == 0


def test_a_repository_made_between_runs_is_protected(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between runs the scan for repositories lists again only directories
    that changed (``gitscan``): a repository the host creates after one run
    in a directory that run's scan remembered is found by the next run,
    and its hooks are protected. (Directories younger than ``RACY_NS`` are
    never remembered; lowered here to cover the remembered case.)"""
    from nanobox._linux import gitscan

    monkeypatch.setattr(gitscan, "RACY_NS", 0)
    (workspace / "old" / "src").mkdir(parents=True)
    time.sleep(0.03)
    attack = "echo evil > old/src/.git/hooks/pre-commit"
    hook = workspace / "old" / "src" / ".git" / "hooks" / "pre-commit"
    with nanobox.Sandbox() as box:
        for _ in range(2):  # the first scan of a root lists, the second remembers
            assert box.run(["true"]).returncode == 0
        assert str(workspace / "old" / "src") in gitscan._memory[(str(workspace), os.geteuid())]
        time.sleep(0.03)
        subprocess.run(["git", "init", "-q", "old/src"], check=True)
        r = box.run(["sh", "-c", f"{attack} 2>/dev/null || echo refused"])
        assert r.stdout == b"refused\n", r
        assert not hook.exists()
    outside(attack, cwd=workspace)  # control: the host can
    assert hook.exists()


def test_git_still_works_and_new_repos_can_be_created(repo: Path) -> None:
    r = sh(
        "git -c user.email=a@b -c user.name=n commit -q --allow-empty -m inside && "
        "mkdir fresh && cd fresh && git init -q && echo x > f && git add f && "
        "git -c user.email=a@b -c user.name=n commit -q -m one && echo OK"
    )
    assert r.stdout == b"OK\n", r.stderr


def test_unprotect_a_git_path(workspace: Path) -> None:
    """``unprotect=(".git/hooks",)`` (the CLI help's example) lifts the
    hooks of every repository and nothing else (as a path with a '/' it was
    taken for an absolute path and lifted nothing); other relative paths
    are refused rather than ignored."""
    subprocess.run(["git", "init", "-q", str(workspace)], check=True)
    attack = "echo x > .git/hooks/x && echo hooks; echo y >> .git/config && echo config"
    assert sh(f"{{ {attack}; }} 2>/dev/null").stdout == b""  # control: both protected
    fs = nanobox.Filesystem(unprotect=(".git/hooks",))
    r = sh(f"{{ {attack}; }} 2>/dev/null", policy=nanobox.Policy(filesystem=fs))
    assert r.stdout == b"hooks\n", r
    assert (workspace / ".git" / "hooks" / "x").exists()
    for bad in ("sub/.vscode", "~user/x"):
        with pytest.raises(nanobox.PolicyError, match=r"filesystem\.unprotect"):
            nanobox.Filesystem(unprotect=(bad,))


def test_no_placeholders_left_behind(workspace: Path) -> None:
    assert sh("true").returncode == 0
    assert sorted(os.listdir(workspace)) == []


def test_unprotect(workspace: Path) -> None:
    fs = nanobox.Filesystem(unprotect=(".vscode",))
    r = sh(
        "mkdir .vscode && echo ok > .vscode/x && cat .vscode/x",
        policy=nanobox.Policy(filesystem=fs),
    )
    assert r.stdout == b"ok\n"
    assert (workspace / ".vscode" / "x").exists()


def test_symlinked_protected_name_is_refused(workspace: Path) -> None:
    (workspace / ".bashrc").symlink_to("/etc/hostname")
    with pytest.raises(nanobox.PolicyError, match="symlink"):
        sh("true")


# -- escapes --------------------------------------------------------------------


ESCAPES = {
    "mknod": "mknod ./null c 1 3",
    "mount": "mount -t tmpfs none /mnt",
    "umount": "umount /proc",
    "umount-lazy": "umount -l /proc",
    "chroot": "chroot / true",
    "pivot_root": "mkdir -p n/old && pivot_root n n/old",
    "proc-1-root": "ls /proc/1/root/",
    "proc-1-environ": "cat /proc/1/environ",
    "remount-rw": "mount -o remount,rw /",
}


@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_escape_attempts_fail(workspace: Path, name: str) -> None:
    r = sh(ESCAPES[name] + " && echo ESCAPED")
    assert b"ESCAPED" not in r.stdout, (name, r.stderr)


def test_escape_controls_succeed_in_a_plain_user_namespace(workspace: Path) -> None:
    # The same operations work in a bare user+mount namespace: nanobox's
    # dropped capabilities and view are what stop them.
    p = outside(
        "unshare -Urm sh -c 'mount -t tmpfs none /mnt && umount /mnt && chroot / true && echo OK'"
    )
    assert p.stdout == b"OK\n", p.stderr


@pytest.mark.root_only
def test_mknod_control_as_root(tmp_path: Path) -> None:
    assert outside(f"mknod {tmp_path}/n c 1 3 && echo OK").stdout == b"OK\n"


def test_proc_self_exe_is_the_command(workspace: Path) -> None:
    r = sh("readlink /proc/self/exe; ls /proc/self/root/ | head -3")
    assert r.stdout.startswith(b"/usr/bin/readlink") or r.stdout.startswith(b"/bin/readlink")


SETID = {
    "chmod u+s": "cp /bin/true t && chmod u+s t",
    "chmod g+s": "cp /bin/true t && chmod g+s t",
    "chmod 4755": "cp /bin/true t && chmod 4755 t",
    "install -m": "install -m 4755 /bin/true t",
    "open O_CREAT 04755": (
        "python3 -c \"import os; os.close(os.open('t', os.O_CREAT | os.O_WRONLY, 0o4755))\""
    ),
    "mkdir -m 2755": "mkdir -m 2755 t",
}


@pytest.mark.parametrize("name", sorted(SETID))
def test_files_cannot_gain_setuid_or_setgid(workspace: Path, name: str) -> None:
    r = sh(SETID[name])
    t = workspace / "t"
    assert not (t.exists() and t.stat().st_mode & 0o6000), (name, oct(t.stat().st_mode))
    assert any(v.kind == "syscall" for v in r.violations), r.stderr
    # Control: outside, the same command leaves a setuid/setgid file.
    t.unlink(missing_ok=True) if t.is_file() else (t.rmdir() if t.exists() else None)
    outside(SETID[name], cwd=workspace)
    assert t.stat().st_mode & 0o6000, name


# -- root callers ---------------------------------------------------------------


@pytest.mark.root_only
def test_root_caller_cannot_read_shadow_but_writes_workspace(workspace: Path) -> None:
    r = sh("cat /etc/shadow; echo done > f; id -u")
    assert b"root:" not in r.stdout and r.stdout.endswith(b"0\n")
    assert (workspace / "f").read_text() == "done\n"
    assert (workspace / "f").stat().st_uid == 0  # owned by the caller on the host
    assert outside("head -c 5 /etc/shadow").stdout == b"root:"


# -- options --------------------------------------------------------------------


def test_ro_rw_tmpfs_options(workspace: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.txt").write_text("input")
    out = tmp_path / "out"
    out.mkdir()
    fs = nanobox.Filesystem(
        read_only=(f"{data}:/data",),
        read_write=(f"{out}",),
        tmpfs=("/scratch:1M",),
    )
    r = sh(
        f"cat /data/in.txt; echo x > /data/y || echo ro; echo r > {out}/r;"
        "echo s > /scratch/s && cat /scratch/s; head -c 2M /dev/zero > /scratch/big || echo full",
        policy=nanobox.Policy(filesystem=fs),
    )
    assert r.stdout == b"inputro\ns\nfull\n", r.stderr
    assert (out / "r").read_text() == "r\n" and not (data / "y").exists()


MAPPED_ATTACKS = [
    "echo evil > .git/hooks/pre-commit",
    "echo evil >> .git/config",
    "echo evil > sub/.git/hooks/post-checkout",
    "mv sub sub2",
    "echo evil > .bashrc",
    "mkdir .vscode",
]


@pytest.mark.parametrize("attack", MAPPED_ATTACKS)
def test_a_writable_root_bound_elsewhere_is_protected(
    workspace: Path, tmp_path: Path, attack: str
) -> None:
    """``read_write=["SRC:DST"]``: the repositories and names to protect are
    looked for in SRC, and protected where the sandbox sees them (under
    DST). (It looked in DST on the host: nothing to find there, and the
    placeholders went to the wrong place, failing every run.)"""
    src = tmp_path / "src"
    src.mkdir()
    subprocess.run(["git", "init", "-q", str(src)], check=True)
    subprocess.run(["git", "init", "-q", str(src / "sub")], check=True)
    dst = f"/var/tmp/nanobox-test-mapped-{uuid.uuid4().hex}"
    policy = nanobox.Policy(filesystem=nanobox.Filesystem(read_write=(f"{src}:{dst}",)))
    prelude = f"cd {dst} && echo ok > new-file"
    _refused_inside_done_outside(src, prelude, attack, policy=policy, host=attack)
    assert (src / "new-file").read_text() == "ok\n"  # the root itself is writable
    assert not os.path.lexists(dst)  # nothing made on the host


NESTED_ATTACKS = [
    "echo evil > sub/.vscode/evil",
    "echo evil > sub/.vscode/r/.git/hooks/pre-commit",
    "echo evil > sub/.bashrc",
]


@pytest.mark.parametrize("attack", NESTED_ATTACKS)
def test_a_writable_root_bound_inside_another_is_protected(
    workspace: Path, tmp_path: Path, attack: str
) -> None:
    """A root bound inside the workspace (``read_write "SRC:WS/sub"``): what
    the sandbox sees there is SRC, so SRC's names and repositories are
    protected there, not what the bind hides on the host (its repository
    at hidden/ would have failed the run, and its pins of WS/sub/.vscode
    made that writable)."""
    src = tmp_path / "src"
    (src / ".vscode" / "r").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(src / ".vscode" / "r")], check=True)
    hidden = workspace / "sub"
    (hidden / ".vscode" / "r").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(hidden / ".vscode" / "r")], check=True)
    subprocess.run(["git", "init", "-q", str(hidden / "hidden")], check=True)
    policy = nanobox.Policy(filesystem=nanobox.Filesystem(read_write=(f"{src}:{workspace}/sub",)))
    host = attack.replace("sub/", "")  # the same paths, from SRC on the host
    _refused_inside_done_outside(src, "echo ok > sub/new-file", attack, policy=policy, host=host)
    assert (src / "new-file").read_text() == "ok\n"


def test_a_destination_with_two_leading_slashes(workspace: Path, tmp_path: Path) -> None:
    """``//x`` is ``/x`` to the kernel; the plan compares paths as strings,
    so it is normalised (a tmpfs or bind there failed at setup: "create
    mount point //x: File exists"), and SRC's repository is still protected
    there."""
    src = tmp_path / "src"
    src.mkdir()
    subprocess.run(["git", "init", "-q", str(src)], check=True)
    dst = f"/var/tmp/nanobox-test-slashes-{uuid.uuid4().hex}"
    fs = nanobox.Filesystem(read_write=(f"{src}:/{dst}",), tmpfs=("//scratch",))
    policy = nanobox.Policy(filesystem=fs)
    prelude = f"echo s > /scratch/s && cd {dst} && echo ok > new-file"
    attack = "echo evil > .git/hooks/pre-commit"
    _refused_inside_done_outside(src, prelude, attack, policy=policy, host=attack)
    assert (src / "new-file").read_text() == "ok\n"


@pytest.mark.parametrize(
    ("field", "entry"),
    [
        ("read_write", "/"),
        ("read_write", "{src}:/"),
        ("read_write", "{src}://"),
        ("read_write", "{src}:/x/.."),
        ("read_only", "/"),
        ("read_only", "{src}://"),
        ("tmpfs", "/"),
        ("tmpfs", "//:1M"),
        ("hide", "/"),
        ("hide", "//."),
    ],
)
def test_the_root_as_a_destination_is_refused(tmp_path: Path, field: str, entry: str) -> None:
    """A writable bind, a tmpfs or a hide at '/' would replace the whole
    root: refused with the option named (they failed at setup with an
    unrelated message, or were silently ignored: a hide not applied)."""
    from nanobox._linux import fsplan

    entry = entry.format(src=tmp_path)
    fs = nanobox.Filesystem(**{field: (entry,)})
    with pytest.raises(nanobox.PolicyError, match="'/' is not supported") as info:
        fsplan.build(fs, str(tmp_path), str(tmp_path))
    assert info.value.field == f"filesystem.{field}" and entry in str(info.value)
    if field != "tmpfs":  # (no tmpfs without a mount namespace)
        with pytest.raises(nanobox.PolicyError, match="'/' is not supported"):
            fsplan.build_nons(fs, str(tmp_path), str(tmp_path))


def test_the_host_root_as_a_writable_source_is_refused(tmp_path: Path) -> None:
    """A link to '/' (or ``/proc/self/root``) as a writable root would make
    every host file writable: refused, with and without a mount namespace."""
    from nanobox._linux import fsplan

    link = tmp_path / "root-link"
    link.symlink_to("/")
    for entry in (str(link), f"{link}:/x", "/proc/self/root:/x"):
        fs = nanobox.Filesystem(read_write=(entry,))
        with pytest.raises(nanobox.PolicyError, match="host root '/' cannot be writable"):
            fsplan.build(fs, str(tmp_path), str(tmp_path))
    with pytest.raises(nanobox.PolicyError, match="host root '/' cannot be writable"):
        fsplan.build_nons(nanobox.Filesystem(read_write=(str(link),)), str(tmp_path), str(tmp_path))
    # A tmpfs or a hide through a link to '/' would land on '/' (mounted by path).
    for field in ("tmpfs", "hide"):
        with pytest.raises(nanobox.PolicyError, match="'/' is not supported"):
            fsplan.build(nanobox.Filesystem(**{field: (str(link),)}), "/nonexistent", "/x")


def test_landlock_rules_never_follow_a_link_around_a_hidden_path(tmp_path: Path) -> None:
    """Landlock is the only layer without a mount namespace: the rules
    around a hidden path must not include a link to its parent (or to
    '/'): a rule is for where the link leads, and granted the hidden path
    with it."""
    from nanobox._linux import fsplan

    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / "notes").write_text("public")
    (home / "me").symlink_to(home)
    (home / "up").symlink_to("/")
    fs = nanobox.Filesystem(read_only=(str(home),))
    for nons in (True, False):
        view = (fsplan.build_nons if nons else fsplan.build)(fs, "/nonexistent", str(home))
        rules = fsplan.landlock_plan(view, nons=nons)
        granted = rules["read"] + rules["write"]
        for path in (str(home / "me"), str(home / "up"), "/"):
            assert path not in granted, (nons, path)
        if nons:  # (with mounts, the bind of home is granted whole: the hide is a mount)
            assert str(home / "notes") in granted and str(home) in rules["list"]
            assert str(home) not in granted


def test_landlock_rules_around_deep_and_linked_hidden_paths(tmp_path: Path) -> None:
    """Around a hidden path 14 directories deep (rules stopped descending at
    12 and granted the rest whole), refused beyond ``MAX_HIDE_DEPTH``
    rather than granted; and a hidden path named through a symlinked
    ancestor (a home directory under a linked /home) is planned around
    where it really is."""
    from nanobox._linux import fsplan

    deep = tmp_path.joinpath(*[f"d{i}" for i in range(14)], "secret")
    deep.mkdir(parents=True)
    view = fsplan.build_nons(nanobox.Filesystem(hide=(str(deep),)), "/nonexistent", "/x")
    granted = fsplan.landlock_plan(view, nons=True)["read"]
    assert not [p for p in granted if fsplan._is_under(str(deep), p)], granted
    too_deep = tmp_path.joinpath(*["d"] * (fsplan.MAX_HIDE_DEPTH + 1))
    too_deep.mkdir(parents=True)
    view = fsplan.build_nons(nanobox.Filesystem(hide=(str(too_deep),)), "/nonexistent", "/x")
    with pytest.raises(nanobox.PolicyError, match=r"filesystem\.hide"):
        fsplan.landlock_plan(view, nons=True)

    real = tmp_path / "data" / "home" / "u" / ".ssh"
    real.mkdir(parents=True)
    (tmp_path / "home").symlink_to(tmp_path / "data" / "home")
    named = str(tmp_path / "home" / "u" / ".ssh")
    view = fsplan.build(nanobox.Filesystem(hide=(named,)), "/nonexistent", "/x")
    granted = fsplan.landlock_plan(view)["read"]
    assert not [p for p in granted if fsplan._is_under(str(real), p)], granted


@pytest.mark.parametrize(
    ("field", "entry", "dst"),
    [
        ("tmpfs", "//y:1M", "/y"),
        ("read_write", "{src}://y", "/y"),
        ("read_only", "{src}://y/", "/y"),
        ("hide", "/{src}", "{src}"),
    ],
)
def test_destinations_are_normalised(tmp_path: Path, field: str, entry: str, dst: str) -> None:
    from nanobox._linux import fsplan

    fs = nanobox.Filesystem(**{field: (entry.format(src=tmp_path),)})
    view = fsplan.build(fs, str(tmp_path), str(tmp_path))
    kind = {"read_write": "bind", "read_only": "robind"}.get(field, field)
    want = dst.format(src=tmp_path)
    assert any(op["t"] == kind and op["dst"] == want for op in view.ops), view.ops
    assert not [op for op in view.ops if op["dst"].startswith("//")], view.ops


def test_inside_path() -> None:
    from nanobox._linux.fsplan import inside_path

    assert inside_path("/.bashrc", "/", "/mnt") == "/mnt/.bashrc"
    assert inside_path("/", "/", "/mnt") == "/mnt"
    assert inside_path("/a/b/c", "/a", "/x/y") == "/x/y/b/c"
    assert inside_path("/a/b", "/a/b", "/a/b") == "/a/b"


def test_missing_source_is_an_error_unless_optional(workspace: Path) -> None:
    with pytest.raises(nanobox.PolicyError, match="does not exist"):
        nanobox.Filesystem(read_only=("/nonexistent",))  # validated at run time
        sh(
            "true",
            policy=nanobox.Policy(filesystem=nanobox.Filesystem(read_only=("/nonexistent",))),
        )
    fs = nanobox.Filesystem(read_only=("/nonexistent?",))
    assert sh("true", policy=nanobox.Policy(filesystem=fs)).returncode == 0


def test_dest_is_created_under_read_only_directories(workspace: Path, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("here")
    fs = nanobox.Filesystem(read_only=(f"{tmp_path / 'f'}:/usr/share/nanobox-test/f",))
    r = sh(
        "cat /usr/share/nanobox-test/f; ls /usr/share | grep -c .",
        policy=nanobox.Policy(filesystem=fs),
    )
    assert r.stdout.startswith(b"here") and int(r.stdout[4:]) > 10  # siblings still visible


def test_destinations_below_a_new_top_level_directory(workspace: Path, tmp_path: Path) -> None:
    """``--ro SRC:/data/a/b`` with no ``/data`` on the host failed at setup
    ("create mount point /data/a/b: File exists": the root, read-only, was
    shadowed in place); only a destination directly under ``/`` got the
    rebuilt root it needs. The host's own top-level entries stay."""
    top = f"/nanobox-test-{uuid.uuid4().hex[:8]}"
    assert not os.path.lexists(top)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("here")
    fs = nanobox.Filesystem(
        read_only=(f"{src}:{top}/ro/a",),
        read_write=(f"{src}:{top}-w/rw",),
        tmpfs=(f"{top}-t/scratch",),
    )
    r = sh(
        f"cat {top}/ro/a/f && echo new > {top}-w/rw/new && echo s > {top}-t/scratch/s"
        " && ls / | grep -cx -e usr -e etc",
        policy=nanobox.Policy(filesystem=fs),
    )
    assert (r.returncode, r.stdout) == (0, b"here2\n"), r
    assert (src / "new").read_text() == "new\n"
    assert not os.path.lexists(top) and not os.path.lexists(f"{top}-w")


def test_a_writable_file(workspace: Path, tmp_path: Path) -> None:
    """``--rw FILE[:DEST]``: the file is writable, nothing beside it. It was
    refused ("protected path: cannot check FILE/.gitmodules: Not a
    directory": a writable root was searched for protected names as if it
    were a directory)."""
    # Not under /tmp (the sandbox's own there) and reachable by a root
    # caller's sandbox uid: its directory is the host's, read-only, inside.
    d = Path(f"/var/tmp/nanobox-test-{uuid.uuid4().hex}")
    d.mkdir(mode=0o755)
    try:
        f = d / "log.txt"
        f.write_text("a\n")
        f.chmod(0o666)
        for spec, inside in ((f"{f}:{d}-elsewhere/log", f"{d}-elsewhere/log"), (str(f), str(f))):
            r = sh(
                f"echo b >> {inside} && (echo c > {os.path.dirname(inside)}/beside || echo no)",
                policy=nanobox.Policy(filesystem=nanobox.Filesystem(read_write=(spec,))),
            )
            assert (r.returncode, r.stdout) == (0, b"no\n"), r
        assert f.read_text() == "a\nb\nb\n"
        assert sorted(p.name for p in d.iterdir()) == ["log.txt"]
        assert not os.path.lexists(f"{d}-elsewhere")
    finally:
        shutil.rmtree(d)


def test_a_file_onto_a_directory_says_so(workspace: Path, tmp_path: Path) -> None:
    """The kernel's answer was a bare EINVAL from move_mount."""
    f = tmp_path / "f"
    f.write_text("x")
    for entry, message in (
        (f"{f}:/etc", f"{f} is a file but /etc is a directory"),
        ("/usr/share:/etc/hostname", "/usr/share is a directory but /etc/hostname is a file"),
    ):
        fs = nanobox.Filesystem(read_only=(entry,))
        with pytest.raises(nanobox.SetupError, match=re.escape(message)):
            sh("true", policy=nanobox.Policy(filesystem=fs))


def test_most_specific_path_wins(workspace: Path, tmp_path: Path) -> None:
    outer = tmp_path / "outer"
    (outer / "inner").mkdir(parents=True)
    fs = nanobox.Filesystem(read_write=(str(outer),), read_only=(str(outer / "inner"),))
    r = sh(
        f"echo a > {outer}/a && echo b > {outer}/inner/b || echo inner-ro",
        policy=nanobox.Policy(filesystem=fs),
    )
    assert r.stdout == b"inner-ro\n"


def test_minimal_rootfs(workspace: Path) -> None:
    fs = nanobox.Filesystem(rootfs="minimal")
    r = sh(
        "ls /; ls /etc | grep -c .; ls /home; echo ok > f; cat f",
        policy=nanobox.Policy(filesystem=fs),
    )
    assert r.returncode == 0, r.stderr
    assert b"usr" in r.stdout and b"ok\n" in r.stdout
    r2 = nanobox.run([SPY, "-c", "print(6*7)"], policy=nanobox.Policy(filesystem=fs))
    assert r2.stdout == b"42\n"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--ro", "relative/path"], "--ro"),
        (["--rw", "/nonexistent/x"], "--rw"),
        (["--tmpfs", "/x:lots"], "--tmpfs"),
        (["--tmpfs", "relative"], "--tmpfs"),
        (["--hide", "no-slash"], "--hide"),
        (["--rootfs", "tiny"], "--rootfs"),
        (["--ro", "/a:/b:/c"], "--ro"),
        (["--rw", "/tmp:relative"], "--rw"),
    ],
)
def test_bad_filesystem_options(workspace: Path, args: list[str], named: str) -> None:
    p = nanobox_cli("run", *args, "true")
    assert p.returncode == 125
    lines = p.stderr.decode().splitlines()
    assert len(lines) == 1 and named in lines[0], lines


def test_unknown_filesystem_key_in_policy(workspace: Path, tmp_path: Path) -> None:
    pol = tmp_path / "p.toml"
    pol.write_text('[filesystem]\nreadonly = ["/etc"]\n')
    p = nanobox_cli("run", "--policy", str(pol), "true")
    assert p.returncode == 125 and b"filesystem.readonly" in p.stderr


def test_is_root_flag() -> None:
    assert IS_ROOT == (os.geteuid() == 0)


# -- each layer on its own --------------------------------------------------------


def test_mount_view_alone_blocks_writes_and_hides(workspace: Path, home: Path) -> None:
    """Landlock off: the mount view by itself keeps /etc, $HOME and secrets safe.
    (Landlock by itself is tested in test_nouserns.py, where no mounts exist.)"""
    policy = nanobox.Policy(filesystem=nanobox.Filesystem(landlock=False))
    name = f"nanobox-test-{uuid.uuid4().hex}"
    r = sh(
        f"echo x > /etc/{name}; echo x > {home}/{name}; cat {home}/.ssh/secret; echo ws > w",
        policy=policy,
    )
    assert not os.path.exists(f"/etc/{name}") and not (home / name).exists()
    assert b"TOPSECRET" not in r.stdout and (workspace / "w").exists()


def test_landlock_is_on_by_default(workspace: Path) -> None:
    from nanobox._linux import landlock

    if landlock.abi_version() == 0:
        pytest.skip("no Landlock on this kernel")
    r = sh(
        "grep -c . /proc/self/status >/dev/null; cat /proc/self/attr/current 2>/dev/null; "
        'python3 -c "import ctypes; l=ctypes.CDLL(None); print(l.syscall(444, 0, 0, 1))"'
    )
    assert r.returncode == 0


# -- unix sockets ------------------------------------------------------------------


CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
    print("CONNECTED")
except OSError as e:
    print("refused", e.errno)
"""


def test_host_unix_socket_outside_private_dirs_is_not_connectable(workspace: Path) -> None:
    """A read-only view does not stop connect(): nanobox brokers it."""
    d = Path(f"/var/tmp/nanobox-test-{uuid.uuid4().hex}")
    d.mkdir()
    path = d / "s.sock"
    srv = __import__("socket").socket(__import__("socket").AF_UNIX)
    try:
        srv.bind(str(path))
        srv.listen()
        path.chmod(0o777)
        r = nanobox.run([SPY, "-c", CONNECT, str(path)], timeout=30)
        assert r.stdout == b"refused 13\n", r.stderr
        assert any(v.kind == "unix_socket" for v in r.violations)
        ctl = subprocess.run([SPY, "-c", CONNECT, str(path)], capture_output=True, timeout=30)
        assert ctl.stdout == b"CONNECTED\n"
    finally:
        srv.close()
        shutil.rmtree(d, ignore_errors=True)


ODD_CONNECTS = """
import ctypes, os, socket, struct
libc = ctypes.CDLL(None, use_errno=True)
libc.connect.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint)
inet = socket.socket()
unix = socket.socket(socket.AF_UNIX)
sin = ctypes.create_string_buffer(struct.pack("=H", socket.AF_INET) + bytes(14))  # port 0
path = ctypes.create_string_buffer(
    struct.pack("=H", socket.AF_UNIX) + b"/nonexistent/s\\0", 200
)
r, w = os.pipe()
calls = {
    "no such fd": (999, sin, 16),
    "not a socket": (r, sin, 16),
    "NULL address": (inet.fileno(), None, 16),
    "unmapped address": (inet.fileno(), 4096, 16),
    "kernel address": (inet.fileno(), 0xFFFF800000000000, 16),
    "length 0": (inet.fileno(), sin, 0),
    "length 200": (inet.fileno(), sin, 200),
    "length 5000": (inet.fileno(), sin, 5000),
    "short for its family": (inet.fileno(), sin, 8),
    "no such path": (unix.fileno(), path, 2 + len("/nonexistent/s") + 1),
    "unix, past sockaddr_un": (unix.fileno(), path, 111),
    "unix, past sockaddr_storage": (unix.fileno(), path, 129),
    "past sockaddr_storage": (inet.fileno(), sin, 129),
    "unix, another family": (unix.fileno(), sin, 16),
}
for name, (fd, addr, size) in calls.items():
    ctypes.set_errno(0)
    rc = libc.connect(fd, addr, size)
    print(name, rc, ctypes.get_errno())
"""


def test_odd_connect_calls_get_the_kernels_answers(workspace: Path) -> None:
    """Every ``connect()`` in the sandbox is performed by nanobox's broker
    (see unixconnect): calls it cannot make get the errors the kernel gives
    outside (a bad fd, a non-socket, an address it cannot read, a length
    the family refuses)."""
    r = nanobox.run([SPY, "-c", ODD_CONNECTS], timeout=30)
    ctl = subprocess.run([SPY, "-c", ODD_CONNECTS], capture_output=True, timeout=30)
    assert ctl.returncode == 0 and b"-1 14" in ctl.stdout, ctl
    assert r.stdout.decode().splitlines() == ctl.stdout.decode().splitlines(), r.stderr


SEND_DATAGRAMS = """
import socket, sys
def attempt(how):
    try:
        if how == "socket+sendto":
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"1", sys.argv[1])
        elif how == "socket+sendmsg":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            s.sendmsg([b"2"], [], 0, sys.argv[1])
        elif how == "raw socket+sendto":  # the kernel makes it a datagram socket
            socket.socket(socket.AF_UNIX, socket.SOCK_RAW).sendto(b"4", sys.argv[1])
        else:
            a, _b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            a.sendto(b"3", sys.argv[1])
        print(how, "SENT")
    except OSError as e:
        print(how, "refused", e.errno)
for how in ("socket+sendto", "socket+sendmsg", "socketpair+sendto", "raw socket+sendto"):
    attempt(how)
"""


def test_host_unix_datagram_socket_is_not_reachable(workspace: Path) -> None:
    """A datagram sent with an address needs no connect(), which is where
    unix socket paths are brokered: a datagram socket could reach a host
    daemon's socket (a syslog or journal socket) through the read-only view.
    Unix datagram sockets are refused in the sandbox (and reported);
    outside, each of the four ways delivers (``SOCK_RAW`` is a datagram
    socket for ``AF_UNIX``)."""
    import socket

    d = Path(f"/var/tmp/nanobox-test-{uuid.uuid4().hex}")
    d.mkdir()
    d.chmod(0o755)
    path = d / "d.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        srv.bind(str(path))
        path.chmod(0o777)
        srv.settimeout(0.2)
        r = nanobox.run([SPY, "-c", SEND_DATAGRAMS, str(path)], timeout=30)
        assert r.stdout.decode().split("\n")[:4] == [
            "socket+sendto refused 13",
            "socket+sendmsg refused 13",
            "socketpair+sendto refused 13",
            "raw socket+sendto refused 13",
        ], r.stderr
        refused = [v.data for v in r.violations if v.kind == "syscall"]
        assert [(v["syscall"], v["errno"]) for v in refused] == [
            ("socket", "EACCES"),
            ("socket", "EACCES"),
            ("socketpair", "EACCES"),
            ("socket", "EACCES"),
        ], r.violations
        with pytest.raises(TimeoutError):
            srv.recv(16)  # nothing arrived
        ctl = subprocess.run(
            [SPY, "-c", SEND_DATAGRAMS, str(path)], capture_output=True, timeout=30
        )
        assert ctl.stdout.count(b"SENT") == 4, ctl
        assert sorted(srv.recv(16) for _ in range(4)) == [b"1", b"2", b"3", b"4"]
    finally:
        srv.close()
        shutil.rmtree(d, ignore_errors=True)


def test_unix_sockets_inside_the_sandbox_work(workspace: Path) -> None:
    code = (
        "import socket, os\n"
        "for p in ('ws.sock', '/tmp/t.sock'):\n"
        "    l = socket.socket(socket.AF_UNIX); l.bind(p); l.listen()\n"
        "    c = socket.socket(socket.AF_UNIX); c.connect(p); a, _ = l.accept()\n"
        "    c.send(b'x'); assert a.recv(1) == b'x'\n"
        "    os.unlink(p)\n"
        "a, b = socket.socketpair(); a.send(b'y'); assert b.recv(1) == b'y'\n"
        "a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        "a.send(b'z'); assert b.recv(1) == b'z'\n"
        "print('ok')\n"
    )
    r = nanobox.run([SPY, "-c", code], timeout=30)
    assert r.stdout == b"ok\n", r.stderr


def test_a_placeholder_record_that_failed_is_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The crash record is rewritten only when its set of paths changes;
    one write that failed (a full disk) is retried at the next acquire or
    release, even one that changes no path (another run sharing it)."""
    from nanobox._linux import placeholders

    ph = placeholders.Placeholders(f"test-{uuid.uuid4().hex}")
    assert ph.record is not None
    target = str(tmp_path / ".vscode")

    def full(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    first = ph.acquire([(target, "dir")])
    assert os.path.isdir(target) and not os.path.exists(ph.record)
    assert not os.path.exists(ph.record + ".tmp")  # no half-written file left either
    monkeypatch.undo()
    second = ph.acquire([(target, "dir")])  # shared: no new path
    with open(ph.record) as fh:
        assert fh.read().endswith(f"\t{target}\n")
    ph.release(second)
    ph.release(first)
    assert not os.path.exists(target) and not os.path.exists(ph.record)


def _as_if_killed(ph: Any) -> None:
    """A killed server's locks go with it: close the fds it held."""
    for held in ph.refs.values():
        os.close(held.fd)
    ph.refs.clear()


def test_a_placeholder_record_keeps_a_path_that_is_not_utf8(tmp_path: Path) -> None:
    """A workspace whose name is not UTF-8 (bytes a Linux path may hold):
    its placeholders are recorded byte for byte, and swept by that record
    once their server is gone (writing the record used to raise
    ``UnicodeEncodeError`` and fail the run)."""
    from nanobox._linux import placeholders

    ws = tmp_path / os.fsdecode(b"caf\xe9")
    ws.mkdir()
    target = str(ws / ".vscode")
    ph = placeholders.Placeholders("999999999_1")  # no such server: swept below
    assert ph.record is not None
    try:
        ph.acquire([(target, "file")])
        with open(ph.record, "rb") as fh:
            assert fh.read().endswith(b"\t" + os.fsencode(target) + b"\n")
        _as_if_killed(ph)
        placeholders.sweep_placeholders()
        assert not os.path.lexists(target) and not os.path.exists(ph.record)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ph.record)


def test_a_run_in_a_workspace_whose_name_is_not_utf8(tmp_path: Path) -> None:
    ws = tmp_path / os.fsdecode(b"caf\xe9")
    ws.mkdir()
    r = nanobox.run(["sh", "-c", "pwd; echo x > out"], cwd=ws, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout == os.fsencode(str(ws)) + b"\n"
    assert sorted(os.listdir(ws)) == ["out"]  # its placeholders are gone


def test_a_record_cut_short_by_a_kill_is_swept_too(tmp_path: Path) -> None:
    """A server killed while rewriting its record leaves the new one as
    ``.tmp``: the sweep removes the placeholders both name (only empty files
    with the recorded inode) and both files."""
    from nanobox._linux import placeholders

    ph = placeholders.Placeholders("999999998_1")  # no such server
    assert ph.record is not None
    first, second, cut = (str(tmp_path / n) for n in (".bashrc", ".zshrc", ".profile"))
    try:
        ph.acquire([(first, "file")])
        _as_if_killed(ph)
        for path in (second, cut):
            open(path, "w").close()
        with open(ph.record + ".tmp", "w") as fh:  # as a kill mid-rewrite leaves it
            fh.write(f"{os.lstat(first).st_ino}\t{first}\n{os.lstat(second).st_ino}\t{second}\n")
            fh.write(f"{os.lstat(cut).st_ino}\t{cut[:-3]}")  # cut short: another path
        open(cut[:-3], "w").close()  # an empty file of the user's there: kept
        placeholders.sweep_placeholders()
        assert sorted(os.listdir(tmp_path)) == [".prof", ".profile"]
        assert not os.path.exists(ph.record) and not os.path.exists(ph.record + ".tmp")
    finally:
        for leftover in (ph.record, ph.record + ".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


def test_placeholders_of_a_killed_server_are_swept(workspace: Path, marker: str) -> None:
    import threading

    from nanobox._linux import client

    def victim() -> None:
        with pytest.raises(nanobox.SandboxError):
            nanobox.run(["sleep", "60", marker][:2])

    t = threading.Thread(target=victim)
    t.start()
    from conftest import wait_until

    assert wait_until(lambda: (workspace / ".bashrc").exists(), timeout=20)
    os.kill(client.get_server().pid, 9)  # the server cannot clean up after itself
    t.join(30)
    assert (workspace / ".bashrc").exists()  # left behind for now...
    assert sh("true").returncode == 0  # ...and removed by the next server
    assert sorted(os.listdir(workspace)) == []


@pytest.mark.root_only
def test_root_caller_workspace_below_a_root_only_directory() -> None:
    """/root/project-like workspaces: the sandbox's unprivileged uid cannot
    pass through a 0700 root directory, so nanobox covers it (its contents
    were unreachable anyway) and keeps the path to the workspace."""
    top = Path(f"/var/tmp/nanobox-test-{uuid.uuid4().hex}")
    ws = top / "project"
    ws.mkdir(parents=True)
    top.chmod(0o700)
    (top / "private.txt").write_text("root only")
    (ws / "in.txt").write_text("data")
    try:
        r = nanobox.run(
            ["sh", "-c", "cat in.txt; echo out > out.txt; cat ../private.txt"], cwd=ws, timeout=30
        )
        assert r.stdout == b"data", (r.stdout, r.stderr)
        assert (ws / "out.txt").read_text() == "out\n"
        assert (ws / "out.txt").stat().st_uid == 0
    finally:
        shutil.rmtree(top)


@pytest.fixture
def mounted_ws() -> Iterator[Path]:
    """A workspace under /var/tmp whose mounts are undone afterwards."""
    ws = Path(f"/var/tmp/nanobox-test-{uuid.uuid4().hex}")
    ws.mkdir()
    ws.chmod(0o755)
    try:
        yield ws
    finally:
        for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
            point = line.split(" ")[4]
            if point.startswith(f"{ws}/"):
                subprocess.run(["umount", point], check=False)
        shutil.rmtree(ws, ignore_errors=True)


@pytest.mark.root_only
def test_root_caller_sees_and_writes_a_mount_inside_the_workspace(mounted_ws: Path) -> None:
    """A root caller's workspace is an idmapped clone: of its submounts too
    (a volume, a tmpfs build directory). It used to be of the top mount
    only: the sandbox saw the directory under a mount point, and what it
    wrote there landed under it, hidden on the host while mounted."""
    sub = mounted_ws / "sub"
    sub.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(sub)], check=True)
    (sub / "in.txt").write_text("in the mount")
    r = nanobox.run(["sh", "-c", "cat sub/in.txt; echo out > sub/out.txt"], cwd=mounted_ws)
    assert r.returncode == 0 and r.stdout == b"in the mount", (r.stdout, r.stderr)
    assert (sub / "out.txt").read_text() == "out\n"
    assert (sub / "out.txt").stat().st_uid == 0
    subprocess.run(["umount", str(sub)], check=True)
    assert os.listdir(sub) == []  # nothing went under the mount point


MOUNT_OPTIONS = """
import os, sys
import nanobox
r = nanobox.run(["cat", "/proc/self/mountinfo"], timeout=30)
for line in r.stdout.decode().splitlines():
    fields = line.split(" ")
    if fields[4] == os.path.join(os.getcwd(), "sub"):
        print(fields[5])
"""


@pytest.mark.root_only
def test_a_mount_inside_the_workspace_is_nosuid_nodev_for_a_caller_that_is_not_root(
    mounted_ws: Path,
) -> None:
    """The rootless view's writable roots are recursive clones: the mounts
    below them get nosuid and nodev too (only the top one did; a tmpfs
    mounted in the workspace was suid and dev inside)."""
    os.chown(mounted_ws, 65534, 65534)
    sub = mounted_ws / "sub"
    sub.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=777", "tmpfs", str(sub)], check=True)
    p = subprocess.run(
        [_python_for_anyone(), "-c", MOUNT_OPTIONS],
        cwd=mounted_ws,
        env={
            "PATH": os.environ["PATH"],
            "HOME": str(mounted_ws),
            "PYTHONPATH": os.path.dirname(os.path.dirname(nanobox.__file__)),
        },
        user=65534,
        group=65534,
        extra_groups=[],
        capture_output=True,
        timeout=60,
    )
    options = p.stdout.decode().split()
    assert options, (p.stdout, p.stderr)
    assert {"rw", "nosuid", "nodev"} <= set(options[-1].split(",")), options


@pytest.mark.root_only
def test_root_caller_gets_a_mount_that_cannot_be_idmapped_read_only(mounted_ws: Path) -> None:
    """A submount whose filesystem cannot be idmapped (ramfs here) makes the
    kernel refuse the whole recursive idmap: the workspace's own mount is
    idmapped alone and every mount below it comes on its own where it was:
    the ramfs read-only (its files visible, writes refused), a tmpfs inside
    it idmapped and writable, an mqueue inside it covered (a kernel
    interface nested in such a mount, a chroot's /proc say, was shown);
    nothing lands under a mount point."""
    ram = mounted_ws / "ram"
    ram.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(ram)], check=True)
    (ram / "f").write_text("ramfs")
    for name in ("n", "mq"):
        (ram / name).mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(ram / "n")], check=True)
    (ram / "n" / "d").write_text("deeper")
    subprocess.run(["mount", "-t", "mqueue", "none", str(ram / "mq")], check=True)
    (ram / "mq" / "q").touch()  # a message queue: shown if the mount were
    script = (
        "cat ram/f ram/n/d; echo; ls -A ram/mq; "
        "for f in ram/new ram/n/new top; do (echo x > $f) 2>/dev/null && echo wrote $f; done"
    )
    r = nanobox.run(["sh", "-c", script], cwd=mounted_ws)
    assert r.stdout == b"ramfsdeeper\nwrote ram/n/new\nwrote top\n", (r.stdout, r.stderr)
    assert (ram / "n" / "new").read_text() == "x\n"
    for point in (ram / "mq", ram / "n", ram):
        subprocess.run(["umount", str(point)], check=True)
    assert os.listdir(ram) == []


# -- workspaces the caller cannot write ------------------------------------------------

TOP_NAMES = PROTECTED_TOP
CREATE_EACH = " ".join(
    f"(touch {n} 2>/dev/null || mkdir {n} 2>/dev/null) && echo made {n};" for n in TOP_NAMES
)


@pytest.mark.root_only
def test_a_read_only_workspace_runs_and_its_protected_names_stay_uncreatable(
    workspace: Path,
) -> None:
    """A workspace on a read-only mount (a read-only volume, a CD): the
    placeholders for missing protected names cannot be made there (it used
    to fail every run with exit 125, EROFS), and need not be: the sandbox
    cannot create those names either, which is what the attempt below
    checks. Control: on the same directory made writable again, with the
    names unprotected, the same command creates every one of them."""
    subprocess.run(["mount", "--bind", str(workspace), str(workspace)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(workspace)], check=True)
        r = sh(f"{CREATE_EACH} echo done")
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"done\n"
        r = nanobox.run(["true"], cwd=workspace, timeout=30)  # the CLI's own path
        assert r.returncode == 0, r.stderr
    finally:
        subprocess.run(["umount", str(workspace)], check=True)
    assert os.listdir(workspace) == []
    fs = nanobox.Filesystem(unprotect=TOP_NAMES)
    r = sh(CREATE_EACH, policy=nanobox.Policy(filesystem=fs))
    assert r.stdout.count(b"made ") == len(TOP_NAMES), r.stderr


AS_NOBODY = """
import sys
import nanobox
create = sys.argv[1]
r = nanobox.run(["sh", "-c", create + " echo done"], timeout=30)
print(r.returncode, r.stdout.decode().strip(), r.stderr.decode().strip()[-300:])
"""


def _python_for_anyone() -> str:
    """An interpreter another user can run (this one may live under /root)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        path = os.path.realpath(candidate)
        dirs = [d for d in Path(path).parents]
        if all(d.stat().st_mode & 0o001 for d in dirs) and os.stat(path).st_mode & 0o001:
            return candidate
    pytest.skip("no Python interpreter that another user may run")


@pytest.mark.root_only
def test_a_read_only_workspace_runs_for_a_caller_that_is_not_root() -> None:
    """The same on a read-only mount for an unprivileged caller (``nobody``),
    whose own directory it is: its view of the workspace is a clone of a
    read-only mount, which a user namespace cannot make writable (setting
    nosuid/nodev on it used to ask the kernel to clear the read-only flag
    too, which it refused: exit 125), and no protected name can be made."""
    ws = Path(f"/var/tmp/nanobox-test-{uuid.uuid4().hex}")
    ws.mkdir()
    try:
        ws.chmod(0o755)
        os.chown(ws, 65534, 65534)
        subprocess.run(["mount", "--bind", str(ws), str(ws)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(ws)], check=True)
            src = os.path.dirname(os.path.dirname(nanobox.__file__))
            p = subprocess.run(
                [_python_for_anyone(), "-c", AS_NOBODY, CREATE_EACH],
                cwd=ws,
                env={"PATH": os.environ["PATH"], "HOME": str(ws), "PYTHONPATH": src},
                user=65534,
                group=65534,
                extra_groups=[],
                capture_output=True,
                timeout=60,
            )
            assert p.stdout.decode().split(" ", 2)[:2] == ["0", "done"], (p.stdout, p.stderr)
        finally:
            subprocess.run(["umount", str(ws)], check=True)
        assert os.listdir(ws) == []
    finally:
        shutil.rmtree(ws, ignore_errors=True)


@pytest.mark.skipif(IS_ROOT, reason="a root caller writes anywhere")
def test_a_workspace_the_caller_cannot_write_runs() -> None:
    """A caller that is not root, in a directory of another user's that it
    cannot write (``/usr``): the run works, no placeholder is needed, and
    the protected names cannot be created in the sandbox, as outside."""
    ws = Path("/usr")
    assert not os.access(ws, os.W_OK) and ws.stat().st_uid != os.geteuid()
    r = nanobox.run(["sh", "-c", f"{CREATE_EACH} echo done"], cwd=ws, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"done\n"
    assert outside(CREATE_EACH, cwd=ws).stdout == b""


@pytest.mark.skipif(IS_ROOT, reason="a root caller writes anywhere")
def test_a_read_only_directory_of_the_callers_own_fails_closed(tmp_path: Path) -> None:
    """Not writable, but the caller's own: the sandbox could make it
    writable (``chmod``) and then create a protected name, so a missing
    name still needs its placeholder, and the run is refused with a message
    naming the way out. Control: with the names unprotected, the command
    does exactly that."""
    ws = tmp_path / "ro"
    ws.mkdir()
    ws.chmod(0o555)
    try:
        with pytest.raises(nanobox.SandboxError, match=r"filesystem\.unprotect") as info:
            nanobox.run(["true"], cwd=ws, timeout=30)
        assert ".gitmodules" in str(info.value)
        fs = nanobox.Filesystem(unprotect=TOP_NAMES)
        r = nanobox.run(
            ["sh", "-c", f"chmod u+w . && {CREATE_EACH}"],
            cwd=ws,
            timeout=30,
            policy=nanobox.Policy(filesystem=fs),
        )
        assert r.stdout.count(b"made ") == len(TOP_NAMES), r.stderr
    finally:
        ws.chmod(0o755)


@pytest.mark.root_only
def test_root_caller_workspace_with_a_kernel_interface_mounted_in_it(mounted_ws: Path) -> None:
    """A kernel interface mounted in the workspace (mqueue here; a chroot's
    /proc alike) cannot be idmapped: it is covered by an empty read-only
    directory (a host /proc would show the host's processes), while a tmpfs
    beside it is still idmapped and writable, and of two mounts stacked on
    one directory the sandbox sees the top one, as the host does."""
    for name in ("mq", "t", "t2"):
        (mounted_ws / name).mkdir()
    (mounted_ws / "t2" / "under").write_text("under")
    subprocess.run(["mount", "-t", "mqueue", "none", str(mounted_ws / "mq")], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mounted_ws / "t")], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mounted_ws / "t2")], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mounted_ws / "t2")], check=True)
    (mounted_ws / "t2" / "top").write_text("top")
    script = "ls -A mq; (echo x > mq/new) 2>/dev/null || echo refused; ls t2; echo w > t/file"
    r = nanobox.run(["sh", "-c", script], cwd=mounted_ws)
    assert r.stdout == b"refused\ntop\n" and r.returncode == 0, (r.stdout, r.stderr)
    assert (mounted_ws / "t" / "file").read_text() == "w\n"


@pytest.mark.root_only
def test_root_caller_workspace_with_a_proc_mounted_in_it(mounted_ws: Path) -> None:
    """A chroot-like workspace with /proc mounted: the plan's scan for
    repositories does not stop at a /proc directory even root cannot list
    (it did: "cannot list .../task/1/fdinfo ... chmod u+rx"), and the
    sandbox sees an empty directory there, not the host's processes."""
    proc = mounted_ws / "proc"
    proc.mkdir()
    subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True)
    assert str(os.getpid()) in os.listdir(proc)  # control: the host's processes
    r = nanobox.run(["sh", "-c", "ls -A proc | wc -l"], cwd=mounted_ws, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == b"0", (r.stdout, r.stderr)


def test_mountinfo_paths_are_unescaped() -> None:
    from nanobox._linux import userns

    assert userns._unescape(b"/a\\040b\\011c\\134d\\012") == "/a b\tc\\d\n"
    assert userns._unescape(b"/plain/\\04") == "/plain/\\04"  # (not an escape)
