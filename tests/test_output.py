"""stdin sources, output capture with caps, floods, live streaming."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import nanobox

PY = sys.executable


def test_stdin_bytes_str_file_and_none(workspace: Path) -> None:
    assert nanobox.run(["cat"], input=b"abc").stdout == b"abc"
    assert nanobox.run(["cat"], input="text", text=True).stdout == "text"
    f = workspace / "in.txt"
    f.write_bytes(b"from a file")
    with open(f, "rb") as fh:
        assert nanobox.run(["cat"], stdin=fh).stdout == b"from a file"
    r = nanobox.run(["cat"], timeout=10)  # stdin is /dev/null: EOF at once
    assert r.stdout == b"" and r.returncode == 0


def test_a_bad_stdin_is_a_clear_error(workspace: Path) -> None:
    import io

    for bad in (1_000_000, -1, 2**70, io.BytesIO(b"x"), "in.txt", True):  # (no fd 1000000 here)
        with pytest.raises(nanobox.PolicyError, match=r"^stdin: expected an open file descriptor"):
            nanobox.run(["cat"], stdin=bad)  # type: ignore[arg-type]


def test_a_bad_cwd_is_a_clear_error(workspace: Path) -> None:
    # (An int was a TypeError from os.fspath, a NUL a ValueError from stat.)
    for bad in (3, b"/tmp", "a\0b", ""):
        with pytest.raises(nanobox.PolicyError, match=r"^cwd: expected a non-empty path string"):
            nanobox.run(["true"], cwd=bad)  # type: ignore[arg-type]


def test_large_input_and_output_roundtrip(workspace: Path) -> None:
    data = bytes(range(256)) * 40000  # ~10 MB, more than any pipe buffer
    r = nanobox.run(["cat"], input=data, timeout=60)
    assert r.stdout == data and r.stdout_bytes == len(data)


def test_command_that_ignores_stdin(workspace: Path) -> None:
    r = nanobox.run(["true"], input=b"x" * (4 << 20), timeout=30)
    assert r.returncode == 0


FLOOD = (
    "import sys\n"
    "sys.path[:0] = {path!r}\n"
    "import nanobox\n"
    "p = nanobox.Policy(limits=nanobox.Limits(output='1M'))\n"
    "r = nanobox.run(['head', '-c', '1G', '/dev/zero'], policy=p, timeout=300)\n"
    "# VmHWM: this process's own peak (ru_maxrss would include the pre-exec\n"
    "# copy of whatever forked it)\n"
    "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
    "print(r.stdout_truncated, r.stdout_bytes, len(r.stdout), r.returncode, hwm)\n"
)


def test_1gb_flood_with_1mib_cap_bounded_memory(workspace: Path) -> None:
    out = subprocess.run(
        [PY, "-c", FLOOD.format(path=sys.path)], capture_output=True, timeout=300, check=True
    ).stdout.split()
    truncated, total, kept, code, maxrss_kb = out
    assert truncated == b"True" and int(total) == 1 << 30 and int(kept) == 1 << 20
    assert code == b"0"
    assert int(maxrss_kb) < 100 * 1024, f"caller peaked at {int(maxrss_kb) // 1024} MiB"


def test_output_limit_kill(workspace: Path) -> None:
    p = nanobox.Policy(limits=nanobox.Limits(output="64K", on_output_limit="kill"))
    r = nanobox.run(["yes"], policy=p, timeout=30)
    assert r.outcome is nanobox.Outcome.OUTPUT_LIMIT
    assert r.stdout_truncated and len(r.stdout) == 64 * 1024
    assert r.violations[0].kind == "output_limit"


def test_stderr_capped_separately(workspace: Path) -> None:
    p = nanobox.Policy(limits=nanobox.Limits(output="10"))
    r = nanobox.run(["sh", "-c", "echo 0123456789abcdef; echo short >&2"], policy=p)
    assert r.stdout == b"0123456789" and r.stdout_truncated and r.stdout_bytes == 17
    assert r.stderr == b"short\n" and not r.stderr_truncated


def test_cli_streams_with_the_same_cap(workspace: Path) -> None:
    proc = subprocess.run(
        [
            PY,
            "-m",
            "nanobox",
            "run",
            "--output-limit",
            "10",
            "--",
            "sh",
            "-c",
            "echo 0123456789abcdef; echo err >&2",
        ],
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 0
    assert proc.stdout == b"0123456789"
    assert proc.stderr.startswith(b"err\n") and b"stdout truncated" in proc.stderr


def test_cli_output_is_live(workspace: Path) -> None:
    proc = subprocess.Popen(
        [PY, "-m", "nanobox", "run", "--", "sh", "-c", "echo first; sleep 30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"first\n"  # arrives before the command ends
    finally:
        proc.kill()
        proc.wait()


def test_a_raising_output_callback_kills_the_run_sync_and_async(workspace: Path) -> None:
    """``on_stdout`` raises: the run is killed and the error propagates, from
    ``run()`` and (it was only logged by the loop, the run going on to its
    end with a normal result) from ``run_async()``."""
    import asyncio
    import time

    def bad(_data: bytes) -> None:
        raise ValueError("boom")

    cmd = ["sh", "-c", "echo hi; sleep 20"]
    box = nanobox.Sandbox()
    try:
        for how in ("sync", "async"):
            t0 = time.monotonic()
            with pytest.raises(ValueError, match="boom"):
                if how == "sync":
                    box.run(cmd, on_stdout=bad)
                else:
                    asyncio.run(box.run_async(cmd, on_stdout=bad))
            assert time.monotonic() - t0 < 10, how
    finally:
        box.close()
