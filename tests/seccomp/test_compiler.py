"""Unit tests for the seccomp compiler, the BPF helpers and the default policy.

Everything here runs without a kernel: programs are executed in
``nanobox._seccomp.interp``, which also applies the kernel's attach-time checks.
"""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest

from nanobox._seccomp import bpf, interp, loader
from nanobox._seccomp.bpf import SeccompData
from nanobox._seccomp.compiler import compile, compile_insns, native_arch
from nanobox._seccomp.default import DEFAULT_RULES, default_policy
from nanobox._seccomp.policy import (
    ALLOW,
    ARCHES,
    KILL_PROCESS,
    LOG,
    NOTIFY,
    Cond,
    Errno,
    Policy,
    Rule,
    SeccompPolicyError,
    UnsupportedArchError,
    decide,
)

REPO = Path(__file__).resolve().parents[2]
ARCH_NAMES = tuple(ARCHES)
X86 = ARCHES["x86_64"]
ARM = ARCHES["aarch64"]
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_ARM = 0x40000028

RET_ALLOW = bpf.SECCOMP_RET_ALLOW
RET_KILL = bpf.SECCOMP_RET_KILL_PROCESS


def ret_errno(code: int) -> int:
    return bpf.SECCOMP_RET_ERRNO | code


def call(arch: str, name: str, *args: int) -> SeccompData:
    info = ARCHES[arch]
    padded = (tuple(args) + (0,) * 6)[:6]
    return SeccompData(info.syscalls[name], info.audit_arch, padded)  # type: ignore[arg-type]


def run_both(policy: Policy, arch: str, data: SeccompData) -> int:
    """Run the compiled program and check it agrees with the reference."""
    got = interp.run(compile(policy, arch), data)
    want = decide(policy, arch, data)
    assert got == want, (
        f"{arch} {data}: compiled {bpf.action_name(got)} != decide {bpf.action_name(want)}"
    )
    return got


# -- bpf encoding ---------------------------------------------------------------------


def test_pack_layout_is_sock_filter() -> None:
    insn = bpf.jump(bpf.BPF_JMP | bpf.BPF_JEQ | bpf.BPF_K, 0xC000003E, 1, 2)
    assert bpf.pack([insn]) == bytes([0x15, 0x00, 0x01, 0x02, 0x3E, 0x00, 0x00, 0xC0])
    assert bpf.unpack(bpf.pack([insn])) == [insn]


def test_seccomp_data_layout() -> None:
    data = SeccompData(-1, 0xC000003E, (0x1122334455667788, 0, 0, 0, 0, 0xFF), ip=7)
    raw = data.pack()
    assert len(raw) == bpf.SECCOMP_DATA_SIZE
    assert raw[0:4] == b"\xff\xff\xff\xff"  # nr = -1 loads as 0xffffffff
    assert raw[bpf.arg_lo(0) : bpf.arg_lo(0) + 4] == bytes.fromhex("88776655")
    assert raw[bpf.arg_hi(0) : bpf.arg_hi(0) + 4] == bytes.fromhex("44332211")
    assert bpf.arg_lo(5) == 56 and bpf.arg_hi(5) == 60
    with pytest.raises(ValueError):
        bpf.arg_lo(6)


def test_jump_offsets_are_8_bit() -> None:
    with pytest.raises(ValueError):
        bpf.jump(bpf.BPF_JMP | bpf.BPF_JEQ, 0, 256, 0)


def test_action_names() -> None:
    assert bpf.action_name(ret_errno(1)) == "ERRNO(1)"
    assert bpf.action_name(RET_KILL) == "KILL_PROCESS"
    assert bpf.action_name(RET_ALLOW) == "ALLOW"


# -- the interpreter's verifier ----------------------------------------------------------

RET = bpf.stmt(bpf.BPF_RET | bpf.BPF_K, RET_ALLOW)
LD_NR = bpf.stmt(bpf.BPF_LD | bpf.BPF_W | bpf.BPF_ABS, 0)


