"""How stage A starts the command. Usually it takes the command's last
steps on itself (stdio, cwd, capabilities, Landlock, rlimits, seccomp) and
starts it with ``posix_spawn``; where the plan does not allow that, a
command process forked ahead does them and execs: under a seccomp policy
that denies what a spawn needs afterwards (say, ``clone``: a judge that
forbids forking), or an address-space rlimit. Both ways give the same
sandbox: the suite runs the first; these tests pin the choice and run the
second."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

import nanobox
from conftest import SLOW, SPY, userns_usable
from nanobox._linux import plan
from nanobox._seccomp import bpf, default_program, interp
from nanobox._seccomp.policy import arch_info, native_arch

# The tests that run sandboxes (marked here one by one: the pure ones, which
# only interpret BPF programs, have nothing to learn from the VM lane's kernels).
_USERNS = pytest.mark.skipif(not userns_usable(), reason="no user namespaces")

NO_FORK = nanobox.Policy(
    syscalls=nanobox.Syscalls(deny=("clone", "clone3", "fork", "vfork")),
)
# Denies a call of the spawn's (the command's own setsid comes before its
# filter) while the command may still fork: the forked-ahead path for a
# shell script.
NO_SETSID = nanobox.Policy(syscalls=nanobox.Syscalls(deny=("setsid",)))
NO_WAIT4 = nanobox.Policy(syscalls=nanobox.Syscalls(deny=("wait4",)))
SIGACTION_31 = nanobox.Policy(
    syscalls=nanobox.Syscalls(
        rules=(nanobox.SyscallRule("rt_sigaction", "errno", args=(nanobox.Arg(0, "eq", 31),)),)
    )
)
FORK = """import os
try:
    pid = os.fork()
except OSError as e:
    print("denied", e.errno)
else:
    pid or os._exit(0)
    print("forked")
