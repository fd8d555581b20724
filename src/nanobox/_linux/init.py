"""The sandbox's PID 1: sets up the view, starts the command as PID 2, reaps,
enforces the wall-clock and tree CPU-time limits, and reports.

It is never the command itself, so the command sees normal signal semantics
(``kill -TERM $$`` ends a shell). It reaps every orphan. When the command
ends (or a limit is hit, or the server asks, or the server dies) it kills
every other process of the pid namespace with one ``kill(-1, SIGKILL)``,
reaps them all, and writes one report line (``R`` + JSON) with the
command's wait status and the whole tree's rusage (its own usage excluded).
A setup failure is reported as ``E`` + JSON.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import socket
import time
from typing import Any, NoReturn

from . import child, mounts, netns, notify
from .fds import write_all

_TICK = os.sysconf("SC_CLK_TCK")
CPU_POLL_S = 0.05


def _error(status_w: int, step: str, exc: BaseException) -> NoReturn:
    payload = {
        "step": step,
        "errno": getattr(exc, "errno", None),
        "message": str(exc),
    }
    try:
        write_all(status_w, b"E" + json.dumps(payload).encode() + b"\n")
    finally:
        os._exit(1)


class _SkipSetup(Exception):
    pass


def _descendants() -> list[int]:
    """PIDs below this process (without a pid namespace: the sandbox)."""
    me = os.getpid()
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                parent[int(name)] = int(fh.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    out: list[int] = []
    frontier = {me}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier}
        out.extend(frontier)
    return out


def _kill_descendants() -> None:
    """SIGKILL everything below this process until nothing is left (each
    round also catches what forked meanwhile; orphans come back to us)."""
    for _ in range(1000):
        pids = _descendants()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break


def send_listeners(chan_fd: int, ports: list[int]) -> None:
    """Bind the proxy's listeners inside the sandbox's network namespace and
    hand them to the caller, before the command exists: no start-up race,
    and the command never holds them."""
    socks: list[socket.socket] = []
    try:
        for port in ports:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen(1024)
        chan = socket.socket(fileno=chan_fd)
        try:
            socket.send_fds(chan, [b'{"t": "listeners"}'], [s.fileno() for s in socks])
        finally:
            chan.close()
    finally:
        for s in socks:
            s.close()


def _sandbox_pids() -> list[str]:
    """Every process of the sandbox but the init: the whole pid namespace,
    or (without one) this process's descendants."""
    return [name for name in os.listdir("/proc") if name.isdigit() and name != "1"]


