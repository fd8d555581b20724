"""Namespaces and privileges: each claim tested inside the sandbox, with a
control run outside showing the same probe gives the other answer there."""

from __future__ import annotations

import ctypes
import os
import pty
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import nanobox
from conftest import SPY, userns_usable, wait_until

PY = sys.executable


def sandboxed(code: str, **kw: object) -> nanobox.Result:
    r = nanobox.run([SPY, "-c", code], timeout=30, **kw)  # type: ignore[arg-type]
    assert r.outcome is nanobox.Outcome.EXITED, (r.outcome, r.stderr)
    return r


def outside(code: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([PY, "-c", code], capture_output=True, timeout=30)


LIST_PIDS = "import os; print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))"


def test_sees_only_its_own_processes(workspace: Path) -> None:
    inside = eval(sandboxed(LIST_PIDS).stdout)
    assert inside == [1, 2], inside  # the nanobox init and the command itself
    host = eval(outside(LIST_PIDS).stdout)
    assert os.getpid() in host and len(host) > 2


def test_own_pid_namespace_and_not_pid_1(workspace: Path) -> None:
    code = "import os; print(os.readlink('/proc/self/ns/pid'), os.getpid())"
    ns_in, pid_in = sandboxed(code).stdout.split()
    ns_out, pid_out = outside(code).stdout.split()
    assert ns_in != ns_out
    assert pid_in == b"2" and pid_out != b"2"


def test_shell_kill_term_self_behaves_normally(workspace: Path) -> None:
    r = nanobox.run(["sh", "-c", "kill -TERM $$; echo survived"], timeout=10)
    assert r.outcome is nanobox.Outcome.SIGNALED and r.returncode == -15 and r.stdout == b""


NETDEVS = "print(sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]))"


def test_only_loopback(workspace: Path) -> None:
    assert eval(sandboxed(NETDEVS).stdout) == ["lo"]
    assert eval(sandboxed("import os; print(os.listdir('/sys/class/net'))").stdout) == ["lo"]
    code = "import os; print(os.readlink('/proc/self/ns/net'))"
    assert sandboxed(code).stdout != outside(code).stdout


def test_loopback_is_up_and_usable(workspace: Path) -> None:
    code = (
        "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen();"
        "c=socket.create_connection(s.getsockname()); a,_=s.accept(); c.send(b'hi');"
        "print(a.recv(2).decode())"
    )
    assert sandboxed(code).stdout == b"hi\n"


def test_cannot_reach_host_loopback_server(workspace: Path) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    code = (
        f"import socket\ntry:\n socket.create_connection(('127.0.0.1',{port}),timeout=2)\n"
        " print('connected')\nexcept OSError as e:\n print('refused', e.errno)"
    )
    try:
        assert sandboxed(code).stdout.startswith(b"refused")
        assert outside(code).stdout == b"connected\n"
    finally:
        srv.close()


def test_hostname_differs(workspace: Path) -> None:
    code = "import socket; print(socket.gethostname())"
    assert sandboxed(code).stdout == b"nanobox\n"
    assert outside(code).stdout.strip() == socket.gethostname().encode() != b"nanobox"


def test_host_sysv_ipc_invisible(workspace: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    key = 0x4E420000 | (uuid.uuid4().int & 0xFFFF)
    shmid = libc.shmget(key, 4096, 0o1600)  # IPC_CREAT | 0600
    assert shmid >= 0, os.strerror(ctypes.get_errno())
    code = f"print(any(l.split()[0] == '{key}' for l in open('/proc/sysvipc/shm').readlines()[1:]))"
    try:
        assert sandboxed(code).stdout == b"False\n"
        assert outside(code).stdout == b"True\n"
    finally:
        libc.shmctl(shmid, 0, None)  # IPC_RMID


def test_host_abstract_socket_invisible(workspace: Path) -> None:
    name = f"\0nanobox-test-{uuid.uuid4().hex}"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(name)
    srv.listen()
    code = (
        "import socket\ns=socket.socket(socket.AF_UNIX)\n"
        f"try:\n s.connect({name!r}); print('connected')\nexcept OSError as e: print('failed')"
    )
    try:
        assert sandboxed(code).stdout == b"failed\n"
        assert outside(code).stdout == b"connected\n"
    finally:
        srv.close()


STATUS = (
    "d=dict(l.split(':',1) for l in open('/proc/self/status'));"
    "print(d['CapEff'].strip(), d['CapPrm'].strip(), d['CapBnd'].strip(), d['NoNewPrivs'].strip())"
)


def test_no_capabilities_and_no_new_privs(workspace: Path) -> None:
    eff, prm, bnd, nnp = sandboxed(STATUS).stdout.split()
    assert int(eff, 16) == 0 and int(prm, 16) == 0 and int(bnd, 16) == 0
    assert nnp == b"1"
    # Control: a plain user namespace (what the sandbox is built on) hands
    # out every capability; nanobox must have dropped them.
    control = "import ctypes; assert ctypes.CDLL(None).unshare(0x10000000) == 0;" + STATUS
    eff_c, _prm, _bnd, nnp_c = outside(control).stdout.split()
    assert int(eff_c, 16) != 0 and nnp_c == b"0"


def test_sandbox_root_cannot_regain_capabilities(workspace: Path) -> None:
    # Creating a nested user namespace would hand capabilities back.
    code = (
        "import ctypes, os; r = ctypes.CDLL(None, use_errno=True).unshare(0x10000000);"
        "print(r, ctypes.get_errno())"
    )
    out = sandboxed(code).stdout.split()
    # Without seccomp (issue 5) the kernel may allow a nested namespace, but
    # it can only ever hold capabilities over the sandbox's own namespaces.
    assert out[0] in (b"0", b"-1")


TIOCSTI = (
    "import fcntl, termios, sys\n"
    "try:\n fcntl.ioctl(0, termios.TIOCSTI, b'Z'); print('injected')\n"
    "except OSError as e:\n print('denied', e.errno)"
)


def test_tiocsti_cannot_reach_callers_terminal(workspace: Path) -> None:
    master, slave = pty.openpty()
    try:
        r = nanobox.run([SPY, "-c", TIOCSTI], stdin=slave, timeout=30)
        assert r.stdout.startswith(b"denied"), r.stdout + r.stderr
        # Control: a process whose controlling terminal is that pty can inject.
        ctl = subprocess.run(
            [PY, "-c", "import fcntl, termios\nfcntl.ioctl(0, termios.TIOCSCTTY, 0)\n" + TIOCSTI],
            stdin=slave,
            capture_output=True,
            start_new_session=True,
            timeout=30,
        )
        legacy = Path("/proc/sys/dev/tty/legacy_tiocsti")
        if legacy.exists() and legacy.read_text().strip() == "0" and os.geteuid() != 0:
            pytest.skip("TIOCSTI is disabled host-wide (dev.tty.legacy_tiocsti=0): no control")
        assert ctl.stdout == b"injected\n", ctl.stdout + ctl.stderr
    finally:
        os.close(master)
        os.close(slave)


def test_environment_is_clean_by_default(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOBOX_SECRET_TOKEN", "hunter2")
    code = "import os; print(sorted(os.environ))"
    names = eval(sandboxed(code, env={"EXTRA": "1"}).stdout)
    assert "NANOBOX_SECRET_TOKEN" not in names
    assert set(names) <= {"PATH", "HOME", "LANG", "TERM", "EXTRA", "LC_CTYPE"}
    assert "EXTRA" in names and "PATH" in names
    inherit = nanobox.Policy(inherit_env=True)
    names2 = eval(sandboxed(code, policy=inherit).stdout)
    assert "NANOBOX_SECRET_TOKEN" in names2


_SIGNALS_PROBE = (
    "import signal, subprocess, sys\n"
    "sys.path[:0] = sys.argv[2:]\n"
    "import nanobox\n"
    "for s in (signal.SIGHUP, signal.SIGUSR1, signal.SIGTERM):\n"
    "    signal.signal(s, signal.SIG_IGN)\n"
    "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})\n"
    "cmd = ['grep', '-E', '^Sig(Ign|Blk)', '/proc/self/status']\n"
    "if sys.argv[1] == 'sandbox':\n"
    "    sys.stdout.write(nanobox.run(cmd).stdout.decode())\n"
    "else:\n"
    "    sys.stdout.write(subprocess.run(cmd, capture_output=True, text=True).stdout)\n"
)


def test_command_starts_with_default_signal_dispositions(workspace: Path) -> None:
    """A caller that ignores or blocks signals (nohup, a service manager)
    does not pass that on: the command can be stopped by SIGTERM/SIGHUP."""
    src = str(Path(nanobox.__file__).parent.parent)

    def probe(where: str) -> dict[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", _SIGNALS_PROBE, where, src],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return {
            k.strip(): int(v, 16) for k, v in (ln.split(":") for ln in out.stdout.split("\n") if ln)
        }

    outside = probe("outside")
    assert outside["SigIgn"] and outside["SigBlk"], outside  # the control inherits them
    inside = probe("sandbox")
    assert inside == {"SigIgn": 0, "SigBlk": 0}, inside


def _children() -> set[str]:
    me = os.getpid()
    return set(open(f"/proc/{me}/task/{me}/children").read().split())


def _state(pid: str) -> str:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _uid_map_through(fd: int) -> str:
    """/proc/self/uid_map as seen from the user namespace ``fd``."""
    from nanobox._linux import sys as k

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            k.setns(fd, k.CLONE_NEWUSER)
            os.write(w, open("/proc/self/uid_map").read().encode())
        finally:
            os._exit(0)
    os.close(w)
    data = os.read(r, 4096).decode()
    os.close(r)
    os.waitpid(pid, 0)
    return " ".join(data.split())


def _sig_masks(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as fh:
        return {
            key: int(value, 16)
            for key, _, value in (line.partition(":\t") for line in fh)
            if key in ("SigBlk", "SigIgn")
        }


@pytest.mark.skipif(not userns_usable(), reason="no user namespaces (see test_nouserns)")
def test_the_id_mapping_holder_blocks_every_signal() -> None:
    """The holder shares the caller's memory, so no signal handler may run
    on its stack: it starts with every signal blocked (the kernel keeps
    SIGKILL and SIGSTOP, glibc its two internal ones); the caller's own
    mask is as it was."""
    import signal

    from nanobox._linux import sys as k

    before = _sig_masks(os.getpid())
    pid, pidfd = k.spawn_userns_holder(5)
    try:
        held = _sig_masks(pid)["SigBlk"]
        assert _sig_masks(os.getpid()) == before
    finally:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        os.close(pidfd)
        os.waitpid(pid, 0)
    for sig in range(1, 65):
        blocked = bool(held >> (sig - 1) & 1)
        assert blocked == (sig not in (9, 19, 32, 33)), (sig, hex(held))
    assert not before["SigBlk"] >> (signal.SIGTERM - 1) & 1  # (the control: here it is not)


@pytest.mark.root_only
@pytest.mark.parametrize("holder", ["clone_vm", "forked", "expired"])
def test_the_id_mapping_namespace_of_a_root_caller(
    holder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """make_userns maps root to the given uid, through a child sharing the
    caller's memory or (where that fails, or the child is gone already:
    "expired", reaped by the kernel as stage A ignores SIGCHLD) a forked
    one, and leaves no process behind either way."""
    import signal
    import time

    from nanobox._linux import sys as k
    from nanobox._linux import userns

    if holder == "expired":
        spawn = k.spawn_userns_holder

        def expired(seconds: int) -> tuple[int, int]:
            held = spawn(0)  # sleeps 0 s
            time.sleep(0.05)
            return held

        monkeypatch.setattr(k, "spawn_userns_holder", expired)
        old = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        try:
            fd = userns.make_userns("0 654321 1\n", "0 654321 1\n")
        finally:
            signal.signal(signal.SIGCHLD, old)
        try:
            userns.reap_holders()
            assert _uid_map_through(fd) == "0 654321 1"
        finally:
            os.close(fd)
        return
    if holder == "forked":

        def refuse(seconds: int) -> tuple[int, int]:
            raise OSError(22, "clone")

        monkeypatch.setattr(k, "spawn_userns_holder", refuse)
    else:

        def no_fork(uid_map: str, gid_map: str) -> int:
            raise AssertionError("fell back to a fork")

        monkeypatch.setattr(userns, "_make_userns_forked", no_fork)
    before = _children()
    fd = userns.make_userns("0 654321 1\n", "0 654321 1\n")
    try:
        for pid in _children() - before:  # killed, reaped later by stage A
            assert wait_until(lambda p=pid: _state(p) in ("Z", "X", "gone"), timeout=5)
        userns.reap_holders()
        assert _children() == before
        assert _uid_map_through(fd) == "0 654321 1"
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("user:[")
    finally:
        os.close(fd)
