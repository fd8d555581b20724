"""Probe what this host can enforce, for ``nanobox check``.

The namespace probes fork, so they run in a fresh single-threaded
interpreter (``python -I -S -m``-style, see :func:`run_probe`) that prints
one JSON object; the caller may have threads.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import sys
from typing import Any

NS_FLAGS = {
    "mount": 0x00020000,
    "pid": 0x20000000,
    "network": 0x40000000,
    "ipc": 0x08000000,
    "uts": 0x04000000,
    "cgroup": 0x02000000,
}


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def _in_child(fn: Any) -> tuple[bool, str]:
    """Run ``fn`` in a forked child; (ok, detail)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            detail = fn() or "ok"
            os.write(w, b"1" + detail.encode())
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            os.write(w, b"0" + f"{exc} ({name})".encode())
        except BaseException as exc:  # noqa: BLE001
            os.write(w, b"0" + repr(exc).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return data[:1] == b"1", data[1:].decode(errors="replace")


def _userns() -> str:
    from . import sys as k
    from . import userns

    uid, gid = os.getuid(), os.getgid()
    k.unshare(k.CLONE_NEWUSER)
    userns.map_self(uid, gid, uid, gid)
    return "ok"


def probe() -> dict[str, Any]:
    from . import sys as k

    out: dict[str, Any] = {}
    release = os.uname().release
    out["kernel"] = {"available": True, "detail": f"Linux {release} ({os.uname().machine})"}
    sysctls = {
        name: _read(path)
        for name, path in (
            ("user.max_user_namespaces", "/proc/sys/user/max_user_namespaces"),
            ("kernel.unprivileged_userns_clone", "/proc/sys/kernel/unprivileged_userns_clone"),
            (
                "kernel.apparmor_restrict_unprivileged_userns",
                "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
            ),
        )
        if _read(path) is not None
    }
    ok, detail = _in_child(_userns)
    if not ok:
        detail += "; sysctls: " + ", ".join(f"{k_}={v}" for k_, v in sysctls.items())
    out["user_namespace"] = {
        "available": ok,
        "detail": detail if not ok else "ok (single uid/gid map)",
    }
    for name, flag in NS_FLAGS.items():

        def fn(flag: int = flag) -> str:
            _userns()
            k.unshare(flag)
            return "ok"

        ok_ns, det = _in_child(fn) if ok else (False, "needs a user namespace")
        out[f"{name}_namespace"] = {"available": ok_ns, "detail": det}

    def mount_api() -> str:
        _userns()
        k.unshare(k.CLONE_NEWNS)
        k.mount(None, "/", None, k.MS_REC | k.MS_PRIVATE)
        k.mount_setattr("/", k.MOUNT_ATTR_RDONLY, recursive=True)
        fd = k.open_tree("/tmp", k.OPEN_TREE_CLONE | k.OPEN_TREE_CLOEXEC)
        os.close(fd)
        return "ok (open_tree, move_mount, mount_setattr)"

    ok_m, det_m = _in_child(mount_api) if ok else (False, "needs a user namespace")
    out["mount_api"] = {"available": ok_m, "detail": det_m}
    try:
        fd = os.pidfd_open(os.getpid())
        os.close(fd)
        out["pidfd"] = {"available": True, "detail": "ok"}
    except (OSError, AttributeError) as exc:
        out["pidfd"] = {"available": False, "detail": str(exc)}
    nnp = _read("/proc/self/status") or ""
    out["no_new_privs"] = {"available": "NoNewPrivs" in nnp, "detail": "prctl(PR_SET_NO_NEW_PRIVS)"}
    actions = _read("/proc/sys/kernel/seccomp/actions_avail")
    out["seccomp"] = {
        "available": actions is not None and "errno" in actions,
        "detail": f"actions: {actions}"
        if actions
        else "no /proc/sys/kernel/seccomp (CONFIG_SECCOMP_FILTER off?)",
    }
    out["landlock"] = _landlock()
    out["cgroups"] = _cgroups()
    return out


def _landlock() -> dict[str, Any]:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(ctypes.c_long(444), None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 0:
        err = ctypes.get_errno()
        why = {
            errno.ENOSYS: "kernel without Landlock",
            errno.EOPNOTSUPP: "Landlock disabled at boot",
        }
        return {"available": False, "abi": 0, "detail": why.get(err, os.strerror(err))}
    return {"available": True, "abi": abi, "detail": f"ABI {abi}"}


def _cgroups() -> dict[str, Any]:
    from . import cgroups

    layout = cgroups.detect()
    controllers = sorted(set(layout.v1) | set(layout.v2_controllers()))
    info: dict[str, Any] = {"layout": layout.kind, "controllers": controllers}
    try:
        placement = cgroups.place(layout)
    except (cgroups.CgroupUnavailable, OSError) as exc:
        info.update(
            available=False,
            detail=f"{layout.kind} layout; not usable: {exc} (the memory, pids, cpus and "
            "cpu_time limits need one: refused, or weaker with --allow-degraded)",
        )
        return info
    removed = cgroups.sweep(placement)
    where = ", ".join(sorted(set(placement.bases.values())))
    info.update(
        available=True,
        version=placement.version,
        detail=f"{layout.kind} layout; memory, pids, cpu limits and accounting in {where}"
        + (f" (removed {removed} stale groups)" if removed else ""),
    )
    return info


def run_probe() -> dict[str, Any]:
    """Run :func:`probe` in a fresh interpreter and return its result."""
    import subprocess

    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (
        f"import sys; sys.path.insert(0, {pkg_parent!r}); "
        "from nanobox._linux.probe import main; main()"
    )
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"probe failed: {proc.stderr.decode(errors='replace')[-500:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def main() -> None:
    print(json.dumps(probe()))


if __name__ == "__main__":
    main()