def test_interp_rejects_out_of_range_jumps() -> None:
    # Never taken for this input, rejected all the same, like the kernel does.
    far = bpf.Insn(bpf.BPF_JMP | bpf.BPF_JEQ | bpf.BPF_K, 1, 0, 5)
    with pytest.raises(interp.BpfError, match="past the end"):
        interp.run([LD_NR, far, RET], SeccompData(0, 0))
    ja = bpf.Insn(bpf.BPF_JMP | bpf.BPF_JA, 0, 0, 1)
    with pytest.raises(interp.BpfError, match="past the end"):
        interp.run([ja, RET], SeccompData(0, 0))


@pytest.mark.parametrize(
    ("program", "message"),
    [
        ([], "1..4096"),
        ([RET] * 4097, "1..4096"),
        ([LD_NR], "last instruction"),
        ([bpf.stmt(bpf.BPF_LD | bpf.BPF_W | bpf.BPF_ABS, 64), RET], "outside seccomp_data"),
        ([bpf.stmt(bpf.BPF_LD | bpf.BPF_W | bpf.BPF_ABS, 2), RET], "unaligned"),
        ([bpf.stmt(bpf.BPF_LD | bpf.BPF_H | bpf.BPF_ABS, 0), RET], "not allowed"),
        ([bpf.stmt(bpf.BPF_LD | bpf.BPF_MEM, 3), RET], "before any write"),
        ([bpf.stmt(bpf.BPF_ALU | bpf.BPF_DIV | bpf.BPF_K, 0), RET], "division"),
    ],
)
def test_interp_verifier(program: list[bpf.Insn], message: str) -> None:
    with pytest.raises(interp.BpfError, match=message):
        interp.check(program)


def test_interp_scratch_memory_and_alu() -> None:
    program = [
        LD_NR,
        bpf.stmt(bpf.BPF_ST, 2),
        bpf.stmt(bpf.BPF_LD | bpf.BPF_IMM, 5),
        bpf.stmt(bpf.BPF_ALU | bpf.BPF_ADD | bpf.BPF_K, 1),
        bpf.stmt(bpf.BPF_MISC | bpf.BPF_TAX, 0),
        bpf.stmt(bpf.BPF_LD | bpf.BPF_MEM, 2),
        bpf.stmt(bpf.BPF_ALU | bpf.BPF_ADD | bpf.BPF_X, 0),
        bpf.stmt(bpf.BPF_RET | bpf.BPF_A, 0),
    ]
    assert interp.run(program, SeccompData(10, 0)) == 16


# -- program structure ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_arch_check_comes_first(arch: str) -> None:
    insns = compile_insns(default_policy(), arch)
    assert insns[0] == bpf.stmt(bpf.BPF_LD | bpf.BPF_W | bpf.BPF_ABS, bpf.OFF_ARCH)
    assert insns[1].code == bpf.BPF_JMP | bpf.BPF_JEQ | bpf.BPF_K
    assert insns[1].k == ARCHES[arch].audit_arch
    assert insns[2] == bpf.stmt(bpf.BPF_RET | bpf.BPF_K, RET_KILL)


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("foreign", [AUDIT_ARCH_I386, AUDIT_ARCH_ARM, 0, 0xFFFFFFFF])
def test_foreign_arch_is_killed(arch: str, foreign: int) -> None:
    data = SeccompData(ARCHES[arch].syscalls["getpid"], foreign)
    assert run_both(Policy(ALLOW), arch, data) == RET_KILL


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_other_supported_arch_is_killed(arch: str) -> None:
    other = next(info for name, info in ARCHES.items() if name != arch)
    data = SeccompData(0, other.audit_arch)
    assert run_both(default_policy(), arch, data) == RET_KILL


