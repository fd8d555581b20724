"""``connect()`` on behalf of the sandbox, so a pathname unix socket outside
the sandbox's own writable places cannot be reached.

A read-only bind does not stop ``connect()`` on a unix socket (it needs
write permission on the socket file, not a writable mount), and Landlock
gained a right for it only after this kernel (``RESOLVE_UNIX``). So every
``connect()`` is a seccomp user notification, and the sandbox init performs
it itself on a copy of the caller's socket (``pidfd_getfd``): it reads the
address once from the caller's memory, decides on what it read, and connects
with exactly that, so nothing the caller changes afterwards matters
(no ``SECCOMP_USER_NOTIF_FLAG_CONTINUE``, which would re-read the address).

A pathname address is resolved in the sandbox's view (relative paths from
the caller's cwd), pinned with an ``O_PATH`` fd, and allowed only when the
socket lies in a writable root or one of the sandbox's own tmpfs mounts;
otherwise the call fails with ``EACCES``. Abstract and unnamed addresses,
and every other family, are connected as given (the network namespace and
Landlock's abstract-socket scope isolate those), but for abstract addresses
where the sandbox shares the host's network namespace: those are refused
(``ECONNREFUSED``, as Landlock's scope answers), because a connect made here
is outside that scope and could reach a host service's socket. Each connect runs on a
worker thread of its own (kept a while for the next), because a blocking
``connect`` may take long.
"""

from __future__ import annotations

import _thread
import ctypes
import fcntl
import os
import struct
import time

from . import signals, socks

TYPE_CHECKING = False  # not ``typing``'s: the fork server starts without it
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)
_libc.connect.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
_libc.syscall.restype = ctypes.c_long
SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438
SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40082102
SO_DOMAIN = 39
_AF_UNIX_BYTES = struct.pack("=H", socks.AF_UNIX)
_SUN_LEN = 110  # sizeof(struct sockaddr_un)


PIDFD_THREAD = os.O_EXCL  # (6.9+: a pidfd of any thread, not only a leader)


def _pidfd_open(pid: int, proc: str) -> int:
    """A pidfd of the task ``pid`` (a notification's pid is the calling
    thread's id, often not its process's): with ``PIDFD_THREAD`` where the
    kernel has it, else of its thread group, read from ``proc``."""
    for flags in (PIDFD_THREAD, 0):
        pidfd = _libc.syscall(
            ctypes.c_long(SYS_PIDFD_OPEN), ctypes.c_int(pid), ctypes.c_uint(flags)
        )
        if pidfd >= 0:
            return int(pidfd)
        err = ctypes.get_errno()
        if flags == 0 or err != 22:  # (EINVAL: no PIDFD_THREAD here)
            raise OSError(err, "pidfd_open")
        with open(proc, "rb") as f:
            tgid = [line for line in f.read().split(b"\n") if line.startswith(b"Tgid:")]
        pid = int(tgid[0].split()[1]) if tgid else pid
    raise AssertionError("unreachable")


def _pidfd_getfd(pidfd: int, fd: int) -> int:
    got = _libc.syscall(
        ctypes.c_long(SYS_PIDFD_GETFD), ctypes.c_int(pidfd), ctypes.c_int(fd), ctypes.c_uint(0)
    )
    if got < 0:
        raise OSError(ctypes.get_errno(), "pidfd_getfd")
    return int(got)


def _ignore(_signo: int, _frame: object) -> None:
    pass


def _valid(listener_fd: int, nid: int) -> bool:
    """Does notification ``nid`` still wait for its answer?"""
    while True:
        try:
            fcntl.ioctl(listener_fd, SECCOMP_IOCTL_NOTIF_ID_VALID, struct.pack("=Q", nid))
            return True
        except InterruptedError:  # (a signal to this thread: ask again)
            continue
        except OSError:
            return False


def _family(sock: int) -> int:
    """``SO_DOMAIN`` of ``sock`` (an fd that may not be a socket: ENOTSOCK)."""
    value, size = ctypes.c_int(0), ctypes.c_uint(ctypes.sizeof(ctypes.c_int))
    if _libc.getsockopt(sock, socks.SOL_SOCKET, SO_DOMAIN, ctypes.byref(value), ctypes.byref(size)):
        raise OSError(ctypes.get_errno(), "getsockopt")
    return value.value


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


