"""The supervisor of a run without namespaces (no user namespaces on the
host, degraded mode): a child subreaper that starts the command, reaps,
enforces the wall-clock and tree CPU-time limits, and reports.

With namespaces the fork server supervises instead (``supervise``) and PID 1
is an idle process (``pid1``). Here there is no pid namespace to end with
one kill: every orphan the command leaves comes back to this process (a
child subreaper), and at the end it kills its descendants round by round
until none is left, reaps them all, and writes one report line (``R`` +
JSON) with the command's wait status and the whole tree's rusage (its own
usage excluded). A setup failure is reported as ``E`` + JSON.
"""

from __future__ import annotations

import os
import resource
import select
import time

from . import child, notify, proctree, signals, socks, wire
from . import sys as k
from .fds import write_all
from .socks import recv_fds

TYPE_CHECKING = False  # not ``typing``'s: the fork server starts without it
if TYPE_CHECKING:
    from typing import Any, NoReturn

CPU_POLL_S = 0.05


def _error(status_w: int, step: str, exc: BaseException) -> NoReturn:
    payload = {
        "step": step,
        "errno": getattr(exc, "errno", None),
        "message": str(exc),
    }
    try:
        write_all(status_w, b"E" + wire.status_dumps(payload) + b"\n")
    finally:
        os._exit(1)


def _kill_descendants() -> None:
    """SIGKILL everything below this process until nothing is left (each
    round also catches what forked meanwhile; orphans come back to us)."""
    for _ in range(1000):
        pids = list(proctree.below([os.getpid()]))
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signals.SIGKILL)
            except ProcessLookupError:
                pass
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break


def _tree_cpu() -> float:
    """CPU seconds of the whole tree: everything reaped so far plus every
    live descendant (its own time and that of the children it reaped)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    u, s = proctree.cpu_times(proctree.below([os.getpid()]))
    return ru.ru_utime + ru.ru_stime + u + s


def init_main(
    plan: dict[str, Any], stdio: tuple[int, int, int], status_w: int, cmd_r: int
) -> NoReturn:
    t_setup = time.monotonic()
    try:
        # Be the subreaper of everything the command starts, so orphans come
        # back here to be reaped and killed.
        k.prctl(k.PR_SET_CHILD_SUBREAPER, 1)
    except BaseException as exc:  # noqa: BLE001
        _error(status_w, "subreaper", exc)

    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signals.set_wakeup_fd(wake_w)
    signals.signal(signals.SIGCHLD, lambda _s, _f: None)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    notify_mine = notify_theirs = None
    if plan.get("seccomp") and plan.get("seccomp_notify"):
        notify_mine, notify_theirs = socks.socketpair()
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
        broker = listener.broker if listener is not None else None
        if broker is not None and broker.cancel_abandoned():  # (connects whose caller gave up)
            wait_s = 0.05 if wait_s is None else min(wait_s, 0.05)
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
                    _msg, fds = recv_fds(notify_mine, 256, 1)
                except BlockingIOError:
                    fds = []
                poller.unregister(fd)
                if fds:
                    listener = notify.Listener(
                        fds[0],
                        plan["seccomp_notify"],
                        plan.get("connect_allowed"),
                        shared_net=not plan.get("newnet", True),
                    )
                    if listener.broker is not None:
                        listener.broker.install_canceller()
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
        if cpu_limit is not None and _tree_cpu() >= cpu_limit:
            reason = "cpu_limit"
            break

    if status is None:
        end = time.monotonic()
    _kill_descendants()
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
    # The command's process's line (why it never ran), passed on for the
    # server to read: decoding it here would import ``json`` in the run.
    exec_error_line = err.decode("ascii", "replace").strip() if err else None
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
        "exec_error": None,
        "exec_error_line": exec_error_line,
        "degraded": [],
        "syscall_violations": listener.recorded if listener is not None else [],
        "unix_denied": listener.broker.denied[:100]
        if listener is not None and listener.broker is not None
        else [],
        "syscall_violation_count": listener.count if listener is not None else 0,
    }
    write_all(status_w, b"R" + wire.status_dumps(report) + b"\n")
    os._exit(0)
