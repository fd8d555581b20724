"""Namespace creation and the fork chain of one run.

    server --fork--> A: a *starter*: joins the run's cgroups (and, for a root
                        caller, creates the run's user namespace) before it
                        is given a plan; then unshare(user, mount, pid, net,
                        ipc, uts, cgroup), write its uid/gid map, fork B and
                        C, build the view, release C, report both pids, exit
                     B: PID 1 of the new pid namespace (``pid1``): makes the
                        procfs, then idles as ``cat`` on the command pipe
                     C: the command, PID 2 (``child``)

A starter is forked ahead of its plan so that the slow parts that do not
depend on the plan (a cgroup migration waits for an RCU grace period; a user
namespace for the id mapping needs a fork) happen off the critical path: the
fork server keeps one spare starter ready after a run. The plan and its fds
(stdio, and the caller's channel when a proxy listens) arrive on the
starter's socket; the command later hands its seccomp listener to the server
over the same socket.

The server is single-threaded, so forking it (and running Python in the
children) is safe. A reports on ``status`` with ``P`` + JSON (the pids of B
and C) or ``E`` + JSON; C adds ``S``/``X`` + JSON if its setup or exec
fails. B and C become the server's children when A exits (it is a child
subreaper); the server supervises them (``supervise``). Without namespaces
A forks the old-style supervising init instead (``init``, ``P<pid>``), which
writes its report (``R`` + JSON) on the same pipe.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import time
from typing import Any

from . import child, init, mounts, netns, pid1, userns
from . import sys as k
from .fds import close_all_except, write_all

BASE_FLAGS = (
    k.CLONE_NEWUSER
    | k.CLONE_NEWNS
    | k.CLONE_NEWPID
    | k.CLONE_NEWIPC
    | k.CLONE_NEWUTS
    | k.CLONE_NEWCGROUP
)
MAX_PLAN = 1 << 20


class Starter:
    """The server's handle on a forked stage A that waits for its plan."""

    __slots__ = ("cmd_w", "group", "key", "pid", "sid", "sock", "status_r")

    def __init__(
        self,
        pid: int,
        sock: socket.socket,
        status_r: int,
        cmd_w: int,
        key: Any,
        group: Any,
        sid: int | None,
    ) -> None:
        self.pid = pid
        self.sock = sock
        self.status_r = status_r
        self.cmd_w = cmd_w
        self.key = key
        self.group = group
        self.sid = sid  # the dedicated uid of a root caller's sandbox

    def start(self, plan: dict[str, Any], fds: list[int]) -> None:
        """Hand the starter its plan; it goes on alone (reporting on status).
        The socket stays: the command hands its seccomp listener over it."""
        socket.send_fds(self.sock, [json.dumps(plan).encode()], fds)

    def discard(self) -> None:
        """Let an unused starter go: it sees EOF and exits."""
        self.sock.close()
        for fd in (self.status_r, self.cmd_w):
            if fd >= 0:
                os.close(fd)


def fork_starter(procs_files: list[str], sid: int | None, key: Any, group: Any) -> Starter:
    """Fork a stage A that joins ``procs_files`` (and makes a user namespace
    mapping root to ``sid``) at once, then waits for its plan."""
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    cmd_r, cmd_w = os.pipe2(os.O_CLOEXEC)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid = os.fork()
    except OSError:
        for fd in (status_r, status_w, cmd_r, cmd_w):
            os.close(fd)
        mine.close()
        theirs.close()
        raise
    if pid == 0:
        try:
            _starter_main(theirs.fileno(), status_w, cmd_r, procs_files, sid)
        finally:
            os._exit(1)
    os.close(status_w)
    os.close(cmd_r)
    theirs.close()
    return Starter(pid, mine, status_r, cmd_w, key, group, sid)


def _set_name(name: bytes) -> None:
    """The process name ``ps`` shows (a spare waits beside the server)."""
    try:
        fd = os.open("/proc/self/comm", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, name)
        finally:
            os.close(fd)
    except OSError:
        pass


def _fail(status_w: int, step: str, exc: BaseException) -> None:
    info = {"step": step, "errno": getattr(exc, "errno", None), "message": str(exc)}
    try:
        write_all(status_w, b"E" + json.dumps(info).encode() + b"\n")
    finally:
        os._exit(1)


