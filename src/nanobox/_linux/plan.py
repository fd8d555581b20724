"""Policy + arguments -> the plan a sandbox is built from (pure; no syscalls
beyond reading the caller's cwd and environment)."""

from __future__ import annotations

import _thread
import os
import resource
import stat
from collections.abc import Mapping, Sequence

from ..errors import PolicyError, UnsupportedError
from ..policy import Policy, validate_env
from . import DEFAULT_PATH, USERNS_HELP, fsplan, wire

TYPE_CHECKING = False  # not ``typing``'s: on the CLI's start-up path
if TYPE_CHECKING:
    from typing import Any

BASE_ENV = ("PATH", "HOME", "LANG", "TERM")
PROXY_HTTP_PORT = 3128
PROXY_SOCKS_PORT = 1080
PROXY_ENV = {
    **{
        name: f"http://127.0.0.1:{PROXY_HTTP_PORT}"
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
    },
    **{name: f"socks5h://127.0.0.1:{PROXY_SOCKS_PORT}" for name in ("ALL_PROXY", "all_proxy")},
    **{name: "localhost,127.0.0.1,::1" for name in ("NO_PROXY", "no_proxy")},
}
_FORBIDDEN_WORKSPACES = ("/proc", "/sys", "/dev")


def check_args(args: object) -> list[str]:
    if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
        raise PolicyError("args", f"expected a non-empty list of strings, got {args!r}")
    out = []
    for a in args:
        if isinstance(a, os.PathLike):
            a = os.fspath(a)
        if not isinstance(a, str) or "\0" in a:
            raise PolicyError("args", f"each argument must be a string without NUL, got {a!r}")
        out.append(a)
    if not out or not out[0]:
        raise PolicyError("args", "the command is empty")
    return out


_ACCOUNT_HOME: dict[int, str | None] = {}  # uid -> home


def account_home() -> str | None:
    """This user's home in the user database (``$HOME`` may point
    elsewhere), looked up once per process and uid; None if there is none
    (or it is not an absolute path)."""
    uid = os.getuid()
    if uid not in _ACCOUNT_HOME:
        try:
            import pwd

            home = pwd.getpwuid(uid).pw_dir
        except (ImportError, KeyError):
            home = ""
        _ACCOUNT_HOME[uid] = home if os.path.isabs(home) else None
    return _ACCOUNT_HOME[uid]


def resolve_cwd(cwd: str | os.PathLike[str] | None) -> str:
    if cwd is None:
        try:
            raw = os.getcwd()
        except OSError as exc:  # removed while this process was in it
            why = f"the current directory cannot be used: {exc.strerror}"
            raise PolicyError("cwd", why) from None
    else:
        given: object = cwd
        try:
            given = os.fspath(cwd)
        except TypeError:
            pass
        if not isinstance(given, str) or not given or "\0" in given:
            raise PolicyError("cwd", f"expected a non-empty path string without NUL, got {cwd!r}")
        raw = given
    path = os.path.realpath(os.path.expanduser(raw))
    try:
        is_dir = stat.S_ISDIR(os.stat(path).st_mode)
    except FileNotFoundError:
        raise PolicyError("cwd", f"{raw!r} does not exist") from None
    except PermissionError:
        raise PolicyError(
            "cwd",
            f"{raw!r} cannot be reached by uid {os.geteuid()}: permission denied (a "
            "directory on the way is not searchable, or a security module such as "
            "Landlock forbids it)",
        ) from None
    except OSError as exc:
        raise PolicyError("cwd", f"{raw!r} cannot be used: {exc.strerror}") from None
    if not is_dir:
        raise PolicyError("cwd", f"{raw!r} is not a directory")
    if path == "/":
        raise PolicyError(
            "cwd",
            "the working directory is the sandbox's writable workspace; '/' would make the "
            "whole host writable (run from, or pass --cwd, a project directory)",
        )
    for bad in _FORBIDDEN_WORKSPACES:
        if path == bad or path.startswith(bad + "/"):
            raise PolicyError("cwd", f"{raw!r} is under {bad}, which cannot be a workspace")
    return path


def build_env(policy: Policy, extra: Mapping[str, str] | None) -> dict[str, str]:
    if policy.inherit_env:
        env = dict(os.environ)
    else:
        env = {k: os.environ[k] for k in BASE_ENV if k in os.environ}
    env.setdefault("PATH", DEFAULT_PATH)
    env.update(policy.env)
    if extra:
        env.update(validate_env(extra, "env"))
    return env


