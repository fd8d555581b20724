"""Where nanobox's start-up milliseconds go (a profile, not a benchmark).

1. Warm run timeline: this process wraps nanobox's internal steps with
   timestamp marks (``CLOCK_MONOTONIC``, shared by every process of the
   fork chain; each mark appends one line to a log in the workspace, so it
   still works inside the sandbox's mount namespace), forks the fork server
   from itself (the CLI's mode, so the wrappers are inherited by the server,
   stage A, the init and the command's pre-exec child) and runs
   ``/bin/true`` N times. Per phase: the median over the runs.
2. Client side: ``cProfile`` of N warm ``Sandbox.run`` calls (the caller's
   process only), the nanobox functions with the most cumulative time.
3. Plan building vs the workspace: ``build_plan`` in an empty directory vs
   in a git checkout (the repository itself): the first plan of the process
   (the whole tree scanned for repositories) and the median of 6 later
   ones (only changed directories listed again).
4. What if: the warm loop without per-run cgroups when no limit is asked
   for (a monkeypatch of ``plan.resources`` in a child process).
4b. CPU per run by process, back to back (a child process, many runs: the
   kernel counts CPU in clock ticks): the caller, the fork server, the
   forker, the stage A processes (the forker's reaped children), the
   command and PID 1 (the server's), and the rest of the machine's busy
   time (the kernel's threads, anything else running) from ``/proc/stat``.
5. Cold CLI: ``python -X importtime`` of ``nanobox run -- /bin/true`` and an
   in-process split (imports, fork server start, the run).

    python bench/hotpath.py [--runs 30] [--json FILE]
"""

from __future__ import annotations

import cProfile
import functools
import inspect
import io
import json
import os
import pstats
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import _common as c

_LOG: str = ""


def _mark(label: str) -> None:
    try:
        fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError:
        return
    try:
        os.write(fd, f"{time.monotonic_ns()} {os.getpid()} {label}\n".encode())
    finally:
        os.close(fd)


def _wrap(obj: Any, attr: str, label: str, *, end: bool = True) -> None:
    orig: Callable[..., Any] = getattr(obj, attr)

    @functools.wraps(orig)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _mark(label + ".B")
        try:
            return orig(*args, **kwargs)
        finally:
            if end:
                _mark(label + ".E")

    static = isinstance(inspect.getattr_static(obj, attr), staticmethod)
    setattr(obj, attr, staticmethod(wrapper) if static else wrapper)


def instrument() -> None:
    from nanobox import _io, sandbox
    from nanobox._linux import (
        cgroups,
        child,
        landlock,
        mounts,
        netns,
        pid1,
        placeholders,
        socks,
        spawn,
        supervise,
        userns,
    )
    from nanobox._linux import forkserver as fsrv
    from nanobox._linux import plan as planmod
    from nanobox._linux import sys as k
    from nanobox._seccomp import loader

    S = sandbox.Sandbox
    _wrap(S, "_prepare", "prepare")
    _wrap(planmod, "build_plan", "build_plan")
    _wrap(S, "_start", "start")
    _wrap(S, "_finish", "finish")
    _wrap(_io.RunIO, "on_chan", "on_chan", end=False)
    # server
    _wrap(fsrv.Server, "_on_ctrl", "on_ctrl")
    _wrap(fsrv.Server, "_claim", "claim")
    _wrap(fsrv.Server, "_prewarm", "prewarm")
    _wrap(fsrv.Server, "_new_starter", "new_starter")
    _wrap(placeholders.Placeholders, "acquire", "placeholders")
    _wrap(placeholders.Placeholders, "release", "placeholders_rm")
    _wrap(spawn.Starter, "go", "go")
    _wrap(supervise.Run, "on_cmd_exit", "cmd_exit")
    _wrap(supervise.Run, "kill", "kill_init")
    _wrap(supervise.Run, "report", "report")
    _wrap(supervise.Run, "release_namespaces", "ns_release")
    _wrap(cgroups.RunGroup, "stats", "cgroup_stats")
    _wrap(fsrv.Server, "_send", "send")
    _wrap(cgroups.RunGroup, "remove", "cgroup_remove")
    # stage A (building ahead, then the claim)
    _wrap(spawn, "starter_main", "stage_a", end=False)
    _wrap(spawn, "close_all_except", "close_fds")
    _wrap(userns, "make_userns", "make_userns")
    _wrap(spawn, "_premade", "premade")
    _wrap(spawn, "_stage_a", "plan_decoded", end=False)
    _wrap(k, "setns", "setns")
    _wrap(k, "unshare", "unshare")
    _wrap(pid1, "start", "pid1")
    _wrap(os, "fork", "fork")  # ".E" is marked by the parent and by the child
    _wrap(socks, "sethostname", "hostname")
    _wrap(netns, "loopback_up", "loopback")
    _wrap(spawn, "_procfs", "procfs")
    _wrap(mounts, "build", "mounts")
    _wrap(landlock, "prepare", "landlock")
    _wrap(mounts, "build_late", "late")
    _wrap(k, "drop_capabilities", "caps")
    _wrap(loader, "install", "seccomp")
    _wrap(k, "spawn", "spawn")
    # a command process forked ahead (plans that need one; not profiled here)
    _wrap(spawn, "_command", "command", end=False)
    _wrap(child, "prepare", "prep")


