#!/usr/bin/env python3
"""Generate nanobox's seccomp syscall tables from Linux UAPI headers.

The seccomp compiler needs, per architecture, every system call name and number
the kernel knows, the ``AUDIT_ARCH_*`` token the kernel puts into
``seccomp_data.arch``, and on x86_64 the x32 ABI bit.  They are read from the
kernel's exported UAPI headers at development time and checked in as
``src/nanobox/_seccomp/syscalls_<arch>.py``, so nanobox needs no headers at run
time.

Where the headers come from: Debian's ``linux-libc-dev`` (since 6.x an
architecture-independent package carrying the headers of every architecture,
under ``usr/include/<triplet>/``).  Debian 12's own is Linux 6.1, which lacks
every syscall numbered 451 and up (``cachestat`` ... ``mseal`` ... ``listns``),
so ``--fetch`` downloads the newer one of another Debian suite (default:
``forky``) with ``apt-get download`` into a private apt state directory and
unpacks it with ``dpkg-deb -x``; nothing is installed system-wide.

    python tools/gen_syscall_tables.py --fetch            # download, regenerate
    python tools/gen_syscall_tables.py --headers DIR      # regenerate from DIR
    python tools/gen_syscall_tables.py --check            # verify (CI)

``--check`` regenerates in memory and exits 1 if a checked-in table differs.  It
exits 0 with a ``skipped:`` line when the headers are not on the machine, or
when they are a different kernel version than the one the tables record (then a
difference is an update to review, not a hand edit).

Only the flat ``asm/unistd_64.h`` layout is supported: always the case on
x86_64, and on arm64 since Linux 6.11 (older arm64 headers route through
``asm-generic/unistd.h`` with preprocessor conditionals).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "src" / "nanobox" / "_seccomp"
DEFAULT_HEADERS = REPO / "build" / "linux-uapi"
HEADERS_ENV = "NANOBOX_UAPI_HEADERS"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
DEBIAN_MIRROR = "http://deb.debian.org/debian"


@dataclass(frozen=True)
class ArchSpec:
    name: str  # nanobox's name, as os.uname().machine spells it
    triplet: str  # Debian multiarch include directory
    audit_macro: str  # AUDIT_ARCH_* in linux/audit.h
    x32: bool  # has the x32 syscall bit (x86_64 only)


ARCHES = (
    ArchSpec("x86_64", "x86_64-linux-gnu", "AUDIT_ARCH_X86_64", x32=True),
    ArchSpec("aarch64", "aarch64-linux-gnu", "AUDIT_ARCH_AARCH64", x32=False),
)


class HeadersMissing(Exception):
    """The header directory lacks a file we need."""


_NR_RE = re.compile(r"^#define\s+__NR_(\w+)\s+(\d+)\s*$")
_DEFINE_RE = re.compile(r"^#define\s+(\w+)\s+(.+?)\s*(?:/\*.*)?$")


def include_root(path: Path) -> Path:
    """Accept an include directory or the root of an unpacked linux-libc-dev."""
    nested = path / "usr" / "include"
    return nested if nested.is_dir() else path


def _read(root: Path, rel: str) -> str:
    file = root / rel
    if not file.is_file():
        raise HeadersMissing(str(file))
    return file.read_text(encoding="utf-8")


def _defines(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        match = _DEFINE_RE.match(line.strip())
        if match:
            out[match.group(1)] = match.group(2)
    return out


def _int_expr(expr: str, names: dict[str, str], depth: int = 0) -> int:
    """Evaluate the ``(A|B|0x40)`` style constant expressions of audit.h."""
    if depth > 8:
        raise ValueError(f"cannot evaluate {expr!r}")
    value = 0
    for part in expr.strip().strip("()").split("|"):
        token = part.strip()
        if re.fullmatch(r"0[xX][0-9a-fA-F]+|\d+", token):
            value |= int(token, 0)
        elif token in names:
            value |= _int_expr(names[token], names, depth + 1)
        else:
            raise ValueError(f"cannot evaluate {token!r} in {expr!r}")
    return value


def kernel_version(root: Path) -> str:
    defs = _defines(_read(root, "linux/version.h"))
    try:
        parts = [defs[f"LINUX_VERSION_{p}"] for p in ("MAJOR", "PATCHLEVEL", "SUBLEVEL")]
    except KeyError:
        code = int(defs["LINUX_VERSION_CODE"])
        parts = [str(code >> 16), str((code >> 8) & 0xFF), str(code & 0xFF)]
    return ".".join(parts)


def parse_unistd(text: str, where: str) -> dict[str, int]:
    if "asm-generic/unistd.h" in text or "__NR3264" in text:
        raise ValueError(
            f"{where}: legacy asm-generic layout (Linux < 6.11 arm64 headers); use newer headers"
        )
    table: dict[str, int] = {}
    seen: dict[int, str] = {}
    for line in text.splitlines():
        match = _NR_RE.match(line.strip())
        if not match:
            continue
        name, nr = match.group(1), int(match.group(2))
        if nr in seen:
            raise ValueError(f"{where}: {name} and {seen[nr]} share number {nr}")
        table[name] = nr
        seen[nr] = name
    if len(table) < 200:
        raise ValueError(f"{where}: only {len(table)} syscalls found; not a unistd_64.h?")
    return dict(sorted(table.items(), key=lambda item: item[1]))


def render(arch: ArchSpec, root: Path) -> str:
    """The full text of ``syscalls_<arch>.py``."""
    version = kernel_version(root)
    rel = f"{arch.triplet}/asm/unistd_64.h"
    table = parse_unistd(_read(root, rel), rel)
    names = _defines(_read(root, "linux/elf-em.h")) | _defines(_read(root, "linux/audit.h"))
    audit_arch = _int_expr(names[arch.audit_macro], names)
    lines = [
        "# GENERATED FILE: do not edit. Regenerate with tools/gen_syscall_tables.py.",
        f'"""{arch.name} system call numbers, name to number.',
        "",
        f"Generated by tools/gen_syscall_tables.py from the Linux {version} UAPI headers",
        f"({rel}, linux/audit.h, linux/elf-em.h) as shipped in",
        "Debian's linux-libc-dev package.",
        "Regenerate: python tools/gen_syscall_tables.py --fetch  (or --headers DIR)",
        "Verify:     python tools/gen_syscall_tables.py --check",
        '"""',
        "",
        "from typing import Final",
        "",
        f'HEADERS_VERSION: Final = "{version}"',
        "",
        f"AUDIT_ARCH: Final = {audit_arch:#010X}".replace("0X", "0x"),
        f'"""{arch.audit_macro}: the value the kernel puts in seccomp_data.arch."""',
    ]
    if arch.x32:
        x32_bit = _int_expr(
            _defines(_read(root, f"{arch.triplet}/asm/unistd.h"))["__X32_SYSCALL_BIT"], {}
        )
        lines += [
            "",
            f"X32_SYSCALL_BIT: Final = {x32_bit:#010x}",
            '"""__X32_SYSCALL_BIT: x32 ABI calls are the x86_64 AUDIT_ARCH with this bit in nr."""',
        ]
    lines += ["", "SYSCALLS: Final[dict[str, int]] = {"]
    lines += [f'    "{name}": {nr},' for name, nr in table.items()]
    lines += ["}", ""]
    return "\n".join(lines)


