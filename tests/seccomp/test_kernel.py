"""The compiled default policy on the real kernel.

A child interpreter installs the filter with :func:`loader.install` and then
``execve``\\ s a probe script (so the test also shows that the filter survives
``execve``, which is how stage 2 uses it).  The probe makes each system call of
interest through ``libc.syscall`` and reports ``(result, errno)`` as JSON.  The
same probe also runs without the filter (the control run), so every check shows
a difference the filter makes, not just a failure that would happen anyway.
Risky probes (``ptrace(PTRACE_TRACEME)``, ``unshare``, a raw ``clone``) run in
a forked grandchild so that, if the filter were broken, the damage stays there.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nanobox._seccomp import loader
from nanobox._seccomp.policy import ARCHES, UnsupportedArchError, native_arch

SRC = Path(__file__).resolve().parents[2] / "src"

try:
    ARCH = native_arch()
except UnsupportedArchError as exc:
    pytest.skip(str(exc), allow_module_level=True)
AVAILABLE, WHY = loader.available()
if not AVAILABLE:
    pytest.skip(WHY, allow_module_level=True)

NR = ARCHES[ARCH].syscalls

PROBE = r"""
import ctypes, json, os, socket, sys
NR = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
out = {}

def sc(nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *(ctypes.c_ulong(a) for a in args))
    return [r, ctypes.get_errno() if r == -1 else 0]

def forked(fn):
    # Run fn in a grandchild; a broken filter then only affects that process.
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(wr, json.dumps(fn()).encode())
        finally:
            os._exit(0)
    os.close(wr)
    data = os.read(rd, 4096)
    os.waitpid(pid, 0)
    return json.loads(data)

def raw_clone(flags):
    r = sc(NR["clone"], flags | 17, 0, 0, 0, 0)  # 17 = SIGCHLD
    if r[0] == 0:
        os._exit(0)  # the raw child: leave at once
    if r[0] > 0:
        os.waitpid(r[0], 0)
    return r

out["getpid"] = sc(NR["getpid"])
os.mkdir(sys.argv[2])
out["mkdir"] = os.path.isdir(sys.argv[2])
out["ptrace_traceme"] = forked(lambda: sc(NR["ptrace"], 0, 0, 0, 0))
out["unshare_newuser"] = forked(lambda: sc(NR["unshare"], 0x10000000))
out["clone_newuser"] = forked(lambda: raw_clone(0x10000000))
out["tiocsti_high_bits"] = sc(NR["ioctl"], 0, 0xDEADBEEF00005412, 0)
out["socket_vsock"] = sc(NR["socket"], 40, 1, 0)
out["socket_inet"] = sc(NR["socket"], 2, 1, 0)
out["personality_rie"] = forked(lambda: sc(NR["personality"], 0x0400000))
out["clone3"] = sc(NR["clone3"], 0, 0)
out["nr_1000"] = sc(1000)
if len(sys.argv) > 3:  # x86_64 only: an x32 call; under the filter it kills us
    print(json.dumps(out), flush=True)
    out = {"x32": sc(int(sys.argv[3]), 0, 0, 0, 0)}
