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
Landlock's abstract-socket scope isolate those). Each connect runs in its
own thread, because a blocking ``connect`` may take long.
"""

from __future__ import annotations

import _thread
import ctypes
import fcntl
import os
import struct

from . import socks

TYPE_CHECKING = False  # not ``typing``'s: the fork server starts without it
if TYPE_CHECKING:
    from collections.abc import Callable

_libc = ctypes.CDLL(None, use_errno=True)
_libc.connect.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
_libc.syscall.restype = ctypes.c_long
SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438
SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40082102
SO_DOMAIN = 39


def _pidfd_getfd(pid: int, fd: int) -> int:
    pidfd = _libc.syscall(ctypes.c_long(SYS_PIDFD_OPEN), ctypes.c_int(pid), ctypes.c_uint(0))
    if pidfd < 0:
        raise OSError(ctypes.get_errno(), "pidfd_open")
    try:
        got = _libc.syscall(
            ctypes.c_long(SYS_PIDFD_GETFD), ctypes.c_int(pidfd), ctypes.c_int(fd), ctypes.c_uint(0)
        )
        if got < 0:
            raise OSError(ctypes.get_errno(), "pidfd_getfd")
        return int(got)
    finally:
        os.close(pidfd)


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


class ConnectBroker:
    """Performs the sandbox's ``connect()`` calls (see the module docstring)."""

    def __init__(
        self,
        allowed_roots: list[str],
        *,
        proc_fd: int | None = None,
        on_denied: Callable[[dict[str, object]], None] | None = None,
    ) -> None:
        self.allowed = [os.path.realpath(r) for r in allowed_roots]
        self.denied: list[dict[str, object]] = []
        # Where the processes are found: "/proc" of this process's view, or
        # (for the fork server's helper, outside the sandbox's pid
        # namespace) an fd of the host's procfs that is also the cwd.
        self.proc_fd = proc_fd
        self.on_denied = on_denied

    def _proc(self, rel: str) -> str:
        return rel if self.proc_fd is not None else f"/proc/{rel}"

    def handle(
        self,
        listener_fd: int,
        nid: int,
        pid: int,
        args: tuple[int, ...],
        respond: Callable[[int, int], None],
    ) -> None:
        # The low-level module: importing ``threading`` would register an
        # at-fork hook in the fork server that makes every fork ~0.25 ms slower.
        _thread.start_new_thread(self._run, (listener_fd, nid, pid, args, respond))

    def _run(
        self,
        listener_fd: int,
        nid: int,
        pid: int,
        args: tuple[int, ...],
        respond: Callable[[int, int], None],
    ) -> None:
        try:
            err = self._connect(listener_fd, nid, pid, args)
        except OSError as exc:
            err = exc.errno or 22
        except Exception:  # noqa: BLE001 - never leave the caller hanging
            err = 22
        respond(nid, err)

    def _connect(self, listener_fd: int, nid: int, pid: int, args: tuple[int, ...]) -> int:
        fd, addr_ptr, addr_len = args[0] & 0xFFFFFFFF, args[1], args[2] & 0xFFFFFFFF
        if addr_len > 4096 or addr_ptr == 0:
            return 22  # EINVAL (EFAULT for NULL: close enough, the kernel says EFAULT)
        with open(self._proc(f"{pid}/mem"), "rb", buffering=0) as mem:
            mem.seek(addr_ptr)
            addr = mem.read(addr_len)
        # The pid could have been reused between the notification and here.
        fcntl.ioctl(listener_fd, SECCOMP_IOCTL_NOTIF_ID_VALID, struct.pack("=Q", nid))
        sock = _pidfd_getfd(pid, fd)
        try:
            family = socks.Socket(fileno=os.dup(sock)).getsockopt(socks.SOL_SOCKET, SO_DOMAIN)
        except OSError:
            os.close(sock)
            raise
        try:
            if family == socks.AF_UNIX and len(addr) > 2 and addr[2:3] not in (b"\0", b""):
                return self._connect_path(sock, pid, addr)
            return self._raw_connect(sock, addr)
        finally:
            os.close(sock)

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
                entry: dict[str, object] = {"path": real, "pid": pid}
                self.denied.append(entry)
                if self.on_denied is not None:
                    self.on_denied(entry)
                return 13  # EACCES, as for a socket without write permission
            target = self._proc(f"self/fd/{pin}").encode()
            return self._raw_connect(sock, struct.pack("=H", socks.AF_UNIX) + target + b"\0")
        finally:
            os.close(pin)

    @staticmethod
    def _raw_connect(sock: int, addr: bytes) -> int:
        if _libc.connect(sock, addr, len(addr)) == 0:
            return 0
        return ctypes.get_errno()
