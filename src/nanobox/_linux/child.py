"""The last stage before ``execve``: the command's own process (PID 2).

Runs in a process forked by stage A, already inside every namespace and
(once A says so) the filesystem view. In order: default signal
dispositions (Python ignores SIGPIPE and SIGXFSZ, which would otherwise be
inherited), a new session (no controlling terminal, so TIOCSTI cannot reach
the caller's), closing every other fd, cwd, no_new_privs, dropping every
capability, Landlock (``prepare``: a sandbox built ahead does these before
its run exists); the run's stdio (``take_stdio``); then rlimits and the
seccomp filter, last, so that nothing but the exec runs under them, and
``execve`` with a PATH search (``seal_and_exec``). Any failure is reported
on ``err_w`` (close-on-exec, so a successful exec reports nothing) as ``S``
(setup) or ``X`` (exec) plus JSON.

Used where a plan needs a command process forked ahead (``spawn``; usually
stage A takes these steps on itself and spawns the command, with
``path_search``, ``set_rlimits`` and ``report`` from here), and by the
supervising init without namespaces.
"""

from __future__ import annotations

import os
import resource

# Imported here, not lazily: in a minimal rootfs the package's files are no
# longer reachable once the view is built.
from .._seccomp import loader as seccomp_loader
from . import DEFAULT_PATH, landlock, signals, socks, wire
from . import sys as k
from .fds import close_all_except, write_all

TYPE_CHECKING = False  # not ``typing``'s: the fork server starts without it
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NoReturn, TypeVar

    T = TypeVar("T")


def report(err_w: int, kind: bytes, step: str, exc: BaseException) -> None:
    errno = getattr(exc, "errno", None)
    payload = {"step": step, "errno": errno, "message": str(exc)}
    try:
        # One line: on the fork server's status pipe it follows stage A's.
        write_all(err_w, kind + wire.status_dumps(payload) + b"\n")
    except OSError:
        pass


def _exec_search(argv: list[str], env: dict[str, str]) -> OSError:
    """``execve`` with a PATH search like ``execvpe``; returns the error."""
    failure = path_search(argv, env, lambda path: os.execve(path, argv, env))
    assert isinstance(failure, OSError)
    return failure


def path_search(argv: list[str], env: dict[str, str], start: Callable[[str], T]) -> T | OSError:
    """``start(path)`` for each candidate of a PATH search like ``execvpe``
    (``start`` execs or spawns ``path``, raising OSError if it cannot):
    the first result, or the error to report."""
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
            return start(candidate)
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


def set_rlimits(plan: dict[str, Any]) -> None:
    limits = list(plan["rlimits"])
    if plan.get("cpu_time") is not None:
        me = resource.getrusage(resource.RUSAGE_SELF)
        limits.append((resource.RLIMIT_CPU, *cpu_rlimit(float(plan["cpu_time"]), me)))
    for res, soft, hard in limits:
        resource.setrlimit(res, _clamp(soft, hard, resource.getrlimit(res)[1]))


