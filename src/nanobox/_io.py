"""Per-run I/O state shared by the sync and asyncio drivers (no I/O here
besides non-blocking reads/writes on fds the drivers hand it)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ._linux import socks, wire
from ._linux.socks import MSG_NOSIGNAL, recv_msg

READ_CHUNK = 1 << 16
Sink = Callable[[bytes], None]


class Capture:
    """One output stream: keeps at most ``cap`` bytes, counts all of them,
    passes the kept bytes to ``sink`` (live streaming) as they arrive."""

    __slots__ = ("cap", "chunks", "fd", "kept", "sink", "total", "truncated")

    def __init__(self, fd: int, cap: int, sink: Sink | None) -> None:
        self.fd = fd
        self.cap = cap
        self.chunks: list[bytes] = []
        self.kept = 0
        self.total = 0
        self.truncated = False
        self.sink = sink

    def feed(self, data: bytes) -> bool:
        """Take ``data``; return True the first time the cap is exceeded."""
        self.total += len(data)
        room = self.cap - self.kept
        if len(data) <= room:
            keep = data
        else:
            keep = data[:room]
        if keep:
            self.chunks.append(keep)
            self.kept += len(keep)
            if self.sink is not None:
                self.sink(keep)
        if len(keep) < len(data) and not self.truncated:
            self.truncated = True
            return True
        return False

    def value(self) -> bytes:
        return b"".join(self.chunks)


class RunIO:
    """What one run is waiting for: the server's message and EOF on both
    output pipes (every writer is dead once the init has reported)."""

    def __init__(
        self,
        chan: socks.Socket,
        out: Capture,
        err: Capture,
        stdin_fd: int | None,
        stdin_data: bytes | None,
        kill_on_overflow: bool,
    ) -> None:
        self.chan = chan
        self.out = out
        self.err = err
        self.open_outputs = {out.fd: out, err.fd: err}
        self.stdin_fd = stdin_fd
        self.stdin_data = memoryview(stdin_data) if stdin_data is not None else None
        self.kill_on_overflow = kill_on_overflow
        self.message: dict[str, Any] | None = None
        self.chan_closed = False
        self.output_killed = False
        self.on_listeners: Callable[[list[int]], None] | None = None
        self.proxy_run: str | None = None
        self.interrupted: str | None = None  # the CLI's signal that killed the run
        self.output_error: tuple[str, str, str] | None = None  # (stream, errno name, message)
        self.output_kill_sent = False

    @property
    def done(self) -> bool:
        return (self.message is not None or self.chan_closed) and not self.open_outputs

    def on_output(self, fd: int) -> bool:
        """Read from ``fd``; return False once it reached EOF."""
        cap = self.open_outputs[fd]
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return True
        if not data:
            del self.open_outputs[fd]
            os.close(fd)
            return False
        if cap.feed(data) and self.kill_on_overflow and not self.output_killed:
            self.output_killed = True
            self.kill()
        return True

    def on_chan(self) -> bool:
        """Read one message; return False once the final one (or EOF) came."""
        try:
            data, fds = recv_msg(self.chan, 4)
        except BlockingIOError:
            return True
        except OSError:
            data, fds = b"", []
        if not data:
            for fd in fds:
                os.close(fd)
            self.chan_closed = True
            return False
        if data == wire.LISTENERS:  # (from stage A: never decoded)
            if self.on_listeners is not None and len(fds) == 2:
                self.on_listeners(fds)
            else:
                for fd in fds:
                    os.close(fd)
            return True
        for fd in fds:
            os.close(fd)
        self.message = wire.loads(data)  # the server's reply
        return False

    def on_stdin(self) -> bool:
        """Write more input; return False when stdin is finished (closed)."""
        assert self.stdin_fd is not None and self.stdin_data is not None
        try:
            n = os.write(self.stdin_fd, self.stdin_data[:READ_CHUNK])
        except BlockingIOError:
            return True
        except OSError:  # EPIPE: the command stopped reading
            n = len(self.stdin_data)
        self.stdin_data = self.stdin_data[n:]
        if not self.stdin_data:
            self.close_stdin()
            return False
        return True

    def close_stdin(self) -> None:
        if self.stdin_fd is not None:
            os.close(self.stdin_fd)
            self.stdin_fd = None

    def interrupt(self, signame: str) -> None:
        """The caller was told to stop (the CLI got ``signame``): kill the
        run, whose result then says so."""
        if self.interrupted is None and self.message is None and not self.chan_closed:
            self.interrupted = signame  # (not once the run has ended: nothing was killed)
            self.kill()

    def fail_output(self, stream: str, errname: str, message: str) -> None:
        """The caller cannot deliver the command's ``stream`` (its own
        stdout is on a full disk, say): kill the run if it still goes on;
        its result says what was lost either way."""
        if self.output_error is None:
            self.output_error = (stream, errname, message)
            if self.message is None and not self.chan_closed:
                self.output_kill_sent = True
                self.kill()

    def kill(self) -> None:
        try:
            # (MSG_NOSIGNAL: a server that has shut its receiving side, the
            # run being over, answers EPIPE, not a SIGPIPE to the caller)
            self.chan.send(b"K", MSG_NOSIGNAL)
        except OSError:
            pass

    def close(self) -> None:
        """Release every fd; a run still going on is killed: asked to
        (``K``), since the channel's EOF does not come while a process forked
        from the caller meanwhile holds a copy of it (a cancelled run went
        on until that child exited), and by the EOF otherwise."""
        if self.message is None and not self.chan_closed:
            self.kill()
        self.close_stdin()
        for fd in list(self.open_outputs):
            os.close(fd)
        self.open_outputs.clear()
        self.chan.close()
