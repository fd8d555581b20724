"""Compile a :class:`~nanobox._seccomp.policy.Policy` into a seccomp BPF program.

Layout of the generated program::

    ld  [arch]                      ; 1. foreign ABI (i386 int 0x80, AArch32)
    jeq #AUDIT_ARCH, ok, next       ;    -> KILL_PROCESS
    ret KILL_PROCESS
ok: ld  [nr]
    jge #0x80000000 -> ret unknown  ; 2. x86_64 only: negative numbers never
    jge #0x40000000 -> ret x32      ;    run a syscall; x32 calls get policy.x32
    <binary search over nr>         ; 3. JGE splits down to one range per leaf
    leaf: ret ACTION                ;    a range with one fixed action
    leaf: <rules of one syscall>    ;    conditions, first match wins,
          ret DEFAULT               ;    then the default action

The search runs over *ranges* of syscall numbers, not single numbers: adjacent
numbers with the same fixed outcome (unlisted syscalls, gaps in the table,
everything above the newest known syscall) merge, so a deny-list of a hundred
calls costs about seven comparisons per syscall instead of a hundred.

Conditional jumps reach at most 255 instructions ahead (``jt``/``jf`` are 8
bits); the assembler replaces a longer one by a jump to an adjacent ``ja``
(32-bit offset) trampoline.  Programs over 4096 instructions, the kernel's
limit, raise :class:`SeccompPolicyError`.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import bpf
from .bpf import Insn
from .policy import (
    ArchInfo,
    Cond,
    Policy,
    Rule,
    SeccompPolicyError,
    arch_info,
    native_arch,
)

__all__ = ["compile", "compile_insns", "native_arch"]

_LD_W_ABS = bpf.BPF_LD | bpf.BPF_W | bpf.BPF_ABS
_U32 = bpf.U32_MAX
_NEG = 0x8000_0000


# -- assembler -----------------------------------------------------------------------


class _Item:
    """An instruction under construction; jump targets are other items."""

    __slots__ = ("code", "jf", "jt", "k", "target")

    def __init__(self, code: int, k: int) -> None:
        self.code = code
        self.k = k
        self.jt: _Item | int | None = None  # label id until resolved
        self.jf: _Item | int | None = None
        self.target: _Item | int | None = None  # for ja

    @property
    def is_cond(self) -> bool:
        return self.code & 0x07 == bpf.BPF_JMP and self.code & 0xF0 != bpf.BPF_JA


class _Asm:
    """Emits instructions with symbolic forward jumps; :meth:`assemble` lays them out."""

    def __init__(self) -> None:
        self.items: list[_Item] = []
        self._labels: list[int | None] = []  # label id -> index of the item it precedes

    def label(self) -> int:
        self._labels.append(None)
        return len(self._labels) - 1

    def place(self, label: int) -> None:
        self._labels[label] = len(self.items)

    def load(self, offset: int) -> None:
        self.items.append(_Item(_LD_W_ABS, offset))

    def alu_and(self, k: int) -> None:
        self.items.append(_Item(bpf.BPF_ALU | bpf.BPF_AND | bpf.BPF_K, k))

    def ret(self, value: int) -> None:
        self.items.append(_Item(bpf.BPF_RET | bpf.BPF_K, value))

    def jump(self, op: int, k: int, jt: int | None, jf: int | None) -> None:
        """Conditional jump; a target of ``None`` means the next instruction."""
        item = _Item(bpf.BPF_JMP | op | bpf.BPF_K, k & _U32)
        item.jt, item.jf = jt, jf
        self.items.append(item)

    def _resolve(self) -> list[_Item]:
        items = self.items

        def at(ref: _Item | int | None, index: int) -> _Item:
            if ref is None:
                position = index + 1
            else:
                assert isinstance(ref, int)
                placed = self._labels[ref]
                assert placed is not None, "jump to a label that was never placed"
                position = placed
            assert position < len(items), "jump past the end of the program"
            return items[position]

        for index, item in enumerate(items):
            if item.is_cond:
                item.jt, item.jf = at(item.jt, index), at(item.jf, index)
        return items

    def assemble(self, limit: int) -> list[Insn]:
        if len(self.items) > limit:
            raise _TooBig(len(self.items))
        items = self._resolve()
        while True:
            position = {id(item): index for index, item in enumerate(items)}
            laid: list[_Item] = []
            grew = False
            for index, item in enumerate(items):
                laid.append(item)
                if not item.is_cond:
                    continue
                for side in ("jt", "jf"):
                    target = getattr(item, side)
                    assert isinstance(target, _Item)
                    if position[id(target)] - index - 1 > 255:
                        trampoline = _Item(bpf.BPF_JMP | bpf.BPF_JA, 0)
                        trampoline.target = target
                        setattr(item, side, trampoline)
                        laid.append(trampoline)
                        grew = True
            items = laid
            if len(items) > limit:
                raise _TooBig(len(items))
            if not grew:
                break
        position = {id(item): index for index, item in enumerate(items)}

        def offset(index: int, target: _Item | int | None) -> int:
            assert isinstance(target, _Item)
            distance = position[id(target)] - index - 1
            assert distance >= 0, "backward jump"
            return distance

        out: list[Insn] = []
        for index, item in enumerate(items):
            if item.is_cond:
                jt, jf = offset(index, item.jt), offset(index, item.jf)
                out.append(bpf.jump(item.code, item.k, jt, jf))
            elif item.target is not None:
                out.append(bpf.stmt(item.code, offset(index, item.target)))
            else:
                out.append(bpf.stmt(item.code, item.k))
        return out


class _TooBig(Exception):
    def __init__(self, count: int) -> None:
        super().__init__(count)
        self.count = count


# -- condition code -------------------------------------------------------------------


def _emit_cond(asm: _Asm, cond: Cond, fail: int) -> None:
    """Fall through when *cond* holds, jump to *fail* otherwise.

    A 64-bit comparison is decided on the high words first; only when they are
    equal do the low words matter.  ``masked_eq`` compares each half under its
    half of the mask and skips a half whose mask is zero, so a low-32-bit mask
    never looks at the high word (the kernel ignores it for ``int`` arguments).
    """
    hi, lo = bpf.arg_hi(cond.arg), bpf.arg_lo(cond.arg)
    vhi, vlo = cond.value >> 32, cond.value & _U32
    op = cond.op
    if op == "masked_eq":
        for offset, mask, value in ((hi, cond.mask >> 32, vhi), (lo, cond.mask & _U32, vlo)):
            if mask:
                asm.load(offset)
                if mask != _U32:
                    asm.alu_and(mask)
                asm.jump(bpf.BPF_JEQ, value, None, fail)
        return
    if op == "eq":
        asm.load(hi)
        asm.jump(bpf.BPF_JEQ, vhi, None, fail)
        asm.load(lo)
        asm.jump(bpf.BPF_JEQ, vlo, None, fail)
        return
    ok = asm.label()
    if op == "ne":
        asm.load(hi)
        asm.jump(bpf.BPF_JEQ, vhi, None, ok)
        asm.load(lo)
        asm.jump(bpf.BPF_JEQ, vlo, fail, ok)
    else:
        # gt/ge hold when hi > vhi; lt/le (the negations of ge/gt) fail then.
        greater_ok = op in ("gt", "ge")
        low_op = bpf.BPF_JGT if op in ("gt", "le") else bpf.BPF_JGE
        asm.load(hi)
        if vhi != _U32:  # nothing is greater than 0xffffffff
            asm.jump(bpf.BPF_JGT, vhi, ok if greater_ok else fail, None)
        if vhi != 0:  # after "not greater than 0" the high word is 0: skip the test
            asm.jump(bpf.BPF_JEQ, vhi, None, fail if greater_ok else ok)
        asm.load(lo)
        if greater_ok:
            asm.jump(low_op, vlo, ok, fail)
        else:
            asm.jump(low_op, vlo, fail, ok)
    asm.place(ok)


def _emit_rules(asm: _Asm, rules: tuple[Rule, ...], default_ret: int) -> None:
    for rule in rules:
        fail = asm.label()
        for cond in rule.conds:
            _emit_cond(asm, cond, fail)
        asm.ret(rule.action.ret)
        if not rule.conds:
            return  # later rules and the default are unreachable
        asm.place(fail)
    asm.ret(default_ret)


# -- dispatch ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Range:
    """Syscall numbers lo..hi with one fixed outcome or one syscall's rules."""

    lo: int
    hi: int
    ret: int | None = None  # fixed outcome
    rules: tuple[Rule, ...] = ()