def test_x32_never_reaches_allow() -> None:
    policy = default_policy()
    for name in ("ptrace", "getpid", "mkdir", "read"):
        nr = X86.syscalls[name] | 0x40000000
        assert run_both(policy, "x86_64", SeccompData(nr, X86.audit_arch)) == RET_KILL
    for nr in (0x40000000, 0x40000200, 0x7FFFFFFF):
        assert run_both(policy, "x86_64", SeccompData(nr, X86.audit_arch)) == RET_KILL
    errno_x32 = Policy(ALLOW, x32=Errno(errno.EPERM))
    assert run_both(errno_x32, "x86_64", SeccompData(0x40000065, X86.audit_arch)) == ret_errno(1)
    with pytest.raises(SeccompPolicyError, match="x32"):
        Policy(ALLOW, x32=ALLOW)


def test_negative_numbers_get_enosys_on_x86_64() -> None:
    # No syscall runs for them; ENOSYS is also what the kernel answers for -1.
    for nr in (-1, -2, 0x80000000, 0xC0000065):
        data = SeccompData(nr, X86.audit_arch)
        assert run_both(default_policy(), "x86_64", data) == ret_errno(errno.ENOSYS)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_unknown_numbers_get_enosys(arch: str) -> None:
    info = ARCHES[arch]
    top = info.max_nr
    gaps = [nr for nr in range(top) if nr not in info.names]
    assert gaps, "expected gaps in the table (e.g. 335..423 on x86_64)"
    for nr in [top + 1, top + 100, 1000, 0x3FFFFFFF, *gaps[:5], gaps[-1]]:
        data = SeccompData(nr, info.audit_arch)
        assert run_both(Policy(ALLOW), arch, data) == ret_errno(errno.ENOSYS)
    data = SeccompData(top, info.audit_arch)
    assert run_both(Policy(ALLOW), arch, data) == RET_ALLOW


def test_known_unlisted_syscalls_get_default() -> None:
    policy = Policy(Errno(errno.EACCES), (Rule("getpid", ALLOW),))
    for arch in ARCH_NAMES:
        assert run_both(policy, arch, call(arch, "getpid")) == RET_ALLOW
        assert run_both(policy, arch, call(arch, "read")) == ret_errno(errno.EACCES)


def test_dispatch_is_a_binary_search() -> None:
    # 100 distinct denied syscalls: a linear chain would need 100+ comparisons
    # on the way to the last one; the search needs about log2(#ranges).
    names = sorted(ARM.syscalls, key=ARM.syscalls.__getitem__)[::3][:100]
    policy = Policy(ALLOW, tuple(Rule(name, Errno(1)) for name in names))
    insns = compile_insns(policy, "aarch64")
    for name in (names[0], names[-1], names[50]):
        steps = _steps(insns, call("aarch64", name))
        assert steps < 20, f"{name}: {steps} instructions executed"


def _steps(insns: list[bpf.Insn], data: SeccompData) -> int:
    """How many instructions the program executes for *data* (a counting interpreter)."""
    raw = data.pack()
    pc = count = 0
    a = 0
    while True:
        code, jt, jf, k = insns[pc]
        count += 1
        pc += 1
        if code & 0x07 == bpf.BPF_RET:
            return count
        if code == bpf.BPF_LD | bpf.BPF_W | bpf.BPF_ABS:
            a = int.from_bytes(raw[k : k + 4], "little")
        elif code == bpf.BPF_JMP | bpf.BPF_JA:
            pc += k
        elif code & 0x07 == bpf.BPF_JMP:
            op = code & 0xF0
            taken = {bpf.BPF_JEQ: a == k, bpf.BPF_JGT: a > k, bpf.BPF_JGE: a >= k}.get(op)
            if taken is None:
                taken = bool(a & k)
            pc += jt if taken else jf
        elif code & 0x07 == bpf.BPF_ALU:
            a &= k


