"""cgroups: limits and accounting for one run, on v2, v1 and hybrid hosts.

Where groups live (every group nanobox creates has ``nanobox`` in its path,
and nanobox never writes to a group it did not create, except to enable
controllers for its own subtree and to move its own processes to a leaf):

- **v2** (unified hierarchy with controllers): as root, ``<mount>/nanobox``;
  otherwise the caller's own group when it is delegated (writable, as under
  systemd's ``user@UID.service``). Controllers must be enabled in the
  parent's ``cgroup.subtree_control``; when the "no internal processes" rule
  refuses (EBUSY: the parent holds processes, e.g. in a container's cgroup
  namespace) nanobox moves the caller's processes of that group to a leaf
  ``nanobox-leaf`` first, then enables them. A process that starts in that
  leaf later (a child of a shell moved there) places its runs in the same
  base. A base that exists but is not this process's to use (root's, for
  a user) is skipped.
- **v1 / hybrid** (a mount per controller): as root, ``<mount>/nanobox`` in
  each hierarchy used (memory, pids, cpu, cpuacct); otherwise the caller's
  own group in that hierarchy if writable. Hybrid hosts' controller-less v2
  tree is not used.

Each run gets ``<base>/<server pid>.<run id>``; the fork server creates it,
the first sandbox process joins it before creating namespaces (so every
instruction of the command is charged), and the server reads the
accounting and removes it once the sandbox's init has exited. Groups left by
a server that was SIGKILLed are removed by the next server's start-up sweep.
"""

from __future__ import annotations

import errno
import os
import time

TYPE_CHECKING = False  # not ``typing``'s: the fork server starts without it
if TYPE_CHECKING:
    from typing import Any

CONTROLLERS = ("memory", "pids", "cpu")
V1_NEEDED = ("memory", "pids", "cpu", "cpuacct")
PREFIX = "nanobox"
LEAF = "nanobox-leaf"
_USER_HZ = os.sysconf("SC_CLK_TCK")


def _read(path: str) -> str:
    """A cgroup file's text (read with ``os``: a run's report reads about
    seven, and a text-mode ``open`` costs several times the syscalls)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return os.fsdecode(b"".join(chunks))
    finally:
        os.close(fd)


def _read_small(path: str) -> str:
    """A file of a few values (``cpuacct.usage``, ``memory.events``): the
    kernel hands all of it to a single read of a page."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.fsdecode(os.read(fd, 4096))
    finally:
        os.close(fd)


def _read_optional(path: str) -> str | None:
    """``_read_small``, or None where the kernel has no such file."""
    try:
        return _read_small(path)
    except FileNotFoundError:
        return None


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


# Plain classes, not dataclasses: the fork server imports this module, and
# ``dataclasses`` (with ``inspect``) would add ~10 ms to its start.
class Layout:
    """The cgroup hierarchies mounted here."""

    __slots__ = ("own", "v1", "v2")

    def __init__(self) -> None:
        self.v2: str | None = None
        self.v1: dict[str, str] = {}  # controller -> mount point
        self.own: dict[str, str] = {}  # controller ("" for v2) -> own path

    @property
    def kind(self) -> str:
        if self.v1 and self.v2:
            return "hybrid"
        if self.v2:
            return "v2"
        return "v1" if self.v1 else "none"

    def v2_controllers(self) -> list[str]:
        if not self.v2:
            return []
        try:
            return _read(os.path.join(self.v2, "cgroup.controllers")).split()
        except OSError:
            return []


def detect() -> Layout:
    layout = Layout()
    try:
        mountinfo = _read("/proc/self/mountinfo")
    except OSError:
        return layout
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        parts, rparts = left.split(), right.split()
        if len(parts) < 5 or len(rparts) < 3:
            continue
        fstype, mnt = rparts[0], parts[4]
        if fstype == "cgroup2" and layout.v2 is None:
            layout.v2 = mnt
        elif fstype == "cgroup":
            for opt in rparts[2].split(","):
                if opt in V1_NEEDED or opt in ("freezer",):
                    layout.v1.setdefault(opt, mnt)
    try:
        for line in _read("/proc/self/cgroup").splitlines():
            _hid, ctls, path = line.split(":", 2)
            if ctls == "":
                layout.own[""] = path
            for ctl in ctls.split(","):
                layout.own[ctl] = path
    except OSError:
        pass
    return layout


class CgroupUnavailable(Exception):
    """No writable, delegated place for the needed controllers."""


