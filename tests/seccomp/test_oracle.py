"""Differential test: our default-policy filter against libseccomp's.

libseccomp (through PyPI ``pyseccomp``, a dev-only dependency) compiles an
independent statement of the default policy; ``seccomp_export_bpf`` writes its
program to a temporary file, and both programs run in our interpreter for every
syscall number of both architectures, with argument values around every
constant the policy tests.  The decisions must agree, except where the two
compilers differ on purpose:

* numbers in no syscall table (gaps, numbers above the newest syscall): we
  return ``ENOSYS`` (``Policy.unknown``) so libc falls back and unreviewed new
  syscalls stay closed; libseccomp gives them the default action (ALLOW);
* x86_64 numbers with the sign bit set (``0x80000000..0xffffffff``): we return
  ``ENOSYS`` (the kernel runs no syscall for them); libseccomp lets ``-1``
  through to the default action (for tracers that skip a call with it) and
  kills the process for the rest, like x32;
* syscalls libseccomp's own tables do not know (it is older than our
  headers): on the native architecture they are added by number, but
  libseccomp can only translate them to a foreign architecture by name, so on
  that architecture their numbers are left out of the comparison.

How the rules are expressed to libseccomp: it cannot order rules (overlapping
rules for one syscall are merged, the broader one winning), cannot put two
comparisons on one argument in one rule, and refuses rules whose action is the
default.  So "first match wins" rules with ALLOW exceptions are restated here as
*disjoint* deny rules: "the low 32 bits are not in S" becomes a set of
``MASKED_EQ`` cubes covering the complement of S; "some CLONE_NEW* bit is set"
becomes one cube per bit.  The unconditional denies are taken from the policy
as they are; every conditional one must have a restatement below, so a new
conditional rule fails this test until it gets one.
"""

from __future__ import annotations

import errno
import itertools
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

try:
    import pyseccomp as seccomp  # type: ignore[import-untyped, import-not-found, unused-ignore]
except ImportError:
    pytest.skip("pyseccomp is not installed (pip install pyseccomp)", allow_module_level=True)
except Exception as exc:  # pyseccomp raises RuntimeError when libseccomp.so is missing
    pytest.skip(f"pyseccomp cannot load libseccomp: {exc}", allow_module_level=True)

from nanobox._seccomp import bpf, interp
from nanobox._seccomp.bpf import SeccompData
from nanobox._seccomp.compiler import compile
from nanobox._seccomp.default import (
    AF_INET,
    AF_INET6,
    AF_NETLINK,
    AF_UNIX,
    ALLOWED_PERSONALITIES,
    CLONE_NS_FLAGS,
    DEFAULT_RULES,
    NETLINK_ROUTE,
    SOCK_DGRAM,
    SOCK_PACKET,
    SOCK_RAW,
    SOCK_TYPE_MASK,
    TIOCLINUX,
    TIOCSTI,
    default_policy,
)
from nanobox._seccomp.policy import ARCHES, Cond, Rule

U32 = 0xFFFFFFFF
LIB_ARCH = {"x86_64": seccomp.Arch.X86_64, "aarch64": seccomp.Arch.AARCH64}
EPERM = seccomp.ERRNO(errno.EPERM)
EAFNOSUPPORT = seccomp.ERRNO(errno.EAFNOSUPPORT)
EACCES = seccomp.ERRNO(errno.EACCES)
EPROTONOSUPPORT = seccomp.ERRNO(errno.EPROTONOSUPPORT)


def outside(values: set[int], bit: int = 31, prefix: int = 0) -> list[tuple[int, int]]:
    """Disjoint (mask, value) cubes over 32 bits covering everything not in *values*."""
    if not values:
        return [(U32 ^ ((1 << (bit + 1)) - 1), prefix)]
    if bit < 0:
        return []
    cubes = []
    for b in (0, 1):
        half = {v for v in values if (v >> bit) & 1 == b}
        cubes += outside(half, bit - 1, prefix | (b << bit))
    return cubes


