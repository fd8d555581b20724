"""Without user namespaces (really denied: a scratch user namespace whose
``user.max_user_namespaces`` is 0, so nested ones fail with ENOSPC, as in
many containers): refuse by default; in degraded mode Landlock, seccomp and
rlimits still hold, and the result says what is weaker."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import SPY, pids_with, wait_until

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare"),
]


def _host_denies_userns() -> bool:
    return subprocess.run(["unshare", "-U", "true"], capture_output=True).returncode != 0


def in_scratch_userns(script: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """Run ``script`` in a new user namespace where nested ones are denied
    (or directly, where the whole host already denies user namespaces, as in
    the VM lane's no-userns configuration)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    if _host_denies_userns():
        return subprocess.run(
            ["sh", "-c", script], capture_output=True, timeout=120, env=env, cwd=cwd
        )
    wrapper = (
        f"echo 0 > /proc/sys/user/max_user_namespaces && cd {shlex.quote(str(cwd))} && {script}"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run(
        ["unshare", "-Ur", "sh", "-c", wrapper], capture_output=True, timeout=120, env=env
    )


def nanobox_cmd(*args: str) -> str:
    return shlex.join([sys.executable, "-m", "nanobox", *args])


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    h = Path(f"/var/tmp/nanobox-test-home-{uuid.uuid4().hex}")
    (h / ".ssh").mkdir(parents=True)
    (h / ".ssh" / "id_rsa").write_text("TOPSECRET")
    (h / "notes.txt").write_text("public")
    monkeypatch.setenv("HOME", str(h))
    try:
        yield h
    finally:
        shutil.rmtree(h, ignore_errors=True)


def test_nested_user_namespaces_really_are_denied(tmp_path: Path) -> None:
    p = in_scratch_userns("unshare -U true", tmp_path)
    assert p.returncode != 0 and b"No space left on device" in p.stderr


def test_refused_by_default_with_a_clear_message(tmp_path: Path) -> None:
    p = in_scratch_userns(nanobox_cmd("run", "--", "true"), tmp_path)
    assert p.returncode == 125
    lines = p.stderr.decode().splitlines()
    assert len(lines) == 1
    assert "user namespace" in lines[0] and "sysctl" in lines[0] and "--allow-degraded" in lines[0]


def test_an_allowlist_is_refused_even_when_degraded(tmp_path: Path) -> None:
    """The CLI plans while its server starts, as if user namespaces work
    (where the allowlist is fine): the server's answer must still decide."""
    p = in_scratch_userns(
        nanobox_cmd("run", "--allow-degraded", "--allow-net", "example.com", "--", "true"),
        tmp_path,
    )
    assert p.returncode == 125, p.stderr
    assert b"network allowlist needs a network namespace" in p.stderr, p.stderr


def test_degraded_mode_still_confines(tmp_path: Path, home: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    target = home / "planted"
    res = tmp_path / "r.json"
    script = (
        f"echo ok > in-ws; echo x > {target}; cat {home}/.ssh/id_rsa; cat {home}/notes.txt; "
        "echo t > $TMPDIR/t && echo tmp-ok; "
        f"{SPY} -c 'import socket; socket.socket(socket.AF_INET)' 2>/dev/null || echo no-inet; "
        "echo done"
    )
    p = in_scratch_userns(
        nanobox_cmd("run", "--allow-degraded", "--result", str(res), "--", "sh", "-c", script), ws
    )
    assert p.returncode == 0, p.stderr
    out = p.stdout.decode()
    assert "TOPSECRET" not in out and "public" in out
    assert "tmp-ok" in out and "no-inet" in out and out.endswith("done\n")
    assert (ws / "in-ws").read_text() == "ok\n"
    assert not target.exists()
    data = json.loads(res.read_text())
    kinds = " ".join(data["degraded"])
    for word in ("namespaces:", "filesystem: Landlock only", "network:", "processes:"):
        assert word in kinds
    assert any(v["kind"] == "syscall" and v["syscall"] == "socket" for v in data["violations"])
    # Control: in the same scratch namespace, without nanobox, both succeed.
    ctl = in_scratch_userns(f"echo x > {target} && cat {home}/.ssh/id_rsa", ws)
    assert ctl.stdout == b"TOPSECRET"
    assert target.exists()


UNIX_TYPES = """
import socket
for name in ("SOCK_STREAM", "SOCK_SEQPACKET", "SOCK_DGRAM", "SOCK_RAW"):
    try:
        socket.socket(socket.AF_UNIX, getattr(socket, name)).close()
        print(name, "ok")
    except OSError as e:
        print(name, "refused", e.errno)
"""


def test_degraded_mode_refuses_unix_datagram_sockets(tmp_path: Path) -> None:
    """Without a network namespace only unix sockets are allowed, but not
    datagram ones, which reach host socket paths past the brokered
    connect() (the rules for this mode came before the default ones, and
    allowed every unix socket)."""
    ws = tmp_path / "ws"
    ws.mkdir()
    p = in_scratch_userns(nanobox_cmd("run", "--allow-degraded", "--", SPY, "-c", UNIX_TYPES), ws)
    assert p.stdout.decode().splitlines() == [
        "SOCK_STREAM ok",
        "SOCK_SEQPACKET ok",
        "SOCK_DGRAM refused 13",
        "SOCK_RAW refused 13",
    ], p.stderr
    ctl = in_scratch_userns(shlex.join([SPY, "-c", UNIX_TYPES]), ws)
    assert ctl.stdout.count(b" ok") == 4, ctl


def test_degraded_hides_hold_past_links_and_read_only_binds(tmp_path: Path, home: Path) -> None:
    """Landlock is the only layer here: a link in an ancestor of a hidden
    path (to that ancestor, or to '/') and a read-only bind of the
    ancestor itself (``--ro ~``) granted the hidden path whole."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (home / "me").symlink_to(home)
    (home / "up").symlink_to("/")
    attack = f"cat {home}/.ssh/id_rsa {home}/me/.ssh/id_rsa {home}/up/{home}/.ssh/id_rsa"
    for extra in ([], ["--ro", str(home)]):
        p = in_scratch_userns(
            nanobox_cmd("run", "--allow-degraded", *extra, "--", "sh", "-c", attack), ws
        )
        assert b"TOPSECRET" not in p.stdout and b"Permission denied" in p.stderr, (extra, p)
        assert (
            b"public"
            in in_scratch_userns(
                nanobox_cmd("run", "--allow-degraded", *extra, "--", "cat", f"{home}/notes.txt"), ws
            ).stdout
        )
    # Control: the same reads outside the sandbox.
    assert in_scratch_userns(attack, ws).stdout == b"TOPSECRET" * 3


def test_degraded_mode_lists_hides_it_cannot_enforce(tmp_path: Path, home: Path) -> None:
    """Run from the home directory (the workspace, writable as a whole),
    ~/.ssh cannot be hidden without a mount namespace: the result says so
    (it said only that hidden names can be listed)."""
    res = tmp_path / "r.json"
    p = in_scratch_userns(
        nanobox_cmd("run", "--allow-degraded", "--result", str(res), "--", "true"), home
    )
    assert p.returncode == 0, p.stderr
    degraded = json.loads(res.read_text())["degraded"]
    assert f"hide: {home}/.ssh is not hidden: it is inside the writable {home}" in " ".join(
        degraded
    ), degraded


def test_degraded_mode_kills_daemons(tmp_path: Path, marker: str) -> None:
    script = f"({SPY} -c 'import os,time; os.setsid(); time.sleep(300)' {marker} &); echo started"
    p = in_scratch_userns(
        nanobox_cmd("run", "--allow-degraded", "--", "sh", "-c", script), tmp_path
    )
    assert p.stdout == b"started\n", p.stderr
    assert wait_until(lambda: not pids_with(marker), timeout=5)


def test_degraded_refuses_what_needs_mounts(tmp_path: Path) -> None:
    p = in_scratch_userns(
        nanobox_cmd("run", "--allow-degraded", "--tmpfs", "/scratch", "--", "true"), tmp_path
    )
    assert p.returncode == 125 and b"--tmpfs" in p.stderr and b"mount namespace" in p.stderr


PROC_MASKED = "mount -t tmpfs none /proc/sys && "  # like a container's masked /proc


@pytest.mark.skipif(
    subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode != 0,
    reason="needs user namespaces for the scratch namespace",
)
def test_refused_proc_mount_fails_closed_or_degrades(tmp_path: Path) -> None:
    """Where the kernel refuses a new procfs (containers with masked /proc),
    nanobox refuses, or in degraded mode gives an empty /proc (never the
    host's) and says so."""

    def scratch(cmd: str) -> subprocess.CompletedProcess[bytes]:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        return subprocess.run(
            ["unshare", "-Urm", "sh", "-c", PROC_MASKED + cmd],
            capture_output=True,
            timeout=120,
            env=env,
            cwd=tmp_path,
        )

    p = scratch(nanobox_cmd("run", "--", "true"))
    assert p.returncode == 125 and b"procfs" in p.stderr, p.stderr
    res = tmp_path / "r.json"
    p = scratch(
        nanobox_cmd(
            "run", "--allow-degraded", "--result", str(res), "--", "sh", "-c", "ls /proc | wc -l"
        )
    )
    assert p.returncode == 0 and p.stdout == b"0\n", p.stderr
    assert any(d.startswith("proc:") for d in json.loads(res.read_text())["degraded"])


def test_allowlist_without_user_namespaces_is_refused_even_degraded(tmp_path: Path) -> None:
    p = in_scratch_userns(
        nanobox_cmd("run", "--allow-degraded", "--allow-net", "pypi.org", "--", "true"), tmp_path
    )
    assert p.returncode == 125 and b"network namespace" in p.stderr, p.stderr


def test_degraded_runs_cannot_write_each_others_tmpdir(tmp_path: Path) -> None:
    """Each run gets its own $TMPDIR, writable under Landlock for that run
    only, also when runs of one Sandbox share a plan."""
    ws = tmp_path / "ws"
    ws.mkdir()
    prog = (
        "import threading, time, nanobox\n"
        "box = nanobox.Sandbox(nanobox.Policy(allow_degraded=True))\n"
        "t = threading.Thread(target=box.run, args=(['sh', '-c', "
        "'echo $TMPDIR > tmpdir1; touch $TMPDIR/mine && echo own-ok > own; sleep 3'],))\n"
        "t.start()\n"
        "while True:\n"
        "    try:\n"
        "        if open('tmpdir1').read().strip(): break\n"
        "    except OSError: pass\n"
        "    time.sleep(0.05)\n"
        "r = box.run(['sh', '-c',\n"
        "             'touch \"$(cat tmpdir1)/pwned\" && echo wrote || echo refused'])\n"
        "print(r.stdout.decode().strip())\n"
        "t.join()\n"
    )
    (tmp_path / "prog.py").write_text(prog)
    p = in_scratch_userns(shlex.join([sys.executable, str(tmp_path / "prog.py")]), ws)
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode().strip().splitlines()[-1] == "refused", p
    assert (ws / "own").read_text() == "own-ok\n"  # control: a run writes its own


def test_degraded_mode_says_why_a_command_never_ran(tmp_path: Path) -> None:
    """The command's own line (not found, not executable) reaches the
    caller through the supervising init's report, as with namespaces."""
    result = tmp_path / "result.json"
    p = in_scratch_userns(
        nanobox_cmd(
            "run", "--allow-degraded", "--result", str(result), "--", "no-such-command-xyz"
        ),
        tmp_path,
    )
    assert p.returncode == 127, p.stderr
    assert b"no-such-command-xyz: command not found" in p.stderr, p.stderr
    report = json.loads(result.read_text())
    assert any(v["kind"] == "exec" for v in report["violations"]), report


def test_degraded_mode_cpu_time_is_the_commands(tmp_path: Path, cbin: Path) -> None:
    """The command's CPU time is at least what it counted itself: of the
    group's total (where there is one, as in the VM lane) nanobox leaves
    out only its own, the supervising init's and its stage A's (from its
    join to its exit)."""
    result = tmp_path / "result.json"
    p = in_scratch_userns(
        nanobox_cmd(
            "run", "--allow-degraded", "--result", str(result), "--", str(cbin / "spin_cpu"), "0.05"
        ),
        tmp_path,
    )
    assert p.returncode == 0, p.stderr
    report = json.loads(result.read_text())
    assert report["cpu_time_s"] >= 0.05, report
    assert report["user_time_s"] + report["system_time_s"] == pytest.approx(
        report["cpu_time_s"], abs=2e-6
    ), report
