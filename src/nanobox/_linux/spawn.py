"""Namespace creation and the fork chain of one run.

    server --fork--> A: unshare(user, mount, pid, net, ipc, uts, cgroup),
                        write its uid/gid map, fork B, report B's pid, exit
                     B: PID 1 of the new pid namespace (``init``), reparented
                        to the server (a child subreaper) when A exits
                     C: the command, PID 2 (``child``)

The server is single-threaded, so forking it (and running Python in the
children) is safe. A reports on ``status`` with ``P<pid>`` or ``E<json>``;
B later writes its report on the same pipe.
"""

from __future__ import annotations

import json
import os
import select
import signal
from dataclasses import dataclass, field
from typing import Any

from . import init, userns
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
SPAWN_TIMEOUT_MS = 30_000


class SpawnError(Exception):
    def __init__(self, info: dict[str, Any]) -> None:
        super().__init__(info.get("message", "sandbox setup failed"))
        self.info = info


@dataclass
class Launched:
    pid: int
    status_r: int
    cmd_w: int
    buffer: bytearray = field(default_factory=bytearray)


def _stage_a(plan: dict[str, Any], stdio: tuple[int, int, int], status_w: int, cmd_r: int) -> None:
    step = "close fds"
    try:
        # The server's wakeup fd (and its SIGCHLD handler) are inherited, but
        # the fd is about to be closed: a signal arriving now would fail to
        # write to it and surface as EBADF later.
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        keep = {*stdio, status_w, cmd_r}
        if plan.get("chan_fd") is not None:
            keep.add(plan["chan_fd"])
        if plan.get("userns_fd") is not None:
            keep |= {plan["userns_fd"], *plan["view"].get("premade", {}).values()}
        close_all_except(keep)
        step = "join cgroup"
        me = str(os.getpid()).encode()
        for procs in plan.get("cgroup_procs", ()):
            fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, me)
            finally:
                os.close(fd)
        step = "create namespaces"
        if plan.get("mode") == "nons":
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
        step = "fork init"
        pid = os.fork()
        if pid == 0:
            init.init_main(plan, stdio, status_w, cmd_r)
        write_all(status_w, b"P%d\n" % pid)
        os._exit(0)
    except BaseException as exc:  # noqa: BLE001 - never return into the server
        info = {"step": step, "errno": getattr(exc, "errno", None), "message": str(exc)}
        try:
            write_all(status_w, b"E" + json.dumps(info).encode() + b"\n")
        finally:
            os._exit(1)


def launch(plan: dict[str, Any], stdio: tuple[int, int, int]) -> Launched:
    """Fork the chain for ``plan``; return B's pid and its pipes."""
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    cmd_r, cmd_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
    except OSError:
        for fd in (status_r, status_w, cmd_r, cmd_w):
            os.close(fd)
        raise
    if pid == 0:
        _stage_a(plan, stdio, status_w, cmd_r)
        os._exit(1)  # pragma: no cover
    os.close(status_w)
    os.close(cmd_r)
    buf = bytearray()
    try:
        poller = select.poll()
        poller.register(status_r, select.POLLIN)
        while b"\n" not in buf:
            if not poller.poll(SPAWN_TIMEOUT_MS):
                os.kill(pid, 9)
                raise SpawnError({"step": "spawn", "errno": None, "message": "setup timed out"})
            chunk = os.read(status_r, 65536)
            if not chunk:
                break
            buf += chunk
    finally:
        os.waitpid(pid, 0)
    line, _, rest = bytes(buf).partition(b"\n")
    if line.startswith(b"P"):
        return Launched(int(line[1:]), status_r, cmd_w, bytearray(rest))
    os.close(status_r)
    os.close(cmd_w)
    if line.startswith(b"E"):
        raise SpawnError(json.loads(line[1:]))
    raise SpawnError({"step": "spawn", "errno": None, "message": "setup process died"})
