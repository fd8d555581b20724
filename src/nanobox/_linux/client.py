"""The caller's side of the fork server: start it once, submit runs.

One server per caller process, started lazily and shared by every
``Sandbox`` and thread. Submitting is one ``sendmsg`` on a SEQPACKET socket,
which the kernel keeps atomic, so threads need no lock for it. After
``os.fork()`` in the caller, the child forgets the parent's server and
starts its own on first use.
"""

from __future__ import annotations

import _thread
import os
import sys

from . import early, socks, wire

TYPE_CHECKING = False  # not ``typing``'s: the CLI imports this module first
if TYPE_CHECKING:
    from typing import Any

# ``_thread``, not ``threading``: the CLI forks its server from this process,
# and ``threading``'s at-fork hook would slow every fork the server makes.
_lock = _thread.allocate_lock()
_server: ForkServer | None = None


class ServerGone(OSError):
    """The fork server is not running any more."""


class ForkServer:
    def __init__(self, *, fork: bool = False, forked: tuple[int, int] | None = None) -> None:
        self.popen: Any = None  # subprocess.Popen, when the server was exec'd
        self.pid: int
        self.userns = False
        self.userns_detail = ""
        self.said_hello = False
        if forked is not None:  # by ``early.fork_oneshot``
            self.pid = forked[0]
            self.ctrl = socks.Socket(fileno=forked[1])
            return
        parent, child = socks.socketpair()
        if fork:
            self.pid = self._fork(parent, child)
        else:
            import subprocess

            pkg_parent = os.path.dirname(
                os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            )
            boot = (
                f"import sys; sys.path.insert(0, {pkg_parent!r}); "
                f"from nanobox._linux.forkserver import main; main({child.fileno()})"
            )
            self.popen = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", boot],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
            self.pid = self.popen.pid
        child.close()
        self.ctrl = parent

    def await_hello(self) -> None:
        """The server first says what it can do (user namespaces or not)."""
        if self.said_hello:
            return
        self.ctrl.settimeout(30)
        try:
            data = self.ctrl.recv(65536)
            hello = wire.loads(data) if data else {}
        except (OSError, ValueError):
            hello = {}
        self.ctrl.settimeout(None)
        if hello.get("t") != "hello":
            self.close()
            raise ServerGone(0, "the nanobox fork server did not start")
        self.userns = bool(hello["userns"])
        self.userns_detail = str(hello["detail"])
        self.said_hello = True

    def hello_pending(self) -> bool:
        """Has the server yet to say hello (nothing to read from it yet)?"""
        if self.said_hello:
            return False
        try:
            self.ctrl.recv(1, socks.MSG_PEEK | socks.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False  # (await_hello says what went wrong)
        return False

    @staticmethod
    def _fork(parent: socks.Socket, child: socks.Socket) -> int:
        """Fork the server from this (single-threaded) process: no new
        interpreter to start (the CLI, when ``early`` did not fork one)."""
        pid = os.fork()
        if pid == 0:
            try:
                parent.close()
                early.serve(child.detach(), oneshot=False)
            finally:
                os._exit(1)
        return pid

    def submit(self, plan: bytes, fds: list[int]) -> None:
        try:
            socks.send_msg(self.ctrl, plan, fds)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ServerGone(exc.errno, "the nanobox fork server is gone") from None

    def close(self) -> None:
        self.ctrl.close()
        if self.popen is not None:
            self.popen.wait()
        else:
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass


def get_server(*, fork: bool = False, hello: bool = True) -> ForkServer:
    """This process's server, started if need be. ``hello=False``: do not
    wait for it to say what it can do (``ensure_hello`` does)."""
    global _server
    with _lock:
        if _server is None:
            forked = early.take()
            _server = ForkServer(forked=forked) if forked else ForkServer(fork=fork)
        server = _server
    if hello:
        ensure_hello(server)
    return server


def ensure_hello(server: ForkServer) -> None:
    """Wait for ``server``'s hello (``ServerGone`` if it never comes)."""
    global _server
    with _lock:
        try:
            server.await_hello()
        except ServerGone:
            if _server is server:
                _server = None
            raise


def has_server() -> bool:
    """Has this process started its server (and not shut it down)?"""
    return _server is not None


def reset_server(dead: ForkServer) -> None:
    """Forget ``dead`` (after ServerGone) so the next run starts a new one."""
    global _server
    with _lock:
        if _server is dead:
            _server = None
    try:
        dead.close()
    except OSError:
        pass


def shutdown() -> None:
    """Stop this process's server (it also stops when the process exits)."""
    global _server
    with _lock:
        server, _server = _server, None
    if server is not None:
        server.close()


def shutdown_before_exit(timeout: float = 2.0) -> None:
    """Stop this process's server and wait (up to ``timeout`` seconds) until
    it is gone: for a process about to exit without the interpreter's
    teardown (the CLI), so that no process of nanobox's outlives it. The
    server ends its sandboxes, removes their cgroups and exits when its
    control socket closes; a server stuck longer (a sandbox in an
    uninterruptible sleep) is left to finish by itself."""
    global _server
    with _lock:
        server, _server = _server, None
    if server is None:
        return
    server.ctrl.close()
    if server.popen is None:  # (an exec'd server is not this process's concern at exit)
        early.wait_gone(server.pid, timeout)


def _after_fork_in_child() -> None:
    global _server, _lock
    _lock = _thread.allocate_lock()
    if _server is not None:
        try:
            _server.ctrl.close()
        except OSError:
            pass
    _server = None


os.register_at_fork(after_in_child=_after_fork_in_child)