"""
STATUS = "grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp|SigIgn|SigBlk):' /proc/self/status"


# What stage A (and posix_spawn's child) call after installing the seccomp
# filter when A starts the command itself (``spawn._build_spawning``):
# checked against the default filter here. (syscall, arg0 or None)
CLONE_VFORK_FLAGS = 0x100 | 0x4000 | 17  # CLONE_VM | CLONE_VFORK | SIGCHLD
CLONE_FORK_FLAGS = 0x01000000 | 0x00200000 | 17  # as glibc's fork()
SPAWN_CALLS: tuple[tuple[str, int | None], ...] = (
    ("clone", CLONE_VFORK_FLAGS),
    ("clone", CLONE_FORK_FLAGS),
    ("execve", None),
    ("wait4", None),
    ("rt_sigprocmask", None),
    ("rt_sigaction", None),
    ("setsid", None),
    ("set_robust_list", None),
    ("gettid", None),
    ("mmap", None),
    ("munmap", None),
    ("mremap", None),
    ("mprotect", None),
    ("brk", None),
    ("newfstatat", None),
    ("sendmsg", None),
    ("write", None),
    ("close", None),
    ("getrusage", None),
    ("exit_group", None),
)


def filter_allows_spawn(program: bytes) -> bool:
    """Whether ``program`` lets stage A spawn after installing it: every
    call in ``SPAWN_CALLS`` allowed, whatever its other arguments (tried
    with several), every signal's ``rt_sigaction`` and every
    ``rt_sigprocmask``; ``clone3`` allowed or failing with ENOSYS (glibc
    then uses clone)."""
    info = arch_info(native_arch())
    others = (0, 1, 0xFFFFFFFF, 0x7FFFFFFF_FFFFFFFF)

    def actions(name: str, arg0: int | None = None) -> set[int]:
        got = set()
        for rest in others:
            for first in (arg0,) if arg0 is not None else others:
                args = (first, rest, rest, rest, rest, rest)
                data = interp.SeccompData(info.syscalls[name], info.audit_arch, args)
                got.add(interp.run(program, data))
        return got

    allow = {bpf.SECCOMP_RET_ALLOW}
    if not actions("clone3") <= allow | {bpf.SECCOMP_RET_ERRNO | 38}:  # ENOSYS
        return False
    for sig in range(1, 65):
        if actions("rt_sigaction", sig) != allow:
            return False
    for how in (0, 1, 2):
        if actions("rt_sigprocmask", how) != allow:
            return False
    return all(actions(name, arg0) == allow for name, arg0 in SPAWN_CALLS)


def test_the_default_filter_lets_stage_a_spawn() -> None:
    """Whatever the arguments of the calls stage A makes after installing
    it (so none of them can be refused, reported, or wait for an answer)."""
    prog = bytes.fromhex(default_program.PROGRAMS[native_arch()])
    assert filter_allows_spawn(prog)
    # The check can fail: a filter that refuses a spawn's call, or refuses
    # one only for some arguments.
    for policy in (NO_FORK, NO_SETSID, SIGACTION_31):
        program, _table = plan.seccomp_program(policy)
        assert program is not None and not filter_allows_spawn(bytes.fromhex(program))


def test_which_plans_spawn() -> None:
    program, _table = plan.seccomp_program(nanobox.Policy())
    assert plan.spawn_allowed(program, [], default=True)
    assert plan.spawn_allowed(None, [], default=False)  # syscalls="none"
    # A filter of the caller's, even one that leaves the spawn's calls alone:
    # a command process forked ahead (A's own calls must not be refused).
    program, _table = plan.seccomp_program(
        nanobox.Policy(syscalls=nanobox.Syscalls(deny=("socket",)))
    )
    assert program is not None and not plan.spawn_allowed(program, [], default=False)
    # No address-space limit may apply to stage A's own (Python-sized) memory.
    import resource

    limit = [(resource.RLIMIT_AS, 1 << 26, 1 << 26)]
    assert not plan.spawn_allowed(None, limit, default=True)
    assert plan.spawn_allowed(None, [(resource.RLIMIT_CORE, 0, 0)], default=True)


@pytest.mark.vm
@_USERNS
def test_a_filter_refusing_what_a_spawn_needs_does_not_stop_the_start(
    workspace: Path,
) -> None:
    """Refusing ``wait4`` (which glibc's posix_spawn calls after a failed
    exec) or ``rt_sigaction`` of one signal (its child resets every signal)
    neither hangs the run nor fails a command that would start otherwise."""
    noexec = workspace / "noexec"
    noexec.write_text("#!/bin/sh\n")  # mode 644: exec fails with EACCES
    r = nanobox.run(["./noexec"], policy=NO_WAIT4, timeout=20)
    assert r.returncode == 126 and r.wall_time_s < 10, r
    # ... and nanobox's own calls are not reported as the command's.
    assert [v.kind for v in r.violations] == ["exec"], r.violations
    r = nanobox.run(["/bin/true"], policy=SIGACTION_31, timeout=20)
    assert r.returncode == 0 and r.wall_time_s < 10, r
    assert not r.violations, r.violations


@pytest.mark.vm
@_USERNS
def test_a_policy_that_denies_forking_gets_a_command_process_forked_ahead(
    workspace: Path,
) -> None:
    r = nanobox.run([SPY, "-c", FORK], policy=NO_FORK)
    assert (r.returncode, r.stdout) == (0, b"denied 1\n"), r
    # Control: the default policy lets the command fork.
    r = nanobox.run([SPY, "-c", FORK])
    assert (r.returncode, r.stdout) == (0, b"forked\n"), r
    # Outside: forking works too (the test can fail).
    out = subprocess.run([SPY, "-c", FORK], capture_output=True, text=True, check=True)
    assert out.stdout == "forked\n"


@pytest.mark.vm
@_USERNS
@pytest.mark.parametrize("policy", [None, NO_SETSID], ids=["spawned", "forked-ahead"])
def test_both_ways_start_the_command_alike(workspace: Path, policy: nanobox.Policy) -> None:
    """No capabilities, no_new_privs, a seccomp filter, default signal
    dispositions and mask, a session of its own, the run's stdio, argv,
    env and directory."""
    sub = workspace / "sub"
    sub.mkdir()
    script = f'{STATUS}; echo "$0 $FOO $(pwd)"; cat; echo "session $(ps -o sid= -p $$) $$"'
    r = nanobox.run(
        ["/bin/sh", "-c", script, "zero"],
        env={"FOO": "bar", "PATH": "/usr/bin:/bin"},
        input=b"in\n",
        cwd=sub,
        policy=policy,
    )
    assert r.returncode == 0, r
    lines = r.stdout.decode().splitlines()
    fields = dict(ln.split(":\t") for ln in lines if ":\t" in ln)
    assert fields["CapEff"] == fields["CapBnd"] == "0000000000000000", fields
    assert fields["NoNewPrivs"] == "1" and fields["Seccomp"] == "2", fields
    assert fields["SigIgn"] == fields["SigBlk"] == "0000000000000000", fields
    assert f"zero bar {sub}" in lines and "in" in lines, lines
    _word, sid, pid = lines[-1].split()
    assert sid == pid, lines  # a session of its own


@pytest.mark.vm
@_USERNS
@pytest.mark.parametrize("policy", [None, NO_SETSID], ids=["spawned", "forked-ahead"])
def test_both_ways_stop_a_cpu_bound_command_at_its_limit(
    workspace: Path, cbin: Path, policy: nanobox.Policy | None
) -> None:
    """One CPU-bound process under ``cpu_time=1s``: the run ends once the
    command has used its second, not before. ``RLIMIT_CPU``, the per-process
    backstop, counts a process's CPU from its start: what nanobox did in the
    forked-ahead command process before its exec must not come off the
    command's second (it did: stopped by SIGXCPU at 0.948 s here)."""
    lim = nanobox.Limits(cpu_time="1s")
    pol = dataclasses.replace(policy or nanobox.Policy(), limits=lim, allow_degraded=True)
    r = nanobox.run([str(cbin / "spin_cpu"), "5"], policy=pol, timeout=30)
    assert r.outcome is nanobox.Outcome.CPU_LIMIT, r
    assert 1.0 <= r.cpu_time_s <= (2.0 if SLOW else 1.3), (r.cpu_time_s, r.signal)


@pytest.mark.vm
@_USERNS
@pytest.mark.parametrize("policy", [None, NO_FORK], ids=["spawned", "forked-ahead"])
def test_both_ways_report_a_missing_program(workspace: Path, policy: nanobox.Policy) -> None:
    r = nanobox.run(["no-such-program-xyz"], policy=policy)
    assert r.returncode == 127, r
    assert any("no-such-program-xyz" in v.detail for v in r.violations), r.violations