# (phase, from mark, to mark), marks as ROLE:label, on the critical path of
# a run that claims a sandbox built ahead. Roles: client, server, A (stage
# A, which spawns the command), C (a command process forked ahead, where a
# plan needs one: not in this profile of the default policy).
PHASES = [
    ("client: policy → plan (build_plan)", "client:build_plan.B", "client:build_plan.E"),
    ("client: rest of prepare (encode the plan)", "client:build_plan.E", "client:prepare.E"),
    ("client: pipes, submit; server receives", "client:start.B", "server:on_ctrl.B"),
    ("server: decode, take the sandbox built ahead", "server:on_ctrl.B", "server:claim.B"),
    ("server: create placeholders", "server:placeholders.B", "server:placeholders.E"),
    ("server: argv/env/stdio and go to A", "server:placeholders.E", "server:go.E"),
    ("A: wake up, protect placeholders, late hides", "server:go.E", "A:late.E"),
    ("A: stdio, fds, cwd, no_new_privs, capabilities", "A:late.E", "A:caps.E"),
    ("A: Landlock, rlimits", "A:caps.E", "A:seccomp.B"),
    ("A: seccomp filter, listener to the server", "A:seccomp.B", "A:spawn.B"),
    (
        "posix_spawn, /bin/true runs and exits, the server reaps it",
        "A:spawn.B",
        "server:cmd_exit.B",
    ),
    ("server: kill PID 1, reap it", "server:kill_init.B", "server:report.B"),
    ("server: report, cgroup stats", "server:report.B", "server:ns_release.B"),
    ("server: mount namespace teardown", "server:ns_release.B", "server:ns_release.E"),
    ("server: remove placeholders", "server:placeholders_rm.B", "server:placeholders_rm.E"),
    ("server: reply; client receives it", "server:placeholders_rm.E", "client:on_chan.B"),
    ("client: build Result", "client:finish.B", "client:finish.E"),
]
# Building the next run's sandbox (off the critical path: per stage A / C).
BUILD = [
    (
        "server: cgroups + ask the forker for a spare stage A",
        "server:new_starter.B",
        "server:new_starter.E",
    ),
    ("server: hand the plan to a stage A (prewarm)", "server:prewarm.B", "server:prewarm.E"),
    ("A: join the run's cgroups (spare, before its plan)", "A:close_fds.E", "A:make_userns.B"),
    ("A: user namespace for the id mapping (root)", "A:make_userns.B", "A:make_userns.E"),
    ("A: idmapped clones of the writable roots (root)", "A:premade.B", "A:premade.E"),
    ("A: setns, unshare(mnt, pid, net, ipc, uts, cgroup)", "A:plan_decoded.B", "A:unshare.E"),
    ("A: start PID 1 (posix_spawn cat)", "A:pid1.B", "A:pid1.E"),
    ("A: hostname, loopback up", "A:hostname.B", "A:loopback.E"),
    ("A: procfs (pidns option)", "A:procfs.B", "A:procfs.E"),
    ("A: filesystem view (mounts.build)", "A:mounts.B", "A:mounts.E"),
    ("A: Landlock ruleset", "A:landlock.B", "A:landlock.E"),
]


