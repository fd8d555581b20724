"""Processes below given pids, read from ``/proc`` (no pid namespace of
their own to enumerate): for killing a tree and for its CPU time."""

from __future__ import annotations

import os

_TICK = os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int | str) -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` after the command name (so the
    state is ``[0]``, as field 3 of proc(5)), or None when it cannot be
    read. Read with ``os``: one line, well under a page."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 4096).rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    finally:
        os.close(fd)


def below(roots: list[int], *, include_roots: bool = False) -> dict[int, list[bytes]]:
    """The ``/proc/PID/stat`` fields (after the command name) of every
    process below ``roots``, and of the roots too with ``include_roots``."""
    parent: dict[int, int] = {}
    stats: dict[int, list[bytes]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = stat_fields(name)
        if fields is None:
            continue
        try:
            parent[int(name)] = int(fields[1])
        except (IndexError, ValueError):
            continue
        stats[int(name)] = fields
    chosen = {pid for pid in roots if pid in stats} if include_roots else set()
    frontier = set(roots)
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - chosen
        chosen |= frontier
    return {pid: stats[pid] for pid in chosen}


def cpu_times(stats: dict[int, list[bytes]]) -> tuple[float, float]:
    """User and system seconds of those processes, with the children each
    of them has waited for."""
    u = s = 0
    for f in stats.values():
        u += int(f[11]) + int(f[13])
        s += int(f[12]) + int(f[14])
    return u / _TICK, s / _TICK