def recorded_version(path: Path) -> str | None:
    if not path.is_file():
        return None
    match = re.search(r'^HEADERS_VERSION: Final = "([^"]+)"', path.read_text(), re.MULTILINE)
    return match.group(1) if match else None


def fetch(dest: Path, suite: str, version: str | None) -> None:
    """Download and unpack linux-libc-dev from a Debian suite into *dest*."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise SystemExit(f"--fetch needs {tool} (Debian/Ubuntu)")
    with tempfile.TemporaryDirectory(prefix="nanobox-apt-") as tmp:
        state = Path(tmp)
        (state / "lists" / "partial").mkdir(parents=True)
        (state / "cache" / "archives" / "partial").mkdir(parents=True)
        sources = state / "sources.list"
        signed = f"[signed-by={DEBIAN_KEYRING}] " if Path(DEBIAN_KEYRING).exists() else ""
        sources.write_text(f"deb {signed}{DEBIAN_MIRROR} {suite} main\n")
        opts = [
            f"-oDir::Etc::SourceList={sources}",
            "-oDir::Etc::SourceParts=/dev/null",
            f"-oDir::State::Lists={state / 'lists'}",
            f"-oDir::Cache={state / 'cache'}",
            "-oAPT::Sandbox::User=root" if os.geteuid() == 0 else "-oDebug::NoLocking=1",
        ]
        subprocess.run(["apt-get", *opts, "-q", "update"], check=True, stdout=subprocess.DEVNULL)
        spec = "linux-libc-dev" + (f"={version}" if version else "")
        subprocess.run(["apt-get", *opts, "-q", "download", spec], check=True, cwd=state)
        debs = sorted(state.glob("linux-libc-dev_*.deb"))
        if not debs:
            raise SystemExit("apt-get download produced no linux-libc-dev package")
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(dest)], check=True)
        print(f"unpacked {debs[-1].name} into {dest}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--headers",
        type=Path,
        default=Path(os.environ.get(HEADERS_ENV, DEFAULT_HEADERS)),
        help=f"UAPI include dir or unpacked linux-libc-dev root (default: ${HEADERS_ENV} "
        f"or {DEFAULT_HEADERS.relative_to(REPO)})",
    )
    parser.add_argument("--output-dir", type=Path, default=OUT_DIR)
    parser.add_argument("--check", action="store_true", help="verify, do not write")
    parser.add_argument("--fetch", action="store_true", help="download headers first")
    parser.add_argument("--suite", default="forky", help="Debian suite for --fetch")
    parser.add_argument("--package-version", help="exact linux-libc-dev version for --fetch")
    args = parser.parse_args(argv)

    if args.fetch:
        fetch(args.headers, args.suite, args.package_version)
    root = include_root(args.headers)

    rendered: dict[Path, str] = {}
    try:
        version = kernel_version(root)
        for arch in ARCHES:
            rendered[args.output_dir / f"syscalls_{arch.name}.py"] = render(arch, root)
    except HeadersMissing as exc:
        if args.check:
            print(
                f"skipped: headers not found at {root} (missing {exc}); "
                f"pass --headers DIR, set ${HEADERS_ENV}, or use --fetch"
            )
            return 0
        print(f"error: headers not found at {root} (missing {exc})", file=sys.stderr)
        return 2

    if not args.check:
        for path, text in rendered.items():
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path} (Linux {version} headers)")
        return 0

    failed = False
    for path, text in rendered.items():
        recorded = recorded_version(path)
        if recorded is not None and recorded != version:
            print(
                f"skipped: {path.name} was generated from Linux {recorded} headers, "
                f"but {root} has {version}; regenerate to update"
            )
            continue
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current != text:
            print(
                f"FAILED: {path} differs from what Linux {version} headers generate; "
                "regenerate with tools/gen_syscall_tables.py",
                file=sys.stderr,
            )
            failed = True
        else:
            print(f"ok: {path.name} matches Linux {version} headers")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