def rlimits(policy: Policy) -> list[tuple[int, int, int]]:
    lim = policy.limits
    out = [(resource.RLIMIT_CORE, 0, 0)]
    if lim.open_files is not None:
        n = int(lim.open_files)
        out.append((resource.RLIMIT_NOFILE, n, n))
    if lim.file_size is not None:
        n = int(lim.file_size)
        out.append((resource.RLIMIT_FSIZE, n, n))
    # RLIMIT_CPU, the per-process backstop of ``cpu_time``, depends on what
    # the process has used when it is set: ``child.set_rlimits`` makes it.
    return out


_placement_lock = _thread.allocate_lock()  # (not ``threading``: ~1 ms of the CLI's start)
_placement: Any = None  # Placement, or the CgroupUnavailable explaining why not


def cgroup_placement() -> Any:
    """This process's cgroup placement (computed once), or the reason there
    is none (a ``CgroupUnavailable``)."""
    global _placement
    with _placement_lock:
        if _placement is None:
            from . import cgroups

            try:
                _placement = cgroups.place(cgroups.detect())
            except (cgroups.CgroupUnavailable, OSError) as exc:
                _placement = cgroups.CgroupUnavailable(str(exc))
        return _placement


def resources(
    policy: Policy,
) -> tuple[dict[str, Any] | None, list[tuple[int, int, int]], list[str]]:
    """Decide how memory/pids/cpus limits and accounting are enforced.

    Returns (cgroup plan or None, extra rlimits, degradations). Raises
    UnsupportedError when a limit cannot be enforced and degraded mode was
    not allowed (or cannot be enforced soundly at all)."""
    from . import cgroups

    lim = policy.limits
    wanted = {
        "memory": None if lim.memory is None else int(lim.memory),
        "pids": None if lim.pids is None else int(lim.pids) + 1,  # + the sandbox's init
        "cpus": None if lim.cpus is None else float(lim.cpus),
    }
    requested = [k for k, v in wanted.items() if v is not None]
    if lim.cpu_time is not None:
        requested.append("cpu_time")
    placement = cgroup_placement()
    if isinstance(placement, cgroups.Placement):
        where = placement.for_run(pids=wanted["pids"] is not None, cpus=wanted["cpus"] is not None)
        return {"placement": where, "limits": wanted}, [], []
    if not requested:
        return None, [], []  # accounting falls back to rusage; nothing was promised
    why = str(placement)
    if not policy.allow_degraded:
        raise UnsupportedError(
            f"cannot enforce the {'/'.join(requested)} limit: no usable cgroup ({why}); "
            "run as root, from a delegated cgroup (e.g. 'systemd-run --user --scope -p "
            "Delegate=yes ...'), or allow degraded mode (--allow-degraded)",
            step="cgroups",
        )
    extra: list[tuple[int, int, int]] = []
    degraded: list[str] = []
    if wanted["memory"] is not None:
        mem = int(wanted["memory"])
        extra.append((resource.RLIMIT_AS, mem, mem))
        degraded.append(
            "memory: enforced with RLIMIT_AS (virtual address space per process), not a "
            f"cgroup; no OOM accounting ({why})"
        )
    if wanted["cpus"] is not None:
        degraded.append(f"cpus: not enforced ({why})")
    if lim.cpu_time is not None:
        # Polling the process tree misses what no one waits for: children of
        # a parent that ignores SIGCHLD are reaped by the kernel, their CPU
        # added nowhere (250 such used 5 s under a 1 s limit, reported 0.14).
        degraded.append(
            "cpu_time: counted from the sandbox's processes every 50 ms, not a cgroup; "
            f"the CPU of processes reaped unwaited (SIGCHLD ignored) is not counted ({why})"
        )
    if wanted["pids"] is not None:
        raise UnsupportedError(
            f"cannot enforce the pids limit: no usable cgroup ({why}), and RLIMIT_NPROC is "
            "not sound here (it counts every process of the caller's uid, not just the "
            "sandbox's)",
            step="cgroups",
        )
    return None, extra, degraded


_programs: dict[object, tuple[str, dict[str, Any]]] = {}


