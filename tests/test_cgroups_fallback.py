"""Without a usable cgroup (rootless on most hosts): memory falls back to
RLIMIT_AS in degraded mode, pids refuse (RLIMIT_NPROC is not sound for a
shared uid), and nothing runs weaker than asked unless degraded mode is on.

As an unprivileged user these tests exercise the real host; as root the
fork server is told there is no usable cgroup (the enforcement that follows
is still the real kernel's)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import nanobox
from conftest import SPY, nanobox_cli
from nanobox._linux import cgroups, plan

PY = sys.executable


@pytest.fixture
def no_cgroups() -> Iterator[None]:
    saved = plan._placement
    if isinstance(plan.cgroup_placement(), cgroups.Placement):
        plan._placement = cgroups.CgroupUnavailable("disabled for this test")
    try:
        yield
    finally:
        plan._placement = saved


def _policy(degraded: bool, **kw: object) -> nanobox.Policy:
    return nanobox.Policy(limits=nanobox.Limits(**kw), allow_degraded=degraded)  # type: ignore[arg-type]


def test_memory_limit_refused_without_degraded(no_cgroups: None, workspace: Path) -> None:
    with pytest.raises(nanobox.UnsupportedError, match=r"memory limit.*no usable cgroup"):
        nanobox.run(["true"], policy=_policy(False, memory="64M"))


def test_memory_limit_degrades_to_rlimit_as(no_cgroups: None, workspace: Path) -> None:
    r = nanobox.run([SPY, "-c", "b = bytearray(512 << 20)"], policy=_policy(True, memory="256M"))
    assert r.returncode != 0 and b"MemoryError" in r.stderr
    assert any(d.startswith("memory: enforced with RLIMIT_AS") for d in r.degraded)
    ok = nanobox.run([SPY, "-c", "b = bytearray(16 << 20)"], policy=_policy(True, memory="256M"))
    assert ok.returncode == 0


def test_pids_limit_refused_even_degraded(no_cgroups: None, workspace: Path) -> None:
    for degraded in (False, True):
        with pytest.raises(nanobox.UnsupportedError, match="pids"):
            nanobox.run(["true"], policy=_policy(degraded, pids=10))


def test_cpus_degraded_is_listed(no_cgroups: None, workspace: Path) -> None:
    with pytest.raises(nanobox.UnsupportedError, match="cpus"):
        nanobox.run(["true"], policy=_policy(False, cpus=0.5))
    r = nanobox.run(["true"], policy=_policy(True, cpus=0.5))
    assert r.returncode == 0 and any(d.startswith("cpus: not enforced") for d in r.degraded)


UNWAITED_CHILDREN = """
import os, signal, time
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps them: no one waits
for _ in range(60):
    if os.fork() == 0:
        end = time.process_time() + 0.03
        while time.process_time() < end:
            pass
        os._exit(0)
    time.sleep(0.035)
"""


def test_cpu_time_refused_without_a_cgroup_unless_degraded(
    no_cgroups: None, workspace: Path
) -> None:
    """Polling the process tree misses the CPU of processes reaped unwaited
    (children of a parent that ignores SIGCHLD): here 1.8 s under a 0.5 s
    limit, reported as a run that ended by itself. So without a cgroup the
    limit is refused, as the memory limit is, unless degraded mode is
    allowed, and then ``degraded`` says what is missing. (With a cgroup the
    same run is stopped: test_cgroups.)"""
    with pytest.raises(nanobox.UnsupportedError, match=r"cpu_time limit.*no usable cgroup"):
        nanobox.run(["true"], policy=_policy(False, cpu_time="0.5s"))
    r = nanobox.run([SPY, "-c", UNWAITED_CHILDREN], policy=_policy(True, cpu_time="0.5s"))
    assert [d for d in r.degraded if d.startswith("cpu_time: ")], r.degraded
    assert r.outcome is nanobox.Outcome.EXITED and r.cpu_time_s < 0.5, r  # (the gap)


def test_accounting_without_cgroups_uses_rusage(no_cgroups: None, workspace: Path) -> None:
    r = nanobox.run([SPY, "-c", "x = 0\nfor i in range(3 * 10**6): x += i"])
    assert r.cpu_time_s > 0.05 and r.peak_memory_bytes > 0 and r.degraded == ()


# Orphans that each burn 40 ms of CPU after their parent has gone, one
# after another: each is adopted by PID 1 and exits between two of the
# server's 50 ms samples of the process tree (1 s of CPU in all).
SHORT_LIVED_ORPHANS = r"""
import os, time
def burn(s):
    t = time.process_time()
    while time.process_time() - t < s:
        pass