def _roles(marks: list[tuple[int, int, str]], client_pid: int) -> dict[int, str]:
    roles = {client_pid: "client"}
    first = {"on_ctrl.B": "server", "stage_a.B": "A", "command.B": "C"}
    for _ts, pid, label in marks:
        if label in first and pid not in roles:
            roles[pid] = first[label]
    return roles


def _stats(vals: list[float], critical: bool) -> dict[str, Any]:
    return {
        "mean_ms": sum(vals) / len(vals),
        "median_ms": c.percentile(vals, 50),
        "p90_ms": c.percentile(vals, 90),
        "n": len(vals),
        "critical": critical,
    }


def timeline(runs: int, cwd: str, policy: Any = None) -> dict[str, Any]:
    global _LOG
    import nanobox
    from nanobox._linux import client

    _LOG = os.path.join(cwd, "marks.log")
    client.shutdown()  # a server started earlier would not have the wrappers
    instrument()
    box = nanobox.Sandbox(policy)
    box._fork_server = True  # fork the server from here: it inherits the wrappers
    box.run(["/bin/true"], cwd=cwd)
    box.run(["/bin/true"], cwd=cwd)
    os.unlink(_LOG)
    fd = os.open(_LOG, os.O_WRONLY | os.O_CREAT, 0o666)
    os.fchmod(fd, 0o666)  # stage A and the command run as other uids
    os.close(fd)
    totals = []
    for _ in range(runs):
        time.sleep(0.02)  # the next sandbox is built ahead meanwhile
        t0 = time.perf_counter()
        r = box.run(["/bin/true"], cwd=cwd)
        totals.append(time.perf_counter() - t0)
        if r.returncode:
            raise RuntimeError(f"/bin/true failed: {r.returncode}")
    client.shutdown()
    marks: list[tuple[int, int, str]] = []
    with open(_LOG) as fh:
        for ln in fh:
            parts = ln.split()
            if len(parts) == 3:
                marks.append((int(parts[0]), int(parts[1]), parts[2]))
    marks.sort()
    roles = _roles(marks, os.getpid())
    # The critical path: the marks between a run's prepare.B and finish.E.
    per_run: list[dict[str, int]] = []
    inside = False
    for ts, pid, label in marks:
        role = roles.get(pid, "other")
        if label == "prepare.B" and role == "client":
            per_run.append({})
            inside = True
        if inside:
            per_run[-1].setdefault(f"{role}:{label}", ts)
        if label == "finish.E" and role == "client":
            inside = False
    # Building ahead: per process (every stage A / command process builds one).
    per_proc: dict[int, dict[str, int]] = {}
    for ts, pid, label in marks:
        role = roles.get(pid, "other")
        per_proc.setdefault(pid, {}).setdefault(f"{role}:{label}", ts)
    server_marks = [(ts, label) for ts, pid, label in marks if roles.get(pid) == "server"]
    phases: dict[str, Any] = {}
    for name, a, b in PHASES:
        vals = [(r[b] - r[a]) / 1e6 for r in per_run if a in r and b in r]
        if vals:
            phases[name] = _stats(vals, True)
    for name, a, b in BUILD:
        if a.startswith("server:"):
            la, lb = a.split(":", 1)[1], b.split(":", 1)[1]
            vals = []
            open_at: int | None = None
            for ts, label in server_marks:
                if label == la:
                    open_at = ts
                elif label == lb and open_at is not None:
                    vals.append((ts - open_at) / 1e6)
                    open_at = None
        else:
            vals = [(m[b] - m[a]) / 1e6 for m in per_proc.values() if a in m and b in m]
        if vals:
            phases[name] = _stats(vals, False)
    crit = sum(p["median_ms"] for p in phases.values() if p["critical"])
    spans = [
        (r["client:finish.E"] - r["client:prepare.B"]) / 1e6
        for r in per_run
        if "client:finish.E" in r and "client:prepare.B" in r
    ]
    return {
        "runs": runs,
        "phases": phases,
        "sum_of_phase_medians_ms": crit,
        "instrumented_total_ms": c.percentile(spans, 50) if spans else None,
        "wall_total_ms": c.percentile(totals, 50) * 1e3,
    }


