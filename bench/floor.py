"""The floor of a forked-Python sandbox: what #7's warm-start goal costs at least.

nanobox's warm start goes through a fork server, a forker and a stage A
built ahead; this script asks what is left without any of that. This
single-threaded process starts sandboxes back to back itself, one at a time,
forking each from itself, and adds nanobox's default protections one step
at a time, side by side with bubblewrap (``bwrap --unshare-all
--die-with-parent --ro-bind / / --proc /proc --dev /dev --tmpfs /tmp``) and
nanobox's warm ``Sandbox.run`` in alternating order, with the machine's CPU
time per run (``/proc/stat``: every process and the kernel's threads):

- ``F0``: the prototype #7 quotes (3.34 ms against bwrap's 6.20 ms, each
  timed on its own): ``fork`` → ``unshare(USER|NS|PID|NET|IPC|UTS|CGROUP)``
  → uid/gid map → ``fork`` (PID 1) → bwrap's mounts (``/`` read-only,
  procfs, tmpfs ``/tmp``, tmpfs ``/dev`` with six devices bound) → ``execv``
  of the command, which is PID 1;
- ``S0``: one Python ``fork`` per sandbox, as nanobox's stage A: the same
  namespaces and id map → ``posix_spawn`` of ``cat`` as PID 1 → the same
  mounts (the procfs of the new pid namespace by its ``pidns`` option,
  Linux 6.18+) → ``posix_spawn`` of the command (PID 2);
- ``S1``: + loopback up and a hostname;
- ``S2``: + the command's Landlock ruleset (nanobox's default plan's paths
  for this directory), ``no_new_privs``, every capability dropped;
- ``S3``: + nanobox's default seccomp filter (with its user-notification
  listener, as a run has it);
- ``S4``: + per-run cgroups (v1 ``memory``, ``pids``, ``cpu``, ``cpuacct``;
  skipped on v2), joined before the namespaces as nanobox's stage A joins
  them (``0`` to ``tasks``), their peak memory and CPU read after the run.

Cold, side by side with ``python -c pass`` and the CLI: ``S3`` once in a new
interpreter started by a ``-c`` stub that imports this module's cached
bytecode and the mechanisms' modules (the Landlock paths and the seccomp
program come precomputed, so no policy is evaluated): forked from that
interpreter, which waits for it (as a supervisor outside the sandbox
would), and in that process itself (no fork, nothing left outside).

None of this supervises anything, hides or protects any path, or could be
called from a multithreaded caller (it forks the caller). It is a lower
bound, not an alternative implementation.

    python bench/floor.py [--quick] [--rounds 3] [--runs 200] [--json FILE]
"""

from __future__ import annotations

import ctypes
import marshal
import os
import sys
import time

from nanobox._linux import sys as k

TYPE_CHECKING = False  # (not `typing`'s: the cold start below imports no more than it needs)
if TYPE_CHECKING:
    from typing import Any

NS_FLAGS = (
    k.CLONE_NEWUSER
    | k.CLONE_NEWNS
    | k.CLONE_NEWPID
    | k.CLONE_NEWNET
    | k.CLONE_NEWIPC
    | k.CLONE_NEWUTS
    | k.CLONE_NEWCGROUP
)
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1  # (netns's, without `socket`)
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")  # bwrap's --dev set
COMMAND = "/bin/true"
LEVELS = ("F0", "S0", "S1", "S2", "S3", "S4")
DESCRIPTIONS = {
    "F0": "the issue's prototype: fork, namespaces, id map, fork (PID 1), mounts, exec",
    "S0": "one fork: namespaces, id map, spawn cat (PID 1), mounts, spawn the command",
    "S1": "+ loopback up, hostname",
    "S2": "+ Landlock (the default plan's paths), no_new_privs, no capabilities",
    "S3": "+ the default seccomp filter and its listener",
    "S4": "+ per-run cgroups (peak memory, CPU read after the run)",
}


# --------------------------------------------------------------------------- the sandbox


