"""Supervision: nothing the command starts outlives the run, nor the caller."""

from __future__ import annotations

import copy
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import nanobox
from conftest import SPY, kill_pids, pids_with, wait_until

PY = sys.executable

# Forks, starts a new session, forks again, ignores SIGTERM, sleeps: a daemon.
DAEMON = (
    "import os, signal, sys, time\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    if os.fork() == 0:\n"
    "        signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "        signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
    "        os.closerange(0, 3)\n"
    "        time.sleep(300)\n"
    "    os._exit(0)\n"
    "os.wait()\n"
    "print('daemon started')\n"
)


def test_double_forked_setsid_daemon_is_killed(workspace: Path, marker: str) -> None:
    r = nanobox.run([SPY, "-c", DAEMON, marker], timeout=30)
    assert r.stdout == b"daemon started\n" and r.returncode == 0
    assert wait_until(lambda: not pids_with(marker), timeout=5), pids_with(marker)


def test_control_daemon_survives_outside(workspace: Path, marker: str) -> None:
    subprocess.run([PY, "-c", DAEMON, marker], timeout=30, check=True, capture_output=True)
    try:
        assert wait_until(lambda: bool(pids_with(marker)), timeout=5)
        time.sleep(0.2)
        assert pids_with(marker), "the control daemon should outlive its parent"
    finally:
        kill_pids(pids_with(marker))


def test_orphans_are_reaped(workspace: Path) -> None:
    code = (
        "import os, time\n"
        "for _ in range(5):\n"
        "    if os.fork() == 0:\n"
        "        if os.fork() == 0: os._exit(0)\n"
        "        os._exit(0)\n"
        "    os.wait()\n"
        "time.sleep(0.3)\n"
        "states = [open(f'/proc/{p}/stat').read().rsplit(')',1)[1].split()[0]\n"
        "          for p in os.listdir('/proc') if p.isdigit()]\n"
        "print(states.count('Z'))\n"
    )
    r = nanobox.run([SPY, "-c", code], timeout=30)
    assert r.stdout == b"0\n", r.stderr


CALLER = (
    "import sys; sys.path[:0] = {path!r}\n"
    "import nanobox\n"
    "nanobox.run([{spy!r}, '-c', 'import time; time.sleep(300)', {marker!r}[::-1]])\n"
)


