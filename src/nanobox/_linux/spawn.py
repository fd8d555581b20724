"""Namespace creation and the fork chain of one run.

    server --forker--> A: a *starter*: joins the run's cgroups (and, for a root
                        caller, creates the run's user namespace) before it
                        is given a plan; then unshare(user, mount, pid, net,
                        ipc, uts, cgroup), write its uid/gid map, start B,
                        build the view, wait for ``go`` and the run, finish
                        the view, then start the command (C), report the
                        pids, exit
                     B: PID 1 of the new pid namespace (``pid1``): ``cat``
                        on the command pipe, started with posix_spawn
                     C: the command, PID 2. Usually (``_build_spawning``) A
                        takes the command's last steps on itself once the
                        run is here (stdio, cwd, no_new_privs, capabilities,
                        Landlock, rlimits, seccomp) and starts C with
                        posix_spawn: no copy of a Python process per run.
                        Where the plan does not allow that (``plan.spawn``:
                        a seccomp filter of the caller's, which might refuse
                        A's own calls, or an address-space rlimit), C is forked
                        ahead instead (``_build_sandbox``): it makes the
                        procfs for A, prepares itself (``child.prepare``),
                        waits for its run and A's release, then sets rlimits
                        and seccomp and execs (``child.seal_and_exec``)

A starter is forked ahead of its plan so that the slow parts that do not
depend on the plan (a cgroup migration waits for an RCU grace period; a user
namespace for the id mapping needs a fork) happen off the critical path: the
fork server keeps one spare starter ready after a run. Given a plan, it
builds the whole sandbox, then waits for ``go``: the server builds the next
run's sandbox ahead this way, and a run with the same plan bytes only sends
``go`` (to A) and its argv/env/stdio (to A, or to C forked ahead, on the
"command socket"). The plan (and the caller's channel when a proxy listens)
arrives on the starter's socket; over the command socket the server also
receives the seccomp listener.

The server is single-threaded, so forking it (and running Python in the
children) is safe. A reports on ``status`` with ``P`` + JSON (the pids of B
and C) or ``E`` + JSON; ``S``/``X`` + JSON say that the command's setup or
exec failed (C's exit status is then 125 or 127, also when A started it: a
stand-in process exits so). When A starts the command itself, its ``P``
comes first, as the run starts (C's pid 0), so that the server supervises
the run (time limit, kill, the seccomp listener's notifications, which
A's own calls may cause) while A takes the last steps; a ``C`` + JSON line
then gives C's pid and start time. B and C become the
server's children when A exits (it is a child subreaper); the server
supervises them (``supervise``). Without namespaces A forks the old-style
supervising init instead (``init``, ``P<pid>``), which writes its report
(``R`` + JSON) on the same pipe.
"""

from __future__ import annotations

import gc
import os
import resource
import select
import time

from .._seccomp import loader as seccomp_loader
from . import cgroups, child, init, landlock, mounts, netns, pid1, signals, socks, userns, wire
from . import sys as k
from .fds import close_all_except, write_all
from .socks import recv_fds, recv_msg

TYPE_CHECKING = False  # not ``typing``'s: the fork server starts without it
if TYPE_CHECKING:
    from typing import Any

BASE_FLAGS = (
    k.CLONE_NEWUSER
    | k.CLONE_NEWNS
    | k.CLONE_NEWPID
    | k.CLONE_NEWIPC
    | k.CLONE_NEWUTS
    | k.CLONE_NEWCGROUP
)
PROC_ATTRS = k.MOUNT_ATTR_NOSUID | k.MOUNT_ATTR_NODEV | k.MOUNT_ATTR_NOEXEC


