"""The CLI's fork server, forked before the CLI imports anything else.

``nanobox run`` makes one run. Its server's start-up (its imports, the
first stage A) then overlaps the CLI's own (its imports and the plan) on
the other core, the earlier the better: this module needs nothing but
``os`` and ``_socket``, so the fork happens right after the interpreter
has started (importing ``client`` first, with ``socket`` and ``json``,
cost the server ~6 ms of its head start here). ``client.get_server``
adopts the server forked here.
"""

from __future__ import annotations

import _socket
import os
import sys

_forked: tuple[int, int] | None = None  # (pid, control socket fd), until adopted


def fork_oneshot() -> None:
    """Fork a one-shot server (the caller is single-threaded: the CLI),
    unless this process has one (``cli.main`` called by a library user)."""
    client = sys.modules.get(__name__.rpartition(".")[0] + ".client")
    if client is None:
        _fork()  # (nothing else could have started one)
        return
    with client._lock:  # as get_server takes this one, or starts its own
        if not client.has_server():
            _fork()


def _fork() -> None:
    global _forked
    if _forked is not None:
        return
    parent, child = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        try:
            parent.close()
            serve(child.detach(), oneshot=True)
        finally:
            os._exit(1)
    child.close()
    _forked = (pid, parent.detach())


def take() -> tuple[int, int] | None:
    """The server forked by ``fork_oneshot``, once."""
    global _forked
    forked, _forked = _forked, None
    return forked


def end_unadopted(timeout: float = 2.0) -> None:
    """Stop the server forked here if ``client`` never adopted it (the CLI
    failed before its run) and wait until it is gone (see ``wait_gone``)."""
    forked = take()
    if forked is not None:
        pid, ctrl_fd = forked
        os.close(ctrl_fd)  # its hello goes nowhere: it shuts down
        wait_gone(pid, timeout)


def wait_gone(pid: int, timeout: float) -> None:
    """Wait up to ``timeout`` seconds for this process's child ``pid`` to
    exit, and reap it. (A child stuck longer, e.g. behind a sandbox in an
    uninterruptible sleep, is left to finish by itself; so is one when
    the wait is interrupted.)"""
    pidfd = -1
    try:
        pidfd = os.pidfd_open(pid)
        import select

        poller = select.poll()  # (not select(): the fd may be above 1023)
        poller.register(pidfd, select.POLLIN)
        if poller.poll(int(timeout * 1000)):
            os.waitpid(pid, os.WNOHANG)
    except (AttributeError, OSError, KeyboardInterrupt):
        pass  # (a kernel before 5.3, reaped already, or an interrupt: stop waiting)
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def serve(ctrl_fd: int, *, oneshot: bool) -> None:
    """Become the fork server (in a child forked from the caller)."""
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    from . import fds, forkserver

    fds.close_all_except({ctrl_fd, 2})
    forkserver.main(ctrl_fd, refill=not oneshot)


def _after_fork_in_child() -> None:
    global _forked
    _forked = None  # the parent's server


os.register_at_fork(after_in_child=_after_fork_in_child)