def low32(arg: int, mask: int, value: int) -> Any:
    return seccomp.Arg(arg, seccomp.MASKED_EQ, mask, value)


def eq32(arg: int, value: int) -> Any:
    return low32(arg, U32, value)


def conditional_rules() -> dict[str, list[tuple[int, list[Any]]]]:
    """The default policy's conditional rules, restated as disjoint libseccomp rules."""
    ns_bits = [1 << i for i in range(32) if CLONE_NS_FLAGS >> i & 1]
    family_ok = {AF_UNIX, AF_INET, AF_INET6, AF_NETLINK}
    return {
        "clone": [
            # the first namespace bit set, counting from bit 0: one cube per bit
            (EPERM, [low32(0, bit | (bit - 1) & CLONE_NS_FLAGS, bit)])
            for bit in ns_bits
        ],
        "personality": [
            (EPERM, [low32(0, mask, value)]) for mask, value in outside(set(ALLOWED_PERSONALITIES))
        ],
        "ioctl": [(EPERM, [eq32(1, TIOCSTI)]), (EPERM, [eq32(1, TIOCLINUX)])],
        "socket": [
            *((EAFNOSUPPORT, [low32(0, m, v)]) for m, v in outside(family_ok)),
            (EPERM, [eq32(0, AF_INET), low32(1, SOCK_TYPE_MASK, SOCK_RAW)]),
            (EPERM, [eq32(0, AF_INET6), low32(1, SOCK_TYPE_MASK, SOCK_RAW)]),
            (EAFNOSUPPORT, [eq32(0, AF_INET), low32(1, SOCK_TYPE_MASK, SOCK_PACKET)]),
            (EACCES, [eq32(0, AF_UNIX), low32(1, SOCK_TYPE_MASK, SOCK_DGRAM)]),
            (EACCES, [eq32(0, AF_UNIX), low32(1, SOCK_TYPE_MASK, SOCK_RAW)]),
            *(
                (EPROTONOSUPPORT, [eq32(0, AF_NETLINK), low32(2, m, v)])
                for m, v in outside({NETLINK_ROUTE})
            ),
        ],
        "socketpair": [
            *((EAFNOSUPPORT, [low32(0, m, v)]) for m, v in outside({AF_UNIX})),
            (EACCES, [eq32(0, AF_UNIX), low32(1, SOCK_TYPE_MASK, SOCK_DGRAM)]),
            (EACCES, [eq32(0, AF_UNIX), low32(1, SOCK_TYPE_MASK, SOCK_RAW)]),
        ],
    }


def _by_syscall() -> dict[str, list[Rule]]:
    grouped: dict[str, list[Rule]] = {}
    for rule in DEFAULT_RULES:
        grouped.setdefault(rule.syscall, []).append(rule)
    return grouped


def test_every_conditional_rule_is_restated() -> None:
    conditional = {name for name, rules in _by_syscall().items() if rules[0].conds}
    assert conditional == set(conditional_rules()), (
        "restate new conditional default rules for libseccomp in test_oracle.py"
    )


def test_outside_covers_the_complement() -> None:
    values = {0, 8, 0x40000, 0xFFFFFFFF}
    cubes = outside(values)
    for probe in [*values, 1, 7, 9, 0x40008, 0x80000000, 0xFFFFFFFE, 0x12345678]:
        hits = [c for c in cubes if probe & c[0] == c[1]]
        assert len(hits) == (0 if probe in values else 1), hex(probe)