def client_profile(runs: int, cwd: str) -> dict[str, Any]:
    import nanobox

    box = nanobox.Sandbox()
    box.run(["/bin/true"], cwd=cwd)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(runs):
        box.run(["/bin/true"], cwd=cwd)
    prof.disable()
    st = pstats.Stats(prof)
    rows = []
    stats: dict[Any, Any] = st.stats  # type: ignore[attr-defined]
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in stats.items():
        if "nanobox" not in file and fn not in ("poll", "select"):
            continue
        short = file.split("/src/")[-1] if "/src/" in file else os.path.basename(file)
        rows.append(
            {
                "function": f"{short}:{line}({fn})",
                "calls_per_run": nc / runs,
                "cum_ms_per_run": ct / runs * 1e3,
                "self_ms_per_run": tt / runs * 1e3,
            }
        )
    rows.sort(key=lambda r: -r["cum_ms_per_run"])
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(8)
    return {"top_cumulative": rows[:16], "top_self_text": buf.getvalue()[-2500:]}


def plan_vs_workspace(cwd: str) -> dict[str, Any]:
    import nanobox
    from nanobox._linux import gitscan, wire
    from nanobox._linux import plan as planmod

    out = {}
    for label, where in (("empty directory", cwd), (f"git checkout ({c.REPO})", c.REPO)):
        gitscan.forget()  # the first plan scans the whole tree, later ones what changed
        times = []
        plan: dict[str, Any] = {}
        for _ in range(7):
            t0 = time.perf_counter()
            plan = planmod.build_plan(
                nanobox.Policy(),
                ["/bin/true"],
                run_id="x",
                cwd=where,
                env=planmod.build_env(nanobox.Policy(), None),
                timeout=None,
            )
            times.append(time.perf_counter() - t0)
        out[label] = {
            "first_build_plan_ms": times[0] * 1e3,
            "build_plan_ms": c.percentile(times[1:], 50) * 1e3,
            "mount_ops": len(plan["view"]["ops"]),
            "landlock_paths": sum(len(plan["landlock"][k]) for k in ("read", "write", "list"))
            if plan.get("landlock")
            else 0,
            "plan_bytes": len(wire.dumps(plan)),
        }
    return out


