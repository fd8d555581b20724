"""The seccomp escape suite: each attempt is a raw syscall from a small C
program (tests/c/escape.c), run inside a default-policy sandbox, where it
must be refused -- and the refusal must come from the filter (a reported
syscall violation, or a SIGSYS kill for foreign ABIs), not merely from a
missing capability. Where it is safe, the same attempt runs outside in a
plain user namespace as a control, and succeeds there."""

from __future__ import annotations

import os
import platform
import pty
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

import nanobox

X86 = platform.machine() in ("x86_64", "amd64")

# name -> syscall the filter reports (None: ENOSYS answer, not reported)
REPORTED = {
    "ptrace_traceme": "ptrace",
    "ptrace_sibling": "ptrace",
    "process_vm_readv": "process_vm_readv",
    "pidfd_getfd": "pidfd_getfd",
    "unshare_user": "unshare",
    "unshare_net": "unshare",
    "clone_newuser": "clone",
    "setns": "setns",
    "socket_vsock": "socket",
    "socket_packet": "socket",
    "socket_raw": "socket",
    "socket_netlink_audit": "socket",
    "bpf": "bpf",
    "perf_event_open": "perf_event_open",
    "userfaultfd": "userfaultfd",
    "keyctl": "keyctl",
    "add_key": "add_key",
    "open_by_handle_at": "open_by_handle_at",
    "mount": "mount",
    "umount2": "umount2",
    "pivot_root": "pivot_root",
    "chroot": "chroot",
    "kexec_load": "kexec_load",
    "init_module": "init_module",
    "finit_module": "finit_module",
    "delete_module": "delete_module",
    "reboot": "reboot",
    "swapon": "swapon",
    "settimeofday": "settimeofday",
    "clock_settime": "clock_settime",
    "adjtimex": "adjtimex",
    "acct": "acct",
    "quotactl": "quotactl",
    "personality_bad": "personality",
}
QUIET_ENOSYS = [
    "clone3_newuser",
    "io_uring",
    "open_tree",
    "fsopen",
    "move_mount",
    "mount_setattr",
    "unknown_syscall",
]
KILLED = ["x32_ptrace", "x32_unshare", "x32_getpid", "int80_getpid"] if X86 else []
# Attempts that succeed in a plain user namespace without a filter (controls).
CONTROL_OK = [
    "ptrace_traceme",
    "ptrace_sibling",
    "process_vm_readv",
    "pidfd_getfd",
    "unshare_user",
    "unshare_net",
    "clone_newuser",
    "clone3_newuser",
    "keyctl",
    "add_key",
    "chroot",
    "personality_bad",
    "io_uring",
    "fsopen",
]
if X86:
    CONTROL_OK.append("int80_getpid")


def inside(cbin: Path, name: str, *args: str) -> nanobox.Result:
    return nanobox.run([str(cbin / "escape"), name, *args], timeout=30)


def control(cbin: Path, name: str) -> str:
    p = subprocess.run(
        ["unshare", "-Urmn", str(cbin / "escape"), name], capture_output=True, timeout=30
    )
    return p.stdout.decode().strip()


@pytest.mark.parametrize("name", sorted(REPORTED))
def test_denied_and_reported(workspace: Path, cbin: Path, name: str) -> None:
    r = inside(cbin, name)
    assert r.stdout.decode().startswith(f"{name} DENIED"), (r.stdout, r.stderr)
    reported = [v.data.get("syscall") for v in r.violations if v.kind == "syscall"]
    assert REPORTED[name] in reported, (name, reported)


@pytest.mark.parametrize("name", QUIET_ENOSYS)
def test_enosys_answers(workspace: Path, cbin: Path, name: str) -> None:
    r = inside(cbin, name)
    assert r.stdout == f"{name} DENIED 38\n".encode(), (r.stdout, r.stderr)


@pytest.mark.parametrize("name", KILLED)
def test_foreign_abis_are_killed(workspace: Path, cbin: Path, name: str) -> None:
    r = inside(cbin, name)
    assert r.outcome is nanobox.Outcome.SIGNALED and r.signal == signal.SIGSYS, (r, r.stdout)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
@pytest.mark.parametrize("name", CONTROL_OK)
def test_controls_succeed_without_the_filter(cbin: Path, name: str) -> None:
    assert control(cbin, name) == f"{name} OK"