def _spawn_caller(marker: str, code: str) -> subprocess.Popen[bytes]:
    # The marker is spelled backwards in the caller's own command line, so
    # only the process it starts matches.
    return subprocess.Popen(
        [PY, "-c", code.format(path=sys.path, marker=marker[::-1], spy=SPY)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_caller_sigkill_takes_the_sandbox_down(workspace: Path, marker: str) -> None:
    caller = _spawn_caller(marker, CALLER)
    try:
        assert wait_until(lambda: bool(pids_with(marker)), timeout=20), caller.stderr
        os.kill(caller.pid, signal.SIGKILL)
        caller.wait()
        assert wait_until(lambda: not pids_with(marker), timeout=10), pids_with(marker)
    finally:
        kill_pids(pids_with(marker))
        if caller.poll() is None:
            caller.kill()
            caller.wait()


def test_control_child_survives_sigkilled_parent(workspace: Path, marker: str) -> None:
    code = (
        "import subprocess, sys, time\n"
        "cmd = [sys.executable, '-c', 'import time; time.sleep(300)', {marker!r}[::-1]]\n"
        "subprocess.Popen(cmd)\n"
        "time.sleep(300)\n{path!r}\n"
    )
    caller = _spawn_caller(marker, code)
    try:
        assert wait_until(lambda: bool(pids_with(marker)), timeout=20)
        os.kill(caller.pid, signal.SIGKILL)
        caller.wait()
        time.sleep(0.3)
        assert pids_with(marker), "without a sandbox the child outlives its killed parent"
    finally:
        kill_pids(pids_with(marker))


def test_wall_timeout_kills_everything(workspace: Path, marker: str) -> None:
    t0 = time.monotonic()
    r = nanobox.run([SPY, "-c", DAEMON + "import time; time.sleep(300)", marker], timeout=1)
    assert r.outcome is nanobox.Outcome.TIMEOUT and r.timed_out
    assert r.returncode == -signal.SIGKILL
    assert 1.0 <= r.wall_time_s < 5 and time.monotonic() - t0 < 10
    assert wait_until(lambda: not pids_with(marker), timeout=5)


def test_cpu_time_limit_counts_children(workspace: Path) -> None:
    # Two children spin; the parent only waits. Per-process RLIMIT_CPU alone
    # would let each child run a full second; the tree total must stop them.
    code = (
        "import os\n"
        "for _ in range(2):\n"
        "    if os.fork() == 0:\n"
        "        while True: pass\n"
        "os.wait(); os.wait()\n"
    )
    # (degraded allowed: without a cgroup the process tree is polled instead)
    policy = nanobox.Policy(limits=nanobox.Limits(cpu_time="1s"), allow_degraded=True)
    r = nanobox.run([SPY, "-c", code], policy=policy, timeout=30)
    assert r.outcome is nanobox.Outcome.CPU_LIMIT
    assert 1.0 <= r.cpu_time_s < 2.0, r.cpu_time_s


def test_rlimit_file_size_and_core(workspace: Path) -> None:
    policy = nanobox.Policy(limits=nanobox.Limits(file_size="1K"))
    r = nanobox.run(
        ["sh", "-c", "ulimit -c; exec head -c 4096 /dev/zero > big"],
        policy=policy,
        timeout=10,
    )
    assert r.stdout == b"0\n"
    assert r.outcome is nanobox.Outcome.SIGNALED and r.signal == signal.SIGXFSZ
    assert (workspace / "big").stat().st_size == 1024


def test_open_files_limit(workspace: Path) -> None:
    policy = nanobox.Policy(limits=nanobox.Limits(open_files=20))
    r = nanobox.run(["sh", "-c", "ulimit -n"], policy=policy, timeout=10)
    assert r.stdout == b"20\n"


def test_check_raises_a_called_process_error(workspace: Path) -> None:
    """``Result.check()`` and ``check=True`` raise ``SandboxedProcessError``,
    a ``subprocess.CalledProcessError`` carrying the run (it raised a
    TypeError from its own constructor once)."""
    r = nanobox.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    try:
        r.check()
    except subprocess.CalledProcessError as exc:
        assert isinstance(exc, nanobox.SandboxedProcessError)
        assert isinstance(exc, nanobox.SandboxError)
        assert (exc.returncode, exc.cmd) == (3, ["sh", "-c", "echo out; echo err >&2; exit 3"])
        assert (exc.stdout, exc.stderr) == (b"out\n", b"err\n")
        assert exc.result is r and "returncode 3" in str(exc)
        # It crosses process boundaries (a worker of a process pool) and copies.
        for back in (pickle.loads(pickle.dumps(exc)), copy.copy(exc), copy.deepcopy(exc)):
            assert type(back) is nanobox.SandboxedProcessError
            assert (back.returncode, back.cmd, back.stdout) == (3, exc.cmd, b"out\n")
            assert str(back) == str(exc) and back.result.returncode == 3
    else:
        raise AssertionError("check() did not raise")
    try:
        nanobox.run(["sh", "-c", "exit 4"], check=True)
    except nanobox.SandboxedProcessError as exc:
        assert exc.returncode == 4 and exc.step == "run"
    else:
        raise AssertionError("check=True did not raise")
    assert nanobox.run(["true"]).check().returncode == 0


def test_cpu_time_limit_counts_short_lived_orphans(workspace: Path) -> None:
    """Processes re-parented to PID 1 that exit between two samples still
    count (with a cgroup, or as zombies until the run ends without one)."""
    from test_cgroups_fallback import SHORT_LIVED_ORPHANS

    policy = nanobox.Policy(limits=nanobox.Limits(cpu_time="0.5s"), allow_degraded=True)
    r = nanobox.run([SPY, "-c", SHORT_LIVED_ORPHANS], policy=policy, timeout=30)
    assert r.outcome is nanobox.Outcome.CPU_LIMIT, r
    assert 0.5 <= r.cpu_time_s < 1.0, r.cpu_time_s


def test_a_timeout_of_weeks_is_kept_without_breaking_the_server(workspace: Path) -> None:
    """A wall-time limit beyond epoll's longest wait (INT_MAX ms, ~24.8
    days) once crashed the fork server's loop (``OverflowError``), and with
    it every run of the caller. The loop waits at most a day at a time."""
    r = nanobox.run(["sh", "-c", "echo ok"], timeout=3e6)  # ~35 days
    assert r.returncode == 0 and r.stdout == b"ok\n", r
    box = nanobox.Sandbox(nanobox.Policy(limits=nanobox.Limits(wall_time="1000h")))
    assert box.run(["true"]).returncode == 0
    assert nanobox.run(["true"]).returncode == 0  # the same server, still there


def test_argv_and_env_may_be_str_subclasses(workspace: Path) -> None:
    """Strings of a ``str`` subclass (a ``StrEnum``, a YAML loader's) are
    sent to the fork server as plain strings (its messages are ``marshal``,
    which only writes the exact built-in types)."""

    class Name(str):
        def __str__(self) -> str:
            return "not this"

    r = nanobox.run(
        [Name("sh"), Name("-c"), Name('printf %s "$X"')], env={Name("X"): Name("value")}
    )
    assert r.returncode == 0 and r.stdout == b"value", r


def test_the_largest_limits_a_policy_takes_are_enforceable(workspace: Path) -> None:
    """Each limit's upper bound (``policy.MAX_*``) is one the kernel
    accepts: a policy either refuses a value, naming its field, or runs."""
    from conftest import cgroups_usable
    from nanobox import policy

    lim = nanobox.Limits(
        wall_time=policy.MAX_SECONDS,
        cpu_time=policy.MAX_SECONDS,
        file_size=policy.MAX_SIZE,
        open_files=policy.MAX_COUNT,
        output=policy.MAX_SIZE,
    )
    r = nanobox.Sandbox(nanobox.Policy(limits=lim, allow_degraded=True)).run(
        ["sh", "-c", "ulimit -t"]
    )
    # (RLIMIT_CPU: the limit plus the CPU nanobox used in the process before
    # the command, rounded up to a second: ``child.cpu_rlimit``.)
    assert r.returncode == 0 and r.stdout in (b"1000000000\n", b"1000000001\n"), r
    fs = nanobox.Filesystem(tmp_size=policy.MAX_SIZE)
    assert nanobox.Sandbox(nanobox.Policy(filesystem=fs)).run(["true"]).returncode == 0
    if cgroups_usable():
        lim = nanobox.Limits(memory=policy.MAX_SIZE, pids=policy.MAX_PIDS)
        assert nanobox.Sandbox(nanobox.Policy(limits=lim)).run(["true"]).returncode == 0


def test_a_run_killed_before_its_command_starts_ends(workspace: Path) -> None:
    """A timeout (or kill) that comes between the run's start and its
    command's spawn: the spawn fails in the dead pid namespace (ENOMEM), and
    stage A reaped PID 1 itself, so the server waited for its exit for ever
    (a few of every ten such runs hung, with their placeholders and cgroups).
    Now they end, as killed, without an exec error (it reported 126)."""
    import threading

    seen: list[tuple[str, int | None, tuple[str, ...]]] = []

    def loop() -> None:
        for _ in range(100):
            r = nanobox.run(["true"], timeout=1e-6)
            seen.append((r.outcome.value, r.returncode, tuple(v.kind for v in r.violations)))

    runner = threading.Thread(target=loop, daemon=True)
    runner.start()
    runner.join(90)
    assert not runner.is_alive(), f"hung after {len(seen)} runs"
    # (Killed, or done before the timer: never an exec error, nor status 126.)
    assert {s[2] for s in seen} <= {("timeout",), ()}, sorted(set(seen))
    assert {s[1] for s in seen} <= {0, -signal.SIGKILL}, sorted(set(seen))
    assert sorted(x.name for x in workspace.iterdir()) == []


def test_a_cancelled_run_ends_while_a_forked_child_of_the_caller_lives(
    workspace: Path,
) -> None:
    """The caller forks while a run goes on; the child holds a copy of the
    run's channel, whose EOF ended the run: cancelled in the parent, the run
    went on until the child exited. Now it is asked to end."""
    import asyncio
    import uuid

    marker = f"nanobox-test-{uuid.uuid4().hex}"

    async def main() -> float:
        task = asyncio.ensure_future(nanobox.run_async(["sh", "-c", f"sleep 30; : {marker}"]))
        assert await asyncio.to_thread(wait_until, lambda: bool(pids_with(marker)), 10)
        child = os.fork()
        if child == 0:
            time.sleep(8)
            os._exit(0)
        try:
            t0 = time.monotonic()
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            assert await asyncio.to_thread(wait_until, lambda: not pids_with(marker), 5)
            return time.monotonic() - t0
        finally:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)

    assert asyncio.run(main()) < 3