class Starter:
    """The server's handle on a forked stage A that waits for its plan."""

    __slots__ = ("cmd_w", "csock", "group", "key", "pid", "sid", "sock", "status_r")

    def __init__(
        self,
        pid: int,
        sock: socks.Socket,
        csock: socks.Socket,
        status_r: int,
        cmd_w: int,
        key: Any,
        group: Any,
        sid: int | None,
    ) -> None:
        self.pid = pid
        self.sock = sock  # to stage A: the plan, then "go"
        self.csock = csock  # to the command: its run; from it: the seccomp listener
        self.status_r = status_r
        self.cmd_w = cmd_w
        self.key = key
        self.group = group
        self.sid = sid  # the dedicated uid of a root caller's sandbox

    def start(self, plan: bytes, fds: list[int]) -> None:
        """Hand the starter its plan (the bytes the caller sent, as is); it
        builds the sandbox and waits for ``go``."""
        socks.send_msg(self.sock, plan, fds)

    def go(self, skipped: list[int]) -> None:
        """The run starts: stage A finishes the view and releases the
        command. ``skipped``: the plan's placeholders the server did not
        make (names the sandbox cannot create: nothing to protect)."""
        socks.send_msg(self.sock, b"G" + ",".join(map(str, skipped)).encode())

    def send_run(self, run: bytes, stdio: list[int]) -> None:
        """The run's argv and env (``wire``) and stdio, straight to the command."""
        socks.send_msg(self.csock, run, stdio)

    def discard(self) -> None:
        """Let a starter go: it sees EOF on its socket (before its plan, or
        while its sandbox waits for ``go``) and exits, taking what it
        built with it."""
        self.sock.close()
        self.csock.close()
        for fd in (self.status_r, self.cmd_w):
            if fd >= 0:
                os.close(fd)
        self.status_r = self.cmd_w = -1


def fork_starter(
    forker: Any, join_files: list[str], sid: int | None, key: Any, group: Any
) -> Starter:
    """Have ``forker`` fork a stage A that joins ``join_files`` (and makes a
    user namespace mapping root to ``sid``) at once, then waits for its
    plan. The starter's ``pid`` is the forker's ident for it (negative), or
    its pid (``forker.Direct``)."""
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    cmd_r, cmd_w = os.pipe2(os.O_CLOEXEC)
    mine, theirs = socks.socketpair()
    cmine, ctheirs = socks.socketpair()
    # The forker takes the starter's ends over (and closes them once sent).
    try:
        ident = forker.fork([theirs.detach(), ctheirs.detach(), status_w, cmd_r], join_files, sid)
    except BaseException:
        for sock in (mine, cmine):
            sock.close()
        for fd in (status_r, cmd_w):
            os.close(fd)
        raise
    return Starter(ident, mine, cmine, status_r, cmd_w, key, group, sid)


def _set_name(name: bytes) -> None:
    """The process name ``ps`` shows (a spare waits beside the server)."""
    try:
        k.set_name(name)
    except OSError:
        pass


def _fail(status_w: int, step: str, exc: BaseException) -> None:
    info = {"step": step, "errno": getattr(exc, "errno", None), "message": str(exc)}
    try:
        write_all(status_w, b"E" + wire.status_dumps(info) + b"\n")
    finally:
        os._exit(1)