def test_long_jumps_use_trampolines() -> None:
    # Enough conditional rules that the root's jump skips far more than 255.
    names = sorted(X86.syscalls)[:120]
    rules = tuple(
        Rule(name, Errno(i % 50 + 1), (Cond.eq(0, i), Cond.gt(1, i << 33)))
        for i, name in enumerate(names)
    )
    policy = Policy(ALLOW, rules)
    insns = compile_insns(policy, "x86_64")
    assert len(insns) > 1000
    assert any(insn.code == bpf.BPF_JMP | bpf.BPF_JA for insn in insns)
    interp.check(insns)
    for i, name in enumerate(names):
        hit = call("x86_64", name, i, (i << 33) + 1)
        miss = call("x86_64", name, i, i << 33)
        assert run_both(policy, "x86_64", hit) == ret_errno(i % 50 + 1)
        assert run_both(policy, "x86_64", miss) == RET_ALLOW


def test_too_big_is_a_clear_error() -> None:
    names = sorted(X86.syscalls)[:300]
    conds = tuple(Cond.ne(arg, 7) for arg in range(6))
    policy = Policy(ALLOW, tuple(Rule(name, Errno(1), conds) for name in names))
    with pytest.raises(SeccompPolicyError, match="4096"):
        compile(policy, "x86_64")


# -- argument conditions ---------------------------------------------------------------------


@pytest.mark.parametrize("op", ["eq", "ne", "lt", "le", "gt", "ge"])
@pytest.mark.parametrize("value", [0, 1, 0xFFFFFFFF, 0x100000000, 0x1_0000_0001, 2**64 - 1])
def test_64_bit_comparisons(op: str, value: int) -> None:
    policy = Policy(ALLOW, (Rule("read", Errno(5), (Cond(2, op, value),)),))  # type: ignore[arg-type]
    probes = {0, 1, value, value - 1, value + 1, value ^ (1 << 32), value ^ 1, 2**64 - 1}
    for probe in probes:
        probe &= 2**64 - 1
        for arch in ARCH_NAMES:
            run_both(policy, arch, call(arch, "read", 0, 0, probe))


@pytest.mark.parametrize(
    "mask",
    [0, 0xF, 0xFFFFFFFF, 0xFFFFFFFF_00000000, 0x0000FFFF_0000FFFF, 0x80000000_00000001,
     0x7E020080, 0xF0_0000_0000, 2**64 - 1],
)  # fmt: skip
def test_masked_eq(mask: int) -> None:
    value = 0xA5A5A5A5_5A5A5A5A & mask
    policy = Policy(ALLOW, (Rule("read", Errno(5), (Cond.masked_eq(3, mask, value),)),))
    outside = ~mask & (2**64 - 1)
    probes = {value, value | outside, outside, 0, 2**64 - 1, value ^ (1 << 32), value ^ 1}
    for bit in (0, 31, 32, 36, 63):
        probes.add(value ^ (1 << bit))
    for probe in probes:
        for arch in ARCH_NAMES:
            got = run_both(policy, arch, call(arch, "read", 0, 0, 0, probe))
            assert (got == ret_errno(5)) == (probe & mask == value)


def test_masked_eq_low_mask_ignores_high_word() -> None:
    # ioctl's cmd is an unsigned int to the kernel: TIOCSTI with junk in the high
    # half is still TIOCSTI (CVE-2019-10063), so the rule must still match.
    for arch in ARCH_NAMES:
        for cmd in (0x5412, 0xDEADBEEF_00005412, 0xFFFFFFFF_00005412):
            assert run_both(default_policy(), arch, call(arch, "ioctl", 0, cmd)) == ret_errno(1)
        for cmd in (0x5413, 0x00005412_00000000, 0x15412):
            assert run_both(default_policy(), arch, call(arch, "ioctl", 0, cmd)) == RET_ALLOW


