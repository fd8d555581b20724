"""The sandbox's PID 1: an idle process, not a supervisor.

Stage A starts it as the first process of the new pid namespace, with
``posix_spawn`` (no copy of a Python process): ``cat`` reading the server's
command pipe, with SIGCHLD ignored, so the kernel reaps every orphan
re-parented to it; when the pipe reaches EOF (the server ended the run, or
died) it exits, which makes the kernel kill every other process of the
namespace. Its only fds are that pipe and /dev/null.

Where a CPU-time limit is counted from the process tree (no cgroup),
orphans that exit stay zombies instead (``reap=False``): a zombie keeps
the CPU time it used in ``/proc/PID/stat``, where the server's count finds
it (an orphan reaped by the kernel takes its CPU time with it, and a
command could run past its limit in short-lived orphans). They go with the
namespace at the end of the run. Without such a limit they are reaped, so
that a long run does not pile them up; its reported CPU time then misses
orphans that exited before the end.

Everything else a supervisor does (waiting for the command, time and CPU
limits, seccomp notifications, the report) is done by the fork server for
all its sandboxes at once (``supervise``), so a sandbox costs one small
process beside its command instead of a Python interpreter. Where ``cat``
cannot be run, PID 1 is a forked Python process blocked in ``read``.
"""

from __future__ import annotations

import os
import signal

from .fds import close_all_except

TYPE_CHECKING = False  # not ``typing``'s: the fork server starts without it
if TYPE_CHECKING:
    from typing import NoReturn

CATS = ("/bin/cat", "/usr/bin/cat")


def start(cmd_r: int, reap: bool = True) -> int:
    """Start PID 1 (call right after ``unshare(CLONE_NEWPID)``: the next
    child is PID 1); return its pid. ``reap``: have the kernel reap the
    orphans it adopts (else they stay zombies until the end of the run)."""
    cat = next((path for path in CATS if os.access(path, os.X_OK)), None)
    orphans = signal.SIG_IGN if reap else signal.SIG_DFL
    if cat is not None:
        # A failed exec here would leave the namespace without its PID 1
        # (no second try possible), hence the access check first.
        old = signal.signal(signal.SIGCHLD, orphans)  # inherited by cat
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
            signal.signal(signal.SIGCHLD, old)
    pid = os.fork()
    if pid == 0:
        _idle(cmd_r, orphans)
    return pid


def _idle(cmd_r: int, orphans: signal.Handlers) -> NoReturn:
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, orphans)
        close_all_except((cmd_r,))
        while os.read(cmd_r, 4096):
            pass
    except BaseException:  # noqa: BLE001 - stay PID 1 until EOF or killed
        pass
    os._exit(0)
