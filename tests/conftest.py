"""Shared helpers. Every test runs real sandboxes against the real kernel."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")

PY = sys.executable
# The interpreter to run *inside* sandboxes: a root caller's sandbox runs as
# an unprivileged uid, which cannot reach an interpreter under /root (pyenv).
SPY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
# Under the VM lane's software emulation everything is ~20x slower: timing
# tolerances widen and long repetitions shrink.
SLOW = os.environ.get("NANOBOX_VM_LANE") == "1"
# wait_until's timeouts stretch by this much there: they bound how long a
# state may take to come (never that it does not), and a CI host's emulated
# guest ran up to ~2x slower than this machine's.
WAIT_SCALE = 5.0 if SLOW else 1.0
IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root")
    for item in items:
        if "root_only" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Path]:
    """A fresh directory used as the sandbox's cwd (its writable workspace)."""
    ws = tmp_path / "ws"
    ws.mkdir()
    if IS_ROOT:
        # A root caller's command runs as an unprivileged uid, which must be
        # able to reach its workspace: pytest makes its directories 0700.
        # (Under /tmp this is moot -- the sandbox's /tmp is its own -- but
        # the VM lane keeps the tests' directories on /vmtmp.)
        for parent in ws.parents:
            if str(parent) in ("/", "/tmp"):
                break
            st = parent.stat()
            if st.st_uid == 0 and not st.st_mode & 0o001:
                parent.chmod((st.st_mode & 0o7777) | 0o755)
    old = os.getcwd()
    os.chdir(ws)
    try:
        yield ws
    finally:
        os.chdir(old)


@pytest.fixture
def marker() -> str:
    """A unique string to find processes by their command line."""
    return f"nanobox-test-{uuid.uuid4().hex}"


def pids_with(marker: str) -> list[int]:
    """PIDs (host view) of processes whose command line contains ``marker``."""
    found = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                if marker.encode() in fh.read():
                    found.append(int(name))
        except OSError:
            continue
    return found


def wait_until(pred: object, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll ``pred`` until it is true, for up to ``timeout`` seconds
    (``WAIT_SCALE`` times that in the VM lane)."""

    def seen() -> bool | None:
        return True if pred() else None  # type: ignore[operator]

    return wait_for(seen, timeout, interval) is not None


def wait_for(
    get: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.02
) -> T | None:
    """Poll ``get`` until it returns something (not None), for up to
    ``timeout`` seconds (``WAIT_SCALE`` times that in the VM lane); return
    what it returned, or None. For a state that may last only a moment
    (a spare, an unclaimed sandbox built ahead): what was seen is kept,
    not looked for again."""
    deadline = time.monotonic() + timeout * WAIT_SCALE
    while True:
        value = get()
        if value is not None or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


REPO = Path(__file__).resolve().parent.parent


def build_cbin() -> Path:
    """Compile the small C test programs in tests/c (once per content) and
    return their directory.

    Built under /var/tmp, not next to the checkout: the checkout may live
    under /tmp, which is private (invisible) inside a sandbox. The VM lane
    calls this on the host before booting (tools/vm-lane/tests.sh)."""
    import hashlib

    sources = sorted((REPO / "tests" / "c").glob("*.c"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:12]
    out = Path(f"/var/tmp/nanobox-testbin-{os.getuid()}-{digest}")
    out.mkdir(parents=True, exist_ok=True)
    for src in sources:
        exe = out / src.stem
        if not exe.exists():
            tmp = out / f".{src.stem}.{os.getpid()}"
            subprocess.run(["cc", "-O1", "-pthread", "-o", str(tmp), str(src)], check=True)
            os.replace(tmp, exe)
    return out


@pytest.fixture(scope="session")
def cbin() -> Path:
    return build_cbin()


def pid1_of(pid: int) -> int | None:
    """The host pid of PID 1 of ``pid``'s pid namespace (None when gone)."""
    try:
        ns = os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{name}/ns/pid") != ns:
                continue
            with open(f"/proc/{name}/status") as fh:
                nspid = next(ln for ln in fh if ln.startswith("NSpid:")).split()
        except (OSError, StopIteration):
            continue
        if nspid[-1] == "1" and len(nspid) > 2:
            return int(name)
    return None


def descendants(
    root: int, *, skip_zombies: bool = False, prune: tuple[str, ...] = ()
) -> dict[int, str]:
    """Processes below ``root`` (pid -> comm), leaving out the subtrees of
    processes named in ``prune``."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        if skip_zombies and fields[0] == "Z":
            continue
        parents[int(name)] = int(fields[1])
        names[int(name)] = comm
    out: dict[int, str] = {}
    frontier = {root}
    while frontier:
        frontier = {
            pid for pid, ppid in parents.items() if ppid in frontier and names[pid] not in prune
        }
        out.update((pid, names[pid]) for pid in frontier)
    return out


def nanobox_groups() -> set[str]:
    """Every cgroup directory under a nanobox base, on any hierarchy."""
    found = set()
    for root, dirs, _files in os.walk("/sys/fs/cgroup"):
        if os.path.basename(root) == "nanobox":
            found |= {os.path.join(root, d) for d in dirs}
            dirs.clear()
        elif root.count("/") > 6:
            dirs.clear()
    return found


def cgroups_usable() -> bool:
    from nanobox._linux import plan
    from nanobox._linux.cgroups import Placement

    return isinstance(plan.cgroup_placement(), Placement)


def userns_usable() -> bool:
    """Can nanobox build its namespaces here (asks the fork server)?"""
    from nanobox._linux import client

    return client.get_server().userns


def nanobox_cli(
    *args: str, input: bytes | None = None, cwd: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI as a user would (a separate process)."""
    return subprocess.run(
        [PY, "-m", "nanobox", *args],
        input=input,
        capture_output=True,
        cwd=cwd,
        timeout=timeout,
    )


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
