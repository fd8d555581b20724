"""Classic BPF as the seccomp filter interface sees it.

A seccomp filter is a program of ``struct sock_filter`` instructions (``u16 code;
u8 jt; u8 jf; u32 k``, eight bytes, native byte order) that the kernel runs on a
``struct seccomp_data`` snapshot of each system call.  Both architectures that
nanobox supports (x86_64 and aarch64) are little-endian, so programs are packed
little-endian.

Only the small part of classic BPF that seccomp accepts is modelled here: 32-bit
loads from ``seccomp_data``, ALU operations on the accumulator, forward jumps and
returns.  The constants are the kernel's UAPI values (``linux/bpf_common.h``,
``linux/filter.h``, ``linux/seccomp.h``).
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

# -- instruction classes (code & 0x07) ---------------------------------------
BPF_LD: Final = 0x00
BPF_LDX: Final = 0x01
BPF_ST: Final = 0x02
BPF_STX: Final = 0x03
BPF_ALU: Final = 0x04
BPF_JMP: Final = 0x05
BPF_RET: Final = 0x06
BPF_MISC: Final = 0x07

# -- load size (code & 0x18) and mode (code & 0xe0) ---------------------------
BPF_W: Final = 0x00
BPF_H: Final = 0x08
BPF_B: Final = 0x10
BPF_IMM: Final = 0x00
BPF_ABS: Final = 0x20
BPF_IND: Final = 0x40
BPF_MEM: Final = 0x60
BPF_LEN: Final = 0x80
BPF_MSH: Final = 0xA0

# -- ALU and jump operations (code & 0xf0) ------------------------------------
BPF_ADD: Final = 0x00
BPF_SUB: Final = 0x10
BPF_MUL: Final = 0x20
BPF_DIV: Final = 0x30
BPF_OR: Final = 0x40
BPF_AND: Final = 0x50
BPF_LSH: Final = 0x60
BPF_RSH: Final = 0x70
BPF_NEG: Final = 0x80
BPF_MOD: Final = 0x90
BPF_XOR: Final = 0xA0

BPF_JA: Final = 0x00
BPF_JEQ: Final = 0x10
BPF_JGT: Final = 0x20
BPF_JGE: Final = 0x30
BPF_JSET: Final = 0x40

# -- operand source (code & 0x08) and return value source (code & 0x18) -------
BPF_K: Final = 0x00
BPF_X: Final = 0x08
BPF_A: Final = 0x10

# -- misc (code & 0xf8) --------------------------------------------------------
BPF_TAX: Final = 0x00
BPF_TXA: Final = 0x80

BPF_MEMWORDS: Final = 16
"""Scratch memory slots M[0..15]."""

BPF_MAXINSNS: Final = 4096
"""The kernel rejects longer classic BPF programs (``EINVAL``)."""

# -- seccomp return values (linux/seccomp.h) -----------------------------------
# The kernel acts on the most restrictive result of all stacked filters; the
# order below is that precedence, most restrictive first.
SECCOMP_RET_KILL_PROCESS: Final = 0x80000000
SECCOMP_RET_KILL_THREAD: Final = 0x00000000
SECCOMP_RET_TRAP: Final = 0x00030000
SECCOMP_RET_ERRNO: Final = 0x00050000
SECCOMP_RET_USER_NOTIF: Final = 0x7FC00000
SECCOMP_RET_TRACE: Final = 0x7FF00000
SECCOMP_RET_LOG: Final = 0x7FFC0000
SECCOMP_RET_ALLOW: Final = 0x7FFF0000

SECCOMP_RET_ACTION_FULL: Final = 0xFFFF0000
SECCOMP_RET_DATA: Final = 0x0000FFFF

# -- struct seccomp_data layout --------------------------------------------------
# struct seccomp_data { int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]; }
# Classic BPF loads 32 bits at a time, so a 64-bit argument is two loads: on a
# little-endian machine the low word comes first and the high word is at +4.
OFF_NR: Final = 0
OFF_ARCH: Final = 4
OFF_IP: Final = 8
OFF_ARGS: Final = 16
SECCOMP_DATA_SIZE: Final = 64
N_ARGS: Final = 6

U32_MAX: Final = 0xFFFF_FFFF
U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF

_INSN = struct.Struct("<HBBI")
_DATA = struct.Struct("<IIQ6Q")
INSN_SIZE: Final = _INSN.size


def arg_lo(index: int) -> int:
    """Offset of the low 32 bits of syscall argument *index* in seccomp_data."""
    if not 0 <= index < N_ARGS:
        raise ValueError(f"syscall argument index must be 0..5, not {index}")
    return OFF_ARGS + 8 * index


def arg_hi(index: int) -> int:
    """Offset of the high 32 bits of syscall argument *index* (little-endian)."""
    return arg_lo(index) + 4


class Insn(NamedTuple):
    """One ``struct sock_filter``."""

    code: int
    jt: int
    jf: int
    k: int


def stmt(code: int, k: int) -> Insn:
    """A non-jump instruction (``BPF_STMT``)."""
    return Insn(code, 0, 0, k & U32_MAX)


def jump(code: int, k: int, jt: int, jf: int) -> Insn:
    """A jump instruction (``BPF_JUMP``); *jt*/*jf* are relative, 0..255."""
    if not (0 <= jt <= 255 and 0 <= jf <= 255):
        raise ValueError(f"conditional jump offsets must be 0..255, got jt={jt} jf={jf}")
    return Insn(code, jt, jf, k & U32_MAX)


def pack(insns: list[Insn]) -> bytes:
    """Encode instructions as the byte string ``struct sock_fprog.filter`` points to."""
    return b"".join(_INSN.pack(*insn) for insn in insns)


def unpack(program: bytes) -> list[Insn]:
    """Decode a packed program (inverse of :func:`pack`)."""
    if len(program) % INSN_SIZE:
        raise ValueError(f"BPF program length {len(program)} is not a multiple of {INSN_SIZE}")
    return [Insn(*fields) for fields in _INSN.iter_unpack(program)]


class SeccompData(NamedTuple):
    """What a filter sees of one system call (``struct seccomp_data``).

    ``nr`` is stored by the kernel as a signed int but loaded by BPF as an
    unsigned 32-bit word; both spellings are accepted here (``-1`` is
    ``0xffffffff``).
    """

    nr: int
    arch: int
    args: tuple[int, int, int, int, int, int] = (0, 0, 0, 0, 0, 0)
    ip: int = 0

    @property
    def unr(self) -> int:
        """The syscall number as the unsigned 32-bit value BPF compares."""
        return self.nr & U32_MAX

    def pack(self) -> bytes:
        """The 64-byte little-endian ``struct seccomp_data``."""
        return _DATA.pack(
            self.unr, self.arch & U32_MAX, self.ip & U64_MAX, *(a & U64_MAX for a in self.args)
        )


def action_name(ret: int) -> str:
    """Human-readable form of a seccomp return value, e.g. ``ERRNO(1)``."""
    action = ret & SECCOMP_RET_ACTION_FULL
    data = ret & SECCOMP_RET_DATA
    names = {
        SECCOMP_RET_KILL_PROCESS: "KILL_PROCESS",
        SECCOMP_RET_KILL_THREAD: "KILL_THREAD",
        SECCOMP_RET_TRAP: "TRAP",
        SECCOMP_RET_ERRNO: "ERRNO",
        SECCOMP_RET_USER_NOTIF: "USER_NOTIF",
        SECCOMP_RET_TRACE: "TRACE",
        SECCOMP_RET_LOG: "LOG",
        SECCOMP_RET_ALLOW: "ALLOW",
    }
    name = names.get(action, f"UNKNOWN_{action:#x}")
    if action in (SECCOMP_RET_ERRNO, SECCOMP_RET_TRACE, SECCOMP_RET_TRAP) or data:
        return f"{name}({data})"
    return name


_JMP_NAMES = {BPF_JA: "ja", BPF_JEQ: "jeq", BPF_JGT: "jgt", BPF_JGE: "jge", BPF_JSET: "jset"}
_ALU_NAMES = {
    BPF_ADD: "add", BPF_SUB: "sub", BPF_MUL: "mul", BPF_DIV: "div", BPF_OR: "or",
    BPF_AND: "and", BPF_LSH: "lsh", BPF_RSH: "rsh", BPF_NEG: "neg", BPF_MOD: "mod",
    BPF_XOR: "xor",
}  # fmt: skip


def disassemble(program: bytes | list[Insn]) -> str:
    """A readable listing, one instruction per line, with absolute jump targets."""
    insns = unpack(program) if isinstance(program, bytes) else program
    lines = []
    for pc, (code, jt, jf, k) in enumerate(insns):
        cls = code & 0x07
        if cls == BPF_LD and code & 0xE0 == BPF_ABS:
            text = f"ld [{k}]"
        elif cls == BPF_JMP:
            op = _JMP_NAMES.get(code & 0xF0, f"j?{code:#x}")
            if code & 0xF0 == BPF_JA:
                text = f"ja {pc + 1 + k}"
            else:
                src = "x" if code & BPF_X else f"#{k:#x}"
                text = f"{op} {src}, {pc + 1 + jt}, {pc + 1 + jf}"
        elif cls == BPF_RET:
            text = "ret a" if code & 0x18 == BPF_A else f"ret {action_name(k)}"
        elif cls == BPF_ALU:
            src = "x" if code & BPF_X else f"#{k:#x}"
            text = f"{_ALU_NAMES.get(code & 0xF0, '?')} {src}"
        else:
            text = f"code={code:#06x} jt={jt} jf={jf} k={k:#x}"
        lines.append(f"{pc:4d}: {text}")
    return "\n".join(lines)