def _tree_cpu(pids: list[str] | list[int]) -> float:
    """CPU seconds of the whole sandbox: everything reaped so far plus every
    live process in ``pids`` (its own time and that of the children it
    reaped)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = ru.ru_utime + ru.ru_stime
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return total + ticks / _TICK


def _kill_all() -> None:
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        pass


def init_main(
    plan: dict[str, Any], stdio: tuple[int, int, int], status_w: int, cmd_r: int
) -> NoReturn:
    t_setup = time.monotonic()
    view_degraded: list[str] = []
    step = "hostname"
    nons = plan.get("mode") == "nons"
    try:
        if nons:
            # No pid namespace: be the subreaper of everything the command
            # starts, so orphans come back here to be reaped and killed.
            from . import sys as k

            k.prctl(k.PR_SET_CHILD_SUBREAPER, 1)
            raise _SkipSetup
        socket.sethostname(plan["hostname"])
        if plan["newnet"]:
            step = "loopback"
            netns.loopback_up()
        step = "filesystem view"
        view_degraded = mounts.build(plan["view"])
        if plan.get("proxy"):
            step = "proxy listeners"
            send_listeners(plan["chan_fd"], plan["proxy_ports"])
    except _SkipSetup:
        pass
    except mounts.MountStepError as exc:
        _error(status_w, exc.step, exc)
    except BaseException as exc:  # noqa: BLE001
        _error(status_w, step, exc)

    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda _s, _f: None)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    notify_mine = notify_theirs = None
    if plan.get("seccomp") and plan.get("seccomp_notify"):
        notify_mine, notify_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    setup_s = time.monotonic() - t_setup

    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        child.exec_command(
            plan, stdio, err_w, notify_theirs.fileno() if notify_theirs is not None else -1
        )
    os.close(err_w)
    listener: notify.Listener | None = None
    if notify_mine is not None and notify_theirs is not None:
        notify_theirs.close()
        notify_mine.setblocking(False)
    for fd in set(stdio):
        os.close(fd)

    timeout = plan.get("timeout")
    cpu_limit = plan.get("cpu_time")
    deadline = start + timeout if timeout else None
    poller = select.poll()
    poller.register(wake_r, select.POLLIN)
    poller.register(cmd_r, select.POLLIN)
    if notify_mine is not None:
        poller.register(notify_mine.fileno(), select.POLLIN)

    status: int | None = None
    end = start
    reason = "exited"
    while status is None:
        wait_s: float | None = None
        now = time.monotonic()
        if deadline is not None:
            wait_s = max(0.0, deadline - now)
        if cpu_limit is not None:
            wait_s = CPU_POLL_S if wait_s is None else min(wait_s, CPU_POLL_S)
        events = poller.poll(None if wait_s is None else int(wait_s * 1000) + 1)
        for fd, _ev in events:
            if fd == wake_r:
                try:
                    os.read(wake_r, 512)
                except BlockingIOError:
                    pass
            elif fd == cmd_r:
                data = os.read(cmd_r, 64)
                reason = "killed" if data else "server_gone"
            elif notify_mine is not None and fd == notify_mine.fileno():
                try:
                    _msg, fds, _f, _a = socket.recv_fds(notify_mine, 16, 1)
                except BlockingIOError:
                    fds = []
                poller.unregister(fd)
                if fds:
                    listener = notify.Listener(
                        fds[0], plan["seccomp_notify"], plan.get("connect_allowed")
                    )
                    poller.register(fds[0], select.POLLIN)
            elif listener is not None and fd == listener.fd:
                if not listener.handle():
                    poller.unregister(fd)
        # reap whatever exited (orphans included)
        while True:
            try:
                got, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                got = 0
            if got == 0:
                break
            if got == pid:
                status, end = st, time.monotonic()
        if status is not None:
            break
        if reason != "exited":
            break
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            reason = "timeout"
            break
        if cpu_limit is not None and (
            _tree_cpu(_descendants() if nons else _sandbox_pids()) >= cpu_limit
        ):
            reason = "cpu_limit"
            break

    if status is None:
        end = time.monotonic()
    if nons:
        _kill_descendants()
    else:
        _kill_all()
    while True:
        try:
            got, st = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            continue
        if got == pid and status is None:
            status = st
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    me = resource.getrusage(resource.RUSAGE_SELF)
    err = b""
    while True:
        chunk = os.read(err_r, 65536)
        if not chunk:
            break
        err += chunk
    exec_error = None
    if err:
        exec_error = {"kind": err[:1].decode(), **json.loads(err[1:])}
    report = {
        "status": status,
        "reason": reason,
        "wall": end - start,
        "utime": ru.ru_utime,
        "stime": ru.ru_stime,
        "maxrss_kb": ru.ru_maxrss,
        # The init's own CPU (setup, supervision) is in the cgroup's total:
        # the caller subtracts it so accounting describes the command.
        "self_utime": me.ru_utime,
        "self_stime": me.ru_stime,
        "setup_s": setup_s,
        "exec_error": exec_error,
        "degraded": view_degraded,
        "syscall_violations": listener.recorded if listener is not None else [],
        "unix_denied": listener.broker.denied[:100]
        if listener is not None and listener.broker is not None
        else [],
        "syscall_violation_count": listener.count if listener is not None else 0,
    }
    write_all(status_w, b"R" + json.dumps(report).encode() + b"\n")
    os._exit(0)