def cold_cli(cwd: str) -> dict[str, Any]:
    exe = c.VENV_NANOBOX
    py = c.VENV_PYTHON
    res: dict[str, Any] = {}
    compiled = c.compile_nanobox()
    if compiled is not None:
        res["compile_error"] = compiled
    p = subprocess.run(
        [py, "-X", "importtime", exe, "run", "--", "/bin/true"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    imports = []
    for line in p.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        parts = line[len("import time:") :].split("|")
        self_us, cum_us, name = int(parts[0]), int(parts[1]), parts[2]
        depth = (len(name) - len(name.lstrip())) // 2
        imports.append((name.strip(), self_us, cum_us, depth))
    top = [i for i in imports if i[3] == 0]
    res["import_total_ms"] = sum(i[2] for i in top) / 1e3
    res["top_imports"] = [
        {"module": n, "cumulative_ms": cu / 1e3}
        for n, _s, cu, _d in sorted(top, key=lambda i: -i[2])[:12]
    ]
    res["nanobox_modules"] = [
        {"module": n, "self_ms": s / 1e3}
        for n, s, _cu, _d in sorted(
            (i for i in imports if i[0].startswith("nanobox")), key=lambda i: -i[1]
        )[:10]
    ]
    # In the CLI's own order (nanobox._entry): fork the server first, then
    # import the CLI and run.
    split = r"""
import sys, time, json
t0 = time.perf_counter()
from nanobox._entry import start_server_early
start_server_early(["run", "--", "/bin/true"])
t1 = time.perf_counter()
import nanobox.cli as cli
from nanobox import _prepare
t2 = time.perf_counter()
marks = {}
orig_submit = _prepare.submit
def submit(*a, **k):
    try:
        return orig_submit(*a, **k)
    finally:
        marks["submitted"] = time.perf_counter()
        # What the CLI imports next, right here (its own import is then a
        # lookup): to time the run from when the CLI has it.
        from nanobox.sandbox import Sandbox
        orig_run = Sandbox._run_submitted
        def run(self, *a, **k):
            marks["rest_imported"] = time.perf_counter()
            try:
                return orig_run(self, *a, **k)
            finally:
                marks["run_done"] = time.perf_counter()
        Sandbox._run_submitted = run
_prepare.submit = submit
try:
    cli.main(["run", "--", "/bin/true"])
except SystemExit:
    pass
t3 = time.perf_counter()
out = {
    "fork_server_start": t1 - t0,
    "imports": t2 - t1,
    "cli_main_total": t3 - t2,
}
if {"submitted", "rest_imported", "run_done"} <= marks.keys():
    out["to_submit"] = marks["submitted"] - t2
    out["rest_imports"] = marks["rest_imported"] - marks["submitted"]
    out["run_wait"] = marks["run_done"] - marks["rest_imported"]
sys.stderr.write("SPLIT " + json.dumps(out) + "\n")
"""
    samples: list[dict[str, float]] = []
    walls = []
    bare = []
    for _ in range(9):
        t0 = time.perf_counter()
        q = subprocess.run([py, "-c", split], cwd=cwd, capture_output=True, text=True, timeout=60)
        walls.append(time.perf_counter() - t0)
        for line in q.stderr.splitlines():
            if line.startswith("SPLIT "):
                samples.append(json.loads(line[6:]))
        dt, _ = c.time_command([py, "-c", "pass"], cwd)
        bare.append(dt)
    if samples:
        keys = samples[0].keys()
        res["split_ms"] = {
            k: c.percentile([s[k] for s in samples if k in s], 50) * 1e3 for k in keys
        }
    res["wall_ms"] = c.percentile(walls, 50) * 1e3
    res["python_c_pass_ms"] = c.percentile(bare, 50) * 1e3
    if q.returncode not in (0, None) and not samples:
        res["error"] = q.stderr[-500:]
    return res


def what_if_child(variant: str, runs: int, cwd: str, gap: float) -> float:
    """One warm loop in fork-server mode, optionally without per-run cgroups
    for policies that ask for no limits (a monkeypatch: an experiment, not a
    nanobox option)."""
    import nanobox
    from nanobox._linux import client
    from nanobox._linux import plan as planmod

    if variant == "no per-run cgroups":
        orig = planmod.resources

        def resources(policy: Any) -> Any:
            lim = policy.limits
            if lim.memory is None and lim.pids is None and lim.cpus is None:
                return None, [], []
            return orig(policy)

        planmod.resources = resources
    box = nanobox.Sandbox()
    box._fork_server = True
    for _ in range(3):
        box.run(["/bin/true"], cwd=cwd)
    times = []
    for _ in range(runs):
        time.sleep(gap)
        t0 = time.perf_counter()
        box.run(["/bin/true"], cwd=cwd)
        times.append(time.perf_counter() - t0)
    client.shutdown()
    return c.percentile(times, 50) * 1e3


def what_if(runs: int, cwd: str) -> dict[str, Any]:
    """Warm start with the default policy as is vs without per-run cgroups,
    back to back and with a 50 ms pause before each run (isolated starts),
    alternating, 3 rounds, each in a fresh process."""
    keys = [(v, g) for g in (0.0, 0.05) for v in ("as is", "no per-run cgroups")]
    out: dict[tuple[str, float], list[float]] = {k: [] for k in keys}
    for r in range(3):
        for variant, gap in c.alternating(keys, r):
            p = subprocess.run(
                [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--what-if-child",
                    variant,
                    str(runs),
                    cwd,
                    str(gap),
                ],
                capture_output=True,
                text=True,
                timeout=300,
            )
            if p.returncode != 0:
                raise RuntimeError(p.stderr[-500:])
            out[(variant, gap)].append(float(p.stdout.strip().splitlines()[-1]))
    return {
        f"{v}, {'back to back' if g == 0 else f'{g * 1e3:.0f} ms pause before each run'}": {
            "round_medians_ms": x,
            "median_ms": c.percentile(x, 50),
        }
        for (v, g), x in out.items()
    }


def _stat_times(pid: int) -> tuple[int, int]:
    """(own, reaped children's) CPU of ``pid`` in clock ticks."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def _machine_busy() -> int:
    with open("/proc/stat") as fh:
        values = [int(x) for x in fh.readline().split()[1:]]
    return sum(values) - values[3] - values[4]  # (idle, iowait)


def cpu_split_child(runs: int, cwd: str) -> dict[str, Any]:
    import nanobox

    box = nanobox.Sandbox()
    for _ in range(10):
        box.run(["/bin/true"], cwd=cwd)
    me = os.getpid()

    def children(pid: int) -> list[int]:
        out: list[int] = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out += [int(x) for x in fh.read().split()]
        return out

    def comm(pid: int) -> str:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()

    servers = [p for p in children(me) if comm(p) != "nanobox-forker"]
    if len(servers) != 1:
        raise RuntimeError(f"expected one fork server below this process, found {servers}")
    server = servers[0]
    forkers = [p for p in children(server) if comm(p) == "nanobox-forker"]
    if len(forkers) != 1:
        raise RuntimeError(f"expected one forker below the fork server, found {forkers}")
    forker = forkers[0]
    before = (os.times(), _stat_times(server), _stat_times(forker), _machine_busy())
    t0 = time.perf_counter()
    for _ in range(runs):
        box.run(["/bin/true"], cwd=cwd)
    wall = time.perf_counter() - t0
    after = (os.times(), _stat_times(server), _stat_times(forker), _machine_busy())
    tick_ms = 1e3 / os.sysconf("SC_CLK_TCK")
    caller = (after[0].user - before[0].user + after[0].system - before[0].system) * 1e3
    out = {
        "runs": runs,
        "wall_ms": wall * 1e3 / runs,
        "machine_ms": (after[3] - before[3]) * tick_ms / runs,
        "caller_ms": caller / runs,
        "server_ms": (after[1][0] - before[1][0]) * tick_ms / runs,
        "server_children_ms": (after[1][1] - before[1][1]) * tick_ms / runs,
        "forker_ms": (after[2][0] - before[2][0]) * tick_ms / runs,
        "forker_children_ms": (after[2][1] - before[2][1]) * tick_ms / runs,
    }
    named = [k for k in out if k.endswith("_ms") and k not in ("wall_ms", "machine_ms")]
    out["rest_ms"] = out["machine_ms"] - sum(out[k] for k in named)
    return out


def cpu_split(runs: int, cwd: str) -> dict[str, Any]:
    """``cpu_split_child`` in a fresh process (no wrappers, its own server)."""
    p = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--cpu-split-child", str(runs), cwd],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-500:])
    result: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return result


def measure(runs: int) -> dict[str, Any]:
    errors: dict[str, str] = {}
    out: dict[str, Any] = {"errors": errors}
    with c.workdir() as cwd:
        out["cold_cli"] = c.guarded(errors, "cold_cli", lambda: cold_cli(cwd))
        out["plan_vs_workspace"] = c.guarded(errors, "plan", lambda: plan_vs_workspace(cwd))
        out["client_profile"] = c.guarded(errors, "cprofile", lambda: client_profile(runs, cwd))
        out["what_if"] = c.guarded(errors, "what_if", lambda: what_if(runs, cwd))
        out["cpu_split"] = c.guarded(errors, "cpu_split", lambda: cpu_split(runs * 10, cwd))
        # last: it patches nanobox in this process
        out["timeline"] = c.guarded(errors, "timeline", lambda: timeline(runs, cwd))
    return out


def table(res: dict[str, Any]) -> str:
    parts = []
    tl = res.get("timeline")
    if tl:
        rows = [
            [
                n,
                c.fmt(p["median_ms"]),
                c.fmt(p.get("mean_ms")),
                c.fmt(p["p90_ms"]),
                "" if p["critical"] else "ahead",
            ]
            for n, p in tl["phases"].items()
        ]
        parts.append(
            f"Warm `Sandbox.run(['/bin/true'])` as uid {os.getuid()}, {tl['runs']} runs "
            f"(instrumented median {c.fmt(tl['instrumented_total_ms'])} ms, wall "
            f"{c.fmt(tl['wall_total_ms'])} ms):\n\n"
            + c.md_table(["phase", "median ms", "mean ms", "p90 ms", ""], rows)
        )
    cp = res.get("client_profile")
    if cp:
        rows = [
            [
                r["function"],
                c.fmt(r["calls_per_run"], 1),
                c.fmt(r["cum_ms_per_run"]),
                c.fmt(r["self_ms_per_run"]),
            ]
            for r in cp["top_cumulative"]
        ]
        parts.append(
            "Caller-side cProfile (per run):\n\n"
            + c.md_table(["function", "calls", "cumulative ms", "self ms"], rows)
        )
    pw = res.get("plan_vs_workspace")
    if pw:
        rows = [
            [
                k,
                c.fmt(v.get("first_build_plan_ms")),
                c.fmt(v["build_plan_ms"]),
                v["mount_ops"],
                v["landlock_paths"],
                v["plan_bytes"],
            ]
            for k, v in pw.items()
        ]
        parts.append(
            "`build_plan` vs the workspace:\n\n"
            + c.md_table(
                [
                    "cwd",
                    "first build_plan ms",
                    "later build_plan ms",
                    "mount ops",
                    "Landlock paths",
                    "plan bytes (marshal)",
                ],
                rows,
            )
        )
    cc = res.get("cold_cli")
    if cc:
        split = cc.get("split_ms", {})
        parts.append(
            f"Cold CLI: wall {c.fmt(cc['wall_ms'])} ms (bare `python -c pass` "
            f"{c.fmt(cc['python_c_pass_ms'])} ms); in-process, in the CLI's order: "
            f"forking the server (and the `inspect` stand-in) "
            f"{c.fmt(split.get('fork_server_start'))} ms, then the CLI's first imports "
            f"{c.fmt(split.get('imports'))} ms, options, policy, plan and submitting "
            f"{c.fmt(split.get('to_submit'))} ms, importing the rest (`Sandbox`, the "
            f"Result, the I/O loop) {c.fmt(split.get('rest_imports'))} ms, waiting for "
            f"the run {c.fmt(split.get('run_wait'))} ms, CLI main total "
            f"{c.fmt(split.get('cli_main_total'))} ms; `-X importtime` top-level total "
            f"{c.fmt(cc['import_total_ms'])} ms.\n\n"
            + c.md_table(
                ["top-level import", "cumulative ms"],
                [[i["module"], c.fmt(i["cumulative_ms"])] for i in cc["top_imports"]],
            )
        )
    wi = res.get("what_if")
    if wi:
        rows = [
            [k, c.fmt(v["median_ms"]), " · ".join(c.fmt(x) for x in v["round_medians_ms"])]
            for k, v in wi.items()
        ]
        parts.append(
            "What if (monkeypatched experiment, fork-server mode): default policy without the "
            "per-run cgroups (accounting from rusage):\n\n"
            + c.md_table(["variant", "warm median ms", "per round"], rows)
        )
    cs = res.get("cpu_split")
    if cs:
        rows = [
            [name, c.fmt(cs[key])]
            for name, key in (
                ("the whole machine (busy time, `/proc/stat`)", "machine_ms"),
                ("the caller (this process, all its threads)", "caller_ms"),
                ("the fork server", "server_ms"),
                ("the forker", "forker_ms"),
                ("the stage A processes (the forker's children)", "forker_children_ms"),
                ("the command and PID 1 (the server's children)", "server_children_ms"),
                ("the rest: the kernel's threads, anything else running", "rest_ms"),
            )
        ]
        parts.append(
            f"CPU per run by process, back to back, default policy, {cs['runs']} runs "
            f"({c.fmt(cs['wall_ms'])} ms wall per run; clock ticks of "
            f"{1e3 / os.sysconf('SC_CLK_TCK'):g} ms, summed over all runs):\n\n"
            + c.md_table(["process", "CPU ms per run"], rows)
        )
    for k, v in res.get("errors", {}).items():
        parts.append(f"- error in **{k}**: {v}")
    return "\n\n".join(parts)


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--what-if-child":
        print(what_if_child(sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])))
        return
    if len(sys.argv) == 4 and sys.argv[1] == "--cpu-split-child":
        print(json.dumps(cpu_split_child(int(sys.argv[2]), sys.argv[3])))
        return
    p = c.base_args(__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=30)
    a = p.parse_args()
    res = measure(8 if a.quick else a.runs)
    c.emit(res, a.json, table)


if __name__ == "__main__":
    main()