def libseccomp_program(arch: str) -> tuple[bytes, set[int]]:
    """Export libseccomp's program for the default policy; also the numbers left out."""
    info = ARCHES[arch]
    token = LIB_ARCH[arch]
    native = seccomp.system_arch() == token
    flt = seccomp.SyscallFilter(seccomp.ALLOW)
    flt.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
    if not native:
        flt.add_arch(token)
        flt.remove_arch(seccomp.Arch.NATIVE)
    restated = conditional_rules()
    skipped: set[int] = set()
    for name, rules in _by_syscall().items():
        if name not in info.syscalls:
            continue
        nr = info.syscalls[name]
        if native:
            ref = nr
        else:
            # libseccomp takes native numbers and translates them by name.
            ref = seccomp.resolve_syscall(seccomp.system_arch(), name)
            if ref < 0 or seccomp.resolve_syscall(token, name) != nr:
                skipped.add(nr)
                continue
        if name in restated:
            for action, args in restated[name]:
                flt.add_rule(action, ref, *args)
        else:
            assert len(rules) == 1 and not rules[0].conds
            flt.add_rule(rules[0].action.ret, ref)
    with tempfile.TemporaryFile() as out:
        flt.export_bpf(out)
        out.seek(0)
        return out.read(), skipped


def _probe_values(conds: list[Cond]) -> list[int]:
    out = {0}
    for cond in conds:
        v = cond.value
        out |= {v, v ^ 1, v + 1, v ^ (1 << 32), v | 0xDEADBEEF_00000000, v | (~cond.mask & U32)}
        if cond.op == "masked_eq":
            out |= {cond.mask, v | 0x800, v | 0x80000}
    return sorted(x & 0xFFFF_FFFF_FFFF_FFFF for x in out)


def argument_vectors(name: str) -> Iterator[tuple[int, ...]]:
    """All combinations of probe values on the arguments the policy tests."""
    by_arg: dict[int, list[Cond]] = {}
    for rule in _by_syscall().get(name, []):
        for cond in rule.conds:
            by_arg.setdefault(cond.arg, []).append(cond)
    if not by_arg:
        yield (0,) * 6
        return
    indices = sorted(by_arg)
    for combo in itertools.product(*(_probe_values(by_arg[i]) for i in indices)):
        args = [0] * 6
        for index, value in zip(indices, combo, strict=True):
            args[index] = value
        yield tuple(args)


def expected_difference(arch: str, nr: int) -> bool:
    info = ARCHES[arch]
    if info.x32_bit is not None and nr >= 0x80000000:
        return True
    return nr < (info.x32_bit or 1 << 32) and nr not in info.names


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_default_policy_matches_libseccomp(arch: str) -> None:
    info = ARCHES[arch]
    ours = compile(default_policy(), arch)
    theirs, skipped = libseccomp_program(arch)
    interp.check(ours)
    interp.check(theirs)  # libseccomp's output passes our verifier, too
    assert skipped <= {info.syscalls.get("open_tree_attr", -1)}, (
        f"unexpectedly many syscalls unknown to libseccomp: {sorted(skipped)}"
    )
    numbers = list(range(info.max_nr + 64))
    if info.x32_bit is not None:
        numbers += [nr | info.x32_bit for nr in sorted(info.names)]
        numbers += [0x40000000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]
    else:
        numbers += [0x40000065, 0x80000000, 0xFFFFFFFF]
    compared = differences = 0
    enosys = bpf.SECCOMP_RET_ERRNO | errno.ENOSYS
    for nr in numbers:
        if nr in skipped:
            continue
        name = info.names.get(nr, "")
        for args in argument_vectors(name):
            data = SeccompData(nr, info.audit_arch, args)  # type: ignore[arg-type]
            got = interp.run(ours, data, verify=False)
            want = interp.run(theirs, data, verify=False)
            compared += 1
            if expected_difference(arch, nr):
                differences += 1
                assert got == enosys, f"nr {nr:#x}: {bpf.action_name(got)}"
                assert want in (bpf.SECCOMP_RET_ALLOW, bpf.SECCOMP_RET_KILL_PROCESS)
                continue
            assert got == want, (
                f"{arch} {name or '?'}({nr:#x}) args={[hex(a) for a in args]}: "
                f"ours {bpf.action_name(got)}, libseccomp {bpf.action_name(want)}"
            )
    for token in (0x40000003, 0x40000028, 0):
        data = SeccompData(0, token)
        assert interp.run(ours, data) == interp.run(theirs, data) == bpf.SECCOMP_RET_KILL_PROCESS
    assert compared > 1000 and differences > 0