print(json.dumps(out), flush=True)
"""

INSTALL = r"""
import os, sys
from nanobox._seccomp.compiler import compile
from nanobox._seccomp.default import default_policy
from nanobox._seccomp.loader import install
install(compile(default_policy()))
os.execv(sys.executable, [sys.executable, "-I", *sys.argv[1:]])
"""


def _run(filtered: bool, tmp_path: Path, x32_nr: int | None = None) -> tuple[int, list[Any]]:
    target = tmp_path / ("filtered" if filtered else "control")
    args = ["-c", PROBE, json.dumps(NR), str(target)]
    if x32_nr is not None:
        args.append(str(x32_nr))
    cmd = [sys.executable, "-c", INSTALL, *args] if filtered else [sys.executable, "-I", *args]
    proc = subprocess.run(
        cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )  # fmt: skip
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode not in (0, -signal.SIGSYS):
        pytest.fail(f"probe failed ({proc.returncode}): {proc.stderr}")
    return proc.returncode, lines


def _yama_scope() -> int:
    try:
        return int(Path("/proc/sys/kernel/yama/ptrace_scope").read_text())
    except (OSError, ValueError):
        return 0


def _err(result: list[int]) -> int:
    assert result[0] == -1, f"expected failure, got {result}"
    return result[1]


def test_default_policy_on_the_kernel(tmp_path: Path) -> None:
    code, lines = _run(True, tmp_path)
    assert code == 0, lines
    inside = lines[0]
    code, lines = _run(False, tmp_path)
    assert code == 0
    outside = lines[0]

    # still works
    assert inside["getpid"][0] > 0 and inside["mkdir"] is True
    assert inside["socket_inet"][0] >= 0
    # denied, where the control run got something else
    assert _err(inside["ptrace_traceme"]) == errno.EPERM
    if _yama_scope() < 3:  # scope 3 forbids PTRACE_TRACEME for everyone
        assert outside["ptrace_traceme"] == [0, 0]
    assert _err(inside["unshare_newuser"]) == errno.EPERM
    assert _err(inside["clone_newuser"]) == errno.EPERM
    assert _err(inside["tiocsti_high_bits"]) == errno.EPERM
    assert _err(outside["tiocsti_high_bits"]) == errno.ENOTTY  # fd 0 is /dev/null
    assert _err(inside["socket_vsock"]) == errno.EAFNOSUPPORT
    assert _err(inside["personality_rie"]) == errno.EPERM
    assert outside["personality_rie"][0] >= 0
    assert _err(inside["clone3"]) == errno.ENOSYS
    assert _err(outside["clone3"]) == errno.EINVAL  # NULL args, size 0
    assert _err(inside["nr_1000"]) == errno.ENOSYS
    assert _err(outside["nr_1000"]) == errno.ENOSYS


@pytest.mark.skipif(ARCH != "x86_64", reason="x32 is an x86_64 ABI")
def test_x32_ptrace_kills_the_process(tmp_path: Path) -> None:
    x32_ptrace = 0x40000000 | NR["ptrace"]
    code, lines = _run(True, tmp_path, x32_ptrace)
    assert code == -signal.SIGSYS, f"x32 ptrace was not stopped: {lines}"
    assert len(lines) == 1  # the first report, then killed before the second
    # Control: an x32 getpid, harmless whether or not the host enables x32.
    code, lines = _run(False, tmp_path, 0x40000000 | NR["getpid"])
    assert code == 0 and "x32" in lines[-1]  # ENOSYS or a pid, but alive


LISTENER = r"""
import ctypes, os
from nanobox._seccomp.compiler import compile
from nanobox._seccomp.loader import install
from nanobox._seccomp.policy import ALLOW, NOTIFY, Policy, Rule
fd = install(compile(Policy(ALLOW, (Rule("getppid", NOTIFY),))), log=True, new_listener=True)
assert isinstance(fd, int) and fd >= 0, fd
assert os.get_inheritable(fd) is False
os.close(fd)  # with no listener left, notified calls fail with ENOSYS
libc = ctypes.CDLL(None, use_errno=True)
r = libc.syscall(%d)
print(r, ctypes.get_errno())
"""


def test_new_listener_returns_a_notify_fd() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", LISTENER % NR["getppid"]],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(SRC)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["-1", str(errno.ENOSYS)]


def test_install_rejects_a_bad_program_with_einval() -> None:
    code = (
        "import errno\n"
        "from nanobox._seccomp.loader import install\n"
        "try:\n"
        "    install(bytes(8))  # ld [0] without a return: invalid\n"
        "except OSError as e:\n"
        "    print(e.errno == errno.EINVAL)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )  # fmt: skip
    assert proc.stdout.strip() == "True", proc.stderr