def test_masked_eq_validation() -> None:
    with pytest.raises(SeccompPolicyError, match="never match"):
        Cond.masked_eq(0, 0xF, 0x10)
    with pytest.raises(SeccompPolicyError, match="masked_eq"):
        Cond(0, "eq", 1, mask=0xF)
    with pytest.raises(SeccompPolicyError, match=r"0\.\.5"):
        Cond.eq(6, 0)
    with pytest.raises(SeccompPolicyError, match="64 bits"):
        Cond.eq(0, 2**64)
    assert Cond.eq(0, -100).value == 2**64 - 100  # AT_FDCWD as the kernel sees it


def test_mask_zero_always_matches() -> None:
    policy = Policy(ALLOW, (Rule("read", Errno(3), (Cond.masked_eq(0, 0, 0),)),))
    assert run_both(policy, "x86_64", call("x86_64", "read", 12345)) == ret_errno(3)


def test_rules_first_match_wins() -> None:
    policy = Policy(
        ALLOW,
        (
            Rule("openat", Errno(1), (Cond.eq(0, 5), Cond.eq(1, 6))),
            Rule("openat", Errno(2), (Cond.eq(0, 5),)),
            Rule("openat", LOG),
            Rule("openat", Errno(4)),  # unreachable
        ),
    )
    for arch in ARCH_NAMES:
        assert run_both(policy, arch, call(arch, "openat", 5, 6)) == ret_errno(1)
        assert run_both(policy, arch, call(arch, "openat", 5, 7)) == ret_errno(2)
        assert run_both(policy, arch, call(arch, "openat", 4, 6)) == bpf.SECCOMP_RET_LOG


def test_actions() -> None:
    policy = Policy(
        KILL_PROCESS,
        (Rule("read", ALLOW), Rule("write", NOTIFY), Rule("close", LOG), Rule("dup", Errno(0))),
        unknown=Errno(errno.ENOSYS),
    )
    for arch in ARCH_NAMES:
        assert run_both(policy, arch, call(arch, "read")) == RET_ALLOW
        assert run_both(policy, arch, call(arch, "write")) == bpf.SECCOMP_RET_USER_NOTIF
        assert run_both(policy, arch, call(arch, "close")) == bpf.SECCOMP_RET_LOG
        assert run_both(policy, arch, call(arch, "dup")) == bpf.SECCOMP_RET_ERRNO
        assert run_both(policy, arch, call(arch, "getpid")) == RET_KILL
    with pytest.raises(SeccompPolicyError):
        Errno(4096)


# -- names and architectures ------------------------------------------------------------------


def test_unknown_syscall_name() -> None:
    with pytest.raises(SeccompPolicyError, match=r"'no_such_call'.*x86_64.*aarch64"):
        Rule("no_such_call", ALLOW)
    assert issubclass(SeccompPolicyError, ValueError)


def test_name_missing_on_one_arch_is_skipped() -> None:
    assert "open" in X86.syscalls and "open" not in ARM.syscalls
    policy = Policy(ALLOW, (Rule("open", Errno(1)), Rule("openat", Errno(2))))
    assert run_both(policy, "x86_64", call("x86_64", "open")) == ret_errno(1)
    assert run_both(policy, "aarch64", call("aarch64", "openat")) == ret_errno(2)
    compile(policy, "aarch64")  # no error


def test_unsupported_arch() -> None:
    with pytest.raises(UnsupportedArchError, match="riscv64"):
        compile(Policy(ALLOW), "riscv64")


def test_native_arch() -> None:
    import platform

    machine = platform.machine()
    if machine in ("x86_64", "AMD64", "amd64"):
        assert native_arch() == "x86_64"
    elif machine in ("aarch64", "arm64"):
        assert native_arch() == "aarch64"
    else:
        with pytest.raises(UnsupportedArchError):
            native_arch()


def test_tables() -> None:
    assert X86.audit_arch == 0xC000003E and ARM.audit_arch == 0xC00000B7
    assert X86.x32_bit == 0x40000000 and ARM.x32_bit is None
    # spot checks against well-known numbers
    assert X86.syscalls["read"] == 0 and X86.syscalls["ptrace"] == 101
    assert ARM.syscalls["io_setup"] == 0 and ARM.syscalls["ptrace"] == 117
    for info in (X86, ARM):
        assert info.syscalls["clone3"] == 435 and info.syscalls["mseal"] == 462
        assert info.syscalls["open_tree_attr"] == 467  # needs >= 6.15 headers
        assert len(set(info.syscalls.values())) == len(info.syscalls)


