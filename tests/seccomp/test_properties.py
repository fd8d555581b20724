"""Property tests: the compiled filter decides exactly what ``decide`` specifies.

For random policies (rules on a small pool of syscalls so that several rules
share one, random conditions with every operator, random actions and defaults)
and random ``seccomp_data`` (native, foreign and i386 arch tokens; table
numbers, gaps, x32 and negative numbers, numbers above the table; arguments
near the policy's own constants, with high-word variants), running the compiled
program in the interpreter must return what :func:`decide` returns.
"""

from __future__ import annotations

import random

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from nanobox._seccomp import bpf, interp  # noqa: E402
from nanobox._seccomp.bpf import SeccompData  # noqa: E402
from nanobox._seccomp.compiler import compile, compile_insns  # noqa: E402
from nanobox._seccomp.policy import (  # noqa: E402
    ALLOW,
    ARCHES,
    KILL_PROCESS,
    LOG,
    NOTIFY,
    OPS,
    Action,
    Cond,
    Errno,
    Policy,
    Rule,
    SeccompPolicyError,
    decide,
)

U64 = 2**64 - 1
ARCH_NAMES = sorted(ARCHES)
ALL_NAMES = sorted(set().union(*(info.syscalls for info in ARCHES.values())))
# A small pool so rules collide on the same syscall; includes names that exist
# on one architecture only and neighbours in the numbering.
POOL = ["read", "write", "open", "openat", "close", "ioctl", "socket", "clone", "personality",
        "modify_ldt", "mmap", "mprotect", "ptrace", "io_setup", "getpid",
        "rseq_slice_yield"]  # fmt: skip
INTERESTING = [0, 1, 2, 3, 0x7F, 0x80, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
               0x1_0000_0000, 0x1_0000_0001, 0x1_FFFF_FFFF, 0xFFFF0000_00000000,
               0xFFFFFFFE_FFFFFFFF, 0xFFFFFFFF_00000000, 0x8000_0000_0000_0000, U64]  # fmt: skip

actions: st.SearchStrategy[Action] = st.one_of(
    st.sampled_from([ALLOW, KILL_PROCESS, LOG, NOTIFY]),
    st.builds(Errno, st.integers(0, 4095)),
)
u64 = st.one_of(st.sampled_from(INTERESTING), st.integers(0, U64))
low_masks = st.one_of(st.sampled_from([0xF, 0xFF, 0xFFFF, 0xFFFFFFFF, 0x7E020080]),
                      st.integers(0, 0xFFFFFFFF))  # fmt: skip
masks = st.one_of(
    low_masks,
    st.sampled_from([0, U64, 0xFFFFFFFF_00000000, 0x0000FFFF_0000FFFF, 0x80000000_00000001]),
    st.integers(0, U64),
)


@st.composite
def conds(draw: st.DrawFn) -> Cond:
    arg = draw(st.integers(0, 5))
    op = draw(st.sampled_from(OPS))
    if op == "masked_eq":
        mask = draw(masks)
        return Cond.masked_eq(arg, mask, draw(u64) & mask)
    return Cond(arg, op, draw(u64))


@st.composite
def rules(draw: st.DrawFn, names: st.SearchStrategy[str]) -> Rule:
    cond_list = draw(st.lists(conds(), max_size=4))
    return Rule(draw(names), draw(actions), tuple(cond_list))


def policies(
    min_rules: int = 0, max_rules: int = 12, names: st.SearchStrategy[str] | None = None
) -> st.SearchStrategy[Policy]:
    if names is None:
        names = st.one_of(st.sampled_from(POOL), st.sampled_from(ALL_NAMES))
    return st.builds(
        Policy,
        default=actions,
        rules=st.lists(rules(names), min_size=min_rules, max_size=max_rules).map(tuple),
        x32=st.one_of(st.just(KILL_PROCESS), st.builds(Errno, st.integers(0, 4095))),
        unknown=actions,
    )


def _constants(policy: Policy) -> list[int]:
    values = set(INTERESTING)
    for rule in policy.rules:
        for cond in rule.conds:
            values.update(_probes(cond))
    return sorted(values)


