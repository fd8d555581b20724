"""The few git configuration values that make git run or read files a
sandbox could write: ``core.hooksPath`` (where git takes its hooks from:
husky's ``.husky/_``, a ``.githooks`` directory in the worktree) and the
files a configuration includes (``include.path``, ``includeIf.*.path``).

Pure: ``parse`` reads git's configuration syntax from text, ``hooks_and_includes``
follows includes through a reader it is given (``fsplan`` passes one that
reads files). What git's own parser accepts is the reference; where this
one is unsure it errs toward finding more (every ``includeIf`` is followed,
whatever its condition), since what it finds is only protected.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # not ``typing``'s: this module is on the CLI's start-up path
if TYPE_CHECKING:
    from collections.abc import Callable

MAX_INCLUDE_DEPTH = 10  # git's own limit
_ESCAPES = {"n": "\n", "t": "\t", "b": "\b", '"': '"', "\\": "\\"}
_WS = " \t\n\v\f\r"  # git's whitespace (ASCII only: not a no-break space)


def parse(text: str) -> list[tuple[str, str]]:
    """Every ``(name, value)`` of ``text`` in order, ``name`` as git's
    ``config --list`` writes it: ``section.key`` or
    ``section.subsection.key``, section and key lowercased (a subsection
    keeps its case). A key without ``=`` is a boolean true (value ``""``
    here: no path). Malformed lines are skipped."""
    out: list[tuple[str, str]] = []
    section = ""
    lines = text.removeprefix("\ufeff").split("\n")  # (git skips a UTF-8 BOM)
    i = 0
    while i < len(lines):
        line = lines[i].strip(_WS)
        i += 1
        while line.startswith("["):  # (a header may follow another on its line)
            section, rest = _section(line)
            line = rest.strip(_WS)
        if not line or line[0] in "#;":
            continue
        name, sep, raw = line.partition("=")
        name = name.strip(_WS).lower()
        if not (name.isascii() and name[:1].isalpha() and name.replace("-", "").isalnum()):
            continue
        full = f"{section}.{name}" if section else name  # (before any section: as git)
        if not sep:
            out.append((full, ""))
            continue
        # A value may go on over lines that end in a backslash.
        value, more = _value(raw)
        while more and i < len(lines):
            extra, more = _value(lines[i])
            value += extra
            i += 1
        out.append((full, value))
    return out


def _section(line: str) -> tuple[str, str]:
    """``[core]``, ``[includeIf "gitdir:~/x/"]`` or ``[a.b]``: the section's
    name as ``parse`` reports it, and what follows the ``]`` on the line."""
    end = line.find("]")
    if end < 0:
        return "", ""
    inner = line[1:end].strip(_WS)
    rest = line[end + 1 :]
    if '"' in inner:
        head, _, sub = inner.partition('"')
        sub = sub[:-1] if sub.endswith('"') else sub
        sub = sub.replace('\\"', '"').replace("\\\\", "\\")
        return f"{head.strip(_WS).lower()}.{sub}", rest
    head, dot, sub = inner.partition(".")
    return (f"{head.lower()}.{sub.lower()}" if dot else head.lower()), rest


def _value(raw: str) -> tuple[str, bool]:
    """One line's part of a value: unquoted, unescaped, comments and outer
    whitespace dropped; and whether it goes on (a trailing backslash)."""
    out: list[str] = []
    quoted = False
    pending_space = ""
    i = 0
    while i < len(raw):
        c = raw[i]
        i += 1
        if c == "\\":
            if i >= len(raw) or raw[i:].strip(_WS) == "":
                return "".join(out) + pending_space, True
            out.append(pending_space + _ESCAPES.get(raw[i], raw[i]))
            pending_space = ""
            i += 1
        elif c == '"':
            quoted = not quoted
        elif not quoted and c in "#;":
            break
        elif not quoted and c in _WS:
            if out:
                pending_space += " "  # (git makes each one a space)
        else:
            out.append(pending_space + c)
            pending_space = ""
    return "".join(out), False


def hooks_and_includes(
    path: str, entries: Callable[[str], list[tuple[str, str]] | None], home: str
) -> tuple[list[str], list[str]]:
    """The ``core.hooksPath`` values (as written: relative ones are
    relative to the worktree, ``~/`` expanded) of the configuration file at
    ``path`` and of every file it includes, and the paths of those included
    files (absolute, whether they exist or not). ``entries`` gives a file's
    ``parse``, or None if it cannot be read."""
    hooks: list[str] = []
    included: list[str] = []
    seen: set[str] = set()

    def visit(file: str, depth: int) -> None:
        if depth > MAX_INCLUDE_DEPTH or file in seen:
            return
        seen.add(file)
        found = entries(file)
        if found is None:
            return
        for name, value in found:
            if not value or "\0" in value:
                continue  # (no path: git refuses a NUL too)
            if name == "core.hookspath":
                hooks.append(expand(value, home))
            elif name == "include.path" or (
                name.startswith("includeif.") and name.endswith(".path")
            ):
                # Relative to the directory of the file that includes it.
                target = expand(value, home)
                target = os.path.normpath(os.path.join(os.path.dirname(file), target))
                included.append(target)
                visit(target, depth + 1)

    visit(path, 0)
    return hooks, included


def expand(value: str, home: str) -> str:
    """git's path expansion of a leading ``~/`` (``~user/`` is left as is:
    another user's home, which this user's sandbox cannot write)."""
    if value == "~" or value.startswith("~/"):
        return home + value[1:]
    return value