def _effective_rules(policy: Policy, name: str) -> tuple[Rule, ...]:
    """The rules that can change the outcome for *name*, in order.

    Rules after an unconditional one never run, and trailing rules whose action
    is the default action decide nothing the default would not.
    """
    rules: list[Rule] = []
    for rule in policy.rules_for(name):
        rules.append(rule)
        if not rule.conds:
            break
    while rules and rules[-1].action.ret == policy.default.ret:
        rules.pop()
    return tuple(rules)


def _ranges(policy: Policy, info: ArchInfo, top: int) -> list[_Range]:
    """Partition 0..top into ranges, merging neighbours with the same fixed outcome."""
    unknown = policy.unknown.ret
    out: list[_Range] = []

    def add(item: _Range) -> None:
        last = out[-1] if out else None
        if last and item.ret is not None and last.ret == item.ret and last.hi + 1 == item.lo:
            out[-1] = _Range(last.lo, item.hi, item.ret)
        else:
            out.append(item)

    next_nr = 0
    for nr in sorted(info.names):
        if nr > next_nr:
            add(_Range(next_nr, nr - 1, unknown))
        rules = _effective_rules(policy, info.names[nr])
        if not rules:
            add(_Range(nr, nr, policy.default.ret))
        elif not rules[0].conds:
            add(_Range(nr, nr, rules[0].action.ret))
        else:
            add(_Range(nr, nr, rules=rules))
        next_nr = nr + 1
    if next_nr <= top:
        add(_Range(next_nr, top, unknown))
    return out