def starter_main(
    sock_fd: int,
    csock_fd: int,
    status_w: int,
    cmd_r: int,
    join_files: list[str],
    sid: int | None,
) -> None:
    # Never return into the server's loop: every path ends in os._exit.
    # No garbage collection in this short-lived copy of the server (or in
    # the command's process): a collection would write to every inherited
    # object, copying the server's memory page by page.
    gc.disable()
    early: tuple[str, BaseException] | None = None
    userns_fd: int | None = None
    joined_cpu = (0.0, 0.0)
    step = "close fds"
    try:
        # The server's wakeup fd (and its SIGCHLD handler) are inherited, but
        # the fd is about to be closed: a signal arriving now would fail to
        # write to it and surface as EBADF later.
        signals.set_wakeup_fd(-1)
        signals.signal(signals.SIGCHLD, signals.SIG_DFL)
        close_all_except({sock_fd, csock_fd, status_w, cmd_r})
        _set_name(b"nanobox-spare")
        step = "join cgroup"
        # What this process used before it joined (its fork's copy-on-write
        # faults, the fds closed: ~0.7 ms, ~35 ms under the VM lane's
        # emulation) is not the group's: only what it uses from here is
        # subtracted from the group's total as nanobox's own. Reading its
        # CPU time first has the kernel charge what it ran so far to where
        # it ran (else that slice since the last tick or switch goes to
        # the group it joins: here all of it, 0.65 ms in every run).
        resource.getrusage(resource.RUSAGE_SELF)
        cgroups.join(join_files)  # this process has one thread: the forker's
        joined = resource.getrusage(resource.RUSAGE_SELF)
        joined_cpu = (joined.ru_utime, joined.ru_stime)
        if sid is not None:
            step = "user namespace for the id mapping"
            # Its holder process dies on its own time: the kernel reaps it
            # while this process has no other children (else a zombie
            # would wait here, next to the spare, until the plan comes).
            signals.signal(signals.SIGCHLD, signals.SIG_IGN)
            _set_name(b"nanobox-userns")  # the holder's name in ps, not a spare's
            try:
                userns_fd = userns.make_userns(f"0 {sid} 1\n", f"0 {sid} 1\n")
            finally:
                _set_name(b"nanobox-spare")
    except BaseException as exc:  # noqa: BLE001 - reported once the plan is here
        early = (step, exc)
    try:
        sock = socks.Socket(fileno=sock_fd)
        msg, fds = recv_msg(sock, 8)
    except BaseException:  # noqa: BLE001
        os._exit(0)
    signals.signal(signals.SIGCHLD, signals.SIG_DFL)  # before PID 1 and the command
    userns.reap_holders()  # reaped already, or dead by now
    if not msg:
        os._exit(0)  # discarded, or the server went away
    if early is not None:
        _fail(status_w, *early)
    _set_name(b"nanobox-init")  # B inherits it
    try:
        plan = wire.loads(msg)
        plan["joined_cpu"] = joined_cpu
        if plan.get("mode") == "nons":
            sock.close()
            os.close(csock_fd)
            _stage_a_nons(plan, (fds[0], fds[1], fds[2]), status_w, cmd_r)
        if fds:
            plan["chan_fd"] = fds[0]
        if userns_fd is not None:
            plan["userns_fd"] = userns_fd
            plan["view"]["premade"], plan["view"]["premade_below"] = _premade(plan, userns_fd)
    except BaseException as exc:  # noqa: BLE001
        _fail(status_w, "prepare", exc)
    _stage_a(plan, sock, csock_fd, status_w, cmd_r)


def _premade(
    plan: dict[str, Any], userns_fd: int
) -> tuple[dict[str, int], dict[str, list[tuple[str, int]]]]:
    """For a root caller: the writable roots as idmapped clones (their
    on-disk root ownership is the sandbox uid inside), and read-only roots
    cloned here, where root can still reach them; with the mounts to attach
    below a writable root whose submounts could not be idmapped (see
    ``userns.idmapped_clone``)."""
    premade: dict[str, int] = {}
    subs: dict[str, list[tuple[str, int]]] = {}
    try:
        for i, op in enumerate(plan["view"]["ops"]):
            if op["t"] == "bind":
                fd, below = userns.idmapped_clone(op["src"], userns_fd)
                if below:
                    subs[str(i)] = below
            elif op["t"] == "robind":
                # The sandbox's uid may not reach the source (e.g. under
                # a 0700 directory of root's): clone it here.
                fd = userns.readonly_clone(op["src"])
            else:
                continue
            premade[str(i)] = fd
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"cannot shift ownership of the writable roots for a root caller "
            f"(idmapped mounts): {exc.strerror}",
        ) from None
    return premade, subs


def _stage_a_nons(
    plan: dict[str, Any], stdio: tuple[int, int, int], status_w: int, cmd_r: int
) -> None:
    """No namespaces: fork the supervising init (``init``), report its pid
    and this process's CPU at its join (microseconds, user and system: the
    server counts what it used since as nanobox's own once it is reaped)."""
    try:
        pid = os.fork()
        if pid == 0:
            init.init_main(plan, stdio, status_w, cmd_r)
        joined = [round(t * 1e6) for t in plan["joined_cpu"]]
        write_all(status_w, b"P%d %d %d\n" % (pid, *joined))
    except BaseException as exc:  # noqa: BLE001 - never return into the server
        _fail(status_w, "fork init", exc)
    os._exit(0)