def seccomp_program(
    policy: Policy, *, no_network: bool = False
) -> tuple[str | None, dict[str, Any] | None]:
    """The compiled filter for ``policy.syscalls`` (hex) and the table the
    init answers refused calls from, cached per policy. ``no_network`` adds
    socket rules standing in for an empty network namespace."""
    spec = policy.syscalls
    if spec == "none" and not no_network:
        return None, None
    key: object = (spec, no_network)
    cached = _programs.get(key)
    if cached is None and spec == "default" and not no_network:
        # Precompiled (tools/gen_default_filter.py): no compiler imports on the
        # CLI's start-up path.
        from .._seccomp import default_program

        machine = os.uname().machine
        arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
        if arch in default_program.PROGRAMS:
            cached = (default_program.PROGRAMS[arch], default_program.table(arch))
            _programs[key] = cached
    if cached is None:
        from .. import _seccomp
        from ..syscalls import Arg, SyscallRule, Syscalls, to_seccomp_policy
        from .notify import reporting_policy

        if no_network:
            base = (
                Syscalls()
                if spec == "default"
                else (Syscalls(base="allow") if spec == "none" else spec)
            )
            assert isinstance(base, Syscalls)
            unix = Arg(0, "masked_eq", 1, 0xFFFFFFFF)
            unix_only = (
                # Not unix datagram sockets (SOCK_DGRAM, and SOCK_RAW, which
                # the kernel makes one): see the default policy's socket rules.
                SyscallRule("socket", "errno", "EACCES", args=(unix, Arg(1, "masked_eq", 2, 0xF))),
                SyscallRule("socket", "errno", "EACCES", args=(unix, Arg(1, "masked_eq", 3, 0xF))),
                SyscallRule("socket", "allow", args=(unix,)),
                SyscallRule("socket", "errno", "EACCES"),
            )
            spec = Syscalls(
                base=base.base,
                allow=base.allow,
                deny=base.deny,
                rules=unix_only + tuple(base.rules),
            )
        try:
            reporting, table = reporting_policy(to_seccomp_policy(spec))
            cached = (_seccomp.compile(reporting).hex(), table)
        except _seccomp.SeccompPolicyError as exc:
            raise PolicyError("syscalls", str(exc)) from None
        _programs[key] = cached
    return cached


def without_namespaces(policy: Policy, detail: str) -> list[str]:
    """What is weaker when the sandbox runs without user namespaces (degraded
    mode), or the refusal when that is not allowed."""
    from . import landlock

    if not policy.allow_degraded:
        raise UnsupportedError(
            f"cannot create the sandbox's user namespace ({detail}): {USERNS_HELP}; or allow "
            "degraded mode (--allow-degraded) to run with Landlock, seccomp and rlimits only",
            step="create namespaces",
        )
    abi = landlock.abi_version()
    if abi == 0:
        raise UnsupportedError(
            f"no user namespaces ({detail}) and no Landlock on this kernel: nanobox cannot "
            "restrict the filesystem at all, even in degraded mode",
            step="landlock",
        )
    out = [
        f"namespaces: no user namespace ({detail}); no pid, mount, network, ipc, uts or "
        "cgroup namespace",
        f"filesystem: Landlock only (ABI {abi}): no read-only mounts, protected paths are not "
        "enforced, hidden directories' names can be listed; /tmp is replaced by a private "
        "directory in $TMPDIR",
        "processes: host processes are visible in /proc (signals and ptrace to them are "
        "refused by Landlock scoping and seccomp)",
        "ipc, hostname: shared with the host",
    ]
    if policy.network.mode != "host":
        tcp = " and Landlock TCP rules" if abi >= 4 else ""
        out.append(
            "network: no network namespace; every socket family but AF_UNIX is refused by "
            f"seccomp{tcp}"
        )
    return out


def _in_initial_userns() -> bool:
    """Is this process in the initial user namespace (a real root, not the
    "root" of a container or a scratch namespace, who cannot map other
    host uids)? Read once per process (a fork reads again; a process that
    enters another user namespace later, which is rare, keeps the first
    answer, as its fork server, started in the first one, would)."""
    global _initial_userns
    pid = os.getpid()
    known = _initial_userns
    if known is not None and known[0] == pid:
        return known[1]
    try:
        with open("/proc/self/uid_map") as fh:
            answer = fh.read().split() == ["0", "0", "4294967295"]
    except OSError:
        answer = False
    _initial_userns = (pid, answer)
    return answer


_initial_userns: tuple[int, bool] | None = None  # (pid, answer)