def test_loader_syscall_numbers_match_tables() -> None:
    assert loader.SECCOMP_SYSCALL_NR == {
        name: info.syscalls["seccomp"] for name, info in ARCHES.items()
    }


def test_loader_rejects_malformed_program() -> None:
    with pytest.raises(ValueError):
        loader.install(b"\x00" * 7)
    with pytest.raises(ValueError):
        loader.install(b"")


def test_loader_import_is_light() -> None:
    code = (
        "import sys, nanobox._seccomp.loader\n"
        "heavy = [m for m in ('nanobox._seccomp.compiler', 'nanobox._seccomp.policy',"
        " 'nanobox._seccomp.syscalls_x86_64') if m in sys.modules]\n"
        "print(heavy)"
    )
    setup = f"import sys; sys.path.insert(0, {str(REPO / 'src')!r})\n"
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", setup + code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# -- the default policy ---------------------------------------------------------------------------


def test_every_default_rule_has_a_reason() -> None:
    for rule in DEFAULT_RULES:
        assert rule.reason.strip(), rule


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_default_policy_decisions(arch: str) -> None:
    p = default_policy()
    eperm, enosys = ret_errno(errno.EPERM), ret_errno(errno.ENOSYS)
    ok = RET_ALLOW

    def check(name: str, want: int, *args: int) -> None:
        if name not in ARCHES[arch].syscalls:
            return
        got = run_both(p, arch, call(arch, name, *args))
        assert got == want, f"{name}{args}: {bpf.action_name(got)}, want {bpf.action_name(want)}"

    # common programs keep working
    for name in ("read", "write", "openat", "mkdirat", "mkdir", "execve", "mmap", "futex",
                 "getdents64", "statx", "wait4", "pipe2", "memfd_create", "mknodat",
                 "epoll_pwait", "rseq", "landlock_create_ruleset", "seccomp", "vmsplice",
                 "set_mempolicy", "prctl", "fchmodat2", "mseal"):  # fmt: skip
        check(name, ok)
    # denied outright
    for name in ("ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd",
                 "kexec_load", "init_module", "finit_module", "delete_module", "bpf",
                 "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
                 "open_by_handle_at", "mount", "umount2", "pivot_root", "swapon", "reboot",
                 "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "acct",
                 "quotactl", "quotactl_fd", "unshare", "setns", "syslog", "chroot",
                 "modify_ldt", "iopl", "ioperm", "vhangup", "lookup_dcookie",
                 "fanotify_init", "migrate_pages", "move_pages", "kcmp"):  # fmt: skip
        check(name, eperm)
    for name in ("clone3", "io_uring_setup", "io_uring_enter", "io_uring_register", "fsopen",
                 "fsmount", "fsconfig", "fspick", "move_mount", "open_tree", "open_tree_attr",
                 "mount_setattr", "_sysctl", "create_module", "uselib", "nfsservctl"):  # fmt: skip
        check(name, enosys)
    check("name_to_handle_at", ret_errno(errno.EOPNOTSUPP))
    # clone: threads and fork yes, namespaces no (flags are arg 0 on both arches)
    check("clone", ok, 0x003D0F00)  # pthread_create's flags
    check("clone", ok, 0x01200011)  # fork(): CHILD_SETTID|CHILD_CLEARTID|SIGCHLD
    for flag in (0x20000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
                 0x40000000, 0x80):  # fmt: skip
        check("clone", eperm, 0x11 | flag)
        check("clone", eperm, (1 << 40) | flag)
    check("clone", ok, 1 << 40 | 0x11)  # high half ignored by the kernel
    # personality
    for persona in (0, 8, 0x40000, 0x40008, 0xFFFFFFFF, 0xFFFFFFFF_FFFFFFFF):
        check("personality", ok, persona)
    for persona in (0x0400000, 0x0100000, 0x0020000, 0x1):
        check("personality", eperm, persona)
    # terminals
    for cmd in (0x5412, 0x541C, 0xDEADBEEF_00005412):
        check("ioctl", eperm, 1, cmd)
    check("ioctl", ok, 1, 0x5401)  # TCGETS
    # sockets
    eafnosupport = ret_errno(errno.EAFNOSUPPORT)
    check("socket", ok, 1, 1)
    check("socket", ok, 2, 1 | 0x80000)
    check("socket", ok, 10, 2)
    check("socket", ok, 2, 2, 1)  # unprivileged ICMP (SOCK_DGRAM)
    check("socket", ok, 16, 3, 0)  # rtnetlink
    check("socket", ret_errno(errno.EPROTONOSUPPORT), 16, 3, 12)  # netfilter
    check("socket", eperm, 2, 3)  # raw IPv4
    check("socket", eperm, 10, 3 | 0x800)  # raw IPv6, SOCK_NONBLOCK
    check("socket", eafnosupport, 2, 10)  # SOCK_PACKET
    for family in (17, 40, 0, 31, 38, 30, 44):
        check("socket", eafnosupport, family, 1)
    check("socket", eafnosupport, 1 << 32 | 40, 1)
    eacces = ret_errno(errno.EACCES)
    check("socket", eacces, 1, 2)  # unix datagram
    check("socket", eacces, 1, 2 | 0x80000)  # ... with SOCK_CLOEXEC
    check("socket", eacces, 1, 3 | 0x800)  # unix "raw": a datagram socket
    check("socket", ok, 1, 5)  # unix seqpacket
    check("socketpair", ok, 1, 1)
    check("socketpair", ok, 1, 5 | 0x800)
    check("socketpair", eacces, 1, 2)
    check("socketpair", eacces, 1 << 32 | 1, 2 | 0x800)
    check("socketpair", eacces, 1, 3)
    check("socketpair", eafnosupport, 30, 1)
    # other ABIs
    assert run_both(p, arch, SeccompData(0, AUDIT_ARCH_I386)) == RET_KILL