for _ in range(25):
    r, w = os.pipe()
    if os.fork() == 0:
        if os.fork() == 0:
            os.close(w)
            os.read(r, 1)  # until the command closes its end: an orphan by then
            burn(0.04)
            os._exit(0)
        os._exit(0)
    os.wait()
    os.close(w)
    os.close(r)
    time.sleep(0.06)
"""


def test_cpu_limit_counts_orphans_that_exited(no_cgroups: None, workspace: Path) -> None:
    """The CPU-time limit counted from the process tree: PID 1 waits for
    the orphans it adopts, so the CPU they used shows as its children's,
    and short-lived ones cannot run past the limit (the kernel reaped them,
    and this used 1 s of CPU under a 0.5 s limit and reported 0.05 s)."""
    policy = _policy(True, cpu_time="0.5s")
    r = nanobox.run([SPY, "-c", SHORT_LIVED_ORPHANS], policy=policy, timeout=30)
    assert r.outcome is nanobox.Outcome.CPU_LIMIT, r
    assert 0.5 <= r.cpu_time_s < 1.0, r.cpu_time_s


@pytest.mark.parametrize("cpu_time", [None, "5s"])
def test_orphans_are_reaped_with_or_without_a_cpu_limit(
    no_cgroups: None, workspace: Path, cpu_time: str | None
) -> None:
    """Without a CPU limit the kernel reaps the orphans PID 1 adopts, with
    one PID 1 waits for them: no zombies pile up either way (a long run,
    a script waiting for an orphan's pid to go)."""
    script = (
        "for i in $(seq 30); do ( true & ) ; done; sleep 0.5; "
        "for f in /proc/[0-9]*/stat; do read -r _ _ state _ < $f; echo $state; done | grep -c Z"
    )
    r = nanobox.run(["sh", "-c", script], timeout=30, policy=_policy(True, cpu_time=cpu_time))
    assert r.stdout.strip() == b"0", r


@pytest.mark.skipif(
    isinstance(plan.cgroup_placement(), cgroups.Placement),
    reason="this host has usable cgroups (tested above with them disabled)",
)
def test_cli_refuses_and_degrades(workspace: Path) -> None:
    p = nanobox_cli("run", "--memory", "64M", "true")
    assert p.returncode == 125 and b"no usable cgroup" in p.stderr
    p = nanobox_cli("run", "--allow-degraded", "--memory", "64M", "--result", "-", "true")
    assert p.returncode == 0 and b"RLIMIT_AS" in p.stderr


def test_split_cpu_makes_user_and_system_add_up() -> None:
    from nanobox.sandbox import _split_cpu

    # cgroup v1 ticks (10 ms steps) scaled to the exact total
    assert _split_cpu(0.033, 0.03, 0.01, (0.0, 0.0)) == pytest.approx((0.02475, 0.00825))
    # no ticks yet: the rusage split
    assert _split_cpu(0.004, 0.0, 0.0, (0.003, 0.001)) == pytest.approx((0.003, 0.001))
    # stage A's own CPU, taken off, may exceed a tick count: never negative
    assert _split_cpu(0.002, -0.001, 0.01, (0.0, 0.0)) == pytest.approx((0.0, 0.002))
    assert _split_cpu(0.002, 0.0, 0.0, (0.0, 0.0)) == (0.002, 0.0)  # as the kernel's rusage
    assert _split_cpu(0.0, 0.01, 0.0, (0.0, 0.0)) == (0.0, 0.0)


def test_co_mounted_v1_controllers_share_one_group(tmp_path: Path) -> None:
    """systemd's v1 layout mounts cpu and cpuacct together: a run with a
    cpus limit makes, joins and removes that one directory once (a second
    mkdir failed). (Plain directories stand in for the hierarchies.)"""
    both = tmp_path / "cpu,cpuacct" / "nanobox"
    mem = tmp_path / "memory" / "nanobox"
    both.mkdir(parents=True)
    mem.mkdir(parents=True)
    placement = cgroups.Placement(
        1, {"memory": str(mem), "cpu": str(both), "cpuacct": str(both)}, ("memory", "cpu")
    )
    group = cgroups.RunGroup.create(placement, "run.1", {})  # (limits need cgroupfs files)
    assert sorted(group.procs_files()) == sorted(
        [str(mem / "run.1" / "cgroup.procs"), str(both / "run.1" / "cgroup.procs")]
    )
    assert group.remove()
    assert not (both / "run.1").exists() and not (mem / "run.1").exists()


def test_enabling_v2_controllers_survives_processes_coming_and_going(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """v2's no-internal-processes rule: a group with processes cannot enable
    controllers for its children, so ours move to a leaf first. The CLI and
    its server place their runs at the same time: a process may exit (the
    server's probe) or appear between the listing and the write. cgroupfs's
    answers are simulated here (EBUSY, ESRCH): no host group has that state
    on demand."""
    import errno

    group = tmp_path / "grp"
    group.mkdir()
    (group / "cgroup.subtree_control").write_text("")
    procs = [["1", "2"], ["3"]]  # what cgroup.procs lists, listing by listing
    busy = [True, True, False]  # the subtree_control writes: EBUSY, EBUSY, ok
    moved: list[str] = []

    def read(path: str) -> str:
        if path.endswith("cgroup.procs"):
            return "\n".join(procs.pop(0)) + "\n"
        return Path(path).read_text()

    def write(path: str, value: str) -> None:
        if path.endswith("subtree_control"):
            if busy.pop(0):
                raise OSError(errno.EBUSY, "busy")
            Path(path).write_text(value)
        elif path.endswith("cgroup.procs"):
            if value == "2":
                raise ProcessLookupError(errno.ESRCH, "gone")
            moved.append(value)

    monkeypatch.setattr(cgroups, "_read", read)
    monkeypatch.setattr(cgroups, "_write", write)
    cgroups._enable_controllers(str(group), ["memory", "pids"])
    assert moved == ["1", "3"]
    assert (group / "cgroup.subtree_control").read_text() == "+memory +pids"
    assert not busy and not procs


def test_a_cgroup_file_is_read_whole(tmp_path: Path) -> None:
    """``cgroups._read`` reads with ``os`` until EOF (a ``cgroup.procs`` of
    many processes, or the mount table, is longer than one read), and
    ``_read_optional`` says None where the kernel has no such file."""
    big = tmp_path / "cgroup.procs"
    text = "".join(f"{pid}\n" for pid in range(100_000, 130_000))
    big.write_text(text)
    assert len(text) > 65536
    assert cgroups._read(str(big)) == text
    assert cgroups._read_optional(str(tmp_path / "pids.peak")) is None
    with open("/proc/self/mountinfo") as fh:
        assert cgroups._read("/proc/self/mountinfo").splitlines()[0] == fh.readline().rstrip("\n")


def test_one_policys_equal_plans_are_encoded_once() -> None:
    """The static part of a plan is encoded again only when it changes, and
    never reused across policies (their equal plans may differ when
    encoded: ``1 == 1.0 == True``)."""
    from nanobox._linux import wire

    first, second = object(), object()

    def the_plan(**extra: object) -> dict[str, object]:
        return {"id": "x", "argv": ["true"], "env": [], "timeout": None, "n": 1, **extra}

    def parts(msg: bytes) -> tuple[dict[str, object], dict[str, object]]:
        run, static = wire.split_run(msg)
        return wire.loads(run), wire.loads(static)

    a = plan.encode(the_plan(), first)
    cached = plan._last_rest[2]
    b = plan.encode(the_plan(id="y"), first)
    assert plan._last_rest[2] is cached  # reused, not encoded again
    assert wire.split_run(a)[1] == wire.split_run(b)[1] == wire.dumps({"n": 1})
    assert parts(b)[0]["id"] == "y"
    assert parts(plan.encode(the_plan(n=2), first))[1] == {"n": 2}
    n = parts(plan.encode(the_plan(n=True), second))[1]["n"]
    assert n is True
    n = parts(plan.encode(the_plan(n=1.0), first))[1]["n"]
    assert isinstance(n, float) and n == 1.0


def test_equal_values_encode_to_equal_bytes() -> None:
    """The server reuses a sandbox built ahead only for a run whose plan
    bytes match: values that are equal must encode the same, however the
    objects in them are shared (marshal's newer formats write references
    to objects seen twice, which would make the bytes depend on that)."""
    from nanobox._linux import wire

    shared = "/tmp/ws/" + "x" * 3  # built at run time: not an interned constant
    one = {"a": [shared, shared], "b": (shared, 1)}
    two = {"a": ["/tmp/ws/xxx", "/tmp/ws/" + "xxx"], "b": ("/tmp/ws/xxx", 1)}
    assert one == two
    assert wire.dumps(one) == wire.dumps(two)
    assert wire.loads(wire.dumps(one)) == one
    with pytest.raises(ValueError, match="bad message"):
        wire.loads(wire.dumps(one)[:-3])
    with pytest.raises(ValueError, match="bad message"):
        wire.split_run(b"\x10\x00\x00\x00abc")


def test_pid1_waits_for_orphans_only_where_cpu_is_counted_from_the_tree() -> None:
    from nanobox._linux.spawn import _wait_orphans

    v1 = {"version": 1, "bases": {"memory": "/m", "cpuacct": "/c"}}
    assert not _wait_orphans({"cpu_time": None, "cgroup": None})  # no limit: cat
    assert _wait_orphans({"cpu_time": 1.0, "cgroup": None})
    assert not _wait_orphans({"cpu_time": 1.0, "cgroup": {"placement": v1}})
    assert "cpuacct" in cgroups.V1_NEEDED  # (a v1 placement always counts CPU)