class Floor:
    """What every start needs, prepared once per process."""

    def __init__(self, made: bytes, groups: CgroupSet | None = None) -> None:
        from nanobox._linux import landlock
        from nanobox._seccomp import loader

        self.landlock, self.loader = landlock, loader
        self.libc = ctypes.CDLL(None, use_errno=True)
        ll_plan, self.program = marshal.loads(made)
        self.ll_plan = landlock.LandlockPlan.from_json(ll_plan)
        self.uid, self.gid = os.getuid(), os.getgid()
        self.groups = groups

    def start(self, level: str) -> int:
        """One sandbox of ``level`` running ``COMMAND``; returns its wait
        status once everything in it has exited."""
        run_cg = self.groups.make() if level == "S4" and self.groups else None
        try:
            pid = os.fork()
            if pid == 0:
                try:
                    if level == "F0":
                        self._prototype()
                    else:
                        self._stage_a(int(level[1:]), run_cg)
                except BaseException:  # noqa: BLE001 - shown, then exit 127
                    import traceback  # (only on the way out of a failed child)

                    traceback.print_exc()
                finally:
                    os._exit(127)
            _, status, _rusage = os.wait4(pid, 0)
            if run_cg is not None:
                CgroupSet.read(run_cg)
            return status
        finally:
            if run_cg is not None:
                CgroupSet.remove(run_cg)

    # -- in the forked child

    def _namespaces(self) -> None:
        k.unshare(NS_FLAGS)
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"0 {self.uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"0 {self.gid} 1")

    def _prototype(self) -> None:
        self._namespaces()
        pid1 = os.fork()
        if pid1 == 0:
            try:
                self._mounts(proc_by_option=False)
                os.execv(COMMAND, [COMMAND])
            finally:
                os._exit(127)
        _, status = os.waitpid(pid1, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)

    def _stage_a(self, level: int, run_cg: list[str] | None) -> None:
        if run_cg is not None:
            for group in run_cg:
                # "0": this thread, as nanobox's stage A joins (a pid of
                # its own would take the kernel's global threadgroup lock)
                with open(os.path.join(group, "tasks"), "w") as f:
                    f.write("0")
        self._namespaces()
        r, w = os.pipe()
        init = os.posix_spawn(
            "/bin/cat",
            ["nanobox-init"],
            {},
            file_actions=[(os.POSIX_SPAWN_DUP2, r, 0), (os.POSIX_SPAWN_CLOSE, w)],
        )
        os.close(r)
        self._mounts(proc_by_option=True)
        listener = -1
        if level >= 1:
            self._loopback_up()
            if self.libc.sethostname(b"floor", 5) != 0:
                raise OSError(ctypes.get_errno(), "sethostname")
        if level >= 2:  # (the plan's paths that exist in this view)
            ruleset, _abi = self.landlock.prepare(self.ll_plan)
            if ruleset >= 0:
                self.landlock.restrict(ruleset)  # also no_new_privs
            k.drop_capabilities()
        if level >= 3:
            fd = self.loader.install(self.program, new_listener=True)
            listener = -1 if fd is None else fd
        child = os.posix_spawn(COMMAND, [COMMAND], {})
        if listener >= 0:
            os.close(listener)  # (nothing /bin/true does is refused)
        _, status = os.waitpid(child, 0)
        os.close(w)  # PID 1 reads EOF, exits, and the namespace with it
        os.waitpid(init, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)

    def _loopback_up(self) -> None:
        """Two ioctls on a UDP socket (as nanobox's ``netns.loopback_up``,
        without importing ``socket``)."""
        fd = self.libc.socket(2, 2 | os.O_CLOEXEC, 0)  # AF_INET, SOCK_DGRAM
        if fd < 0:
            raise OSError(ctypes.get_errno(), "socket")
        try:
            req = ctypes.create_string_buffer(b"lo", 40)  # struct ifreq
            for request in (SIOCGIFFLAGS, SIOCSIFFLAGS):
                if request == SIOCSIFFLAGS:
                    req[16] = bytes([req[16][0] | IFF_UP])
                if self.libc.ioctl(fd, ctypes.c_ulong(request), req) != 0:
                    raise OSError(ctypes.get_errno(), "ioctl lo")
        finally:
            os.close(fd)

    def _mounts(self, *, proc_by_option: bool) -> None:
        k.mount(None, "/", None, k.MS_REC | k.MS_PRIVATE)
        devs = [k.open_tree(f"/dev/{d}", k.OPEN_TREE_CLONE | k.OPEN_TREE_CLOEXEC) for d in DEVICES]
        k.mount_setattr("/", k.MOUNT_ATTR_RDONLY, recursive=True)
        if proc_by_option:  # made outside the pid namespace, for it
            options = {"pidns": "/proc/self/ns/pid_for_children"}
            attrs = k.MOUNT_ATTR_NOSUID | k.MOUNT_ATTR_NODEV | k.MOUNT_ATTR_NOEXEC
            proc = k.fsmount_new("proc", options, attrs)
            k.move_mount(proc, "/proc")
            os.close(proc)
        else:
            k.mount("proc", "/proc", "proc", k.MS_NOSUID | k.MS_NODEV | k.MS_NOEXEC)
        k.mount("tmpfs", "/tmp", "tmpfs", k.MS_NOSUID | k.MS_NODEV)
        k.mount("tmpfs", "/dev", "tmpfs", k.MS_NOSUID, "mode=0755")
        for name, fd in zip(DEVICES, devs, strict=True):
            os.close(os.open(f"/dev/{name}", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
            k.move_mount(fd, f"/dev/{name}")
            os.close(fd)


class CgroupSet:
    """Per-run groups below one group of this script's own in each v1
    hierarchy nanobox uses (a co-mounted ``cpu,cpuacct`` once). On cgroup
    v2 the script would need a delegated group with its controllers
    enabled: S4 is skipped there, with the reason."""

    PREFIX = "nanobox-floor-"

    def __init__(self) -> None:
        self.parents: list[str] = []
        self.n = 0
        self.error = ""
        hierarchies = []
        for ctrl in ("memory", "pids", "cpu", "cpuacct"):
            base = os.path.realpath(f"/sys/fs/cgroup/{ctrl}")
            if os.path.isfile(os.path.join(base, "tasks")) and base not in hierarchies:
                hierarchies.append(base)
        if len(hierarchies) < 3:
            self.error = "S4 measures cgroup v1 groups (memory, pids, cpu, cpuacct); none here"
            return
        try:
            for base in hierarchies:
                self._sweep(base)
                path = os.path.join(base, f"{self.PREFIX}{os.getpid()}")
                os.mkdir(path)
                self.parents.append(path)
        except OSError as exc:
            self.error = f"no cgroup of this script's own: {exc}"
            self.close()

    def _sweep(self, base: str) -> None:
        """Groups of an earlier run of this script that was killed."""
        for name in os.listdir(base):
            if name.startswith(self.PREFIX) and not os.path.exists(
                "/proc/" + name[len(self.PREFIX) :]
            ):
                self.remove([*sorted(self._below(os.path.join(base, name)), reverse=True)])

    @staticmethod
    def _below(path: str) -> list[str]:
        return [path] + [os.path.join(path, d) for d in os.listdir(path) if d.startswith("run")]

    def make(self) -> list[str]:
        self.n += 1
        made = []
        for parent in self.parents:
            path = os.path.join(parent, f"run{self.n}")
            os.mkdir(path)
            made.append(path)
        return made

    @staticmethod
    def read(groups: list[str]) -> None:
        for path in groups:
            for name in ("memory.max_usage_in_bytes", "cpuacct.usage"):
                try:
                    with open(os.path.join(path, name)) as f:
                        f.read()
                except FileNotFoundError:
                    pass

    @staticmethod
    def remove(groups: list[str]) -> None:
        for path in groups:
            for attempt in range(1000):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY while the last exit is being accounted
                    if attempt == 999:
                        raise
                    time.sleep(0.001)

    def close(self) -> None:
        for path in self.parents:
            if os.path.isdir(path):
                self.remove(sorted(self._below(path), reverse=True))
        self.parents = []


# --------------------------------------------------------------------------- driver


NANOBOX = "nanobox warm"
COLD_PY = "python -c pass (venv)"
COLD_FLOOR = "S3 cold: a new interpreter, one start (forked)"
COLD_INPROC = "S3 cold: a new interpreter, one start (in-process)"
COLD_CLI = "nanobox CLI (cold)"


def busy_ms() -> float:
    """CPU time the whole machine has spent busy (every CPU, every
    process, the kernel's own threads), from ``/proc/stat``, in ms."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) * 1000.0 / os.sysconf("SC_CLK_TCK")


def made_ahead(cwd: str) -> bytes:
    """What a start takes that is the same every time: the Landlock part of
    nanobox's default plan for ``cwd`` and the default seccomp program
    (``marshal``: a builtin, nothing to import to read it)."""
    from nanobox import Policy
    from nanobox._linux import plan
    from nanobox._seccomp import default_program

    built = plan.build_plan(Policy(), [COMMAND], run_id="floor", cwd=cwd, env={}, timeout=None)
    program = bytes.fromhex(default_program.PROGRAMS[os.uname().machine])
    return marshal.dumps((built["landlock"], program))


ONCE = "import sys; sys.path.insert(0, sys.argv[1]); import floor; floor.once(*sys.argv[2:])"


def once(made_hex: str, how: str) -> None:
    """One ``S3`` start in a new interpreter (the cold floor), from a ``-c``
    stub (this module's bytecode cached, as an installed CLI's is),
    importing only the mechanisms' modules; no policy is evaluated.
    ``forked``: the sandbox is a child and this process waits for it (a
    supervisor outside the sandbox, as nanobox needs one); ``in-process``:
    this process becomes the sandbox's stage A itself (no fork; nothing
    would be left outside to supervise the run or answer its seccomp
    notifications)."""
    floor = Floor(bytes.fromhex(made_hex))
    if how == "in-process":
        floor._stage_a(3, None)  # exits with the command's status
    sys.exit(os.waitstatus_to_exitcode(floor.start("S3")))


def measure(rounds: int, runs: int) -> dict[str, Any]:
    import importlib.util
    import py_compile
    import shutil

    import _common as c
    import startup

    errors: dict[str, str] = {}
    skipped: dict[str, str] = {}
    # The cold rows start from bytecode, as an installed package does (pip
    # compiles at install, even where PYTHONDONTWRITEBYTECODE is set).
    compiled = c.compile_nanobox()
    if compiled is not None:
        errors["byte-compile nanobox"] = compiled
    try:
        py_compile.compile(__file__, importlib.util.cache_from_source(__file__), doraise=True)
    except (OSError, py_compile.PyCompileError) as exc:
        errors["byte-compile floor.py"] = f"{exc} (its cold rows compile it at every start)"
    with c.workdir() as cwd:
        os.chdir(cwd)
        made = made_ahead(cwd)
        groups = None
        worker = None
        try:
            groups = CgroupSet()
            floor = Floor(made, groups)
            names = list(LEVELS)
            if groups.error:
                skipped["S4"] = groups.error
                names.remove("S4")
            here = os.path.dirname(os.path.abspath(__file__))
            cold = {
                COLD_PY: [c.VENV_PYTHON, "-c", "pass"],
                COLD_FLOOR: [c.VENV_PYTHON, "-c", ONCE, here, made.hex(), "forked"],
                COLD_INPROC: [c.VENV_PYTHON, "-c", ONCE, here, made.hex(), "in-process"],
                COLD_CLI: [c.VENV_NANOBOX, "run", "--", COMMAND],
            }
            for name, argv in cold.items():
                if os.access(argv[0], os.X_OK):
                    names.append(name)
                else:
                    skipped[name] = f"{argv[0]} not found"
            bwrap = shutil.which("bwrap")
            bw_argv = [*c.peer_prefixes(cwd)["bwrap"], COMMAND] if bwrap else []
            if bwrap:
                names.append("bwrap")
            else:
                skipped["bwrap"] = "bwrap not found (bash bench/install_peers.sh)"
            try:
                worker = startup.Worker("default", cwd)
                worker.batch(1)
                names.append(NANOBOX)
            except Exception as exc:  # noqa: BLE001 - reported, the rest still runs
                skipped[NANOBOX] = f"{type(exc).__name__}: {exc}"
            times: dict[str, list[float]] = {n: [] for n in names}
            per_round: dict[str, list[float]] = {n: [] for n in names}
            busy: dict[str, float] = dict.fromkeys(names, 0.0)
            for r in range(rounds):
                for name in c.alternating(names, r):
                    got: list[float] = []
                    if name == NANOBOX and worker is not None:
                        worker.batch(3)
                        b0 = busy_ms()
                        data = worker.batch(runs)
                        busy[name] += busy_ms() - b0
                        got = data["times"]
                        if data["failed"]:
                            errors[name] = "; ".join(data["errors"])
                    else:
                        b0 = 0.0
                        for i in range(3 + runs):
                            if i == 3:
                                b0 = busy_ms()
                            if name in cold:
                                if name in (COLD_FLOOR, COLD_INPROC) and i >= runs // 4 + 3:
                                    break  # (each of these starts an interpreter)
                                dt, status = c.time_command(cold[name], cwd)
                            elif name == "bwrap":
                                dt, status = c.time_command(bw_argv, cwd)
                            else:
                                t0 = time.perf_counter()
                                status = floor.start(name)
                                dt = time.perf_counter() - t0
                            if status != 0:
                                errors[name] = f"wait status {status}"
                                continue
                            if i >= 3:
                                got.append(dt)
                        busy[name] += busy_ms() - b0
                    times[name] += got
                    if got:
                        per_round[name].append(c.percentile(got, 50) * 1e3)
        finally:
            if groups is not None:
                groups.close()
            if worker is not None:
                worker.close()
    bw = c.summary(times.get("bwrap", []), 1e3).get("median")
    variants: dict[str, Any] = {}
    for name in names:
        s = c.summary(times[name], 1e3)
        s["round_medians"] = per_round[name]
        s["cpu_ms_per_run"] = busy[name] / len(times[name]) if times[name] else None
        s["x_bwrap"] = c.ratio(s.get("median"), bw)
        pairs = zip(per_round[name], per_round.get("bwrap", []), strict=False)
        s["x_bwrap_rounds"] = [x for x in (c.ratio(a, b) for a, b in pairs) if x is not None]
        s["what"] = DESCRIPTIONS.get(name) or (
            "bwrap " + " ".join(bw_argv[1:-1]) if name == "bwrap" else "Sandbox.run, default policy"
        )
        variants[name] = s
    py = variants.get(COLD_PY, {}).get("median")
    for name in cold:
        if name in variants:
            variants[name]["what"] = (
                f"{c.fmt_ratio(c.ratio(variants[name]['median'], py))} python -c pass"
            )
    return {
        "unit": "ms",
        "rounds": rounds,
        "runs_per_round": runs,
        "variants": variants,
        "skipped": skipped,
        "errors": errors,
    }


def table(data: dict[str, Any]) -> str:
    import _common as c

    rows = []
    for name, s in data["variants"].items():
        rounds = " · ".join(c.fmt(x) for x in s["x_bwrap_rounds"])
        rows.append(
            [
                f"**{name}**",
                s["what"],
                c.fmt(s["median"]),
                c.fmt(s.get("cpu_ms_per_run")),
                f"{c.fmt(s['p10'])}-{c.fmt(s['p90'])}",
                c.fmt_ratio(s["x_bwrap"]),
                rounds,
            ]
        )
    out = c.md_table(
        ["level", "what", "median ms", "CPU ms per run", "p10-p90", "÷ bwrap", "per round"], rows
    )
    if data.get("skipped"):
        out += "\n\nSkipped: " + "; ".join(f"{k}: {v}" for k, v in data["skipped"].items())
    if data["errors"]:
        out += "\n\nErrors: " + "; ".join(f"{k}: {v}" for k, v in data["errors"].items())
    return out


def main() -> None:
    import _common as c

    ap = c.base_args(__doc__.split("\n", 1)[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.runs = 2, 20
    data = measure(args.rounds, args.runs)
    c.emit(data, args.json, table)


if __name__ == "__main__":
    main()
