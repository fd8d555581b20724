"""The forker: the one process that forks stage A for the fork server.

Forking a process write-protects all of its memory; a Python process then
copies page after page as it goes on (every object it touches has a
reference count to write). The fork server runs the event loop of every
sandbox, so if it forked each run's stage A itself it would pay those
copy-on-write faults again after every fork, on its own critical path.
Instead it forks this process once, at start-up; the forker does nothing
but fork stage A on request, so its pages stay untouched and shared, and
the server's memory is never write-protected again.

Protocol over a ``SOCK_SEQPACKET`` pair:

- server -> forker: ``ident``, ``sid`` and the ``join_files``, separated by
  NUL (``encode_request``), with the fds
  ``[sock, csock, status_w, cmd_r]`` of the new stage A (``spawn``);
- forker -> server: ``F<n>`` when it has received ``n`` more requests
  (their fds are out of the socket: the server has at most 16 unacknowledged
  ones out, and the forker acknowledges every ``ACK_EVERY``), and
  ``X<ident> <user> <system>`` once that stage A has exited (and been reaped
  here), ``ident`` being a negative number chosen by the server, ``user``
  and ``system`` its CPU time in microseconds, its exit included.

The forker is not a subreaper: when a stage A exits, PID 1 and the command
go to the server, which supervises them. It dies with the server
(``PR_SET_PDEATHSIG``, and EOF on its socket).
"""

from __future__ import annotations

import gc
import os
import select

from . import signals, socks, spawn
from . import sys as k
from .fds import close_all_except
from .socks import recv_fds

PR_SET_PDEATHSIG = 1
MAX_OUTSTANDING = 16
ACK_EVERY = 8  # requests received per ``F`` notice (< MAX_OUTSTANDING)