class _Pool:
    """At most ``size`` threads that make calls queued for them, each kept
    ``IDLE_S`` for the next call (a thread per ``connect()`` cost ~60 µs of
    the ~250 µs a sandboxed ``connect()`` took here). Calls past ``size``
    wait for a thread. ``running`` says which thread makes which call since
    when, so that a call whose caller gave up can be interrupted
    (``ConnectBroker.cancel_abandoned``). Built on ``_thread``: importing
    ``threading`` would register an at-fork hook in the fork server that
    makes every fork ~0.25 ms slower. (Nothing forks a process that has a
    pool: the helper and the init never fork once they broker.)"""

    IDLE_S = 2.0

    def __init__(self, size: int) -> None:
        self.size = size
        self.mutex = _thread.allocate_lock()
        self.jobs: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self.idle: list[_thread.LockType] = []  # a waiting thread's lock, held
        self.running: dict[int, tuple[tuple[Any, ...], float]] = {}  # thread -> (args, since)
        self.threads = 0

    def submit(self, fn: Callable[..., None], args: tuple[Any, ...]) -> bool:
        """Have ``fn(*args)`` called on a thread of the pool; False if none
        could be started and none is left to take it (it is then not made)."""
        job = (fn, args)
        with self.mutex:
            self.jobs.append(job)
            if self.idle:
                self.idle.pop().release()
                return True
            if self.threads >= self.size:
                return True  # (a thread takes it once it is done with its call)
            self.threads += 1
        try:
            _thread.start_new_thread(self._work, ())
        except RuntimeError:  # (no thread: a pids or memory limit)
            with self.mutex:
                self.threads -= 1
                if any(j is job for j in self.jobs) and not self.threads:
                    self.jobs = [j for j in self.jobs if j is not job]
                    return False
        return True

    def prune(self, keep: Callable[[tuple[Any, ...]], bool]) -> None:
        """Drop the queued calls whose ``args`` ``keep`` refuses."""
        with self.mutex:
            self.jobs = [j for j in self.jobs if keep(j[1])]

    def _work(self) -> None:
        me = _thread.get_ident()
        wake = _thread.allocate_lock()
        wake.acquire()
        try:
            while True:
                with self.mutex:
                    job = self.jobs.pop(0) if self.jobs else None
                    if job is None:
                        self.idle.append(wake)
                    else:
                        self.running[me] = (job[1], time.monotonic())
                if job is not None:
                    try:
                        job[0](*job[1])
                    finally:
                        with self.mutex:
                            del self.running[me]
                    continue
                if not wake.acquire(timeout=self.IDLE_S):
                    with self.mutex:
                        if wake in self.idle:  # (else a call came as the wait ended)
                            self.idle.remove(wake)
                            self.threads -= 1
                            return
                    wake.acquire()  # (released by that call: take it again)
        except BaseException:  # (MemoryError...): the thread is gone, its slot is not
            with self.mutex:
                self.threads -= 1
            raise


class _Call:
    """A ``connect()`` under way: its socket (device, inode) and calling
    thread (the notification's pid), whether it is being answered, whether
    a restart of it was told it had connected."""

    __slots__ = ("answering", "sock", "superseded", "tid")

    def __init__(self, sock: tuple[int, int], tid: int) -> None:
        self.sock = sock
        self.tid = tid
        self.answering = False
        self.superseded = False