def _stage_a(
    plan: dict[str, Any], sock: socks.Socket, csock_fd: int, status_w: int, cmd_r: int
) -> None:
    step = "create namespaces"
    try:
        flags = BASE_FLAGS | (k.CLONE_NEWNET if plan["newnet"] else 0)
        userns_fd = plan.get("userns_fd")
        if userns_fd is not None:
            # Root caller: drop every supplementary group, enter the
            # prepared namespace and become its root (a dedicated uid).
            os.setgroups([])
            k.setns(userns_fd, k.CLONE_NEWUSER)
            os.close(userns_fd)
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
            k.unshare(flags & ~k.CLONE_NEWUSER)
        else:
            k.unshare(flags)
            step = "map uid/gid"
            userns.map_self(plan["outer_uid"], plan["outer_gid"], plan["uid"], plan["gid"])
    except BaseException as exc:  # noqa: BLE001 - never return into the server
        _fail(status_w, step, exc)
    if plan.get("spawn"):
        _build_spawning(plan, sock, csock_fd, status_w, cmd_r)
    _build_sandbox(plan, sock, csock_fd, status_w, cmd_r)


def _end(pids: tuple[int, ...], *, reap: bool = True) -> None:
    """Kill and reap this process's children (PID 1 and the command), so
    that nothing of the sandbox outlives stage A (and its cgroup can go).
    Once the run has started (its "P" line), the server reaps them: it
    waits for PID 1's exit to end the run (``reap=False``)."""
    for pid in pids:
        if pid > 0:
            try:
                os.kill(pid, signals.SIGKILL)
            except OSError:
                pass
    for pid in pids if reap else ():
        if pid > 0:
            try:
                os.waitpid(pid, 0)
            except OSError:
                pass


def _build_sandbox(
    plan: dict[str, Any], sock: socks.Socket, csock_fd: int, status_w: int, cmd_r: int
) -> None:
    """In the new namespaces: PID 1 first (it makes the procfs), then the
    command's process (PID 2), which waits while this process builds the
    view and binds the proxy listeners (so its fork overlaps that work),
    then prepares itself (``child.prepare``) and waits for its run.

    The sandbox may be built ahead of its run (see ``forkserver``): this
    process then waits for ``go`` on its socket before it does the steps
    that depend on the moment the run starts (``mounts.build_late``) and
    releases the command. EOF instead of ``go``: the sandbox was not
    needed; everything is killed. Until this process exits, PID 1 and the
    command are its children; then the server (a subreaper) gets them. The
    ``P`` line tells the server their pids."""
    t0 = time.monotonic()
    step = "start init"
    init_pid = cmd_pid = 0
    try:
        init_pid = pid1.start(cmd_r, wait_orphans=_wait_orphans(plan))
        os.close(cmd_r)
        step = "fork command"
        mine, theirs = socks.socketpair()
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        cmd_pid = os.fork()
        if cmd_pid == 0:
            sock.close()
            mine.close()
            _command(plan, status_w, csock_fd, go_r, go_w, theirs)
        theirs.close()
        os.close(go_r)
        os.close(csock_fd)
        _set_name(b"nanobox-warm")  # until its run starts (ps shows it)
        step = "hostname"
        socks.sethostname(plan["hostname"])
        if plan["newnet"]:
            step = "loopback"
            netns.loopback_up()
        step = "procfs"
        proc = _recv_procfs(mine)
        mine.close()
        if proc is None:
            raise OSError(10, "the command's process died")  # ECHILD
        step = "filesystem view"
        late: list[dict[str, Any]] = []
        deferred = mounts.placeholder_protects(plan)
        degraded = mounts.build(plan["view"], proc, late, deferred)
        if not isinstance(proc, OSError):
            os.close(proc)
        if plan.get("proxy"):
            step = "proxy listeners"
            netns.send_listeners(plan["chan_fd"], plan["proxy_ports"])
        os.write(go_w, b"v")  # the command prepares itself meanwhile
        built = time.monotonic()
        step = "wait for the run"
        skip = _recv_go(sock, plan)
        if skip is None:
            _end((cmd_pid, init_pid))  # not needed after all
            os._exit(0)
        t1 = time.monotonic()
        if late:
            step = "filesystem view"
            mounts.build_late(plan["view"], late, skip)
        step = "start the command"
        start = time.monotonic()
        try:
            os.write(go_w, b"g")
        except BrokenPipeError:
            pass  # the command's process died (its own line says why)
        os.close(go_w)
        me = resource.getrusage(resource.RUSAGE_SELF)
        info = {
            "init": init_pid,
            "cmd": cmd_pid,
            "start": start,
            "setup_s": (built - t0) + (start - t1),
            "degraded": degraded,
            "self_utime": me.ru_utime - plan["joined_cpu"][0],
            "self_stime": me.ru_stime - plan["joined_cpu"][1],
            # (Flat: the server parses a flat line without ``json``.)
            "joined_utime": plan["joined_cpu"][0],
            "joined_stime": plan["joined_cpu"][1],
        }
        write_all(status_w, b"P" + wire.status_dumps(info) + b"\n")
        os._exit(0)
    except BaseException as exc:  # noqa: BLE001 - never return into the server
        _end((cmd_pid, init_pid))
        if isinstance(exc, mounts.MountStepError):
            step = exc.step
        _fail(status_w, step, exc)


