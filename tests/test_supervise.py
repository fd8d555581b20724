"""The fork server supervises each sandbox; the sandbox's PID 1 is a small
idle process (``cat``) that the kernel reaps orphans for."""

from __future__ import annotations

import os
import threading
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
