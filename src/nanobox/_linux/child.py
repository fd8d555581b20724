"""The last stage before ``execve``: the command's own process (PID 2).

Runs in a process forked from the sandbox init, already inside every
namespace and the filesystem view. In order: default signal dispositions
(Python ignores SIGPIPE and SIGXFSZ, which would otherwise be inherited),
a new session (no controlling terminal, so TIOCSTI cannot reach the
caller's), stdio, closing every other fd, cwd, rlimits, no_new_privs,
dropping every capability, the seccomp filter, then ``execve`` with a PATH
search. Any failure is reported on ``err_w`` (close-on-exec, so a successful
exec reports nothing) as ``S`` (setup) or ``X`` (exec) plus JSON.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
from typing import Any, NoReturn

# Imported here, not lazily: in a minimal rootfs the package's files are no
# longer reachable once the view is built.
from .._seccomp import loader as seccomp_loader
from . import landlock
from . import sys as k
from .fds import close_all_except, write_all

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def report(err_w: int, kind: bytes, step: str, exc: BaseException) -> None:
    errno = getattr(exc, "errno", None)
    payload = {"step": step, "errno": errno, "message": str(exc)}
    try:
        # One line: on the fork server's status pipe it follows stage A's.
        write_all(err_w, kind + json.dumps(payload).encode() + b"\n")
    except OSError:
        pass


def _exec_search(argv: list[str], env: dict[str, str]) -> OSError:
    """``execve`` with a PATH search like ``execvpe``; returns the error."""
    name = argv[0]
    if "/" in name:
        candidates = [name]
    else:
        path = env.get("PATH", DEFAULT_PATH)
        candidates = [os.path.join(d or ".", name) for d in path.split(":")]
    saved: OSError | None = None
    last: OSError = FileNotFoundError(2, f"{name}: command not found")
    for candidate in candidates:
        try:
            os.execve(candidate, argv, env)
        except OSError as exc:
            last = exc
            if exc.errno in (2, 20):  # ENOENT, ENOTDIR
                continue
            if exc.errno == 13 and not os.path.lexists(candidate):
                continue  # an unsearchable PATH directory: like a shell, keep looking
            if saved is None:
                saved = exc
    if saved is None and last.errno == 13:
        last = FileNotFoundError(2, f"{name}: command not found")
    return saved or last


def _clamp(soft: int, hard: int, cur_hard: int) -> tuple[int, int]:
    """Never try to raise a hard limit (that needs privilege in the initial
    user namespace): a lower current hard limit wins, which is stricter."""
    inf = resource.RLIM_INFINITY
    if cur_hard != inf and (hard == inf or hard > cur_hard):
        hard = cur_hard
    if hard != inf and (soft == inf or soft > hard):
        soft = hard
    return soft, hard


def exec_command(
    plan: dict[str, Any], stdio: tuple[int, int, int], err_w: int, notify_sock: int = -1
) -> NoReturn:
    """Prepare and exec in one go (the no-namespace init's command)."""
    try:
        prepare(plan, err_w, notify_sock, keep=stdio)
    except SetupError as exc:
        report(err_w, b"S", exc.step, exc.cause)
        os._exit(125)
    finish(plan["argv"], plan["env"], stdio, err_w)


class SetupError(Exception):
    def __init__(self, step: str, cause: BaseException) -> None:
        super().__init__(step)
        self.step = step
        self.cause = cause


def prepare(
    plan: dict[str, Any], err_w: int, notify_sock: int, keep: tuple[int, ...]
) -> tuple[float, float]:
    """Everything before ``execve`` that does not depend on the run's argv,
    env or stdio: signals, session, fds, cwd, rlimits, no_new_privs,
    capabilities, Landlock, seccomp (handing its listener over
    ``notify_sock``). A sandbox prepared ahead of its run (see ``spawn``)
    does this before the run exists. Returns this process's CPU time so
    far (user, system): nanobox's, not the command's. Raises
    ``SetupError`` naming the step."""
    step = "signals"
    try:
        signal.set_wakeup_fd(-1)
        # Caught signals return to their default at execve by themselves;
        # ignored ones stay ignored (SIGPIPE, SIGXFSZ, the server's SIGINT,
        # anything the caller inherited): only those are reset.
        for sig in range(1, signal.NSIG):
            try:
                if signal.getsignal(sig) is signal.SIG_IGN:
                    signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError, RuntimeError):
                pass
        signal.pthread_sigmask(signal.SIG_SETMASK, ())

        step = "setsid"
        os.setsid()

        step = "fds"
        close_all_except({err_w, notify_sock, *keep})

        step = "chdir"
        os.chdir(plan["cwd"])

        step = "rlimits"
        for res, soft, hard in plan["rlimits"]:
            resource.setrlimit(res, _clamp(soft, hard, resource.getrlimit(res)[1]))
        os.umask(0o022)

        step = "no_new_privs"
        k.prctl(k.PR_SET_NO_NEW_PRIVS, 1)
        step = "drop capabilities"
        k.drop_all_capabilities()

        if plan.get("landlock"):
            step = "landlock"
            landlock.apply(landlock.LandlockPlan.from_json(plan["landlock"]))

        listener = None
        prog = plan.get("seccomp")
        if prog:
            step = "seccomp"
            listener = seccomp_loader.install(
                bytes.fromhex(prog),
                new_listener=notify_sock >= 0 and bool(plan.get("seccomp_notify")),
            )
        me = resource.getrusage(resource.RUSAGE_SELF)
        used = (me.ru_utime, me.ru_stime)
        if notify_sock >= 0:
            step = "seccomp listener"
            sock = socket.socket(fileno=notify_sock)
            try:
                msg = b"L" + json.dumps(used).encode()
                socket.send_fds(sock, [msg], [] if listener is None else [listener])
            finally:
                sock.detach()
            if listener is not None:
                os.close(listener)
        return used
    except BaseException as exc:  # noqa: BLE001 - reported by the caller
        raise SetupError(step, exc) from None


def finish(
    argv: list[str], env: Any, stdio: tuple[int, int, int], err_w: int, go_r: int = -1
) -> NoReturn:
    """The run's own part: stdio, every other fd closed, ``execve`` (once
    ``go_r`` says go, when given)."""
    try:
        high = [os.dup(fd) for fd in stdio]  # never collide with 0..2
        for target, fd in enumerate(high):
            os.dup2(fd, target, inheritable=True)
        close_all_except({err_w, go_r})
        environ = dict(env)
    except BaseException as exc:  # noqa: BLE001
        report(err_w, b"S", "stdio", exc)
        os._exit(125)
    if go_r >= 0:
        try:
            if os.read(go_r, 1) != b"g":
                os._exit(125)  # stage A failed (and reports it)
            os.close(go_r)
        except BaseException:  # noqa: BLE001
            os._exit(125)
    failure: BaseException
    try:
        failure = _exec_search(argv, environ)
    except BaseException as err:  # noqa: BLE001
        failure = err
    report(err_w, b"X", "exec", failure)
    os._exit(127)