def _procfs() -> int | OSError:
    """A procfs of the sandbox's pid namespace, made here (outside it) with
    procfs's ``pidns`` option (Linux 6.18+), else by a short-lived child
    inside it (a procfs shows the pid namespace of the process that creates
    it). An error is returned, for ``mounts.build`` to report."""
    try:
        return k.fsmount_new("proc", {"pidns": "/proc/self/ns/pid_for_children"}, PROC_ATTRS)
    except OSError:
        pass  # EINVAL: a kernel without the option; else the child's error says why
    mine, theirs = socks.socketpair()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            mine.close()
            _send_procfs(theirs)
        except BaseException:  # noqa: BLE001
            code = 1
        os._exit(code)
    theirs.close()
    try:
        proc = _recv_procfs(mine)
    finally:
        mine.close()
        os.waitpid(pid, 0)
    return OSError(1, "procfs") if proc is None else proc


def _send_procfs(sock: socks.Socket) -> None:
    """In a process of the sandbox's pid namespace: make its procfs and
    send it to stage A on ``sock`` (or the error number)."""
    try:
        proc = k.fsmount_new("proc", {}, PROC_ATTRS)
    except OSError as exc:
        sock.send(b"E%d" % (exc.errno or 1))
    else:
        socks.send_fds(sock, [b"P"], [proc])
        os.close(proc)


def _recv_procfs(sock: socks.Socket) -> int | OSError | None:
    """``_send_procfs``'s procfs fd, or its error; None when the sender
    died without a word."""
    msg, fds = recv_fds(sock, 64, 1)
    if fds:
        return fds[0]
    return OSError(int(msg[1:] or b"1"), "procfs") if msg else None


def _recv_go(sock: socks.Socket, plan: dict[str, Any]) -> frozenset[str] | None:
    """Wait for "go"; None on EOF. What it carries: the sandbox paths of
    placeholders the server did not make (see ``Starter.go``)."""
    msg = recv_msg(sock, 0)[0]  # (a long list of skipped names must not be cut short)
    if not msg.startswith(b"G"):
        return None
    if len(msg) == 1:
        return frozenset()
    specs = plan.get("placeholders", ())
    hosts = {specs[int(i)][0] for i in msg[1:].split(b",")}
    return mounts.placeholder_protects(plan, hosts)


def _wait_orphans(plan: dict[str, Any]) -> bool:
    """Must PID 1 wait for the orphans it adopts, rather than have the
    kernel reap them? Where a CPU-time limit is counted from the process
    tree (no cgroup: a v1 placement always has cpuacct, v2 its cpu.stat):
    else an orphan's CPU time goes with it, and a command could exceed its
    limit in short-lived orphans (see ``pid1``). The server samples PID 1's
    children's time under the same condition (``Run.kill``)."""
    return plan.get("cgroup") is None and plan.get("cpu_time") is not None


def _wait_unless_init_dies(sock: socks.Socket, init_pid: int) -> None:
    """Wait for ``sock`` to be readable; raise if PID 1 dies first (killed
    from outside: the pid namespace is gone, the sandbox cannot be used,
    and the server must hear of it before a run claims it)."""
    try:
        watch = os.pidfd_open(init_pid)
    except (AttributeError, OSError):
        return  # (a kernel before 5.3): found out at the spawn
    try:
        ready, _, _ = select.select([sock.fileno(), watch], [], [])
        if sock.fileno() not in ready:
            raise OSError(3, "the sandbox's PID 1 died while it waited for its run")  # ESRCH
    finally:
        os.close(watch)


