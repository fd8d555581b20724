"""A reference interpreter for seccomp classic-BPF programs.

Used by the tests (and fuzzers) to run a compiled filter on a chosen
``seccomp_data`` without a kernel.  :func:`check` applies the same static rules
the kernel applies when a filter is attached (``bpf_check_classic`` plus
``seccomp_check_filter``): only seccomp's instruction subset, 32-bit aligned
loads inside ``seccomp_data``, every jump landing inside the program, scratch
memory written before it is read, and a return as the last instruction.  A
program that passes here is one the kernel would accept; one that fails would
be refused with ``EINVAL``.
"""

from __future__ import annotations

from typing import Final

from . import bpf
from .bpf import Insn, SeccompData

__all__ = ["BpfError", "SeccompData", "check", "run"]

_U32: Final = bpf.U32_MAX

_COND_JUMPS: Final = frozenset(
    bpf.BPF_JMP | op | src
    for op in (bpf.BPF_JEQ, bpf.BPF_JGT, bpf.BPF_JGE, bpf.BPF_JSET)
    for src in (bpf.BPF_K, bpf.BPF_X)
)
_ALU_OPS: Final = (
    bpf.BPF_ADD, bpf.BPF_SUB, bpf.BPF_MUL, bpf.BPF_DIV, bpf.BPF_MOD, bpf.BPF_AND,
    bpf.BPF_OR, bpf.BPF_XOR, bpf.BPF_LSH, bpf.BPF_RSH,
)  # fmt: skip
_ALU_CODES: Final = frozenset(
    bpf.BPF_ALU | op | src for op in _ALU_OPS for src in (bpf.BPF_K, bpf.BPF_X)
) | {bpf.BPF_ALU | bpf.BPF_NEG}
_LD_ABS_W: Final = bpf.BPF_LD | bpf.BPF_W | bpf.BPF_ABS
_LD_LEN: Final = bpf.BPF_LD | bpf.BPF_W | bpf.BPF_LEN
_LDX_LEN: Final = bpf.BPF_LDX | bpf.BPF_W | bpf.BPF_LEN
_LD_IMM: Final = bpf.BPF_LD | bpf.BPF_IMM
_LDX_IMM: Final = bpf.BPF_LDX | bpf.BPF_IMM
_LD_MEM: Final = bpf.BPF_LD | bpf.BPF_MEM
_LDX_MEM: Final = bpf.BPF_LDX | bpf.BPF_MEM
_ST: Final = bpf.BPF_ST
_STX: Final = bpf.BPF_STX
_TAX: Final = bpf.BPF_MISC | bpf.BPF_TAX
_TXA: Final = bpf.BPF_MISC | bpf.BPF_TXA
_RET_K: Final = bpf.BPF_RET | bpf.BPF_K
_RET_A: Final = bpf.BPF_RET | bpf.BPF_A
_JA: Final = bpf.BPF_JMP | bpf.BPF_JA

_SECCOMP_CODES: Final = (
    _COND_JUMPS
    | _ALU_CODES
    | {
        _LD_ABS_W, _LD_LEN, _LDX_LEN, _LD_IMM, _LDX_IMM, _LD_MEM, _LDX_MEM,
        _ST, _STX, _TAX, _TXA, _RET_K, _RET_A, _JA,
    }
)  # fmt: skip


class BpfError(ValueError):
    """The program would be rejected by the kernel when the filter is attached."""


def _as_insns(program: bytes | list[Insn]) -> list[Insn]:
    return bpf.unpack(program) if isinstance(program, (bytes, bytearray)) else list(program)


def check(program: bytes | list[Insn]) -> list[Insn]:
    """Validate *program* as the kernel would; return it as instructions."""
    insns = _as_insns(program)
    flen = len(insns)
    if not 0 < flen <= bpf.BPF_MAXINSNS:
        raise BpfError(f"program has {flen} instructions; the kernel accepts 1..{bpf.BPF_MAXINSNS}")
    for pc, (code, jt, jf, k) in enumerate(insns):
        where = f"instruction {pc} (code {code:#06x})"
        if code not in _SECCOMP_CODES:
            raise BpfError(f"{where}: not allowed in a seccomp filter")
        if code == _LD_ABS_W and (k >= bpf.SECCOMP_DATA_SIZE or k & 3):
            raise BpfError(f"{where}: load offset {k} outside seccomp_data or unaligned")
        if code in (_LD_MEM, _LDX_MEM, _ST, _STX) and k >= bpf.BPF_MEMWORDS:
            raise BpfError(f"{where}: scratch slot {k} out of range")
        if code & 0x07 == bpf.BPF_ALU and not code & bpf.BPF_X:
            op = code & 0xF0
            if op in (bpf.BPF_DIV, bpf.BPF_MOD) and k == 0:
                raise BpfError(f"{where}: division by constant zero")
            if op in (bpf.BPF_LSH, bpf.BPF_RSH) and k >= 32:
                raise BpfError(f"{where}: shift by {k}")
        if code == _JA:
            if k >= flen - pc - 1:
                raise BpfError(f"{where}: ja +{k} jumps past the end")
        elif code in _COND_JUMPS and (pc + jt + 1 >= flen or pc + jf + 1 >= flen):
            raise BpfError(f"{where}: jump +{jt}/+{jf} past the end")
    _check_memory(insns)
    if insns[-1].code not in (_RET_K, _RET_A):
        raise BpfError("the last instruction must be a return")
    return insns