def build_plan(
    policy: Policy,
    args: Sequence[str],
    *,
    run_id: str,
    cwd: str,
    env: dict[str, str],
    timeout: float | None,
    userns: tuple[bool, str] = (True, ""),
) -> dict[str, Any]:
    uid, gid = os.getuid(), os.getgid()
    lim = policy.limits
    cgroup, extra_rlimits, degraded = resources(policy)
    fs = policy.filesystem
    home = os.environ.get("HOME") or os.path.expanduser("~")
    mode = "full"
    allowlist = policy.network.mode == "allowlist"
    if allowlist:
        env.update(PROXY_ENV)
    if not userns[0]:
        if allowlist:
            raise UnsupportedError(
                f"a network allowlist needs a network namespace, and user namespaces are "
                f"unavailable here ({userns[1]}); nanobox never falls back to the host "
                "network",
                step="network",
            )
        mode = "nons"
        degraded += without_namespaces(policy, userns[1])
        if uid == 0:
            degraded.append(
                "identity: the command keeps the caller's uid 0 on host files (no user "
                "namespace to give it an unprivileged one); Landlock still limits writes"
            )
        program, notify_table = seccomp_program(policy, no_network=policy.network.mode != "host")
        view = fsplan.build_nons(fs, cwd, home, account_home() if fs.default_hides else None)
        degraded += fsplan.unenforced_hides(view)
    else:
        program, notify_table = seccomp_program(policy)
        view = fsplan.build(fs, cwd, home, account_home() if fs.default_hides else None)
    view_json = view.to_json(fs.rootfs, int(fs.tmp_size))
    view_json["sys"] = policy.network.mode != "host"
    view_json["proc_fallback"] = policy.allow_degraded
    ll = None
    if mode == "nons":
        ll = fsplan.landlock_plan(view, nons=True, tcp=policy.network.mode != "host")
    elif fs.landlock:
        # Applied where the kernel has it (``child.prepare`` asks); this
        # process need not load ctypes to find out.
        ll = fsplan.landlock_plan(view)
    limits = rlimits(policy) + extra_rlimits
    return {
        "proxy": allowlist,
        "proxy_ports": [PROXY_HTTP_PORT, PROXY_SOCKS_PORT],
        "mode": mode,
        "private_tmp": mode == "nons",
        "allow_degraded": policy.allow_degraded,
        "degraded": degraded,
        "cgroup": cgroup,
        "id": run_id,
        "argv": list(args),
        "env": sorted(env.items()),
        "cwd": cwd,
        "outer_uid": uid,
        "outer_gid": gid,
        "uid": uid,
        "gid": gid,
        "root_mapping": uid == 0 and mode == "full" and _in_initial_userns(),
        "hostname": policy.hostname,
        "newnet": policy.network.mode != "host",
        "view": view_json,
        "placeholders": view.placeholders,
        "git_dirs": view.git_dirs,
        "connect_allowed": [*view.writable, "/run", "/var/run", "/dev/shm"]
        if mode == "full"
        else list(view.writable),
        "landlock": ll,
        "rlimits": limits,
        "spawn": mode != "nons"
        and spawn_allowed(program, limits, default=policy.syscalls == "default"),
        "timeout": timeout,
        "cpu_time": None if lim.cpu_time is None else float(lim.cpu_time),
        "seccomp": program,
        "seccomp_notify": notify_table,
    }


def spawn_allowed(
    program: str | None, limits: list[tuple[int, int, int]], *, default: bool
) -> bool:
    """May stage A start the command with posix_spawn, after taking the
    command's last steps (rlimits, seccomp) on itself? Only under the
    default filter or none: A's own calls after installing a filter must
    all be allowed (a refused one would be reported as the command's
    violation, or fail the start where a forked command process would
    have started), and for a filter of the caller's that cannot be
    promised; those get a command process forked ahead, which makes only
    its report and the exec under the filter. Nor under an address-space
    rlimit (the spawn maps a stack in a process the size of a Python
    interpreter). ``tests/test_spawn_path.py`` checks, with the BPF
    interpreter, that the default filter allows every call A makes."""
    if any(res == resource.RLIMIT_AS for res, _soft, _hard in limits):
        return False
    return program is None or default


RUN_KEYS = ("id", "argv", "env", "timeout")


def encode(plan: dict[str, Any], policy: object = None) -> bytes:
    """The message for the fork server (``wire.join_run``): this run's own
    part (``RUN_KEYS``), then the rest, which is byte-for-byte the same for every run
    of one policy in one directory (the server builds the next run's
    sandbox ahead from it, and uses it only for a run whose bytes match)."""
    global _last_rest
    run = {key: plan[key] for key in RUN_KEYS}
    rest = {key: value for key, value in plan.items() if key not in RUN_KEYS}
    last = _last_rest
    # The same policy's plans, when equal, encode the same (equal plans
    # of two policies might not: 1 == 1.0 == True); comparing takes ~2 us,
    # encoding again ~60 us.
    if policy is not None and last[0] is policy and rest == last[1]:
        static = last[2]
    else:
        static = wire.dumps(rest)
        _last_rest = (policy, rest, static)
    return wire.join_run(wire.dumps(run), static)


# The last plan's policy, static part and its bytes: a caller running one
# policy in one directory sends the same bytes every time (see ``encode``).
_last_rest: tuple[object, dict[str, Any], bytes] = (None, {}, b"")