def _build_spawning(
    plan: dict[str, Any], sock: socks.Socket, csock_fd: int, status_w: int, cmd_r: int
) -> None:
    """``_build_sandbox`` without a command process built ahead: this
    process builds the sandbox, waits for the run (on the command's socket),
    finishes the view, then takes the command's last steps on itself
    (stdio, cwd, capabilities, Landlock, rlimits, seccomp) and starts the
    command with ``posix_spawn``, which execs from a vfork-like child: no
    copy of this Python process is made, faulted in and torn down again at
    the exec (a forked command process cost ~2-3 ms of CPU per run and
    ~0.5 ms of the start). Used when the plan allows it (``plan.spawn``):
    the seccomp filter must let this process spawn after it is installed,
    and no address-space rlimit may be too small for that. The server's side
    of the protocol is the same: "R" when ready, the run, "L" with the
    listener, stage A's "P" line."""
    t0 = time.monotonic()
    step = "start init"
    init_pid = cmd_pid = 0
    csock = socks.Socket(fileno=csock_fd)
    try:
        init_pid = pid1.start(cmd_r, wait_orphans=_wait_orphans(plan))
        os.close(cmd_r)
        step = "hostname"
        socks.sethostname(plan["hostname"])
        if plan["newnet"]:
            step = "loopback"
            netns.loopback_up()
        step = "procfs"
        proc = _procfs()
        step = "filesystem view"
        late: list[dict[str, Any]] = []
        deferred = mounts.placeholder_protects(plan)
        degraded = mounts.build(plan["view"], proc, late, deferred)
        if not isinstance(proc, OSError):
            os.close(proc)
        if plan.get("proxy"):
            step = "proxy listeners"
            netns.send_listeners(plan["chan_fd"], plan["proxy_ports"])
        step = "drop capabilities"
        k.drop_bounding_and_ambient()  # (this process keeps its own until the run)
        step = "landlock"
        ruleset = -1
        if plan.get("landlock") and landlock.abi_version() > 0:
            ruleset, _abi = landlock.prepare(landlock.LandlockPlan.from_json(plan["landlock"]))
        prog = bytes.fromhex(plan["seccomp"]) if plan.get("seccomp") else b""
        built = time.monotonic()
        step = "wait for the run"
        _set_name(b"nanobox-warm")  # built, until its run starts (ps shows it)
        csock.send(b"R")  # the server sends the run (on csock) once it has one ...
        _wait_unless_init_dies(sock, init_pid)
        skip = _recv_go(sock, plan)  # ... and "go" (after it)
        if skip is None:  # EOF: not needed after all
            _end((init_pid,))
            os._exit(0)
        msg, fds = recv_msg(csock, 3)
        if not msg or len(fds) != 3:
            raise OSError(32, "the run did not come")  # EPIPE
        t1 = time.monotonic()
        argv, env = wire.loads(msg)
        if late:
            step = "filesystem view"
            mounts.build_late(plan["view"], late, skip)
        # The run starts: the server supervises it from now on (its time
        # limit, a kill, the seccomp listener's notifications, which this
        # process's own calls may cause once the filter is on). The
        # command's pid follows on a "C" line.
        info: dict[str, Any] = {
            "init": init_pid,
            "cmd": 0,
            "start": time.monotonic(),
            "setup_s": built - t0,
            "degraded": degraded,
            "self_utime": 0.0,
            "self_stime": 0.0,
        }
        write_all(status_w, b"P" + wire.status_dumps(info) + b"\n")
    except BaseException as exc:  # noqa: BLE001 - never return into the server
        _end((init_pid,))
        if isinstance(exc, mounts.MountStepError):
            step = exc.step
        _fail(status_w, step, exc)
    # (A failure here reports itself and exits: the server then ends the run.)
    environ = child.take_stdio(env, (fds[0], fds[1], fds[2]), status_w, (csock.fileno(), ruleset))
    kind, step = b"S", "chdir"
    failure: BaseException | None = None
    try:
        os.chdir(plan["cwd"])
        os.umask(0o022)
        step = "no_new_privs"
        k.prctl(k.PR_SET_NO_NEW_PRIVS, 1)
        step = "drop capabilities"
        k.drop_capabilities()
        if ruleset >= 0:
            step = "landlock"
            landlock.restrict(ruleset)
        step = "rlimits"
        child.set_rlimits(plan)
        listener = None
        notify = bool(prog and plan.get("seccomp_notify"))
        msg = b"L" + wire.status_dumps([0.0, 0.0])  # no CPU of the command's before its exec
        if prog:
            step = "seccomp"
            listener = seccomp_loader.install(prog, new_listener=notify)
        step = "seccomp listener"
        if listener is not None:
            socks.send_fds(csock, [msg], [listener])
            os.close(listener)
        else:
            csock.send(msg)
        kind, step = b"X", "exec"
        start = time.monotonic()

        def spawn(path: str) -> int:
            os.stat(path)  # a missing candidate: a stat, not a failed vfork and exec
            return k.spawn(path, argv, environ)

        found = child.path_search(argv, environ, spawn)
        if isinstance(found, OSError):
            failure = found
        else:
            cmd_pid = found
    except BaseException as exc:  # noqa: BLE001
        failure = exc
        start = time.monotonic()
    if failure is not None:
        # As a command process that failed would: its line, then exit
        # status 125 (setup) or 127 (exec) from a process of the sandbox.
        child.report(status_w, kind, step, failure)
        try:
            cmd_pid = os.fork()
            if cmd_pid == 0:
                os._exit(127 if kind == b"X" else 125)
        except BaseException as exc:  # noqa: BLE001
            # (The server ends the run when this process exits without a
            # "C" line; this line says why. PID 1 is the server's to reap:
            # reaped here, the server waited for its exit for ever.)
            _end((init_pid,), reap=False)
            _fail(status_w, step, exc)
    try:
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # the procfs child, if any
        info = {
            "cmd": cmd_pid,
            "start": start,
            "setup_s": (built - t0) + (start - t1),
            "self_utime": me.ru_utime - plan["joined_cpu"][0] + kids.ru_utime,
            "self_stime": me.ru_stime - plan["joined_cpu"][1] + kids.ru_stime,
            # (Flat: the server parses a flat line without ``json``.)
            "joined_utime": plan["joined_cpu"][0],
            "joined_stime": plan["joined_cpu"][1],
        }
        write_all(status_w, b"C" + wire.status_dumps(info) + b"\n")
    finally:
        os._exit(0)