def _check_memory(insns: list[Insn]) -> None:
    """Scratch memory must be written on every path before it is read.

    Jumps only go forward, so one pass in program order sees every predecessor of
    an instruction before the instruction itself.
    """
    every = (1 << bpf.BPF_MEMWORDS) - 1
    masks = [every] * len(insns)
    valid = 0
    for pc, (code, jt, jf, k) in enumerate(insns):
        valid &= masks[pc]
        if code in (_ST, _STX):
            valid |= 1 << k
        elif code in (_LD_MEM, _LDX_MEM):
            if not valid & (1 << k):
                raise BpfError(f"instruction {pc}: reads scratch slot {k} before any write")
        elif code == _JA:
            masks[pc + 1 + k] &= valid
            valid = every
        elif code in _COND_JUMPS:
            masks[pc + 1 + jt] &= valid
            masks[pc + 1 + jf] &= valid
            valid = every


def _alu(op: int, a: int, operand: int) -> int | None:
    """One ALU step on 32-bit values; ``None`` means division by zero."""
    if op == bpf.BPF_ADD:
        return (a + operand) & _U32
    if op == bpf.BPF_SUB:
        return (a - operand) & _U32
    if op == bpf.BPF_MUL:
        return (a * operand) & _U32
    if op in (bpf.BPF_DIV, bpf.BPF_MOD):
        if operand == 0:
            return None
        return a // operand if op == bpf.BPF_DIV else a % operand
    if op == bpf.BPF_AND:
        return a & operand
    if op == bpf.BPF_OR:
        return a | operand
    if op == bpf.BPF_XOR:
        return a ^ operand
    if op == bpf.BPF_LSH:
        return (a << (operand & 31)) & _U32
    if op == bpf.BPF_RSH:
        return a >> (operand & 31)
    return (-a) & _U32  # BPF_NEG


def run(program: bytes | list[Insn], data: SeccompData, *, verify: bool = True) -> int:
    """Run *program* on *data* and return the 32-bit seccomp action it produces.

    With *verify* (the default) the program is first checked like the kernel
    does on attach, so a program with an out-of-range jump raises
    :class:`BpfError` even if that jump is never taken for this input.
    """
    insns = check(program) if verify else _as_insns(program)
    raw = data.pack()
    a = x = 0
    mem = [0] * bpf.BPF_MEMWORDS
    pc = 0
    while True:
        if pc >= len(insns):
            raise BpfError(f"fell off the end of the program at {pc}")
        code, jt, jf, k = insns[pc]
        pc += 1
        cls = code & 0x07
        if code == _LD_ABS_W:
            a = int.from_bytes(raw[k : k + 4], "little")
        elif code in (_LD_LEN, _LDX_LEN):
            if code == _LD_LEN:
                a = bpf.SECCOMP_DATA_SIZE
            else:
                x = bpf.SECCOMP_DATA_SIZE
        elif code == _LD_IMM:
            a = k
        elif code == _LDX_IMM:
            x = k
        elif code == _LD_MEM:
            a = mem[k]
        elif code == _LDX_MEM:
            x = mem[k]
        elif code == _ST:
            mem[k] = a
        elif code == _STX:
            mem[k] = x
        elif code == _TAX:
            x = a
        elif code == _TXA:
            a = x
        elif cls == bpf.BPF_RET:
            return a if code == _RET_A else k
        elif cls == bpf.BPF_ALU:
            result = _alu(code & 0xF0, a, x if code & bpf.BPF_X else k)
            if result is None:
                return 0  # the kernel aborts the program with 0 (KILL_THREAD)
            a = result
        elif code == _JA:
            pc += k
        elif cls == bpf.BPF_JMP:
            operand = x if code & bpf.BPF_X else k
            op = code & 0xF0
            if op == bpf.BPF_JEQ:
                taken = a == operand
            elif op == bpf.BPF_JGT:
                taken = a > operand
            elif op == bpf.BPF_JGE:
                taken = a >= operand
            else:
                taken = bool(a & operand)
            pc += jt if taken else jf
        else:
            raise BpfError(f"instruction {pc - 1}: unsupported code {code:#06x}")