def _emit_search(asm: _Asm, ranges: list[_Range], default_ret: int) -> None:
    """Binary search on the accumulator (nr): ``jge`` on the middle range's start."""
    if len(ranges) == 1:
        leaf = ranges[0]
        if leaf.ret is not None:
            asm.ret(leaf.ret)
        else:
            _emit_rules(asm, leaf.rules, default_ret)
        return
    middle = len(ranges) // 2
    upper = asm.label()
    asm.jump(bpf.BPF_JGE, ranges[middle].lo, upper, None)
    _emit_search(asm, ranges[:middle], default_ret)
    asm.place(upper)
    _emit_search(asm, ranges[middle:], default_ret)


def compile_insns(policy: Policy, arch: str | None = None) -> list[Insn]:
    """Like :func:`compile`, but return the instructions unpacked."""
    info = arch_info(arch if arch is not None else native_arch())
    asm = _Asm()
    native = asm.label()
    asm.load(bpf.OFF_ARCH)
    asm.jump(bpf.BPF_JEQ, info.audit_arch, native, None)
    asm.ret(bpf.SECCOMP_RET_KILL_PROCESS)
    asm.place(native)
    asm.load(bpf.OFF_NR)
    top = _U32
    if info.x32_bit is not None:
        for bound, action_ret in ((_NEG, policy.unknown.ret), (info.x32_bit, policy.x32.ret)):
            below = asm.label()
            asm.jump(bpf.BPF_JGE, bound, None, below)
            asm.ret(action_ret)
            asm.place(below)
        top = info.x32_bit - 1
    _emit_search(asm, _ranges(policy, info, top), policy.default.ret)
    try:
        return asm.assemble(bpf.BPF_MAXINSNS)
    except _TooBig as exc:
        raise SeccompPolicyError(
            f"the {info.name} seccomp filter needs at least {exc.count} instructions, over "
            f"the kernel's limit of {bpf.BPF_MAXINSNS}: use fewer rules or conditions"
        ) from None


def compile(policy: Policy, arch: str | None = None) -> bytes:
    """Compile *policy* for *arch* (default: this machine's) into a BPF program.

    The result is the packed ``struct sock_filter`` array that
    :func:`nanobox._seccomp.loader.install` loads.  Raises
    :class:`SeccompPolicyError` if the program would exceed 4096 instructions
    and :class:`~nanobox._seccomp.policy.UnsupportedArchError` for an unknown
    architecture.
    """
    return bpf.pack(compile_insns(policy, arch))
