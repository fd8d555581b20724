"""The fork server supervises each sandbox; the sandbox's PID 1 is a small
idle process (``cat``) that the kernel reaps orphans for."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import nanobox
from conftest import SPY, pid1_of, pids_with, userns_usable, wait_until

pytestmark = pytest.mark.skipif(not userns_usable(), reason="no user namespaces")


def test_pid1_is_a_small_cat(workspace: Path, marker: str) -> None:
    box = nanobox.Sandbox()
    t = threading.Thread(target=box.run, args=([SPY, "-c", "import time; time.sleep(3)", marker],))
    t.start()
    try:
        assert wait_until(lambda: bool(pids_with(marker)), timeout=10)
        pid1 = pid1_of(pids_with(marker)[0])
        assert pid1 is not None
        with open(f"/proc/{pid1}/comm") as fh:
            assert fh.read().strip() == "cat"
        # Only its command pipe and /dev/null: nothing of nanobox's own
        # (status pipe, sockets) that the command could open via /proc/1/fd.
        assert sorted(os.listdir(f"/proc/{pid1}/fd")) == ["0", "1", "2"]
        assert os.readlink(f"/proc/{pid1}/fd/1") == "/dev/null"
        with open(f"/proc/{pid1}/smaps_rollup") as fh:
            dirty = sum(int(ln.split()[1]) for ln in fh if ln.startswith("Private_Dirty:"))
        assert dirty < 1024, f"PID 1 holds {dirty} KiB of private memory"
    finally:
        t.join(30)


def test_orphans_are_reaped(workspace: Path) -> None:
    """Children whose parent is gone are re-parented to PID 1, which must
    not leave them as zombies."""
    script = (
        "for i in $(seq 30); do ( true & ) ; done; sleep 0.5; "
        "for f in /proc/[0-9]*/stat; do read -r _ _ state _ < $f; echo $state; done | grep -c Z"
    )
    r = nanobox.run(["sh", "-c", script])
    assert r.stdout.strip() == b"0", r


def test_output_of_an_orphan_after_the_command_exits_is_cut(workspace: Path) -> None:
    """The run ends with its command: a background process is killed with
    the namespace, and nothing it would print later arrives."""
    r = nanobox.run(["sh", "-c", "( sleep 1; echo late ) & echo now"])
    assert r.stdout == b"now\n" and r.wall_time_s < 1.0, r


BURN = """
import sys, time
t = time.process_time()
while time.process_time() - t < float(sys.argv[1]):
    pass
