"""A caller that is not root, in a cgroup v2 group delegated to it.

On a pure cgroup v2 host, a user's processes get limits only below a group
delegated to them (what systemd's ``user@UID.service``, or ``systemd-run
--user --scope``, gives: the directory and its ``cgroup.procs``,
``cgroup.threads`` and ``cgroup.subtree_control`` owned by the user). nanobox
then places its runs below the caller's own group, which holds the caller's
processes: the kernel's "no internal processes" rule refuses to enable
controllers there until they are moved to a leaf. Root sets up such a group
here (the VM lane's pure-v2 configuration) and runs nanobox in it as
``nobody``, on a host where root's own base group exists too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import SPY
from test_cgroups import FORKBOMB
from test_filesystem import _python_for_anyone

V2 = "/sys/fs/cgroup"
NEEDED = {"memory", "pids", "cpu"}
NOBODY = 65534


def _pure_v2_with_controllers() -> bool:
    try:
        have = set(Path(V2, "cgroup.controllers").read_text().split())
    except OSError:
        return False
    return NEEDED <= have


def _userns_for_nobody() -> bool:
    """May an unprivileged user create a user namespace here (the VM lane's
    no-userns configurations say no, each its own way)?"""
    for path, off in (
        ("/proc/sys/user/max_user_namespaces", "0"),
        ("/proc/sys/kernel/unprivileged_userns_clone", "0"),
    ):
        try:
            if Path(path).read_text().strip() == off:
                return False
        except OSError:
            pass
    return True


pytestmark = [
    pytest.mark.vm,
    pytest.mark.root_only,
    pytest.mark.skipif(os.geteuid() != 0, reason="sets up a delegated group as root"),
    pytest.mark.skipif(
        not _pure_v2_with_controllers(),
        reason="needs a cgroup v2 tree with memory, pids and cpu at /sys/fs/cgroup (VM lane v2)",
    ),
    pytest.mark.skipif(
        not _userns_for_nobody(),
        reason="no user namespaces for an unprivileged user (see test_nouserns)",
    ),
]

AS_NOBODY = """
import json, sys
import nanobox
from nanobox import Limits, Policy
py, forkbomb = sys.argv[1:3]
out = {}
r = nanobox.run([py, "-c", "b = bytearray(256 << 20)"], policy=Policy(limits=Limits(memory="64M")))
out["memory"] = [r.outcome.value, r.oom_killed, r.peak_memory_bytes]
r = nanobox.run([py, "-c", forkbomb], policy=Policy(limits=Limits(pids=16)), timeout=60)
out["pids"] = [r.outcome.value, r.stdout.decode().strip(), [v.kind for v in r.violations]]
r = nanobox.run(["/bin/true"], policy=Policy(limits=Limits(memory="64M")))
out["true"] = [r.returncode, list(r.degraded)]
print(json.dumps(out))
"""


def _remove_tree(top: Path) -> None:
    """Kill what is left below ``top``, wait until the kernel says the tree
    is empty, then remove its groups bottom-up (each on its own, so one
    that will not go does not keep the rest, or the test's failure, from
    being seen)."""
    (top / "cgroup.kill").write_text("1")
    deadline = time.monotonic() + 10
    while "populated 1" in (top / "cgroup.events").read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    for sub in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _rmdir(sub)
    _rmdir(top)


def _rmdir(path: Path) -> None:
    for _ in range(100):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:  # EBUSY while the last exit is accounted
            time.sleep(0.02)
    warnings.warn(f"cgroup {path} could not be removed", stacklevel=1)


@pytest.fixture(params=["plain", "named-leaf"])
def delegated(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A group with the controllers, owned by ``nobody`` as systemd
    delegates one; removed afterwards (every group below it too).
    ``named-leaf``: the delegated group is itself called ``nanobox-leaf``
    (a name nanobox gives its own leaves), below a group of root's: its
    parent is not the caller's, so nanobox must use the group itself."""
    root_ctl = Path(V2, "cgroup.subtree_control")
    missing = NEEDED - set(root_ctl.read_text().split())
    if missing:
        root_ctl.write_text(" ".join(f"+{c}" for c in sorted(missing)))
    # Root's own base exists, as on a host where root has run nanobox: a
    # user's runs used to be placed there, and failed to make their groups.
    from nanobox._linux import cgroups

    assert cgroups.place(cgroups.detect()).bases == {"": f"{V2}/nanobox"}
    top = Path(V2, f"nanobox-test-delegated-{uuid.uuid4().hex[:8]}")
    top.mkdir()
    try:
        group = top
        if request.param == "named-leaf":
            (top / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in sorted(NEEDED)))
            group = top / "nanobox-leaf"
            group.mkdir()
        for name in ("", "cgroup.procs", "cgroup.threads", "cgroup.subtree_control"):
            os.chown(group / name, NOBODY, NOBODY)
        yield group
    finally:
        _remove_tree(top)


def test_limits_hold_in_a_group_delegated_to_the_caller(delegated: Path) -> None:
    src = os.path.dirname(os.path.dirname(__import__("nanobox").__file__))
    py = _python_for_anyone()
    # Root moves the child into the group, then it becomes nobody and runs
    # nanobox there (as a login shell in user@UID.service would).
    enter = (
        "import os, sys\n"
        "open(sys.argv[1], 'w').write(str(os.getpid()))\n"
        f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n"
        "os.execv(sys.argv[2], sys.argv[2:])\n"
    )
    outs = []
    ws = Path(f"/var/tmp/nanobox-test-{uuid.uuid4().hex}")  # (pytest's tmp_path is 0700)
    try:
        ws.mkdir()
        os.chown(ws, NOBODY, NOBODY)
        # First from the group itself; then from the leaf nanobox moved the
        # caller's processes to, where a shell's later children start.
        for start in (delegated, delegated / "nanobox-leaf"):
            p = subprocess.run(
                [py, "-c", enter, str(start / "cgroup.procs"), py, "-c", AS_NOBODY, SPY, FORKBOMB],
                cwd=ws,
                env={"PATH": os.environ["PATH"], "HOME": str(ws), "PYTHONPATH": src},
                capture_output=True,
                timeout=300,
            )
            assert p.returncode == 0, (start, p.stdout, p.stderr[-2000:])
            outs.append(json.loads(p.stdout.decode().strip().splitlines()[-1]))
    finally:
        shutil.rmtree(ws, ignore_errors=True)
    for out in outs:
        _check(out)
    # nanobox's groups are below the caller's own: its leaf (its processes
    # were moved there to enable the controllers) and its base, no run's
    # group left, and no second leaf nested in the first.
    below = sorted(str(p.relative_to(delegated)) for p in delegated.rglob("*") if p.is_dir())
    assert below == ["nanobox", "nanobox-leaf"], below


def _check(out: dict[str, Any]) -> None:
    outcome, oom, peak = out["memory"]
    assert outcome == "memory_limit" and oom is True and peak <= 64 << 20, out
    outcome, forked, kinds = out["pids"]
    # 16 tasks at most: the python process itself and 15 children.
    assert outcome == "exited" and forked == "15" and "pids_limit" in kinds, out
    assert out["true"] == [0, []], out
