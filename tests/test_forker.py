"""The forker (``_linux/forker.py``): its requests, its batched
acknowledgements (flow control of the fds in flight) and its report of each
stage A's exit, against a real forker process forking real starters."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys

import pytest

from conftest import descendants
from nanobox._linux import forker


@pytest.mark.parametrize(
    ("ident", "files", "sid"),
    [
        (-1, [], None),
        (-42, ["/sys/fs/cgroup/memory/nanobox/x/tasks"], None),
        (-7, ["/a/tasks", "/b b/tasks", "/c/cgroup.procs"], 0x60000123),
        (-3, [], 0),
        (-9, [os.fsdecode(b"/sys/fs/cgroup/caf\xe9/tasks")], None),  # not UTF-8
    ],
)
def test_a_request_decodes_to_what_was_encoded(
    ident: int, files: list[str], sid: int | None
) -> None:
    assert forker.decode_request(forker.encode_request(ident, files, sid)) == (ident, files, sid)


def _recv(sock: socket.socket, timeout: float) -> bytes | None:
    ready, _, _ = select.select([sock], [], [], timeout)
    return sock.recv(64) if ready else None


def test_the_forker_acknowledges_in_batches_and_reports_every_exit() -> None:
    """Eight requests get one ``F8`` (each notice wakes the server); every
    starter that exits (here: its plan socket closed, as for a discarded
    spare) is reported by its ident, with the CPU time it used."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    code = (
        "import os, sys; from nanobox._linux import forker; "
        "forker._main(int(sys.argv[1]), os.getppid())"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(theirs.fileno())], pass_fds=(theirs.fileno(),)
    )
    theirs.close()
    plan_socks: list[socket.socket] = []
    others: list[int] = []
    try:
        for i in range(1, forker.ACK_EVERY + 1):
            if i == forker.ACK_EVERY:
                # Nothing acknowledged before the batch is complete.
                assert _recv(mine, 0.3) is None
            sock_mine, sock_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            csock_mine, csock_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            status_r, status_w = os.pipe()
            cmd_r, cmd_w = os.pipe()
            fds = [sock_theirs.fileno(), csock_theirs.fileno(), status_w, cmd_r]
            socket.send_fds(mine, [forker.encode_request(-i, [], None)], fds)
            for s in (sock_theirs, csock_theirs):
                s.close()
            os.close(status_w)
            os.close(cmd_r)
            plan_socks.append(sock_mine)
            others += [csock_mine.detach(), status_r, cmd_w]
        assert _recv(mine, 10) == b"F%d" % forker.ACK_EVERY
        for s in plan_socks:
            s.close()  # EOF instead of a plan: the starter exits
        gone = set()
        while len(gone) < forker.ACK_EVERY:
            msg = _recv(mine, 10)
            assert msg is not None and msg.startswith(b"X"), msg
            ident, user, system = msg[1:].split()  # its CPU time, in microseconds
            assert int(user) >= 0 and int(system) >= 0 and int(user) + int(system) > 0, msg
            gone.add(int(ident))
        assert gone == {-i for i in range(1, forker.ACK_EVERY + 1)}
    finally:
        mine.close()  # EOF: the forker exits
        for fd in others:
            os.close(fd)
        assert proc.wait(timeout=10) == 0


def test_the_server_counts_a_batch_as_received() -> None:
    """``Forker.flush`` keeps at most ``MAX_OUTSTANDING`` requests
    unacknowledged, and an ``F<n>`` makes room for ``n`` more."""
    server_end, forker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    handle = forker.Forker.__new__(forker.Forker)
    handle.pid, handle.sock, handle.counter, handle.outstanding = 0, server_end, 0, 0
    handle.pending = []
    try:
        for _ in range(forker.MAX_OUTSTANDING + 3):
            r, w = os.pipe()
            os.close(r)
            handle.fork([w], [], None)  # the fd is closed once sent
        assert handle.outstanding == forker.MAX_OUTSTANDING
        assert len(handle.pending) == 3
        forker_end.send(b"F%d" % forker.ACK_EVERY)
        assert handle.exited() == []
        assert len(handle.pending) == 0
        assert handle.outstanding == forker.MAX_OUTSTANDING - forker.ACK_EVERY + 3
        received = 0
        while _recv(forker_end, 0) is not None:
            received += 1
        assert received == forker.MAX_OUTSTANDING + 3
        # Exits, with the CPU each stage A used (in microseconds; "0 0" for
        # one never forked): all of a batch read, in order.
        for notice in (b"X-1 1500 250", b"X-2 0 0", b"X-3"):
            forker_end.send(notice)
        assert handle.exited() == [(-1, (0.0015, 0.00025)), (-2, (0.0, 0.0)), (-3, None)]
    finally:
        server_end.close()
        forker_end.close()


def test_the_clis_server_forks_its_stage_a_itself(workspace: object) -> None:
    """A one-shot server (the CLI's) has no forker process: it forks its one
    stage A itself (``forker.Direct``); a library's server has one."""
    import time

    import nanobox
    from nanobox._linux import client

    cli = subprocess.Popen(
        [sys.executable, "-m", "nanobox", "run", "--", "sleep", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        seen: set[str] = set()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "sleep" not in seen and cli.poll() is None:
            seen.update(descendants(cli.pid).values())
            time.sleep(0.01)
        assert "sleep" in seen, seen  # (the command runs: the server's child)
        assert "nanobox-forker" not in seen, seen
        assert cli.wait(timeout=30) == 0, cli.stderr
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert nanobox.run(["true"]).returncode == 0
    assert "nanobox-forker" in descendants(client.get_server().pid).values()
