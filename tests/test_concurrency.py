"""Many sandboxes at once, from threads and from asyncio: no cross-talk, no
leaked fds, no leftover processes."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nanobox
from conftest import SPY, descendants, pids_with, wait_until

PY = sys.executable
N = 100


def _fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def _children() -> set[int]:
    """Live (non-zombie) descendants of this process, but the fork server's
    spare stage A and the sandbox it built ahead (kept for a second after a
    run, named ``nanobox-spare`` and ``nanobox-warm``)."""
    return set(descendants(os.getpid(), skip_zombies=True, prune=("nanobox-spare", "nanobox-warm")))


def _one(i: int, token: str) -> tuple[int, bytes, bytes]:
    r = nanobox.run(
        ["sh", "-c", 'echo "$0 $1"; echo "err $1" >&2; cat', token, str(i)],
        input=f"in-{i}".encode(),
        timeout=60,
    )
    return r.returncode, r.stdout, r.stderr


def test_warm_up_server(workspace: Path) -> None:
    assert nanobox.run(["true"]).returncode == 0


def test_100_from_16_threads(workspace: Path) -> None:
    nanobox.run(["true"])  # the fork server is started once, then shared
    time.sleep(0.2)  # the server's new spare (forked after the reply) has named itself
    fds_before, kids_before = _fds(), _children()
    token = uuid.uuid4().hex
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: _one(i, token), range(N)))
    for i, (code, out, err) in enumerate(results):
        assert code == 0
        assert out == f"{token} {i}\nin-{i}".encode()
        assert err == f"err {i}\n".encode()
    assert wait_until(lambda: _fds() == fds_before, timeout=5), _fds() ^ fds_before
    assert wait_until(lambda: _children() == kids_before, timeout=5), _describe(
        _children() ^ kids_before
    )


def _describe(pids: set[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ")[:80]
            out.append(f"{pid}: {cmdline!r}")
        except OSError:
            out.append(f"{pid}: gone")
    return out


def test_100_from_asyncio(workspace: Path) -> None:
    nanobox.run(["true"])
    time.sleep(0.2)  # the server's new spare (forked after the reply) has named itself
    fds_before, kids_before = _fds(), _children()
    token = uuid.uuid4().hex

    async def main() -> list[nanobox.Result]:
        return await asyncio.gather(
            *(
                nanobox.run_async(
                    ["sh", "-c", 'echo "$0 $1"; cat', token, str(i)],
                    input=f"in-{i}".encode(),
                    timeout=60,
                )
                for i in range(N)
            )
        )

    results = asyncio.run(main())
    for i, r in enumerate(results):
        assert r.returncode == 0 and r.stdout == f"{token} {i}\nin-{i}".encode()
    assert wait_until(lambda: _fds() == fds_before, timeout=5)
    assert wait_until(lambda: _children() == kids_before, timeout=5)


def test_asyncio_cancellation_kills_the_sandbox(workspace: Path, marker: str) -> None:
    async def main() -> None:
        task = asyncio.ensure_future(
            nanobox.run_async([SPY, "-c", "import time; time.sleep(300)", marker])
        )
        deadline = time.monotonic() + 20
        while not pids_with(marker) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert pids_with(marker)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(main())
    assert wait_until(lambda: not pids_with(marker), timeout=5)


def test_sandbox_object_reused_across_threads(workspace: Path) -> None:
    box = nanobox.Sandbox(nanobox.Policy(limits=nanobox.Limits(wall_time="30s")))
    with box, ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda i: box.run(["echo", str(i)]).stdout, range(32)))
    assert outs == [f"{i}\n".encode() for i in range(32)]


def test_fork_server_restarts_after_it_dies(workspace: Path) -> None:
    from nanobox._linux import client

    nanobox.run(["true"])
    server = client.get_server()
    os.kill(server.pid, 9)
    time.sleep(0.1)
    assert nanobox.run(["echo", "again"]).stdout == b"again\n"