def _command(
    plan: dict[str, Any],
    status_w: int,
    csock_fd: int,
    go_r: int,
    go_w: int,
    proc_sock: socks.Socket,
) -> None:
    """The command's process (PID 2): make the sandbox's procfs for stage A
    (a procfs shows the pid namespace of the process that creates it: this
    is the first Python process in the new one); once stage A says the view
    is built, prepare everything that does not depend on the run, then wait
    for the run's argv, env and stdio (from the server) and for stage A's
    release."""
    try:
        _set_name(b"nanobox-warm")
        os.close(go_w)
        _send_procfs(proc_sock)
        proc_sock.close()
        if os.read(go_r, 1) != b"v":
            os._exit(125)  # stage A failed (and reports it)
    except BaseException:  # noqa: BLE001
        os._exit(125)
    try:
        child.prepare(plan, status_w, keep=(go_r, csock_fd))
    except child.SetupError as exc:
        child.report(status_w, b"S", exc.step, exc.cause)
        os._exit(125)
    try:
        csock = socks.Socket(fileno=csock_fd)
        # Ready: the server sends the run's stdio only now, so that fds do
        # not wait in socket queues (they count against the user's limit of
        # fds in flight) while sandboxes are being built.
        csock.send(b"R")
        msg, fds = recv_msg(csock, 3)
        csock.detach()
        if not msg or len(fds) != 3:
            os._exit(125)  # the run never came: stage A reports why
        argv, env = wire.loads(msg)
    except BaseException:  # noqa: BLE001
        os._exit(125)
    # The run's stdio now, while stage A finishes the view.
    environ = child.take_stdio(env, (fds[0], fds[1], fds[2]), status_w, keep=(go_r, csock_fd))
    try:
        if os.read(go_r, 1) != b"g":
            os._exit(125)  # stage A failed (and reports it)
        os.close(go_r)
    except BaseException:  # noqa: BLE001
        os._exit(125)
    child.seal_and_exec(plan, argv, environ, status_w, csock_fd)