def _starter_main(
    sock_fd: int, status_w: int, cmd_r: int, procs_files: list[str], sid: int | None
) -> None:
    # Never return into the server's loop: every path ends in os._exit.
    early: tuple[str, BaseException] | None = None
    userns_fd: int | None = None
    step = "close fds"
    try:
        # The server's wakeup fd (and its SIGCHLD handler) are inherited, but
        # the fd is about to be closed: a signal arriving now would fail to
        # write to it and surface as EBADF later.
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        close_all_except({sock_fd, status_w, cmd_r})
        _set_name(b"nanobox-spare")
        step = "join cgroup"
        me = str(os.getpid()).encode()
        for procs in procs_files:
            fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, me)
            finally:
                os.close(fd)
        if sid is not None:
            step = "user namespace for the id mapping"
            userns_fd = userns.make_userns(f"0 {sid} 1\n", f"0 {sid} 1\n")
    except BaseException as exc:  # noqa: BLE001 - reported once the plan is here
        early = (step, exc)
    try:
        sock = socket.socket(fileno=sock_fd)
        msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_PLAN, 8)
        sock.detach()  # kept: the command hands its seccomp listener over it
    except BaseException:  # noqa: BLE001
        os._exit(0)
    if not msg:
        os._exit(0)  # discarded, or the server went away
    if early is not None:
        _fail(status_w, *early)
    _set_name(b"nanobox-init")  # B inherits it
    try:
        plan = json.loads(msg)
        stdio = (fds[0], fds[1], fds[2])
        if len(fds) > 3:
            plan["chan_fd"] = fds[3]
        if userns_fd is not None:
            plan["userns_fd"] = userns_fd
            plan["view"]["premade"] = _premade(plan, userns_fd)
    except BaseException as exc:  # noqa: BLE001
        _fail(status_w, "prepare", exc)
    _stage_a(plan, stdio, status_w, cmd_r, sock_fd)


def _premade(plan: dict[str, Any], userns_fd: int) -> dict[str, int]:
    """For a root caller: the writable roots as idmapped clones (their
    on-disk root ownership is the sandbox uid inside), and read-only roots
    cloned here, where root can still reach them."""
    premade: dict[str, int] = {}
    try:
        for i, op in enumerate(plan["view"]["ops"]):
            if op["t"] == "bind":
                fd = userns.idmapped_clone(op["src"], userns_fd)
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
    return premade


def _stage_a(
    plan: dict[str, Any], stdio: tuple[int, int, int], status_w: int, cmd_r: int, sock_fd: int
) -> None:
    step = "create namespaces"
    try:
        if plan.get("mode") == "nons":
            os.close(sock_fd)
            step = "fork init"
            pid = os.fork()
            if pid == 0:
                init.init_main(plan, stdio, status_w, cmd_r)
            write_all(status_w, b"P%d\n" % pid)
            os._exit(0)
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
    _build_sandbox(plan, stdio, status_w, cmd_r, sock_fd)


def _build_sandbox(
    plan: dict[str, Any], stdio: tuple[int, int, int], status_w: int, cmd_r: int, sock_fd: int
) -> None:
    """In the new namespaces: PID 1 first (it makes the procfs), then the
    command's process (PID 2), which waits while this process builds the
    view and binds the proxy listeners (so its fork overlaps that work).
    Both are this process's children until it exits; then the server (a
    subreaper) gets them. The ``P`` line tells the server their pids."""
    t0 = time.monotonic()
    step = "fork init"
    init_pid = cmd_pid = 0
    try:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        init_pid = os.fork()
        if init_pid == 0:
            mine.close()
            pid1.main(theirs.detach(), cmd_r)
        theirs.close()
        os.close(cmd_r)
        step = "fork command"
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        cmd_pid = os.fork()
        if cmd_pid == 0:
            _command(plan, stdio, status_w, sock_fd, go_r, go_w)
        os.close(go_r)
        step = "hostname"
        socket.sethostname(plan["hostname"])
        if plan["newnet"]:
            step = "loopback"
            netns.loopback_up()
        step = "procfs"
        msg, fds, _f, _a = socket.recv_fds(mine, 64, 1)
        mine.close()
        if not fds and not msg:
            raise OSError(10, "the sandbox's PID 1 died")  # ECHILD
        proc: int | OSError = fds[0] if fds else OSError(int(msg[1:] or b"1"), "procfs")
        step = "filesystem view"
        degraded = mounts.build(plan["view"], proc)
        if fds:
            os.close(fds[0])
        if plan.get("proxy"):
            step = "proxy listeners"
            netns.send_listeners(plan["chan_fd"], plan["proxy_ports"])
        step = "start the command"
        setup_s = time.monotonic() - t0
        start = time.monotonic()
        os.write(go_w, b"g")
        os.close(go_w)
        me = resource.getrusage(resource.RUSAGE_SELF)
        info = {
            "init": init_pid,
            "cmd": cmd_pid,
            "start": start,
            "setup_s": setup_s,
            "degraded": degraded,
            "self_utime": me.ru_utime,
            "self_stime": me.ru_stime,
        }
        write_all(status_w, b"P" + json.dumps(info).encode() + b"\n")
        os._exit(0)
    except BaseException as exc:  # noqa: BLE001 - never return into the server
        for pid in (cmd_pid, init_pid):
            if pid > 0:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if isinstance(exc, mounts.MountStepError):
            step = exc.step
        _fail(status_w, step, exc)


def _command(
    plan: dict[str, Any],
    stdio: tuple[int, int, int],
    status_w: int,
    sock_fd: int,
    go_r: int,
    go_w: int,
) -> None:
    """The command's process: wait until stage A says the view is ready."""
    try:
        os.close(go_w)
        if os.read(go_r, 1) != b"g":
            os._exit(125)  # stage A failed (and reports it)
        os.close(go_r)
    except BaseException:  # noqa: BLE001
        os._exit(125)
    child.exec_command(plan, stdio, status_w, sock_fd if plan.get("seccomp_notify") else -1)