class Placement:
    """Where this process's sandboxes get their groups."""

    __slots__ = ("bases", "controllers", "unused", "version")

    def __init__(
        self,
        version: int,
        bases: dict[str, str],
        controllers: tuple[str, ...],
        unused: dict[str, str] | None = None,
    ) -> None:
        self.version = version  # 1 or 2
        self.bases = bases  # controller (or "" for v2) -> base directory
        self.controllers = controllers
        # v1 hierarchies these runs need no group in (swept all the same).
        self.unused = unused or {}

    def __repr__(self) -> str:
        return f"Placement({self.version}, {self.bases!r}, {self.controllers!r})"

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "bases": self.bases, "controllers": self.controllers}

    def for_run(self, *, pids: bool, cpus: bool) -> dict[str, Any]:
        """``to_json`` for a run with (or without) a pids and a cpus limit.
        On v1 a group per hierarchy costs its mkdir, its rmdir and a
        migration (~0.2 ms, ~0.1 ms and an RCU grace period): memory and
        cpuacct for the accounting always, pids and cpu only for their
        limits (the others are still swept, see ``sweep``)."""
        where = self.to_json()
        if self.version == 1:
            unused = {c for c, limited in (("pids", pids), ("cpu", cpus)) if not limited}
            where["bases"] = {c: b for c, b in self.bases.items() if c not in unused}
            where["unused"] = {c: b for c, b in self.bases.items() if c in unused}
        return where


def _enable_controllers(group: str, wanted: list[str]) -> None:
    """Enable ``wanted`` in ``group``'s subtree_control, moving our own
    processes to a leaf first if the no-internal-processes rule demands it."""
    ctl_file = os.path.join(group, "cgroup.subtree_control")
    have = set(_read(ctl_file).split())
    missing = [c for c in wanted if c not in have]
    if not missing:
        return
    value = " ".join(f"+{c}" for c in missing)
    try:
        _write(ctl_file, value)
        return
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
    leaf = os.path.join(group, LEAF)
    os.makedirs(leaf, exist_ok=True)
    for attempt in range(5):
        for pid in _read(os.path.join(group, "cgroup.procs")).split():
            try:
                _write(os.path.join(leaf, "cgroup.procs"), pid)
            except ProcessLookupError:
                pass  # it exited meanwhile (the server's probe, say)
        try:
            _write(ctl_file, value)
            return
        except OSError as exc:
            # A process forked there meanwhile (the client and its server
            # place their runs at the same time): move it too.
            if exc.errno != errno.EBUSY or attempt == 4:
                raise


def _check_usable(base: str) -> None:
    """Can this process make its runs' groups in ``base`` and move processes
    there? A base that exists already may be another user's: root's
    ``<mount>/nanobox`` on a host where root has run nanobox, which a user
    with a group of their own must not take for theirs."""
    if not (
        os.access(base, os.W_OK | os.X_OK, effective_ids=True)
        and os.access(os.path.join(base, "cgroup.procs"), os.W_OK, effective_ids=True)
    ):
        raise PermissionError(errno.EACCES, "not writable")


def place(layout: Layout, needed: tuple[str, ...] = CONTROLLERS) -> Placement:
    """Find (creating if needed) the base groups for this process's runs."""
    v2_ctl = layout.v2_controllers()
    if layout.v2 and all(c in v2_ctl for c in needed):
        candidates = [layout.v2]
        own = layout.own.get("")
        if own is not None and os.path.basename(own) == LEAF and own != "/" + LEAF:
            # The leaf an earlier process of ours moved this one's group to
            # (a shell's children start there too): its parent is the
            # caller's group, already set up, not one more level to make.
            # (If that parent is not the caller's after all, the group
            # itself is tried next.)
            candidates.append(layout.v2 + os.path.dirname(own))
        if own is not None and own != "/":
            candidates.append(layout.v2 + own)
        errors = []
        for parent in candidates:
            try:
                _enable_controllers(parent, list(needed))
                base = os.path.join(parent, PREFIX)
                os.makedirs(base, exist_ok=True)
                _check_usable(base)
                _enable_controllers(base, list(needed))
                return Placement(2, {"": base}, needed)
            except OSError as exc:
                errors.append(f"{parent}: {exc.strerror}")
        raise CgroupUnavailable("no writable cgroup v2 group: " + "; ".join(errors))
    if layout.v1:
        wanted = [c for c in V1_NEEDED if c in needed or (c == "cpuacct" and "cpu" in needed)]
        missing = [c for c in wanted if c not in layout.v1]
        if missing:
            raise CgroupUnavailable(f"cgroup v1 controllers not mounted: {', '.join(missing)}")
        bases: dict[str, str] = {}
        for ctl in wanted:
            mnt = layout.v1[ctl]
            tried = []
            for parent in (mnt, mnt + layout.own.get(ctl, "/")):
                base = os.path.join(parent, PREFIX)
                try:
                    os.makedirs(base, exist_ok=True)
                    _check_usable(base)
                    bases[ctl] = base
                    break
                except OSError as exc:
                    tried.append(f"{base}: {exc.strerror}")
            else:
                raise CgroupUnavailable("no writable cgroup v1 group: " + "; ".join(tried))
        return Placement(1, bases, needed)
    if layout.v2:
        raise CgroupUnavailable(
            f"the cgroup v2 tree at {layout.v2} has no {'/'.join(needed)} controllers "
            f"(available: {' '.join(v2_ctl) or 'none'})"
        )
    raise CgroupUnavailable("no cgroup hierarchy is mounted")