def test_tiocsti_variants_on_a_terminal(workspace: Path, cbin: Path) -> None:
    master, slave = pty.openpty()
    try:
        for name in ("tiocsti", "tiocsti_highbits", "tioclinux"):
            r = nanobox.run([str(cbin / "escape"), name], stdin=slave, timeout=30)
            assert r.stdout.decode().startswith(f"{name} DENIED"), r.stdout
            assert any(v.data.get("syscall") == "ioctl" for v in r.violations), name
    finally:
        os.close(master)
        os.close(slave)


def test_process_vm_writev_and_pidfd_getfd_against_the_init(workspace: Path, cbin: Path) -> None:
    for name in ("process_vm_writev", "pidfd_getfd"):
        r = inside(cbin, name, "1")  # PID 1: the sandbox's init (its supervisor inside)
        assert r.stdout.decode().startswith(f"{name} DENIED"), r.stdout
        assert any(v.data.get("syscall") == name for v in r.violations)


def test_harmless_calls_still_work(workspace: Path, cbin: Path) -> None:
    for name in ("getpid", "personality_query"):
        assert inside(cbin, name).stdout == f"{name} OK\n".encode()


def test_seccomp_none_opt_out(workspace: Path, cbin: Path) -> None:
    r = nanobox.run(
        [str(cbin / "escape"), "keyctl"], policy=nanobox.Policy(syscalls="none"), timeout=30
    )
    assert r.stdout == b"keyctl OK\n"


def test_custom_policy_file(workspace: Path, cbin: Path, tmp_path: Path) -> None:
    pol = tmp_path / "sc.toml"
    pol.write_text(
        'base = "default"\ndeny = ["getpid"]\n'
        '[[rule]]\nsyscall = "uname"\naction = "errno"\nerrno = "EACCES"\n'
    )
    from conftest import nanobox_cli

    p = nanobox_cli("run", "--seccomp", str(pol), "--", str(cbin / "escape"), "getpid")
    assert p.stdout == b"getpid DENIED 1\n"
    bad = tmp_path / "bad.toml"
    bad.write_text('deny = ["no_such_syscall"]\n')
    p = nanobox_cli("run", "--seccomp", str(bad), "true")
    assert p.returncode == 125 and b"no_such_syscall" in p.stderr


def test_precompiled_default_filter_is_current() -> None:
    """The checked-in default program equals a fresh compile (per arch)."""
    from nanobox import _seccomp
    from nanobox._linux.notify import reporting_policy
    from nanobox._seccomp import default_program
    from nanobox.syscalls import to_seccomp_policy

    for arch in ("x86_64", "aarch64"):
        policy, table = reporting_policy(to_seccomp_policy("default"), arch=arch)
        assert _seccomp.compile(policy, arch).hex() == default_program.PROGRAMS[arch], arch
        assert table == default_program.table(arch)


def _unconditional_denials() -> list[tuple[str, int, int]]:
    """(name, native number, errno) of every default rule that refuses a
    syscall whatever its arguments."""
    from nanobox._seccomp import default as dflt
    from nanobox._seccomp.policy import Errno, arch_info, native_arch

    table = arch_info(native_arch()).syscalls
    out = []
    for rule in dflt.DEFAULT_RULES:
        others = [r for r in dflt.DEFAULT_RULES if r.syscall == rule.syscall and r is not rule]
        if (
            isinstance(rule.action, Errno)
            and not rule.conds
            and not others
            and rule.syscall in table
        ):
            out.append((rule.syscall, table[rule.syscall], rule.action.errno))
    return out


@pytest.mark.parametrize(
    ("name", "nr", "err"), _unconditional_denials(), ids=[d[0] for d in _unconditional_denials()]
)
def test_every_default_denial(workspace: Path, cbin: Path, name: str, nr: int, err: int) -> None:
    """Every syscall the default list refuses outright, by raw number."""
    r = inside(cbin, "raw", str(nr))
    assert r.stdout == f"raw DENIED {err}\n".encode(), (name, r.stdout, r.stderr)
    if err not in (38, 95):  # ENOSYS / EOPNOTSUPP answers are not reported
        assert any(v.data.get("syscall") == name for v in r.violations), name
