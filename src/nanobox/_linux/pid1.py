"""The sandbox's PID 1: an idle process, not a supervisor.

Stage A starts it as the first process of the new pid namespace, with
``posix_spawn`` (no copy of a Python process): ``cat`` reading the server's
command pipe, with SIGCHLD ignored, so the kernel reaps every orphan
re-parented to it; when the pipe reaches EOF (the server ended the run, or
died) it exits, which makes the kernel kill every other process of the
namespace. Its only fds are that pipe and /dev/null.

Where a CPU-time limit is counted from the process tree (no cgroup), an
orphan reaped by the kernel would take its CPU time with it, and a command
could run past its limit in short-lived orphans. There PID 1 is a forked
Python process that waits for the orphans itself (``wait_orphans``): the
kernel adds what each used to PID 1's children's time (``cutime`` and
``cstime`` in ``/proc/PID/stat``), where the server counts it. Without such
a limit the reported CPU time misses orphans that exited before the end.

Everything else a supervisor does (waiting for the command, time and CPU
limits, seccomp notifications, the report) is done by the fork server for
all its sandboxes at once (``supervise``), so a sandbox costs one small
process beside its command instead of a Python interpreter. Where ``cat``
cannot be run, PID 1 is a forked Python process blocked in ``read``.
"""

from __future__ import annotations

import os

from . import signals
from .fds import close_all_except

TYPE_CHECKING = False  # not ``typing``'s: the fork server starts without it
if TYPE_CHECKING:
    from typing import NoReturn

CATS = ("/bin/cat", "/usr/bin/cat")


def start(cmd_r: int, *, wait_orphans: bool = False) -> int:
    """Start PID 1 (call right after ``unshare(CLONE_NEWPID)``: the next
    child is PID 1); return its pid. ``wait_orphans``: PID 1 waits for the
    orphans it adopts (their CPU time then shows as its children's)."""
    cat = None
    if not wait_orphans:
        cat = next((path for path in CATS if os.access(path, os.X_OK)), None)
    if cat is not None:
        # A failed exec here would leave the namespace without its PID 1
        # (no second try possible), hence the access check first.
        old = signals.signal(signals.SIGCHLD, signals.SIG_IGN)  # inherited by cat
        try:
            return os.posix_spawn(
                cat,
                ["nanobox-init"],
                {},
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, cmd_r, 0),
                    (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_DUP2, 1, 2),
                ],
            )
        finally:
            signals.signal(signals.SIGCHLD, old)
    pid = os.fork()
    if pid == 0:
        _idle(cmd_r, wait_orphans)
    return pid


def _idle(cmd_r: int, wait_orphans: bool) -> NoReturn:
    try:
        signals.set_wakeup_fd(-1)
        signals.signal(signals.SIGCHLD, _reap if wait_orphans else signals.SIG_IGN)
        close_all_except((cmd_r,))
        if wait_orphans:
            _reap(0, None)  # any that exited before the handler was set
        while os.read(cmd_r, 4096):  # (a SIGCHLD runs _reap, then the read goes on)
            pass
    except BaseException:  # noqa: BLE001 - stay PID 1 until EOF or killed
        pass
    os._exit(0)


def _reap(_signum: int, _frame: object) -> None:
    """Wait for every child that has exited (one SIGCHLD may stand for
    several)."""
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