def test_default_policy_size() -> None:
    for arch in ARCH_NAMES:
        size = len(compile(default_policy(), arch)) // bpf.INSN_SIZE
        assert 50 < size < 600, size


# -- the generator ------------------------------------------------------------------------------


def test_generator_check_skips_without_headers(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gen_syscall_tables.py"), "--check",
         "--headers", str(tmp_path / "missing")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("skipped: headers not found at"), out.stdout


def test_generator_check_detects_edits(tmp_path: Path) -> None:
    headers = REPO / "build" / "linux-uapi"
    if not (headers / "usr" / "include" / "linux" / "version.h").exists():
        pytest.skip("no headers in build/linux-uapi (run tools/gen_syscall_tables.py --fetch)")
    src = REPO / "src" / "nanobox" / "_seccomp"
    for name in ("syscalls_x86_64.py", "syscalls_aarch64.py"):
        (tmp_path / name).write_text((src / name).read_text())
    tool = [sys.executable, str(REPO / "tools" / "gen_syscall_tables.py"), "--check",
            "--headers", str(headers), "--output-dir", str(tmp_path)]  # fmt: skip
    good = subprocess.run(tool, capture_output=True, text=True)
    if "skipped" in good.stdout:
        pytest.skip(good.stdout.strip())
    assert good.returncode == 0, good.stdout + good.stderr
    edited = (tmp_path / "syscalls_x86_64.py").read_text().replace('"ptrace": 101', '"ptrace": 1')
    (tmp_path / "syscalls_x86_64.py").write_text(edited)
    bad = subprocess.run(tool, capture_output=True, text=True)
    assert bad.returncode == 1 and "differs" in bad.stderr
