"""Supervising a sandbox from the fork server (no Python process inside).

Stage A reports the pids of the sandbox's PID 1 (an idle ``cat``, see
``pid1``) and of the command (PID 2); when A exits both become the server's
children (it is a child subreaper). For each run the server then:

- waits for the command (``wait4``: its exit status and rusage);
- enforces the wall-clock limit and the CPU-time limit of the whole
  sandbox (from the run's cgroup, else by summing ``/proc`` over the
  processes below PID 1 and the command, every 50 ms);
- answers the seccomp notifications of the command's filter (refusals are
  recorded as violations; ``connect()`` calls go to a broker helper that
  joins the sandbox's user and mount namespaces, made on the first one);
- ends the run by SIGKILLing PID 1: the kernel then kills everything else in
  the pid namespace, and PID 1's exit is reaped once the namespace is
  empty.

``Run`` holds that state; the server calls it from its event loop.
"""

from __future__ import annotations

import os
import time

from . import notify, proctree, signals, socks, wire

TYPE_CHECKING = False  # not ``typing``'s: the fork server starts without it
if TYPE_CHECKING:
    from typing import Any

CPU_POLL_S = 0.05
MAX_DENIED = 100


class Run:
    """One sandbox supervised by the server."""

    def __init__(self, info: dict[str, Any], plan: dict[str, Any]) -> None:
        self.init_pid: int = int(info["init"])
        self.cmd_pid: int = int(info["cmd"])
        self.info = info
        self.start: float = float(info["start"])
        self.end: float | None = None
        timeout = plan.get("timeout")
        self.deadline: float | None = self.start + float(timeout) if timeout else None
        cpu = plan.get("cpu_time")
        self.cpu_limit: float | None = float(cpu) if cpu is not None else None
        self.next_poll: float | None = (
            time.monotonic() + CPU_POLL_S if self.cpu_limit is not None else None
        )
        self.reason = "exited"
        self.cmd_status: int | None = None
        self.cmd_rusage: Any = None
        self.init_rusage: Any = None
        self.init_done = False
        self.killed = False  # the server ended it
        self.init_lost = False
        self.exec_error: dict[str, Any] | None = None
        self.orphans_cpu = (0.0, 0.0)
        self.init_children_cpu = (0.0, 0.0)  # in orphans_cpu: not PID 1's own
        # The command's process ran nanobox's Python before its exec: what
        # it used, once its "L" message is read.
        self.prep_cpu: tuple[float, float] | None = None
        # Stage A's whole CPU time, once it is reaped (see ``report``).
        self.starter_cpu: tuple[float, float] | None = None
        self.listener: notify.Listener | None = None
        self.helper: Helper | None = None
        self.denied: list[dict[str, Any]] = []
        self.mnt_fd: int | None = None
        self.spec = plan.get("seccomp_notify")
        self.connect_allowed: list[str] = list(plan.get("connect_allowed") or [])
        self.shared_net = not plan.get("newnet", True)  # (abstract addresses: the host's)
        root = bool(plan.get("userns_root"))
        self.inner_ids = (0, 0) if root else (int(plan["uid"]), int(plan["gid"]))

    # -- namespaces ------------------------------------------------------------
    def hold_namespaces(self) -> None:
        """Keep the sandbox's mount namespace alive past its PID 1: tearing
        it down (unmounting the whole view) then happens when the server
        lets go, after the reply, instead of inside PID 1's exit, which the
        reply waits for."""
        try:
            self.mnt_fd = os.open(f"/proc/{self.init_pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.mnt_fd = None

    def release_namespaces(self) -> None:
        if self.mnt_fd is not None:
            os.close(self.mnt_fd)
            self.mnt_fd = None

    # -- timers --------------------------------------------------------------
    def next_timer(self) -> float | None:
        times = [t for t in (self.deadline, self.next_poll) if t is not None]
        return min(times) if times else None

    def check_timers(self, now: float, group_cpu: Any) -> bool:
        """True when a limit was hit (the caller ends the run)."""
        if self.cmd_status is not None:
            return False
        if self.deadline is not None and now >= self.deadline:
            self.reason, self.end = "timeout", now
            return True
        if self.next_poll is not None and now >= self.next_poll:
            self.next_poll = now + CPU_POLL_S
            assert self.cpu_limit is not None
            if self.tree_cpu(group_cpu) >= self.cpu_limit:
                self.reason, self.end = "cpu_limit", now
                return True
        return False

    def tree_cpu(self, group_cpu: Any) -> float:
        """CPU seconds of the sandbox so far (stage A's own and the command
        process's before its exec excluded).

        Where a figure nanobox leaves out is not known yet, the estimate is
        low, never high: a run stopped at its CPU limit must have used it.
        (Counted high, a run in the VM lane was stopped at 0.17 s of a 1 s
        limit: the poll came after the command started and before stage A's
        "C" line, with all of stage A's build in the group.)"""
        if not self.cmd_pid:
            # Stage A spawns the command after its "P" line and then writes
            # its "C" line, with its own CPU (in the group): nothing to
            # judge before that line is read, microseconds later.
            return 0.0
        # PID 1's own CPU (`cat` starting) is left out of the report (it is
        # in init_rusage); leave it out here too, or a run could be stopped
        # at its CPU limit and report less than the limit.
        ours = _cpu_of(self.init_pid)
        if self.prep_cpu is not None:
            ours += sum(self.prep_cpu)
        else:
            # Its "L" (sent right before the exec) is not read yet: all of
            # the command process's own CPU counts as nanobox's for now.
            ours += _cpu_of(self.cmd_pid)
        if group_cpu is not None:
            starter = self.starter_own()
            if starter is None:
                # Stage A's exit (in the group too) is counted once it is
                # reaped, right after its last line: nothing judged before.
                return 0.0
            used = group_cpu()
            if used is not None:
                return float(used) - sum(starter) - ours
        u, s = tree_times([p for p in (self.init_pid, self.cmd_pid) if p], include_roots=True)
        return u + s - ours

    def starter_own(self) -> tuple[float, float] | None:
        """Stage A's CPU in the group, user and system: from its join to
        its exit, once it is reaped (its own lines stop short of its exit,
        ~0.5 ms of a forked Python's); None before."""
        if self.starter_cpu is None or "joined_utime" not in self.info:
            return None
        return (
            max(0.0, self.starter_cpu[0] - self.info["joined_utime"]),
            max(0.0, self.starter_cpu[1] - self.info["joined_stime"]),
        )

    # -- events ----------------------------------------------------------------
    def set_command(self, info: dict[str, Any]) -> None:
        """Stage A started the command itself after its ``P`` line (``C``):
        its pid, the moment it started (the wall clock counts from then),
        and stage A's own time and CPU up to it."""
        self.cmd_pid = int(info["cmd"])
        self.start = float(info["start"])
        timeout = self.deadline is not None and self.deadline - float(self.info["start"])
        if timeout:
            self.deadline = self.start + timeout
        for key in ("setup_s", "self_utime", "self_stime", "joined_utime", "joined_stime"):
            if key in info:
                self.info[key] = info[key]

    def command_lost(self) -> None:
        """Stage A exited after ``P`` without starting the command (its
        ``E`` line, if any, says why): the run ends as a setup failure;
        or, where the server had killed the sandbox (a timeout, a kill),
        as killed: the command could not start in a dead pid namespace."""
        if self.killed:
            self.on_cmd_exit(signals.SIGKILL, None)  # (a failure line before the kill is kept)
            return
        if self.exec_error is None:
            self.exec_error = {
                "kind": "S",
                "step": "start the command",
                "errno": None,
                "message": "stage A exited before it started the command",
            }
        self.on_cmd_exit(125 << 8, None)

    def on_line(self, line: bytes) -> None:
        """A line on the status pipe after ``P``: the command's setup or exec
        failure (``S`` / ``X``), or stage A's own (``E``). Not a failure
        the server's kill caused (a spawn or fork into a dead pid
        namespace fails with ENOMEM): the run is then reported as killed."""
        if self.killed and line[:1] in (b"E", b"S", b"X"):
            try:
                caused_by_kill = wire.status_loads(line[1:]).get("errno") == 12  # ENOMEM
            except (ValueError, AttributeError):
                caused_by_kill = True
            if caused_by_kill:
                return
        if line[:1] == b"E" and self.exec_error is None:
            try:
                self.exec_error = {"kind": "S", **wire.status_loads(line[1:])}
            except ValueError:
                pass
            return
        if line[:1] in (b"S", b"X"):
            try:
                self.exec_error = {"kind": line[:1].decode(), **wire.status_loads(line[1:])}
            except ValueError:
                self.exec_error = {"kind": "S", "step": "exec", "message": "setup failed"}

    def on_cmd_exit(self, status: int, rusage: Any) -> None:
        self.cmd_status, self.cmd_rusage = status, rusage
        # PID 1 died (or is dying, taking the namespace with it) before the
        # command and not by the server's hand: killed from outside.
        self.init_lost = not self.killed and (self.init_done or _exiting(self.init_pid))
        if self.end is None:
            self.end = time.monotonic()

    def kill(self, sample_orphans: bool) -> None:
        """End the sandbox: SIGKILL its PID 1 (the kernel kills the rest)."""
        if self.init_done:
            return
        first, self.killed = not self.killed, True
        if sample_orphans and first:
            # Without a cgroup, count what the command's live descendants and
            # the processes re-parented to PID 1 used so far: they die with
            # the namespace and are reaped by the kernel, not waited for.
            live_cmd = self.cmd_status is None and self.cmd_pid
            roots = [self.init_pid] + ([self.cmd_pid] if live_cmd else [])
            u, s = tree_times(roots, include_roots=False)
            # And those PID 1 waited for, where it does (see pid1).
            self.init_children_cpu = _children_times(self.init_pid)
            self.orphans_cpu = (u + self.init_children_cpu[0], s + self.init_children_cpu[1])
        try:
            os.kill(self.init_pid, signals.SIGKILL)  # our unreaped child: no reuse
        except ProcessLookupError:
            pass

    def done(self) -> bool:
        return self.cmd_status is not None and self.init_done

    # -- seccomp notifications ---------------------------------------------------
    def take_listener(self, fd: int) -> None:
        spec = self.spec or {"table": {}, "arch": ""}
        broker = None
        if spec.get("connect") is not None:
            broker = _Forwarder(self)
        self.listener = notify.Listener(fd, spec, broker=broker, pid_of=inner_pid)

    def report(self) -> dict[str, Any]:
        ru = self.cmd_rusage
        end = self.end if self.end is not None else time.monotonic()
        pu, ps = self.prep_cpu or (0.0, 0.0)
        me_u, me_s = self.starter_own() or (self.info["self_utime"], self.info["self_stime"])
        me_u, me_s = me_u + pu, me_s + ps
        if self.init_rusage is not None:
            me_u += max(0.0, self.init_rusage.ru_utime - self.init_children_cpu[0])
            me_s += max(0.0, self.init_rusage.ru_stime - self.init_children_cpu[1])
        listener = self.listener
        return {
            "status": self.cmd_status,
            "reason": self.reason,
            "wall": end - self.start,
            "utime": max(0.0, (ru.ru_utime if ru else 0.0) - pu) + self.orphans_cpu[0],
            "stime": max(0.0, (ru.ru_stime if ru else 0.0) - ps) + self.orphans_cpu[1],
            "maxrss_kb": ru.ru_maxrss if ru else 0,
            "self_utime": me_u,
            "self_stime": me_s,
            "setup_s": self.info.get("setup_s"),
            "exec_error": self.exec_error,
            "degraded": self.info.get("degraded", []),
            "syscall_violations": listener.recorded if listener is not None else [],
            "unix_denied": self.denied[:MAX_DENIED],
            "syscall_violation_count": listener.count if listener is not None else 0,
        }

    def close(self) -> None:
        if self.listener is not None:
            try:
                os.close(self.listener.fd)
            except OSError:
                pass
        if self.helper is not None:
            self.helper.close()


def _cpu_of(pid: int) -> float:
    """CPU seconds used so far by ``pid`` (a live child of ours)."""
    try:
        with open(f"/proc/{pid}/schedstat", "rb") as fh:
            return int(fh.read().split()[0]) / 1e9  # nanoseconds on a CPU
    except (OSError, ValueError, IndexError):
        pass
    fields = proctree.stat_fields(pid)
    try:
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else 0.0
    except (ValueError, IndexError):
        return 0.0


def _exiting(pid: int) -> bool:
    """Is ``pid`` (our unreaped child) exiting or dead (PF_EXITING)?"""
    fields = proctree.stat_fields(pid)
    if not fields:
        return True
    return fields[0] in (b"Z", b"X") or bool(int(fields[6]) & 0x4)


def inner_pid(pid: int, proc: str = "/proc/") -> int:
    """``pid`` (this process's view) as the sandbox sees it (its last
    NSpid). ``proc``: where the host's procfs is (the connect helper, whose
    cwd it is, passes "")."""
    try:
        with open(f"{proc}{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError):
        pass
    return pid


def _children_times(pid: int) -> tuple[float, float]:
    """User and system seconds of the children ``pid`` has waited for."""
    fields = proctree.stat_fields(pid)
    try:
        tick = os.sysconf("SC_CLK_TCK")
        return (int(fields[13]) / tick, int(fields[14]) / tick) if fields else (0.0, 0.0)
    except (ValueError, IndexError):
        return 0.0, 0.0


def tree_times(roots: list[int], include_roots: bool) -> tuple[float, float]:
    """User and system seconds of the live processes below ``roots`` (and of
    the roots too, with ``include_roots``), their waited-for children
    included."""
    return proctree.cpu_times(proctree.below(roots, include_roots=include_roots))


class _Forwarder:
    """The server-side broker: hands each ``connect()`` notification to the
    run's helper (started on the first)."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def handle(self, listener_fd: int, nid: int, pid: int, args: Any, respond: Any) -> None:
        import json  # (network runs only: the server starts without it)

        run = self.run
        try:
            if run.helper is None:
                run.helper = Helper.start(run, listener_fd)
            run.helper.sock.send(json.dumps([nid, pid, list(args)]).encode())
        except OSError as exc:
            respond(nid, exc.errno or 13)


class Helper:
    """A process in the sandbox's user and mount namespaces that performs
    the sandbox's ``connect()`` calls (``unixconnect``); it answers the
    notifications itself and reports refusals on its socket."""

    def __init__(self, pid: int, sock: socks.Socket) -> None:
        self.pid = pid
        self.sock = sock

    @classmethod
    def start(cls, run: Run, listener_fd: int) -> Helper:
        mine, theirs = socks.socketpair()
        pid = os.fork()
        if pid == 0:
            try:
                mine.close()
                _helper_main(theirs.fileno(), listener_fd, run)
            finally:
                os._exit(1)
        theirs.close()
        mine.setblocking(False)
        return cls(pid, mine)

    def drain(self) -> list[dict[str, Any]]:
        import json

        out: list[dict[str, Any]] = []
        while True:
            try:
                msg = self.sock.recv(65536)
            except OSError:  # BlockingIOError included: nothing more now
                return out
            if not msg:
                return out
            try:
                out.append(json.loads(msg))
            except ValueError:
                continue

    def close(self) -> None:
        self.sock.close()


def _helper_main(sock_fd: int, listener_fd: int, run: Run) -> None:
    import json
    import select

    from . import sys as k
    from .fds import close_all_except
    from .unixconnect import ConnectBroker

    signals.set_wakeup_fd(-1)
    signals.signal(signals.SIGCHLD, signals.SIG_DFL)
    close_all_except({sock_fd, listener_fd})
    sock = socks.Socket(fileno=sock_fd)
    try:
        proc = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        user = os.open(f"/proc/{run.init_pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        mnt = os.open(f"/proc/{run.init_pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        if os.getuid() == 0:
            os.setgroups([])
        k.setns(user, k.CLONE_NEWUSER)
        gid, uid = run.inner_ids[1], run.inner_ids[0]
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        k.setns(mnt, k.CLONE_NEWNS)
        os.close(user)
        os.close(mnt)
        # Relative paths ("<pid>/mem", "self/fd/N") name this host procfs.
        os.fchdir(proc)
    except OSError:
        os._exit(1)  # every pending connect fails with ENOSYS: still refused

    def denied(entry: dict[str, Any]) -> None:
        entry = {**entry, "pid": inner_pid(int(entry["pid"]), "")}
        try:
            sock.send(json.dumps(entry).encode())
        except OSError:
            pass

    broker = ConnectBroker(
        run.connect_allowed, proc_fd=proc, on_denied=denied, refuse_abstract=run.shared_net
    )
    ConnectBroker.install_canceller()
    listener = notify.Listener(listener_fd, {"table": {}, "arch": ""})
    wait = select.poll()
    wait.register(sock_fd, select.POLLIN)
    busy = False
    while True:
        # While calls run, look every 50 ms for those whose caller gave up.
        if not wait.poll(50 if busy else None):
            busy = broker.cancel_abandoned()
            continue
        try:
            msg = sock.recv(65536)
        except InterruptedError:
            continue
        if not msg:
            os._exit(0)
        nid, pid, args = json.loads(msg)
        broker.handle(listener_fd, nid, pid, tuple(args), listener.respond)
        busy = broker.cancel_abandoned()