def _probes(cond: Cond) -> set[int]:
    """Argument values that satisfy *cond* or just miss it, in each 32-bit half."""
    v, m = cond.value, cond.mask
    out = {v, v + 1, v - 1, v ^ 1, v ^ (1 << 32), v & 0xFFFFFFFF, v | 0xDEADBEEF_00000000,
           v ^ (1 << 63), v ^ (1 << 31), v | (~m & U64)}  # fmt: skip
    for half in (m & 0xFFFFFFFF, m & 0xFFFFFFFF_00000000):
        if half:
            out.add(v ^ (half & -half))  # flip the lowest masked bit of this half
            out.add(v ^ (1 << (half.bit_length() - 1)))  # and the highest
    return {x & U64 for x in out}


@st.composite
def seccomp_data(draw: st.DrawFn, policy: Policy, arch: str) -> SeccompData:
    info = ARCHES[arch]
    other = [i.audit_arch for i in ARCHES.values() if i.name != arch]
    arch_token = info.audit_arch
    if draw(st.integers(0, 9)) == 0:
        arch_token = draw(st.one_of(
            st.sampled_from([*other, 0x40000003, 0x40000028, 0]), st.integers(0, 0xFFFFFFFF)
        ))  # fmt: skip
    near = st.sampled_from(_constants(policy))
    args = list(draw(st.tuples(*[st.one_of(near, near, st.integers(0, U64))] * 6)))
    targets = [r for r in policy.rules if r.syscall in info.syscalls]
    if targets and draw(st.integers(0, 2)) > 0:
        # Aim at one rule: its syscall, and each conditioned argument either
        # satisfying the condition or missing it by one bit or one unit.
        rule = draw(st.sampled_from(targets))
        nr = info.syscalls[rule.syscall]
        for cond in rule.conds:
            probes = sorted(_probes(cond))
            hits = [p for p in probes if cond.holds((p,) * 6)]
            if hits and draw(st.integers(0, 3)) > 0:  # mostly satisfy, to reach the action
                args[cond.arg] = draw(st.sampled_from(hits))
            else:
                args[cond.arg] = draw(st.sampled_from(probes))
    else:
        numbers = sorted(info.names)
        nr = draw(st.one_of(
            st.sampled_from(numbers),
            st.sampled_from(numbers).map(lambda n: n | 0x40000000),
            st.integers(info.max_nr + 1, info.max_nr + 600),
            st.sampled_from([-1, -2, 0x80000000, 0x3FFFFFFF, 0x40000000, 0x7FFFFFFF,
                             0xFFFFFFFF]),
            st.integers(0, 0xFFFFFFFF),
        ))  # fmt: skip
    return SeccompData(nr, arch_token, (args[0], args[1], args[2], args[3], args[4], args[5]))


class RandomData:
    """The same distribution as :func:`seccomp_data`, from a plain RNG: much
    cheaper per sample, so each policy can be probed a few hundred times."""

    def __init__(self, policy: Policy, arch: str) -> None:
        self.info = info = ARCHES[arch]
        self.others = [i.audit_arch for i in ARCHES.values() if i.name != arch]
        self.constants = _constants(policy)
        self.numbers = sorted(info.names)
        self.targets = []
        for rule in policy.rules:
            if rule.syscall in info.syscalls:
                conds = []
                for cond in rule.conds:
                    probes = sorted(_probes(cond))
                    hits = [p for p in probes if cond.holds((p,) * 6)]
                    conds.append((cond.arg, probes, hits or probes))
                self.targets.append((info.syscalls[rule.syscall], conds))

    def __call__(self, rng: random.Random) -> SeccompData:
        info = self.info
        token = info.audit_arch
        if rng.random() < 0.1:
            token = rng.choice([*self.others, 0x40000003, 0x40000028, 0, rng.getrandbits(32)])
        args = [
            rng.choice(self.constants) if rng.random() < 0.7 else rng.getrandbits(64)
            for _ in range(6)
        ]
        if self.targets and rng.random() < 0.7:
            nr, conds = rng.choice(self.targets)
            for arg, probes, hits in conds:
                args[arg] = rng.choice(hits if rng.random() < 0.75 else probes)
        else:
            nr = rng.choice(
                [
                    rng.choice(self.numbers),
                    rng.choice(self.numbers) | 0x40000000,
                    info.max_nr + rng.randint(1, 600),
                    rng.choice([-1, -2, 0x80000000, 0x3FFFFFFF, 0x40000000, 0x7FFFFFFF]),
                    rng.getrandbits(32),
                ]
            )
        return SeccompData(nr, token, (args[0], args[1], args[2], args[3], args[4], args[5]))


SUPPRESS = [HealthCheck.too_slow]


