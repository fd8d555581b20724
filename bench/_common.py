"""Shared helpers of the nanobox benchmark scripts (not a test suite).

Every measurement module (``startup``, ``memory``, ``scaling``, ``proxy``,
``accounting``) can run alone (``python bench/startup.py --quick``) and is
also driven by ``bench/run_all.py``, which runs each one in its own process
and merges their JSON. This module holds what they share: statistics, the
peers' exact command lines (from ``shared/docs/perf-baselines.md``), process
trees and ``smaps_rollup``, cgroups, machine facts and markdown tables.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
PEERS_DIR = os.path.join(BENCH_DIR, ".peers")
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
VENV = os.path.join(REPO, ".venv")
VENV_PYTHON = os.path.join(VENV, "bin", "python")
VENV_NANOBOX = os.path.join(VENV, "bin", "nanobox")

# The workload interpreter used inside and outside sandboxes (same binary on
# both sides, so the comparison is of the sandbox, not of the interpreter).
SYSTEM_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

SRT_SETTINGS: dict[str, Any] = {
    "network": {"allowedDomains": [], "deniedDomains": []},
    "filesystem": {"denyRead": [], "allowRead": [], "allowWrite": [], "denyWrite": []},
}


def compile_nanobox() -> str | None:
    """Byte-compile the installed nanobox package, as ``pip install`` does
    for a user (an editable install compiles on first import instead; under
    ``PYTHONDONTWRITEBYTECODE`` it never does, and every cold start would
    compile the changed modules again). Returns an error, or None."""
    if not os.access(VENV_PYTHON, os.X_OK):
        return f"{VENV_PYTHON} not found"
    code = (
        "import os, nanobox, compileall; "
        "compileall.compile_dir(os.path.dirname(nanobox.__file__), quiet=1)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    p = subprocess.run([VENV_PYTHON, "-c", code], capture_output=True, text=True, env=env)
    return None if p.returncode == 0 else (p.stderr or p.stdout)[-300:]


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in 0..100."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values: Sequence[float], scale: float = 1.0) -> dict[str, Any]:
    """median, p10, p90, mean, min, max, n of ``values`` (times ``scale``)."""
    if not values:
        return {"n": 0, "median": None, "p10": None, "p90": None}
    vs = [v * scale for v in values]
    return {
        "n": len(vs),
        "median": percentile(vs, 50),
        "p10": percentile(vs, 10),
        "p90": percentile(vs, 90),
        "mean": sum(vs) / len(vs),
        "min": min(vs),
        "max": max(vs),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def alternating(items: Sequence[Any], round_no: int) -> list[Any]:
    """The order of ``items`` in round ``round_no``: reversed every other round."""
    return list(items) if round_no % 2 == 0 else list(reversed(items))


# --------------------------------------------------------------------------- peers


def srt_path() -> str | None:
    local = os.path.join(PEERS_DIR, "node_modules", ".bin", "srt")
    if os.access(local, os.X_OK):
        return local
    return shutil.which("srt")


def srt_settings_file(directory: str, allowed: Sequence[str] = ()) -> str:
    data = json.loads(json.dumps(SRT_SETTINGS))
    data["network"]["allowedDomains"] = list(allowed)
    path = os.path.join(directory, "srt.json" if not allowed else "srt-net.json")
    with open(path, "w") as fh:
        json.dump(data, fh)
    return path


def peer_prefixes(config_dir: str, *, full_firejail: bool = False) -> dict[str, list[str] | str]:
    """The peers' command prefixes (exactly as in perf-baselines.md), or the
    reason a peer is missing (a string)."""
    out: dict[str, list[str] | str] = {}
    unshare = shutil.which("unshare")
    out["unshare"] = (
        [
            unshare,
            "--user",
            "--map-root-user",
            "--pid",
            "--fork",
            "--mount-proc",
            "--net",
            "--ipc",
            "--uts",
            "--",
        ]
        if unshare
        else "unshare not found (apt-get install util-linux)"
    )
    bwrap = shutil.which("bwrap")
    out["bwrap"] = (
        [
            bwrap,
            "--unshare-all",
            "--die-with-parent",
            "--ro-bind",
            "/",
            "/",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--tmpfs",
            "/tmp",
            "--",
        ]
        if bwrap
        else "bwrap not found (bash bench/install_peers.sh)"
    )
    firejail = shutil.which("firejail")
    base = [firejail or "firejail", "--noprofile", "--quiet", "--net=none", "--private-tmp"]
    out["firejail"] = [*base, "--"] if firejail else "firejail not found"
    if full_firejail:
        out["firejail-full"] = (
            [*base, "--private-dev", "--ipc-namespace", "--hostname=sbx", "--read-only=/", "--"]
            if firejail
            else "firejail not found"
        )
    srt = srt_path()
    out["srt"] = (
        [srt, "--settings", srt_settings_file(config_dir), "--"]
        if srt
        else "sandbox-runtime (srt) not installed (bash bench/install_peers.sh; needs npm)"
    )
    return out


def check_peer(prefix: list[str], cwd: str, timeout: float = 60.0) -> str | None:
    """Run ``PREFIX /bin/true`` once: None when it works, else the error."""
    try:
        proc = subprocess.run(
            [*prefix, "/bin/true"],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{type(exc).__name__}: {exc}"
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()
        return f"exit {proc.returncode}: {' / '.join(err[-3:])[:300]}"
    return None


def working_peers(
    config_dir: str, cwd: str, names: Sequence[str], **kwargs: Any
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(usable prefixes, skipped peer -> reason) for ``names``."""
    prefixes = peer_prefixes(config_dir, **kwargs)
    usable: dict[str, list[str]] = {}
    skipped: dict[str, str] = {}
    for name in names:
        prefix = prefixes.get(name)
        if prefix is None:
            continue
        if isinstance(prefix, str):
            skipped[name] = prefix
            continue
        err = check_peer(prefix, cwd)
        if err is None:
            usable[name] = prefix
        else:
            skipped[name] = f"`{name} /bin/true` failed: {err}"
    return usable, skipped