class ConnectBroker:
    """Performs the sandbox's ``connect()`` calls (see the module docstring)."""

    # Connects made at once for one sandbox; the rest wait. Those whose
    # caller has gone (killed, or interrupted by a signal: a restarted call
    # is a new notification) are interrupted by ``cancel_abandoned``: a
    # command whose connects block, interrupted every millisecond, had a
    # thread made for every notification, thousands in seconds.
    MAX_THREADS = 128
    CANCEL = signals.SIGUSR1  # (its handler: ``install_canceller``)

    def __init__(
        self,
        allowed_roots: list[str],
        *,
        proc_fd: int | None = None,
        on_denied: Callable[[dict[str, object]], None] | None = None,
        refuse_abstract: bool = False,
    ) -> None:
        self.allowed = [os.path.realpath(r) for r in allowed_roots]
        # Where the sandbox shares the host's network namespace, an abstract
        # address may be a host service's: the broker, outside the sandbox's
        # Landlock domain, cannot tell (Landlock's scope, which refuses
        # those, does not hold for connects made on the sandbox's behalf).
        self.refuse_abstract = refuse_abstract
        self.pool = _Pool(self.MAX_THREADS)
        self.prune_at = 64
        self.signalled: dict[int, tuple[Any, float]] = {}  # thread -> (its call, when)
        # Per socket: the calls on it under way, and which thread's one
        # connected it for a caller that had gone meanwhile (``_connect``).
        self.lock = _thread.allocate_lock()
        self.calls: dict[tuple[int, int], list[_Call]] = {}  # socket -> its calls under way
        # (socket, thread): connected by a call whose caller had gone; an
        # insertion-ordered dict, capped (see ``_done``).
        self.lost: dict[tuple[tuple[int, int], int], None] = {}
        self.denied: list[dict[str, object]] = []
        # Where the processes are found: "/proc" of this process's view, or
        # (for the fork server's helper, outside the sandbox's pid
        # namespace) an fd of the host's procfs that is also the cwd.
        self.proc_fd = proc_fd
        self.on_denied = on_denied

    @classmethod
    def install_canceller(cls) -> None:
        """In the main thread of the process that brokers: a handler for
        ``CANCEL`` that does nothing, so that the signal only interrupts the
        worker's blocking call (no ``SA_RESTART``)."""
        signals.signal(cls.CANCEL, _ignore)

    def cancel_abandoned(self, older_than: float = 0.05) -> bool:
        """Interrupt the calls, running ``older_than`` seconds or more, whose
        notification is no longer valid (their caller gave up: a blocking
        ``connect`` to a full backlog would hold its thread for ever).
        Returns whether any call is still running or waiting."""
        pool = self.pool
        now = time.monotonic()
        with pool.mutex:
            for ident, (args, since) in pool.running.items():
                last = self.signalled.get(ident, (None, 0.0))
                if last[0] is args and now - last[1] < older_than:
                    continue  # (signalled already, and still leaving: not again at once)
                if now - since >= older_than and not _valid(args[0], args[1]):
                    self.signalled[ident] = (args, now)
                    try:
                        signals.pthread_kill(ident, self.CANCEL)
                    except OSError:
                        pass
            for ident in [i for i in self.signalled if i not in pool.running]:
                del self.signalled[ident]
            return bool(pool.running or pool.jobs)

    def _proc(self, rel: str) -> str:
        return rel if self.proc_fd is not None else f"/proc/{rel}"

    def handle(
        self,
        listener_fd: int,
        nid: int,
        pid: int,
        args: tuple[int, ...],
        respond: Callable[[int, int], bool],
    ) -> None:
        if not self.pool.submit(self._run, (listener_fd, nid, pid, args, respond)):
            respond(nid, 11)  # EAGAIN: no thread to make the call on
            return
        if len(self.pool.jobs) >= self.prune_at:
            # Calls interrupted meanwhile are notified again when restarted:
            # the old notifications need no answer.
            self.pool.prune(lambda job: _valid(job[0], job[1]))
            self.prune_at = max(64, 2 * len(self.pool.jobs))

    def _run(
        self,
        listener_fd: int,
        nid: int,
        pid: int,
        args: tuple[int, ...],
        respond: Callable[[int, int], bool],
    ) -> None:
        mine: list[_Call] = []  # (this call, once its socket is known: see ``_connect``)
        try:
            err = self._connect(listener_fd, nid, pid, args, mine)
            if err == 106 and mine:  # EISCONN
                err = self._restarted(mine[0], err)
        except OSError as exc:
            err = exc.errno or 22
        except Exception:  # noqa: BLE001 - never leave the caller hanging
            err = 22
        if mine:
            with self.lock:
                mine[0].answering = True
        delivered = False
        try:
            delivered = respond(nid, err)
        finally:
            if mine:
                self._done(mine[0], err == 0 and not delivered)

    def _done(self, call: _Call, lost: bool) -> None:
        with self.lock:
            calls = self.calls.get(call.sock)
            if calls is not None and call in calls:
                calls.remove(call)
                if not calls:
                    del self.calls[call.sock]
            if lost and not call.superseded:
                # Connected for a caller that had gone (interrupted: its
                # restart, from the same thread, finds the socket connected).
                self.lost[(call.sock, call.tid)] = None
                while len(self.lost) > 256:
                    del self.lost[next(iter(self.lost))]

    def _restarted(self, call: _Call, err: int) -> int:
        """``call`` got EISCONN (``err``): 0 if it is a restart whose socket
        an earlier call of the same thread's connected, else ``err``."""
        # A call restarted after a signal (SA_RESTART) is a new notification
        # from the same thread, while the one it replaced may still connect
        # the same socket on another of ours: if that one connected it, this
        # call has (it got EISCONN: 7 to 10 times in 10 with a signal every
        # 2-10 ms). Another thread's call, or the same thread's once answered,
        # is a real EISCONN. Decided at once, but for an earlier call being
        # answered (an ioctl that does not block): the caller may be
        # interrupted again any moment (waiting longer hung such a caller).
        deadline = time.monotonic() + 0.05
        while True:
            with self.lock:
                same = [
                    c for c in self.calls.get(call.sock, ()) if c is not call and c.tid == call.tid
                ]
                connecting = [c for c in same if not c.answering]
                if connecting:
                    for c in connecting:
                        c.superseded = True  # (its answer, if lost, is this one)
                    return 0
                if not same or time.monotonic() > deadline:
                    if self.lost.pop((call.sock, call.tid), False) is None:
                        return 0
                    return err
            time.sleep(0.0002)  # (an earlier call of the thread's is being answered)

    def _connect(
        self, listener_fd: int, nid: int, pid: int, args: tuple[int, ...], mine: list[_Call]
    ) -> int:
        """Make the call; its record goes to ``mine`` once its socket is
        known."""
        fd, addr_ptr, addr_len = args[0] & 0xFFFFFFFF, args[1], args[2] & 0xFFFFFFFF
        if addr_len > 128:
            return 22  # EINVAL, as the kernel answers past a sockaddr_storage
        if addr_ptr >= 1 << 63:
            return 14  # EFAULT (no process has that address: pread could not take it)
        # The task is pinned (a pidfd, its memory open), then checked to be
        # the one that made the call: its pid may have been reused since.
        pidfd = _pidfd_open(pid, self._proc(f"{pid}/status"))
        try:
            mem = os.open(self._proc(f"{pid}/mem"), os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.ioctl(listener_fd, SECCOMP_IOCTL_NOTIF_ID_VALID, struct.pack("=Q", nid))
                addr = os.pread(mem, addr_len, addr_ptr)
            except OSError as exc:
                if exc.errno == 5:  # EIO: nothing mapped there
                    return 14  # EFAULT, the kernel's answer
                raise
            finally:
                os.close(mem)
            if len(addr) < addr_len:
                return 14  # (the rest is unmapped)
            sock = _pidfd_getfd(pidfd, fd)
        finally:
            os.close(pidfd)
        try:
            st = os.fstat(sock)
        except OSError:
            os.close(sock)
            raise
        call = _Call((st.st_dev, st.st_ino), pid)
        with self.lock:
            self.calls.setdefault(call.sock, []).append(call)
        mine.append(call)
        try:
            # An address the kernel would refuse (another family, a length
            # outside 3..110, AF_UNSPEC to dissolve a datagram association)
            # goes to it as it is, for its own answer.
            if (
                _family(sock) == socks.AF_UNIX
                and addr[:2] == _AF_UNIX_BYTES
                and 2 < len(addr) <= _SUN_LEN
            ):
                if addr[2:3] != b"\0":
                    return self._connect_path(sock, pid, addr)
                if self.refuse_abstract:
                    name = "@" + addr[3:].decode(errors="replace")
                    # ECONNREFUSED: what Landlock's scope answers here, and
                    # what a name no one listens on gets.
                    return self._refuse({"path": name, "abstract": True}, pid, 111)
            return self._raw_connect(sock, addr)
        finally:
            os.close(sock)

    def _refuse(self, entry: dict[str, object], pid: int, err: int) -> int:
        entry["pid"] = pid
        self.denied.append(entry)
        if self.on_denied is not None:
            self.on_denied(entry)
        return err

    def _connect_path(self, sock: int, pid: int, addr: bytes) -> int:
        raw = addr[2:].split(b"\0", 1)[0]
        if not raw:
            return 22
        cwd = os.open(self._proc(f"{pid}/cwd"), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                pin = os.open(raw, os.O_PATH | os.O_CLOEXEC, dir_fd=cwd)
            except OSError as exc:
                return exc.errno or 2
        finally:
            os.close(cwd)
        try:
            real = os.readlink(self._proc(f"self/fd/{pin}"))
            if not _under(real, self.allowed):
                return self._refuse({"path": real}, pid, 13)  # EACCES, as without write permission
            target = self._proc(f"self/fd/{pin}").encode()
            return self._raw_connect(sock, struct.pack("=H", socks.AF_UNIX) + target + b"\0")
        finally:
            os.close(pin)

    @staticmethod
    def _raw_connect(sock: int, addr: bytes) -> int:
        if _libc.connect(sock, addr, len(addr)) == 0:
            return 0
        return ctypes.get_errno()