print("burnt", flush=True)
sys.stdin.read()
"""


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/schedstat") as fh:
        return int(fh.read().split()[0]) / 1e9


def test_a_cpu_limit_poll_leaves_out_what_nanobox_used_before_its_report() -> None:
    """The run's cgroup holds stage A's build and the command process's
    steps before its exec. A CPU-limit poll that comes before their figures
    are read ("C" line, "L" message) must not count them as the command's:
    in the VM lane a run was stopped at 0.17 s of a 1 s limit that way.
    Real processes stand in for stage A and the command's process; the
    group's figure is theirs plus what the "command" used."""
    from nanobox._linux import supervise

    def burner(seconds: float) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            [sys.executable, "-c", BURN, str(seconds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert p.stdout is not None and p.stdout.readline() == b"burnt\n"
        return p

    stage_a, init, cmd = burner(0.4), burner(0.0), burner(0.3)
    try:
        user = [0.05]
        now = time.monotonic()
        # Spawned by stage A after its "P" line: the command's pid and
        # stage A's CPU come on its "C" line. Before it is read, stage A's
        # 0.4 s are in the group beside the command's: not judged yet.
        spawned = supervise.Run(
            {"init": init.pid, "cmd": 0, "start": now, "self_utime": 0.0, "self_stime": 0.0},
            {"cpu_time": 0.2, "uid": 0, "gid": 0},
        )
        group = lambda: _cpu(stage_a.pid) + _cpu(init.pid) + user[0]  # noqa: E731
        assert group() - _cpu(init.pid) >= 0.4  # (the old poll: twice the limit)
        assert spawned.tree_cpu(group) == 0.0
        spawned.next_poll = now
        assert not spawned.check_timers(time.monotonic(), group)
        spawned.set_command(
            {
                "cmd": cmd.pid,
                "start": now,
                "setup_s": 0.0,
                "self_utime": _cpu(stage_a.pid),
                "self_stime": 0.0,
                "joined_utime": 0.0,
                "joined_stime": 0.0,
            }
        )
        spawned.prep_cpu = (0.0, 0.0)  # ("L": the spawned command ran nothing before)
        # Stage A's exit is in the group too: nothing judged until it is reaped.
        assert spawned.tree_cpu(group) == 0.0
        spawned.starter_cpu = (_cpu(stage_a.pid), 0.0)
        assert abs(spawned.tree_cpu(group) - 0.05) < 0.03
        user[0] = 0.3
        assert spawned.tree_cpu(group) >= 0.2
        spawned.next_poll = now
        assert spawned.check_timers(time.monotonic(), group) and spawned.reason == "cpu_limit"
        # Built ahead: the command's process (its pid on the "P" line, with
        # stage A's CPU) ran nanobox's steps before its exec, and says how
        # much in its "L" message.
        user[0] = 0.05
        a_cpu = _cpu(stage_a.pid)
        ahead = supervise.Run(
            {
                "init": init.pid,
                "cmd": cmd.pid,
                "start": now,
                "self_utime": a_cpu,
                "self_stime": 0.0,
                "joined_utime": 0.0,
                "joined_stime": 0.0,
            },
            {"cpu_time": 0.2, "uid": 0, "gid": 0},
        )
        ahead.starter_cpu = (a_cpu, 0.0)
        group = lambda: a_cpu + _cpu(init.pid) + _cpu(cmd.pid) + user[0]  # noqa: E731
        assert group() - a_cpu - _cpu(init.pid) >= 0.3  # (the old poll)
        assert ahead.tree_cpu(group) < 0.2  # "L" not read: low, never high
        ahead.prep_cpu = (_cpu(cmd.pid), 0.0)
        assert abs(ahead.tree_cpu(group) - 0.05) < 0.03
        user[0] = 0.3
        assert ahead.tree_cpu(group) >= 0.2
    finally:
        for p in (stage_a, init, cmd):
            p.kill()
            p.wait()


def test_the_report_leaves_all_of_stage_a_out_of_the_command_s_cpu() -> None:
    """Stage A's lines give its CPU up to its last line, from its join on;
    its exit (a forked Python's, ~0.5 ms) comes after, and is in the
    group's total too. Once it is reaped, the report counts as nanobox's
    own all of its CPU from the join to the reap (the server then has it)."""
    from nanobox._linux import supervise

    info = {"init": 0, "cmd": 0, "start": 0.0, "self_utime": 0.0, "self_stime": 0.0}
    run = supervise.Run(info, {"uid": 0, "gid": 0})
    run.set_command(
        {
            "cmd": 0,
            "start": 0.0,
            "setup_s": 0.0,
            "self_utime": 0.004,  # at its "C" line, since the join
            "self_stime": 0.001,
            "joined_utime": 0.0006,  # before the join: not the group's
            "joined_stime": 0.0001,
        }
    )
    run.prep_cpu = (0.0, 0.0)
    assert (run.report()["self_utime"], run.report()["self_stime"]) == (0.004, 0.001)
    run.starter_cpu = (0.0052, 0.0013)  # reaped: its exit included
    report = run.report()
    assert report["self_utime"] == pytest.approx(0.0046, abs=1e-9)
    assert report["self_stime"] == pytest.approx(0.0012, abs=1e-9)


def test_a_stage_a_found_gone_is_reported_by_its_own_error() -> None:
    """A write to a stage A that has just failed (and exited) gets EPIPE; the
    run's error is then stage A's own line on its status pipe, not the
    broken pipe: "setup failed at step 'spawn': Broken pipe" came instead
    of the /proc error in one run of ``test_nouserns`` in three."""
    import types

    from nanobox._linux import forkserver, wire

    r, w = os.pipe2(os.O_NONBLOCK)
    try:
        info = {"step": "procfs", "errno": 1, "message": "mount(proc): Operation not permitted"}
        os.write(w, b"E" + wire.status_dumps(info) + b"\n")
        os.close(w)
        w = -1
        job = types.SimpleNamespace(buffer=bytearray(), status_r=r)
        got = forkserver.Server._failure_of(None, job)  # type: ignore[arg-type]
        assert got == {"t": "error", **info}
        job = types.SimpleNamespace(buffer=bytearray(b"P1 2 3\n"), status_r=-1)
        assert forkserver.Server._failure_of(None, job) is None  # type: ignore[arg-type]
    finally:
        os.close(r)
        if w != -1:
            os.close(w)