class Forker:
    """The server's handle on its forker. Requests are queued and sent
    without blocking (``flush``): the forker may be busy, and its own
    notices to the server must never wait for a server that waits for it."""

    def __init__(self) -> None:
        mine, theirs = socks.socketpair()
        server = os.getpid()
        pid = os.fork()
        if pid == 0:
            try:
                mine.close()
                _main(theirs.detach(), server)
            finally:
                os._exit(1)
        theirs.close()
        self.pid = pid
        self.sock = mine
        self.counter = 0
        # (A list, not a deque: ``collections`` is not imported for it.)
        self.pending: list[tuple[bytes, list[int]]] = []
        self.outstanding = 0  # sent, not yet acknowledged by the forker (``F<n>``)

    def fork(self, fds: list[int], join_files: list[str], sid: int | None) -> int:
        """Have a stage A forked with ``fds`` (which this takes over and
        closes once sent); returns its ident (negative)."""
        self.counter += 1
        ident = -self.counter
        self.pending.append((encode_request(ident, join_files, sid), fds))
        self.flush()
        return ident

    def flush(self) -> None:
        """Send queued requests, at most ``MAX_OUTSTANDING`` not yet received
        by the forker: fds in a socket's queue count against the user's
        limit of fds in flight (RLIMIT_NOFILE; ETOOMANYREFS beyond), shared
        with every sandbox of this user."""
        while self.pending and self.outstanding < MAX_OUTSTANDING:
            msg, fds = self.pending[0]
            try:
                socks.send_fds(self.sock, [msg], fds, socks.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                pass  # the forker is gone (the server notices): the starters see EOF
            else:
                self.outstanding += 1
            del self.pending[0]
            for fd in fds:
                os.close(fd)

    def exited(self) -> list[tuple[int, tuple[float, float] | None]]:
        """Stage A processes that have exited since last asked: their
        idents, with the user and system CPU time each used (None if the
        notice has none)."""
        out: list[tuple[int, tuple[float, float] | None]] = []
        while True:
            try:
                msg = self.sock.recv(64, socks.MSG_DONTWAIT)
            except BlockingIOError:
                return out
            if not msg:
                raise ConnectionError("the forker is gone")
            if msg.startswith(b"X"):
                ident, *used = msg[1:].split()
                cpu = (int(used[0]) / 1e6, int(used[1]) / 1e6) if len(used) == 2 else None
                out.append((int(ident), cpu))
            elif msg.startswith(b"F"):
                self.outstanding = max(0, self.outstanding - int(msg[1:]))
                self.flush()


class Direct:
    """What a one-shot server (the CLI's) has instead of a forker: it forks
    its stage A itself. Such a server makes one stage A, at its start,
    where the forker's own fork, its start-up, the request's round trip and,
    at the end, its exit would all be on a cold start's critical path (the
    copy-on-write faults the server takes after this fork are the cost
    instead: it does little after it). The ident is the stage A's pid; the
    server reaps it (it is the server's child)."""

    sock = None  # (nothing to watch: exits come as SIGCHLD)

    def __init__(self) -> None:
        self.pending: list[tuple[bytes, list[int]]] = []  # (never any)

    def fork(self, fds: list[int], join_files: list[str], sid: int | None) -> int:
        """Fork a stage A with ``fds`` (which this closes here); its pid."""
        try:
            pid = os.fork()
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        if pid == 0:
            try:
                k.set_name(b"nanobox-spare")
                spawn.starter_main(fds[0], fds[1], fds[2], fds[3], join_files, sid)
            finally:
                os._exit(1)
        for fd in fds:
            os.close(fd)
        return pid

    def flush(self) -> None:
        pass

    def exited(self) -> list[tuple[int, tuple[float, float] | None]]:
        return []


def encode_request(ident: int, join_files: list[str], sid: int | None) -> bytes:
    """A request's bytes: fields separated by NUL (no path holds one), so
    that the forker decodes it with one ``split`` (see ``_main``). Paths
    are bytes to the kernel: any that is not UTF-8 (surrogate-escaped, as
    ``os.fsdecode`` gives it) round-trips."""
    fields = [str(ident), "" if sid is None else str(sid), *join_files]
    return "\0".join(fields).encode("utf-8", "surrogateescape")


def decode_request(msg: bytes) -> tuple[int, list[str], int | None]:
    ident, sid, *files = msg.decode("utf-8", "surrogateescape").split("\0")
    return int(ident), files, int(sid) if sid else None


def _main(sock_fd: int, server: int) -> None:
    gc.disable()  # touch as few pages as possible: they stay shared
    k.prctl(PR_SET_PDEATHSIG, signals.SIGKILL)
    if os.getppid() != server:
        os._exit(0)
    k.set_name(b"nanobox-forker")
    k.libc_sleep()  # looked up here once, not again in every stage A
    signals.set_wakeup_fd(-1)
    signals.signal(signals.SIGINT, signals.SIG_IGN)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    close_all_except({sock_fd, wake_r, wake_w})
    signals.set_wakeup_fd(wake_w)
    signals.signal(signals.SIGCHLD, _ignore)
    _loop(socks.Socket(fileno=sock_fd), wake_r, wake_w)


def _ignore(_signum: int, _frame: object) -> None:
    """SIGCHLD's handler: the signal only has to write the wakeup fd."""


def _loop(sock: socks.Socket, wake_r: int, wake_w: int) -> None:
    """Every fork write-protects this process's memory again, so each page
    it writes afterwards is copied: the loop is kept small (``poll``, not
    ``selectors``; a request's fields split, not JSON), which here halves
    the pages it copies per stage A."""
    sock_fd = sock.fileno()
    poller = select.poll()
    poller.register(sock_fd, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    idents: dict[int, int] = {}
    received = 0
    while True:
        for fd, _ev in poller.poll():
            if fd == sock_fd:
                try:
                    msg, fds = recv_fds(sock, 1 << 16, 4)
                except InterruptedError:
                    continue
                if not msg:
                    os._exit(0)  # the server is gone; its starters see EOF too
                received += 1
                if received == ACK_EVERY:
                    # Received: their fds are no longer in flight. Said
                    # for a batch (each notice wakes the server): the
                    # server counts at most ACK_EVERY - 1 too many.
                    sock.send(b"F%d" % received)
                    received = 0
                ident, join_files, sid = decode_request(msg)
                try:
                    pid = os.fork()
                except OSError:
                    pid = -1
                if pid == 0:
                    try:
                        k.set_name(b"nanobox-spare")
                        sock.close()
                        for wfd in (wake_r, wake_w):
                            os.close(wfd)
                        spawn.starter_main(fds[0], fds[1], fds[2], fds[3], join_files, sid)
                    finally:
                        os._exit(1)
                for rfd in fds:
                    os.close(rfd)
                if pid < 0:
                    sock.send(b"X%d 0 0" % ident)  # never started: its fds are closed
                else:
                    idents[pid] = ident
            else:
                try:
                    while os.read(wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                while True:
                    try:
                        pid, _status, ru = os.wait4(-1, os.WNOHANG)
                    except ChildProcessError:
                        break
                    if pid == 0:
                        break
                    gone = idents.pop(pid, None)
                    if gone is not None:
                        used = (round(ru.ru_utime * 1e6), round(ru.ru_stime * 1e6))
                        sock.send(b"X%d %d %d" % (gone, *used))
