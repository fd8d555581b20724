"""The sandbox's PID 1: an idle process, not a supervisor.

Forked by stage A right after the namespaces exist, it does two things:

1. makes the sandbox's procfs (``fsopen("proc")``: a procfs shows the pid
   namespace of the process that creates it, and this is the first process
   of the new one) and hands the detached mount to stage A, which attaches
   it while it builds the view;
2. becomes ``cat`` reading the server's command pipe, with SIGCHLD ignored:
   the kernel reaps every orphan re-parented to it, and when the pipe
   reaches EOF (the server ended the run, or died) it exits, which makes
   the kernel kill every other process of the namespace.

Everything else a supervisor does (waiting for the command, time and CPU
limits, seccomp notifications, the report) is done by the fork server for
all its sandboxes at once (``supervise``), so a sandbox costs one small
process beside its command instead of a Python interpreter. Where ``cat``
cannot be run, PID 1 stays this forked Python process, blocked in ``read``.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import NoReturn

from . import sys as k
from .fds import close_all_except

PROC_ATTRS = k.MOUNT_ATTR_NOSUID | k.MOUNT_ATTR_NODEV | k.MOUNT_ATTR_NOEXEC
CATS = ("/bin/cat", "/usr/bin/cat")


def _open_first(paths: tuple[str, ...], flags: int) -> int | None:
    for path in paths:
        try:
            return os.open(path, flags | os.O_CLOEXEC)
        except OSError:
            continue
    return None


def main(sock_fd: int, cmd_r: int) -> NoReturn:
    # Everything from the host's view is opened first: once the procfs is
    # handed over, stage A rebuilds the view (a new /dev, maybe a new root).
    null = _open_first(("/dev/null",), os.O_RDWR)
    cat = _open_first(CATS, os.O_PATH)
    try:
        sock = socket.socket(fileno=sock_fd)
        try:
            proc = k.fsmount_new("proc", {}, PROC_ATTRS)
        except OSError as exc:
            sock.send(b"E%d" % (exc.errno or 1))
        else:
            socket.send_fds(sock, [b"P"], [proc])
            os.close(proc)
        sock.close()
        # Orphans re-parented here are reaped by the kernel.
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        os.dup2(cmd_r, 0)
        if null is not None:
            os.dup2(null, 1)
            os.dup2(null, 2)
        close_all_except(() if cat is None else (cat,))
        cmd_r = 0
        if cat is not None:
            os.execve(cat, ["nanobox-init"], {})
    except BaseException:  # noqa: BLE001 - stay PID 1 anyway: exiting kills the sandbox
        pass
    try:
        while os.read(cmd_r, 4096):
            pass
    except BaseException:  # noqa: BLE001
        pass
    os._exit(0)