def nanobox_allowlist_support() -> tuple[bool, str]:
    """Does ``nanobox.Network`` have an allowlist (proxy) mode yet?"""
    import dataclasses

    import nanobox

    fields = [f.name for f in dataclasses.fields(nanobox.Network)]
    extra = [f for f in fields if f != "mode"]
    modes = "none/host"
    try:
        nanobox.Network(mode="allowlist")
        modes += "/allowlist"
    except Exception:  # noqa: BLE001 - any refusal means "no such mode"
        pass
    if extra or "allowlist" in modes:
        return True, f"nanobox.Network fields: {', '.join(fields)}; modes {modes}"
    return False, (
        f"nanobox.Network has no allowlist mode yet (fields: {', '.join(fields)}; modes: {modes})"
    )


def allowlist_network(rules: Sequence[str]) -> Any:
    """An allowlisting ``nanobox.Network`` for ``rules`` (tries the
    spellings nanobox has used: ``Network.allow(...)``, ``mode="allowlist"``)."""
    import nanobox

    errors = []
    allow = getattr(nanobox.Network, "allow", None)
    if callable(allow):
        try:
            return allow(*rules)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"Network.allow: {exc}")
    spellings: list[dict[str, Any]] = [
        {"mode": "allowlist", "allowed": tuple(rules)},
        {"mode": "allowlist", "allow": tuple(rules)},
    ]
    for kwargs in spellings:
        try:
            return nanobox.Network(**kwargs)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"Network({kwargs}): {exc}")
    raise RuntimeError("cannot build an allowlist Network: " + "; ".join(errors))


# --------------------------------------------------------------------------- processes


def spawn_devnull(
    argv: list[str], cwd: str | None = None, env: dict[str, str] | None = None
) -> int:
    """posix_spawn ``argv`` with stdio on /dev/null (like ``hyperfine -N``)."""
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
    ]
    old = None
    if cwd is not None:
        old = os.open(".", os.O_RDONLY | os.O_CLOEXEC)
        os.chdir(cwd)
    try:
        environ = env if env is not None else os.environ
        return os.posix_spawn(argv[0], argv, environ, file_actions=actions)
    finally:
        if old is not None:
            os.fchdir(old)
            os.close(old)


