"""The fork server keeps one stage A ("starter") ready after a run, with its
cgroups already joined, so the next run skips the slow cgroup migration.
It must apply each run's limits, and vanish (process and cgroups) when no
run comes for a moment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import nanobox
from conftest import (
    SPY,
    cgroups_usable,
    descendants,
    nanobox_cli,
    nanobox_groups,
    userns_usable,
    wait_for,
    wait_until,
)

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(not userns_usable(), reason="no user namespaces (see test_nouserns)"),
]


def _spares() -> list[int]:
    """Spare starters below this process."""
    return [pid for pid, comm in descendants(os.getpid()).items() if comm == "nanobox-spare"]


def _the_spare() -> int | None:
    """The one spare, seen beside a sandbox built ahead (a starter forked
    for such a sandbox has a spare's name for a moment, until its plan
    arrives; the spare is forked once that sandbox is built). One look:
    the spare stays only a second after it is asked for, and under the VM
    lane's emulation its fork takes part of that."""
    below = descendants(os.getpid())
    spares = [pid for pid, comm in below.items() if comm == "nanobox-spare"]
    built = [pid for pid, comm in below.items() if comm == "nanobox-warm"]
    return spares[0] if len(spares) == 1 and built else None


def test_spare_is_ready_after_a_run_and_goes_away(workspace: Path) -> None:
    box = nanobox.Sandbox()
    try:
        groups_before = nanobox_groups()
        assert box.run(["true"]).returncode == 0
        spare = wait_for(_the_spare, timeout=3)  # (it may be gone already: it stays a second)
        assert spare is not None, (
            f"no spare after a run; processes below the test: {descendants(os.getpid())}"
        )
        # The next sandbox is built from the spare: during this run, or right
        # after it when runs come with a pause (as here: waiting for the spare).
        assert box.run(["true"]).returncode == 0
        assert wait_until(lambda: spare not in _spares(), timeout=2)
        # Nothing comes next: the spare and its groups go within a few seconds.
        assert wait_until(lambda: not _spares(), timeout=5)
        assert wait_until(lambda: not nanobox_groups() - groups_before, timeout=5)
    finally:
        box.close()


@pytest.mark.skipif(not cgroups_usable(), reason="no usable cgroup here")
def test_spare_gets_each_runs_limits(workspace: Path) -> None:
    limited = nanobox.Sandbox(nanobox.Policy(limits=nanobox.Limits(memory="48M")))
    free = nanobox.Sandbox()
    touch = "b = bytearray({} << 20); b[::4096] = b'x' * len(b[::4096])"
    for _ in range(2):  # the first starter is fresh, the next ones spares
        assert free.run(["true"]).returncode == 0
        r = limited.run([SPY, "-c", touch.format(200)])
        assert r.outcome is nanobox.Outcome.MEMORY_LIMIT, r
        # ... and a run without limits right after is not limited.
        r = free.run([SPY, "-c", touch.format(100)])
        assert r.returncode == 0, r
        assert r.peak_memory_bytes is not None and r.peak_memory_bytes > 90 << 20


def test_server_exit_takes_the_spare(workspace: Path) -> None:
    from nanobox._linux import client

    groups_before = nanobox_groups()
    nanobox.run(["true"])
    assert wait_until(lambda: len(_spares()) == 1, timeout=2)
    client.shutdown()  # the caller lets its fork server go (as at exit)
    assert wait_until(lambda: not _spares(), timeout=5)
    assert wait_until(lambda: not nanobox_groups() - groups_before, timeout=5)


def _all_spares() -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/comm") as fh:
                    if fh.read().strip() == "nanobox-spare":
                        out.append(int(name))
            except OSError:
                continue
    return out


def test_cli_leaves_nothing_after_a_usage_error_or_a_run(workspace: Path) -> None:
    """The CLI forks its server (which makes a spare) before it parses its
    options: a bad option, or the end of the run, must take both away."""
    groups_before = nanobox_groups()
    spares_before = set(_all_spares())
    p = nanobox_cli("run", "--memory", "lots", "--", "true")
    assert p.returncode == 125 and b"--memory" in p.stderr
    p = nanobox_cli("run", "--", "sh", "-c", "echo ok")
    assert p.returncode == 0 and p.stdout == b"ok\n"
    assert wait_until(lambda: not set(_all_spares()) - spares_before, timeout=5)
    assert wait_until(lambda: not nanobox_groups() - groups_before, timeout=5)


def test_the_first_spare_fits_a_default_policy_run(workspace: Path) -> None:
    """The server makes its first spare before any plan arrives, for the
    key it guesses; a wrong guess costs the CLI a fresh stage A (and its
    cgroup migration) on its one run."""
    from nanobox._linux import forkserver
    from nanobox._linux import plan as pm

    pol = nanobox.Policy()
    plan = pm.build_plan(
        pol,
        ["true"],
        run_id="x",
        cwd=str(workspace),
        env=pm.build_env(pol, None),
        timeout=None,
        userns=(True, ""),
    )
    assert forkserver.Server._key(plan) == forkserver._default_key(True)
