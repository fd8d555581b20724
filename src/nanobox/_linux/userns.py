"""The sandbox's user namespace: one uid and one gid mapped.

Called by the process that has just done ``unshare(CLONE_NEWUSER)``; it writes
its own maps, which the kernel allows for a single mapping of the caller's
own ids once ``setgroups`` is denied. The command keeps the caller's uid and
gid inside, so file ownership looks as it does outside.
"""

from __future__ import annotations

import os


def _write(path: str, data: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def map_self(outer_uid: int, outer_gid: int, inner_uid: int, inner_gid: int) -> None:
    """Map ``inner`` ids of the new namespace to the ``outer`` ids."""
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{inner_uid} {outer_uid} 1\n")
    _write("/proc/self/gid_map", f"{inner_gid} {outer_gid} 1\n")