def time_command(argv: list[str], cwd: str | None = None) -> tuple[float, int]:
    """Wall seconds from spawn to reaping, and the wait status."""
    t0 = time.perf_counter()
    pid = spawn_devnull(argv, cwd)
    _, status = os.waitpid(pid, 0)
    return time.perf_counter() - t0, status


def children_map() -> dict[int, list[int]]:
    """ppid -> [pid] for every process on the host."""
    out: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out.setdefault(ppid, []).append(int(name))
    return out


def descendants(roots: Iterable[int], cmap: dict[int, list[int]] | None = None) -> list[int]:
    """``roots`` and every process below them."""
    cmap = children_map() if cmap is None else cmap
    out: list[int] = []
    stack = list(roots)
    seen: set[int] = set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        out.append(pid)
        stack.extend(cmap.get(pid, ()))
    return out


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def threads(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def smaps_rollup(pid: int) -> dict[str, int]:
    """Pss, Rss, Private_Dirty, Private_Clean, ... of ``pid`` in bytes ({} if gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    except OSError:
        return {}
    return out


def kill_tree(roots: Iterable[int]) -> None:
    """SIGKILL ``roots`` and everything below them (several passes)."""
    for _ in range(5):
        pids = descendants(roots)
        alive = False
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                alive = True
        if not alive:
            return
        time.sleep(0.05)


def raise_nofile(target: int = 1 << 16) -> int:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(target, soft)
    want = max(soft, min(want, target) if hard == resource.RLIM_INFINITY else want)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (OSError, ValueError):
        return soft
    return want


def meminfo_used() -> int:
    """MemTotal - MemAvailable in bytes (system wide)."""
    vals: dict[str, int] = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            vals[key] = int(rest.split()[0]) * 1024
    return vals["MemTotal"] - vals["MemAvailable"]


# --------------------------------------------------------------------------- cgroups


class MemoryGroup:
    """A memory cgroup of the benchmark's own (a child of the caller's
    group, v1 ``memory`` or v2), to measure a driver and its children."""

    def __init__(self, name: str) -> None:
        self.path: str | None = None
        self.parent: str | None = None
        self.version = 0
        self.error: str | None = None
        try:
            own = _own_cgroups()
            if "memory" in own and os.path.isdir("/sys/fs/cgroup/memory"):
                parent = "/sys/fs/cgroup/memory" + own["memory"]
                self.version = 1
            elif "" in own and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
                parent = "/sys/fs/cgroup" + own[""]
                self.version = 2
            else:
                raise OSError("no memory cgroup found")
            path = os.path.join(parent, name)
            os.makedirs(path, exist_ok=True)
            self.parent = parent
            self.path = path
        except OSError as exc:
            self.error = f"cannot create a memory cgroup: {exc}"

    def join(self, pid: int | None = None) -> bool:
        if self.path is None:
            return False
        try:
            with open(os.path.join(self.path, "cgroup.procs"), "w") as fh:
                fh.write(str(pid or os.getpid()))
            if self.version == 1:
                with (
                    contextlib.suppress(OSError),
                    open(os.path.join(self.path, "memory.max_usage_in_bytes"), "w") as fh,
                ):
                    fh.write("0")
            return True
        except OSError as exc:
            self.error = f"cannot join {self.path}: {exc}"
            return False

    def usage(self) -> int | None:
        if self.path is None:
            return None
        name = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
        try:
            with open(os.path.join(self.path, name)) as fh:
                return int(fh.read())
        except OSError:
            return None

    def peak(self) -> int | None:
        if self.path is None:
            return None
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            with open(os.path.join(self.path, name)) as fh:
                return int(fh.read())
        except OSError:
            return None

    def remove(self) -> None:
        """Leave the group (back to the parent) and remove it."""
        if self.path is None:
            return
        if self.parent is not None:
            with (
                contextlib.suppress(OSError),
                open(os.path.join(self.parent, "cgroup.procs"), "w") as fh,
            ):
                fh.write(str(os.getpid()))
        for _ in range(50):
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)


def _own_cgroups() -> dict[str, str]:
    out: dict[str, str] = {}
    with open("/proc/self/cgroup") as fh:
        for line in fh:
            _hid, ctls, path = line.rstrip("\n").split(":", 2)
            if ctls == "":
                out[""] = path
            for ctl in ctls.split(","):
                if ctl:
                    out[ctl] = path
    return out


def nanobox_cgroup_usage() -> int | None:
    """Memory charged to nanobox's run groups (the hierarchical usage of its
    base group), or None when nanobox places no groups on this host."""
    try:
        from nanobox._linux import plan

        placement = plan.cgroup_placement()
        bases = getattr(placement, "bases", None)
        if not bases:
            return None
        if "memory" in bases:
            path, name = bases["memory"], "memory.usage_in_bytes"
        elif "" in bases:
            path, name = bases[""], "memory.current"
        else:
            return None
        with open(os.path.join(path, name)) as fh:
            return int(fh.read())
    except Exception:  # noqa: BLE001 - accounting is best effort
        return None


# --------------------------------------------------------------------------- machine


def _first_line(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).decode(errors="replace").strip()
    return text.splitlines()[0] if text else None


def machine_info() -> dict[str, Any]:
    cpu = None
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
        mem = int(fh.readline().split()[1]) * 1024
    os_name = None
    with contextlib.suppress(OSError), open("/etc/os-release") as fh:
        for line in fh:
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip().strip('"')
    srt = srt_path()
    srt_version = None
    if srt:
        pkg = os.path.join(
            PEERS_DIR, "node_modules", "@anthropic-ai", "sandbox-runtime", "package.json"
        )
        with contextlib.suppress(OSError, ValueError), open(pkg) as fh:
            srt_version = json.load(fh).get("version")
    try:
        import nanobox

        nb_version = nanobox.__version__
    except Exception:  # noqa: BLE001
        nb_version = None
    commit = _first_line(["git", "-C", REPO, "rev-parse", "--short", "HEAD"])
    dirty = _first_line(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"])
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "hostname": platform.node(),
        "kernel": platform.release(),
        "os": os_name,
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_bytes": mem,
        "loadavg": os.getloadavg(),
        "uid": os.getuid(),
        "python": sys.version.split()[0],
        "system_python": _first_line([SYSTEM_PYTHON, "-V"]),
        "nanobox": nb_version,
        "commit": f"{commit}{' (dirty tree)' if dirty else ''}" if commit else None,
        "bwrap": _first_line(["bwrap", "--version"]),
        "firejail": _first_line(["firejail", "--version"]),
        "unshare": _first_line(["unshare", "--version"]),
        "hyperfine": _first_line(["hyperfine", "--version"]),
        "node": _first_line(["node", "--version"]),
        "srt": srt_version,
    }


# --------------------------------------------------------------------------- misc


@contextlib.contextmanager
def workdir(prefix: str = "nanobox-bench-") -> Iterator[str]:
    """An empty directory (the workload's cwd and nanobox's workspace)."""
    path = tempfile.mkdtemp(prefix=prefix)
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def guarded(errors: dict[str, str], key: str, fn: Callable[[], Any]) -> Any:
    """Call ``fn``; on any exception record it under ``key`` and return None."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a failing variant must not end the run
        errors[key] = f"{type(exc).__name__}: {exc}"
        return None


def write_json(path: str, data: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, default=str)
    os.replace(tmp, path)


def private_tmpdir() -> str:
    """Point TMPDIR (for this process and everything it starts) at a fresh
    directory removed at exit: some peers leave files in the temporary
    directory (sandbox-runtime an ``srt-mux-PID-0.sock`` per run)."""
    import atexit
    import shutil

    if os.environ.get("NANOBOX_BENCH_TMPDIR"):
        return os.environ["NANOBOX_BENCH_TMPDIR"]  # a parent made one
    path = tempfile.mkdtemp(prefix="nanobox-bench-tmp-")
    os.chmod(path, 0o1777)  # the `nobody` worker's too
    os.environ["TMPDIR"] = os.environ["NANOBOX_BENCH_TMPDIR"] = path
    tempfile.tempdir = None  # re-read TMPDIR
    atexit.register(shutil.rmtree, path, True)
    return path


def base_args(description: str) -> Any:
    """The options every module takes (and a private TMPDIR for the run)."""
    import argparse

    private_tmpdir()
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny counts (development)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    return p


def emit(
    result: dict[str, Any], json_path: str | None, table: Callable[[dict[str, Any]], str]
) -> None:
    if json_path:
        write_json(json_path, result)
    print(table(result))