class RunGroup:
    """The group(s) of one run."""

    def __init__(self, placement: Placement, name: str) -> None:
        self.version = placement.version
        self.paths: dict[str, str] = {
            ctl: os.path.join(base, name) for ctl, base in placement.bases.items()
        }

    @classmethod
    def create(cls, placement: Placement, name: str, limits: dict[str, Any]) -> RunGroup:
        group = cls(placement, name)
        try:
            for path in group.dirs():
                os.mkdir(path)
            group.apply(limits)
        except BaseException:
            group.remove()
            raise
        return group

    def apply(self, limits: dict[str, Any]) -> None:
        mem, pids, cpus = limits.get("memory"), limits.get("pids"), limits.get("cpus")
        if self.version == 2:
            g = self.paths[""]
            if mem is not None:
                _write(f"{g}/memory.max", str(mem))
                try:
                    _write(f"{g}/memory.swap.max", "0")
                except FileNotFoundError:  # no swap accounting: swap cannot be used
                    pass
                # No memory.oom.group: the OOM killer should take the command's
                # biggest process, not the init that reports the accounting.
            if pids is not None:
                _write(f"{g}/pids.max", str(pids))
            if cpus is not None:
                period = 100_000
                _write(f"{g}/cpu.max", f"{max(1000, int(cpus * period))} {period}")
            return
        if mem is not None and "memory" in self.paths:
            g = self.paths["memory"]
            _write(f"{g}/memory.limit_in_bytes", str(mem))
            if os.path.exists(f"{g}/memory.memsw.limit_in_bytes"):
                _write(f"{g}/memory.memsw.limit_in_bytes", str(mem))
            try:
                _write(f"{g}/memory.swappiness", "0")
            except OSError:
                pass
        if pids is not None and "pids" in self.paths:
            _write(f"{self.paths['pids']}/pids.max", str(pids))
        if cpus is not None and "cpu" in self.paths:
            g = self.paths["cpu"]
            _write(f"{g}/cpu.cfs_period_us", "100000")
            _write(f"{g}/cpu.cfs_quota_us", str(max(1000, int(cpus * 100_000))))

    def dirs(self) -> list[str]:
        """The group's directories, once each (co-mounted v1 controllers,
        e.g. systemd's cpu,cpuacct, share one)."""
        return list(dict.fromkeys(self.paths.values()))

    def procs_files(self) -> list[str]:
        return [os.path.join(p, "cgroup.procs") for p in self.dirs()]

    def join_files(self) -> list[str]:
        """The files a single-threaded process writes to join the group
        (``join``). On v1 that is each hierarchy's ``tasks``, where a
        thread moving itself (``0``) is not a threadgroup migration: the
        kernel then skips the global threadgroup lock, whose write side
        waits for an RCU grace period (5-17 ms here, against ~0.2 ms) and
        stalls every fork and exit on the host meanwhile. For a process
        with one thread, moving the thread moves the process (its memory
        is charged to its leader's group). v2 allows a thread to move on
        its own only inside a threaded subtree: ``cgroup.procs`` there."""
        name = "tasks" if self.version == 1 else "cgroup.procs"
        return [os.path.join(p, name) for p in self.dirs()]

    def cpu_seconds(self) -> float | None:
        """CPU time of the group so far (for the CPU-time limit's polling),
        or None when it cannot be read."""
        try:
            if self.version == 2:
                for line in _read_small(f"{self.paths['']}/cpu.stat").splitlines():
                    if line.startswith("usage_usec "):
                        return int(line.split()[1]) / 1e6
                return None
            if "cpuacct" in self.paths:
                return int(_read_small(f"{self.paths['cpuacct']}/cpuacct.usage")) / 1e9
        except (OSError, ValueError):
            pass
        return None

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        try:
            if self.version == 2:
                g = self.paths[""]
                cpu = dict(line.split() for line in _read_small(f"{g}/cpu.stat").splitlines())
                out["cpu_s"] = int(cpu["usage_usec"]) / 1e6
                out["user_s"] = int(cpu["user_usec"]) / 1e6
                out["system_s"] = int(cpu["system_usec"]) / 1e6
                if (text := _read_optional(f"{g}/memory.peak")) is not None:
                    out["peak_bytes"] = int(text)
                if (text := _read_optional(f"{g}/memory.events")) is not None:
                    ev = dict(line.split() for line in text.splitlines())
                    out["oom_kills"] = int(ev.get("oom_kill", 0))
                    out["memory_max_events"] = int(ev.get("max", 0))
                if (text := _read_optional(f"{g}/pids.events")) is not None:
                    ev = dict(line.split() for line in text.splitlines())
                    out["pids_max_events"] = int(ev.get("max", 0))
                if (text := _read_optional(f"{g}/pids.peak")) is not None:
                    out["pids_peak"] = int(text)
                return out
            if "cpuacct" in self.paths:
                g = self.paths["cpuacct"]
                out["cpu_s"] = int(_read_small(f"{g}/cpuacct.usage")) / 1e9
                st = dict(line.split() for line in _read_small(f"{g}/cpuacct.stat").splitlines())
                out["user_s"] = int(st["user"]) / _USER_HZ
                out["system_s"] = int(st["system"]) / _USER_HZ
            if "memory" in self.paths:
                g = self.paths["memory"]
                out["peak_bytes"] = int(_read_small(f"{g}/memory.max_usage_in_bytes"))
                oom = dict(
                    line.split() for line in _read_small(f"{g}/memory.oom_control").splitlines()
                )
                out["oom_kills"] = int(oom.get("oom_kill", 0))
                out["memory_max_events"] = int(_read_small(f"{g}/memory.failcnt"))
            if "pids" in self.paths:
                g = self.paths["pids"]
                ev = dict(line.split() for line in _read_small(f"{g}/pids.events").splitlines())
                out["pids_max_events"] = int(ev.get("max", 0))
                if (peak := _read_optional(f"{g}/pids.peak")) is not None:
                    out["pids_peak"] = int(peak)
        except (OSError, KeyError, ValueError) as exc:
            out["error"] = str(exc)
        return out

    def kill(self) -> None:
        """Kill whatever is still in the group (normally nothing: the pid
        namespace died with its init)."""
        if self.version == 2:
            try:
                _write(f"{self.paths['']}/cgroup.kill", "1")
                return
            except OSError:
                pass
        for procs in self.procs_files():
            try:
                for pid in _read(procs).split():
                    try:
                        os.kill(int(pid), 9)
                    except ProcessLookupError:
                        pass
            except OSError:
                pass

    def remove(self) -> bool:
        """Remove the group(s); True when nothing is left."""
        ok = True
        for path in self.dirs():
            for attempt in range(50):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        ok = False
                        break
                    if attempt == 5:
                        self.kill()
                    time.sleep(0.002 * (attempt + 1))
            else:
                ok = False
        return ok