def cpu_rlimit(limit: float, me: Any) -> tuple[int, int]:
    """``RLIMIT_CPU`` (the per-process backstop of a CPU-time limit, whole
    seconds) for a process that has used ``me`` so far: the limit plus
    that, rounded up. The CPU it counts includes nanobox's before the
    command: a forked-ahead command process's steps before its exec, carried
    across it, which the command must not lose from its limit; stage A's
    build, where A sets the limits on itself before it spawns the command
    (A must not be stopped by it; the spawned command, whose count starts
    at 0, inherits a backstop looser by up to a second). The fork server's
    poll is what stops a run at the limit; this only stops a process the
    poll missed."""
    used = me.ru_utime + me.ru_stime
    soft = max(1, -int(-(limit + used) // 1))  # ceil
    return soft, soft + 1


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
    """All steps in one go (the no-namespace init's command)."""
    try:
        prepare(plan, err_w, keep=(notify_sock, *stdio))
    except SetupError as exc:
        report(err_w, b"S", exc.step, exc.cause)
        os._exit(125)
    environ = take_stdio(plan["env"], stdio, err_w, keep=(notify_sock,))
    seal_and_exec(plan, plan["argv"], environ, err_w, notify_sock)


class SetupError(Exception):
    def __init__(self, step: str, cause: BaseException) -> None:
        super().__init__(step)
        self.step = step
        self.cause = cause


def prepare(plan: dict[str, Any], err_w: int, keep: tuple[int, ...]) -> None:
    """The steps that depend neither on the run (argv, env, stdio) nor
    restrict the syscalls this process still makes to receive it: signals,
    session, fds, cwd, no_new_privs, capabilities, Landlock. A sandbox
    built ahead of its run (see ``spawn``) does them before the run
    exists. Raises ``SetupError`` naming the step."""
    step = "signals"
    try:
        signals.set_wakeup_fd(-1)
        # Caught signals return to their default at execve by themselves;
        # ignored ones stay ignored (SIGPIPE, SIGXFSZ, the server's SIGINT,
        # anything the caller inherited): only those are reset.
        for sig in range(1, signals.NSIG):
            try:
                if signals.getsignal(sig) == signals.SIG_IGN:
                    signals.signal(sig, signals.SIG_DFL)
            except (OSError, ValueError, RuntimeError):
                pass
        signals.pthread_sigmask(signals.SIG_SETMASK, ())

        step = "setsid"
        os.setsid()

        step = "fds"
        close_all_except({err_w, *keep})

        step = "chdir"
        os.chdir(plan["cwd"])
        os.umask(0o022)

        step = "no_new_privs"
        k.prctl(k.PR_SET_NO_NEW_PRIVS, 1)
        step = "drop capabilities"
        k.drop_all_capabilities()

        if plan.get("landlock") and (plan.get("mode") == "nons" or landlock.abi_version() > 0):
            step = "landlock"
            landlock.apply(landlock.LandlockPlan.from_json(plan["landlock"]))
    except BaseException as exc:  # noqa: BLE001 - reported by the caller
        raise SetupError(step, exc) from None


def take_stdio(
    env: Any, stdio: tuple[int, int, int], err_w: int, keep: tuple[int, ...] = ()
) -> dict[str, str]:
    """The run's stdio on 0..2, every other fd but ``err_w`` and ``keep``
    closed; returns the run's environment as a dict."""
    try:
        high = [os.dup(fd) for fd in stdio]  # never collide with 0..2
        for target, fd in enumerate(high):
            os.dup2(fd, target, inheritable=True)
        close_all_except({err_w, *keep})
        return dict(env)
    except BaseException as exc:  # noqa: BLE001
        report(err_w, b"S", "stdio", exc)
        os._exit(125)


def seal_and_exec(
    plan: dict[str, Any], argv: list[str], env: dict[str, str], err_w: int, notify_sock: int
) -> NoReturn:
    """The last steps, right before ``execve`` (nothing but handing the
    listener over and the exec runs under them): rlimits, the seccomp filter
    (its listener and this process's CPU time so far, which is nanobox's,
    go to ``notify_sock``), then ``execve`` with a PATH search."""
    step = "rlimits"
    try:
        set_rlimits(plan)
        prog = plan.get("seccomp")
        notify = prog and notify_sock >= 0 and bool(plan.get("seccomp_notify"))
        sock = socks.Socket(fileno=notify_sock) if notify_sock >= 0 else None
        me = resource.getrusage(resource.RUSAGE_SELF)
        msg = b"L" + wire.status_dumps([me.ru_utime, me.ru_stime])
        if sock is not None and not notify:
            sock.send(msg)  # before the filter: nothing but the exec runs under it
        listener = None
        if prog:
            step = "seccomp"
            listener = seccomp_loader.install(bytes.fromhex(prog), new_listener=bool(notify))
        if sock is not None and listener is not None:
            step = "seccomp listener"
            socks.send_fds(sock, [msg], [listener])
            os.close(listener)
        if sock is not None:
            sock.detach()
    except BaseException as exc:  # noqa: BLE001
        report(err_w, b"S", step, exc)
        os._exit(125)
    failure: BaseException
    try:
        failure = _exec_search(argv, env)
    except BaseException as err:  # noqa: BLE001
        failure = err
    report(err_w, b"X", "exec", failure)
    os._exit(127)
