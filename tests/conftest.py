"""Shared helpers. Every test runs real sandboxes against the real kernel."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PY = sys.executable
IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root")
    for item in items:
        if "root_only" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Path]:
    """A fresh directory used as the sandbox's cwd (its writable workspace)."""
    ws = tmp_path / "ws"
    ws.mkdir()
    old = os.getcwd()
    os.chdir(ws)
    try:
        yield ws
    finally:
        os.chdir(old)


@pytest.fixture
def marker() -> str:
    """A unique string to find processes by their command line."""
    return f"nanobox-test-{uuid.uuid4().hex}"


def pids_with(marker: str) -> list[int]:
    """PIDs (host view) of processes whose command line contains ``marker``."""
    found = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                if marker.encode() in fh.read():
                    found.append(int(name))
        except OSError:
            continue
    return found


def wait_until(pred: object, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return bool(pred())  # type: ignore[operator]


def nanobox_cli(*args: str, input: bytes | None = None, cwd: str | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI as a user would (a separate process)."""
    return subprocess.run(
        [PY, "-m", "nanobox", *args],
        input=input,
        capture_output=True,
        cwd=cwd,
        timeout=timeout,
    )


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