def join(files: list[str]) -> None:
    """Move the calling (single-threaded) process into a group through its
    ``RunGroup.join_files``."""
    me = str(os.getpid()).encode()
    for path in files:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0" if path.endswith("/tasks") else me)
        finally:
            os.close(fd)


def server_ident(pid: int | None = None) -> str:
    """``<pid>_<start time>`` of a process: unique even across pid reuse."""
    pid = os.getpid() if pid is None else pid
    with open(f"/proc/{pid}/stat", "rb") as fh:
        start = fh.read().rsplit(b")", 1)[1].split()[19].decode()
    return f"{pid}_{start}"


def sweep(placement: Placement) -> int:
    """Remove groups left by fork servers that no longer exist."""
    removed = 0
    for base in [*placement.bases.values(), *placement.unused.values()]:
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for name in names:
            owner, dot, _run = name.partition(".")
            pid, _, start = owner.partition("_")
            if not dot or not pid.isdigit() or not start:
                continue
            if _alive(int(pid), owner):
                continue
            path = os.path.join(base, name)
            try:
                for pid in _read(os.path.join(path, "cgroup.procs")).split():
                    try:
                        os.kill(int(pid), 9)
                    except ProcessLookupError:
                        pass
                for _ in range(50):
                    try:
                        os.rmdir(path)
                        removed += 1
                        break
                    except OSError as exc:
                        if exc.errno != errno.EBUSY:
                            break
                        time.sleep(0.01)
            except OSError:
                continue
    return removed


def _alive(pid: int, ident: str) -> bool:
    """Is the process that created groups as ``ident`` still running?"""
    try:
        return server_ident(pid) == ident
    except (OSError, IndexError):
        return False