def _agree(policy: Policy, arch: str, program: bytes, data: SeccompData) -> None:
    got = interp.run(program, data, verify=False)  # callers interp.check() it once
    want = decide(policy, arch, data)
    assert got == want, (
        f"{arch} nr={data.nr:#x} arch={data.arch:#x} args={[hex(a) for a in data.args]}: "
        f"compiled {bpf.action_name(got)}, decide {bpf.action_name(want)}\n{policy}"
    )


PROFILE = settings(deadline=None, suppress_health_check=SUPPRESS, max_examples=200)


@PROFILE
@given(policy=policies(), arch=st.sampled_from(ARCH_NAMES), data=st.data())
def test_compiled_matches_decide(policy: Policy, arch: str, data: st.DataObject) -> None:
    program = compile(policy, arch)
    interp.check(program)
    for _ in range(6):
        _agree(policy, arch, program, data.draw(seccomp_data(policy, arch)))
    rng = random.Random(data.draw(st.integers(0, 2**32), label="seed"))
    sample = RandomData(policy, arch)
    for _ in range(150):
        _agree(policy, arch, program, sample(rng))


@settings(deadline=None, suppress_health_check=SUPPRESS, max_examples=25)
@given(
    policy=policies(min_rules=60, max_rules=150, names=st.sampled_from(ALL_NAMES)),
    arch=st.sampled_from(ARCH_NAMES),
    data=st.data(),
)
def test_large_policies_with_long_jumps(policy: Policy, arch: str, data: st.DataObject) -> None:
    try:
        insns = compile_insns(policy, arch)
    except SeccompPolicyError as exc:
        assert "4096" in str(exc)
        return
    program = bpf.pack(insns)
    interp.check(program)
    for _ in range(5):
        _agree(policy, arch, program, data.draw(seccomp_data(policy, arch)))
    rng = random.Random(data.draw(st.integers(0, 2**32), label="seed"))
    sample = RandomData(policy, arch)
    for _ in range(200):
        _agree(policy, arch, program, sample(rng))


def _long_jump_policy(rule_count: int, per_rule: int) -> Policy:
    names = ALL_NAMES[:rule_count]
    return Policy(
        ALLOW,
        tuple(
            Rule(name, Errno(i % 4000 + 1), tuple(Cond.lt(arg, i + 1) for arg in range(per_rule)))
            for i, name in enumerate(names)
        ),
    )


LONG_JUMPS = _long_jump_policy(rule_count=100, per_rule=3)
LONG_JUMP_PROGRAMS = {arch: compile_insns(LONG_JUMPS, arch) for arch in ARCH_NAMES}


@settings(deadline=None, suppress_health_check=SUPPRESS, max_examples=40)
@given(arch=st.sampled_from(ARCH_NAMES), data=st.data())
def test_trampolined_program(arch: str, data: st.DataObject) -> None:
    policy = LONG_JUMPS
    insns = LONG_JUMP_PROGRAMS[arch]
    assert any(i.code == bpf.BPF_JMP | bpf.BPF_JA for i in insns), "expected JA trampolines"
    program = bpf.pack(insns)
    interp.check(program)
    for _ in range(5):
        _agree(policy, arch, program, data.draw(seccomp_data(policy, arch)))
    rng = random.Random(data.draw(st.integers(0, 2**32), label="seed"))
    sample = RandomData(policy, arch)
    for _ in range(100):
        _agree(policy, arch, program, sample(rng))


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_over_4096_instructions_is_an_error(arch: str) -> None:
    policy = _long_jump_policy(rule_count=len(ALL_NAMES), per_rule=6)
    with pytest.raises(SeccompPolicyError, match=r"limit of 4096.*fewer rules"):
        compile(policy, arch)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_just_under_the_limit_still_compiles(arch: str) -> None:
    # Find a size near the limit by growing the policy, then check it runs.
    low, high = 10, len(ALL_NAMES)
    while low < high:
        mid = (low + high + 1) // 2
        try:
            compile(_long_jump_policy(mid, 6), arch)
            low = mid
        except SeccompPolicyError:
            high = mid - 1
    policy = _long_jump_policy(low, 6)
    insns = compile_insns(policy, arch)
    assert 3500 < len(insns) <= 4096
    interp.check(insns)
    info = ARCHES[arch]
    program = bpf.pack(insns)
    for rule in policy.rules:
        if rule.syscall in info.syscalls:
            nr = info.syscalls[rule.syscall]
            for args in ((0,) * 6, (1 << 32,) * 6):
                _agree(policy, arch, program, SeccompData(nr, info.audit_arch, args))
