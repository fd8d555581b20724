"""``nanobox`` command line. Exit statuses: the command's own; 128+N when it
was killed by signal N; 124 on a wall-clock or CPU timeout; 125 when nanobox
itself fails (bad option, setup failure, unenforceable request); 126 command
not executable; 127 command not found."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Sequence

from ._version import __version__

TYPE_CHECKING = False  # not ``typing``'s: a cold start does not import it
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable
    from typing import Any, NoReturn

EXIT_TIMEOUT = 124
EXIT_NANOBOX = 125

# options of `nanobox run` that take a value (for splitting off the command)
_VALUE_OPTIONS: set[str] = set()  # options of `run` that take a value (filled below)
_LONG_OPTIONS: set[str] = set()  # every long option of `run` (for abbreviations)


_RUN_PARSER: list[argparse.ArgumentParser] = []

# `nanobox run [--] COMMAND...` without options takes these values and never
# builds the parser (importing argparse and adding ~40 options costs the
# CLI's start ~5 ms). tests/test_cli.py checks them against the parser.
_RUN_DEFAULTS: dict[str, Any] = {
    "timeout": None,
    "cpu_time": None,
    "memory": None,
    "pids": None,
    "cpus": None,
    "file_size": None,
    "open_files": None,
    "output_limit": None,
    "on_output_limit": None,
    "env": [],
    "inherit_env": False,
    "cwd": None,
    "network": None,
    "allow_net": [],
    "deny_net": [],
    "net_connect_timeout": None,
    "net_idle_timeout": None,
    "ro": [],
    "rw": [],
    "tmpfs": [],
    "hide": [],
    "no_default_hides": False,
    "unprotect": [],
    "rootfs": None,
    "seccomp": None,
    "policy": None,
    "result": None,
    "allow_degraded": False,
    "log_format": None,
    "verbose": 0,
    "quiet": False,
}


class _UsageError(Exception):
    pass


def _parser_class() -> type[argparse.ArgumentParser]:
    """argparse's parser raising :class:`_UsageError`, with a formatter
    that does not ``import shutil`` (for the terminal width) on every start."""
    import argparse

    class _Formatter(argparse.HelpFormatter):
        def __init__(self, prog: str) -> None:
            try:
                width = int(os.environ.get("COLUMNS", "")) or os.get_terminal_size(1).columns
            except (OSError, ValueError):
                width = 80
            super().__init__(prog, width=max(width - 2, 40))

    class _Parser(argparse.ArgumentParser):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("formatter_class", _Formatter)
            super().__init__(*args, **kwargs)

        def error(self, message: str) -> NoReturn:
            raise _UsageError(message)

    return _Parser


def _fail(message: str, code: int = EXIT_NANOBOX) -> NoReturn:
    _say(f"nanobox: error: {message}\n")
    raise SystemExit(code)


def _build_parser() -> argparse.ArgumentParser:
    _Parser = _parser_class()
    p = _Parser(prog="nanobox", description="Run a command in a sandbox.")
    p.add_argument("--version", action="version", version=f"nanobox {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    r = sub.add_parser(
        "run",
        help="run a command in a sandbox",
        usage="nanobox run [options] [--] COMMAND [ARG...]",
    )
    r.add_argument("--timeout", metavar="DUR", help="wall-clock limit (e.g. 30s, 500ms, 2m)")
    r.add_argument("--cpu-time", metavar="DUR", help="CPU-time limit of the whole sandbox")
    r.add_argument("--memory", metavar="SIZE", help="memory limit (cgroup; swap excluded)")
    r.add_argument("--pids", metavar="N", help="most tasks (processes + threads) at once")
    r.add_argument("--cpus", metavar="N", help="CPU bandwidth, e.g. 0.5 or 2")
    r.add_argument("--file-size", metavar="SIZE", help="largest file the command may write")
    r.add_argument("--open-files", metavar="N", help="open file descriptor limit")
    r.add_argument(
        "--output-limit",
        metavar="SIZE",
        help="bytes kept per output stream (K/M/G = powers of 1024)",
    )
    r.add_argument(
        "--on-output-limit", metavar="ACTION", help="truncate (default: drain and discard) or kill"
    )
    r.add_argument(
        "--env",
        "-e",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="set a variable inside (repeatable)",
    )
    r.add_argument("--inherit-env", action="store_true", help="pass this environment through")
    r.add_argument("--cwd", metavar="PATH", help="working directory (the writable workspace)")
    r.add_argument("--network", metavar="MODE", help="none (default), allowlist or host")
    r.add_argument(
        "--allow-net",
        metavar="RULE",
        action="append",
        default=[],
        help="allow NAME[:PORT], *.SUFFIX, IP, CIDR or [IPv6]:PORT through the proxy",
    )
    r.add_argument(
        "--deny-net",
        metavar="RULE",
        action="append",
        default=[],
        help="deny a destination (same syntax; checked first)",
    )
    r.add_argument("--net-connect-timeout", metavar="DUR", help="proxy connect timeout (30s)")
    r.add_argument("--net-idle-timeout", metavar="DUR", help="proxy idle timeout (5m)")
    r.add_argument(
        "--ro",
        metavar="PATH[:DEST]",
        action="append",
        default=[],
        help="bind PATH read-only (at DEST); a trailing '?' on PATH makes it optional",
    )
    r.add_argument(
        "--rw",
        metavar="PATH[:DEST]",
        action="append",
        default=[],
        help="bind PATH writable (at DEST)",
    )
    r.add_argument(
        "--tmpfs",
        metavar="DEST[:SIZE]",
        action="append",
        default=[],
        help="a private tmpfs at DEST",
    )
    r.add_argument(
        "--hide",
        metavar="PATH",
        action="append",
        default=[],
        help="hide PATH (empty and unreadable inside); missing paths are ignored",
    )
    r.add_argument(
        "--no-default-hides",
        action="store_true",
        help="do not hide the default secrets (~/.ssh, ~/.aws, ...)",
    )
    r.add_argument(
        "--unprotect",
        metavar="NAME",
        action="append",
        default=[],
        help="let the command write a protected path (e.g. .vscode or .git/hooks)",
    )
    r.add_argument("--rootfs", metavar="KIND", help="host (default) or minimal")
    r.add_argument(
        "--seccomp",
        metavar="POLICY",
        help="syscall filter: default, none, or a TOML file (see docs/API.md)",
    )
    r.add_argument("--policy", metavar="FILE.toml", help="policy file (same names as Python)")
    r.add_argument("--result", metavar="FILE", help="write the result as JSON ('-' = stderr)")
    r.add_argument(
        "--allow-degraded",
        action="store_true",
        help="run even if a requested protection is unavailable (listed in the result)",
    )
    r.add_argument("--log-format", metavar="FMT", help="text (default) or json")
    r.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    r.add_argument("-q", "--quiet", action="store_true", help="no nanobox messages")
    _RUN_PARSER[:] = [r]
    _LONG_OPTIONS.update(o for a in r._actions for o in a.option_strings if o.startswith("--"))
    _VALUE_OPTIONS.update(
        opt for action in r._actions if action.nargs != 0 for opt in action.option_strings
    )
    c = sub.add_parser("check", help="what this host can enforce")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split ``run``'s arguments into options and the command: the options
    end at ``--`` or at the first word that is not an option (or an
    option's value); a ``--`` after that belongs to the command."""
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            return argv[:i], argv[i + 1 :]
        if not tok.startswith("-") or tok == "-":
            return argv[:i], argv[i:]
        if _takes_next(tok):
            i += 1
        i += 1
    return argv, []


def _takes_next(tok: str) -> bool:
    """Does option ``tok`` take the next argument as its value, as argparse
    reads it: a value option without ``=``, a unique abbreviation of one
    (``--time``), or a cluster of short flags ending in one (``-qe``)?"""
    if tok.startswith("--"):
        if "=" in tok:
            return False
        if tok in _LONG_OPTIONS:
            return tok in _VALUE_OPTIONS
        matches = [o for o in _LONG_OPTIONS if o.startswith(tok)]
        return len(matches) == 1 and matches[0] in _VALUE_OPTIONS
    for i in range(1, len(tok)):
        if "-" + tok[i] in _VALUE_OPTIONS:
            return i == len(tok) - 1  # else the rest of the token is its value
    return False


def _setup_logging(ns: Any) -> None:
    fmt = ns.log_format or "text"
    if fmt not in ("text", "json"):
        raise _UsageError(f"--log-format: expected 'text' or 'json', got {fmt!r}")
    if ns.quiet or not ns.verbose:
        return
    import logging

    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":

        class _Json(logging.Formatter):
            def format(self, record: logging.LogRecord) -> str:
                out = {
                    "level": record.levelname.lower(),
                    "logger": record.name,
                    "message": record.getMessage(),
                }
                event = getattr(record, "nanobox_event", None)
                if event is not None:
                    out["event"] = event
                import json

                return json.dumps(out, default=str)

        handler.setFormatter(_Json())
    else:
        handler.setFormatter(logging.Formatter("nanobox: %(name)s: %(message)s"))
    log = logging.getLogger("nanobox")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if ns.verbose else logging.INFO)


def _policy_from_args(ns: Any) -> Any:
    from ._valuetype import replace
    from .errors import PolicyError as _PolicyError
    from .policy import Limits, Policy, load_policy

    try:
        base = load_policy(ns.policy) if ns.policy else Policy()
    except _PolicyError as exc:
        raise _UsageError(f"--policy {ns.policy}: {exc}") from None
    limits: dict[str, Any] = {}
    for opt, name in (
        ("timeout", "wall_time"),
        ("cpu_time", "cpu_time"),
        ("file_size", "file_size"),
        ("open_files", "open_files"),
        ("memory", "memory"),
        ("pids", "pids"),
        ("cpus", "cpus"),
        ("output_limit", "output"),
        ("on_output_limit", "on_output_limit"),
    ):
        value = getattr(ns, opt)
        if value is not None:
            limits[name] = value
    changes: dict[str, Any] = {}
    if limits:
        from .errors import PolicyError

        try:
            changes["limits"] = replace(base.limits, **limits)
        except PolicyError as exc:
            flag = {"wall_time": "--timeout", "output": "--output-limit"}.get(
                exc.field.split(".")[-1], "--" + exc.field.split(".")[-1].replace("_", "-")
            )
            raise _UsageError(f"{flag}: {exc.message.split(': ', 1)[1]}") from None
        except TypeError as exc:  # pragma: no cover
            raise _UsageError(str(exc)) from None
    fs_changes: dict[str, Any] = {}
    for opt, name in (
        ("ro", "read_only"),
        ("rw", "read_write"),
        ("tmpfs", "tmpfs"),
        ("hide", "hide"),
        ("unprotect", "unprotect"),
    ):
        values = getattr(ns, opt)
        if values:
            fs_changes[name] = tuple(getattr(base.filesystem, name)) + tuple(values)
    if ns.no_default_hides:
        fs_changes["default_hides"] = False
    if ns.rootfs is not None:
        fs_changes["rootfs"] = ns.rootfs
    if fs_changes:
        from .errors import PolicyError

        try:
            changes["filesystem"] = replace(base.filesystem, **fs_changes)
        except PolicyError as exc:
            raise _UsageError(_flag_message(exc)) from None
    if ns.seccomp is not None:
        if ns.seccomp in ("default", "none"):
            changes["syscalls"] = ns.seccomp
        else:
            from .errors import PolicyError
            from .syscalls import load_syscalls

            try:
                changes["syscalls"] = load_syscalls(ns.seccomp)
            except PolicyError as exc:
                # As --policy's: the option and its file, then the key in it.
                where = exc.field.partition(".")[2]
                reason = f"{where}: {exc._reason}" if where else exc._reason
                raise _UsageError(f"--seccomp {ns.seccomp}: {reason}") from None
    net_changes: dict[str, Any] = {}
    if ns.network is not None:
        if ns.network not in ("none", "allowlist", "host"):
            raise _UsageError(
                f"--network: expected 'none', 'allowlist' or 'host', got {ns.network!r}"
            )
        net_changes["mode"] = ns.network
    if ns.allow_net or ns.deny_net:
        net_changes["mode"] = "allowlist"
        net_changes["allowed"] = tuple(base.network.allowed) + tuple(ns.allow_net)
        net_changes["denied"] = tuple(base.network.denied) + tuple(ns.deny_net)
    if ns.net_connect_timeout is not None:
        net_changes["connect_timeout"] = ns.net_connect_timeout
    if ns.net_idle_timeout is not None:
        net_changes["idle_timeout"] = ns.net_idle_timeout
    if net_changes:
        from .errors import PolicyError

        try:
            changes["network"] = replace(base.network, **net_changes)
        except PolicyError as exc:
            raise _UsageError(_flag_message(exc)) from None
    env = dict(base.env)
    for item in ns.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _UsageError(f"--env: expected KEY=VALUE, got {item!r}")
        env[key] = value
    if ns.env:
        changes["env"] = env
    if ns.inherit_env:
        changes["inherit_env"] = True
    if ns.allow_degraded:
        changes["allow_degraded"] = True
    del Limits
    return base.replace(**changes) if changes else base


_FIELD_FLAGS = {
    "filesystem.read_only": "--ro",
    "filesystem.read_write": "--rw",
    "filesystem.tmpfs": "--tmpfs",
    "filesystem.hide": "--hide",
    "filesystem.rootfs": "--rootfs",
    "filesystem.unprotect": "--unprotect",
    "filesystem.protect": "protected path",
    "cwd": "--cwd",
    "syscalls": "--seccomp",
    "network.allowed": "--allow-net",
    "network.denied": "--deny-net",
    "network.mode": "--network",
    "network.connect_timeout": "--net-connect-timeout",
    "network.idle_timeout": "--net-idle-timeout",
    "env": "--env",
}


def _flag_message(exc: Any) -> str:
    """A PolicyError as the user typed it: name the flag, not the field."""
    flag = _FIELD_FLAGS.get(getattr(exc, "field", ""))
    if flag is None:
        return str(exc)
    return f"{flag}: {str(exc.message).split(': ', 1)[-1]}"


class _ResultFile:
    """Where ``--result`` goes: settled, and opened, before the command runs
    (a judge's record should not be lost after it, and nothing the command
    does to the file system meanwhile may change where it is written: a
    result path is often in its workspace), written after it.

    - ``/dev/stdout``, ``/dev/stderr``, ``/dev/fd/N``, ``/proc/self/fd/N``
      (or a link to one) name this process's descriptor N: written there,
      after what the command wrote (reopening the name would start at
      offset 0; replacing where it leads would replace the file the
      caller's shell opened). Not one of nanobox's own descriptors.
    - An existing FIFO, terminal or device (not through a link) is opened
      now and written through, as a shell's ``>`` does (it was replaced by
      a regular file: as root, ``/dev/full`` was). A FIFO must have its
      reader already.
    - Anything else is a name in a directory opened now: the result is
      written to a new file of an unguessable name there (``O_EXCL``, no
      links followed) and renamed over the name, which replaces whatever
      is at the name then (a link left there is replaced, not followed),
      so that a reader never sees half of it. If the directory is no
      longer where it was (the command moved it away, and maybe left
      another, with a record of its own, in its place), nothing is written
      and the CLI says so (exit 125).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1  # the descriptor written to, for the first two kinds
        self.close_fd = False
        self.dir_fd = -1  # the directory, for the third
        self.dir_path = ""
        self.name = ""

    @classmethod
    def settle(cls, path: str) -> _ResultFile:
        """Check and open ``path``; a ``_UsageError`` if it cannot be written."""
        self = cls(path)
        try:
            self._settle()
        except OSError as exc:
            self.close()
            raise _UsageError(f"--result: cannot write {path!r}: {exc.strerror}") from None
        except BaseException:
            self.close()
            raise
        return self

    def _settle(self) -> None:
        import stat

        path = self.path
        if path == "-":
            self.fd = 2
            return
        if not path:
            raise _UsageError("--result: expected a file path, or '-' for stderr, got ''")
        if path.endswith("/") or os.path.isdir(path):
            raise _UsageError(f"--result: {path!r} names a directory; name a file in it")
        fd = _fd_named(path)
        if fd is not None:
            import fcntl

            if fd in _nanobox_fds():
                raise _UsageError(f"--result: {path!r}: descriptor {fd} is not the caller's")
            try:
                mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
            except OSError:
                raise _UsageError(f"--result: {path!r}: descriptor {fd} is not open") from None
            if mode == os.O_RDONLY:
                raise _UsageError(f"--result: {path!r}: descriptor {fd} is open read-only")
            self.fd = fd
            return
        try:
            st = os.lstat(path)
        except OSError:
            st = None  # (missing; or a name too long, which the directory step says)
        if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            if stat.S_ISSOCK(st.st_mode):
                raise _UsageError(f"--result: {path!r} is a socket; name a file")
            flags = os.O_WRONLY | os.O_NOCTTY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            try:
                self.fd = os.open(path, flags)
            except OSError as exc:
                why = "a FIFO without a reader" if exc.errno == errno.ENXIO else exc.strerror
                raise _UsageError(f"--result: cannot write {path!r}: {why}") from None
            self.close_fd = True
            if stat.S_ISREG(os.fstat(self.fd).st_mode):  # (swapped since the lstat)
                raise _UsageError(f"--result: {path!r} changed while it was opened")
            os.set_blocking(self.fd, True)
            return
        head, self.name = os.path.split(path)  # (as given: the kernel resolves "..")
        if self.name in (".", ".."):
            raise _UsageError(f"--result: {path!r} names a directory; name a file in it")
        self.dir_path = head or "."
        self.dir_fd = os.open(self.dir_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.lstat(self.name, dir_fd=self.dir_fd)  # (ENAMETOOLONG)
        except FileNotFoundError:
            pass
        tmp, fd = self._new_tmp()  # (the directory takes a file)
        os.close(fd)
        os.unlink(tmp, dir_fd=self.dir_fd)

    def _new_tmp(self) -> tuple[str, int]:
        """A new empty file of an unguessable name in the directory: its
        name and a descriptor to write it through."""
        while True:
            tmp = f".nanobox-result.{os.urandom(8).hex()}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                return tmp, os.open(tmp, flags, 0o666, dir_fd=self.dir_fd)
            except FileExistsError:
                continue

    def _still_there(self) -> bool:
        """Is the directory opened before the run still at its path?"""
        try:
            now, then = os.stat(self.dir_path), os.fstat(self.dir_fd)
        except OSError:
            return False
        return (now.st_dev, now.st_ino) == (then.st_dev, then.st_ino) and then.st_nlink > 0

    def write(self, data: dict[str, Any]) -> bool:
        """Write the result; False, said on stderr, if it could not be."""
        import json

        from ._linux.fds import write_all

        text = (json.dumps(data, indent=2) + "\n").encode()
        tmp = ""
        try:
            if self.fd >= 0:
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except (OSError, ValueError, AttributeError):
                        pass
                write_all(self.fd, text)
            else:
                if not self._still_there():
                    _say(
                        f"nanobox: error: --result: cannot write {self.path!r}: its directory "
                        "was moved or removed during the run\n"
                    )
                    return False
                tmp, out = self._new_tmp()
                try:
                    write_all(out, text)
                finally:
                    os.close(out)
                try:
                    os.replace(tmp, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
                except OSError as exc:
                    # (the command made the name a directory, say): the
                    # record is kept under its temporary name, not lost
                    kept = os.path.join(os.path.dirname(self.path), tmp)
                    tmp = ""
                    _say(
                        f"nanobox: error: --result: cannot write {self.path!r}: "
                        f"{exc.strerror}; the result is in {kept!r}\n"
                    )
                    return False
                tmp = ""
        except OSError as exc:
            _say(f"nanobox: error: --result: cannot write {self.path!r}: {exc.strerror}\n")
            return False
        finally:
            if tmp:
                try:
                    os.unlink(tmp, dir_fd=self.dir_fd)
                except OSError:
                    pass
            self.close()
        return True

    def close(self) -> None:
        if self.close_fd and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


def _fd_named(path: str) -> int | None:
    """The descriptor of this process that ``path`` names (through links, as
    ``/dev/stdout`` leads to ``/proc/self/fd/1``), or None."""
    fd_dirs = (os.path.realpath("/proc/self/fd"), os.path.realpath("/proc/thread-self/fd"))
    p = os.path.abspath(path)
    for _ in range(40):  # (the kernel's limit of links on one path)
        head, name = os.path.split(p)
        head = os.path.realpath(head)
        if head in fd_dirs:
            return int(name) if name.isascii() and name.isdigit() and len(name) < 10 else None
        p = os.path.join(head, name)
        try:
            target = os.readlink(p)
        except OSError:
            return None  # (not a link)
        p = os.path.normpath(os.path.join(head, target))
    return None


def _nanobox_fds() -> set[int]:
    """The descriptors of nanobox's own in this process (its server's)."""
    out = set()
    early = sys.modules.get("nanobox._linux.early")
    forked = getattr(early, "_forked", None)
    if forked is not None:
        out.add(forked[1])
    client = sys.modules.get("nanobox._linux.client")
    server = getattr(client, "_server", None)
    if server is not None:
        out.add(server.ctrl.fileno())
    return out


def _relay(fd: int, data: bytes, stop: _Interrupts) -> None:
    """The command's output to the CLI's ``fd`` (1 or 2), all of it, also
    where the descriptor is non-blocking (``BufferedWriter`` dropped what
    did not fit). A reader that went away (EPIPE) or a terminal that hung
    up (EIO on a character device) takes nothing more: the descriptor is
    pointed at /dev/null, the run is killed (``stop``) and reported."""
    from ._linux.fds import write_all

    try:
        write_all(fd, data)
    except OSError as exc:
        import stat

        if exc.errno == errno.EPIPE:
            _to_devnull(fd)
            stop.output_closed()
        elif exc.errno == errno.EIO and stat.S_ISCHR(os.fstat(fd).st_mode):
            _to_devnull(fd)  # (the terminal's SIGHUP ends the run)
        else:  # (ENOSPC, EFBIG, EIO on a file, ...: the output is lost)
            _to_devnull(fd)
            stop.output_failed("stdout" if fd == 1 else "stderr", exc)


def _to_devnull(fd: int) -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    except OSError:
        pass


def _say(text: str) -> None:
    """A line on stderr, unless stderr is gone (a hung-up terminal)."""
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):  # (AttributeError: started without one)
        _to_devnull(2)


def _failure_result(command: list[str], message: str) -> dict[str, Any]:
    return {
        "id": None,
        "command": command,
        "exit_code": None,
        "signal": None,
        "outcome": "setup_failed",
        "timed_out": False,
        "oom_killed": False,
        "wall_time_s": 0.0,
        "cpu_time_s": 0.0,
        "user_time_s": 0.0,
        "system_time_s": 0.0,
        "peak_memory_bytes": 0,
        "stdout_bytes": 0,
        "stderr_bytes": 0,
        "stdout_truncated": False,
        "stderr_truncated": False,
        "degraded": [],
        "violations": [{"kind": "setup", "detail": message}],
    }


def _exit_status(result: Any) -> int:
    from .result import Outcome

    if result.outcome in (Outcome.TIMEOUT, Outcome.CPU_LIMIT):
        return EXIT_TIMEOUT
    if result.signal is not None:
        return 128 + int(result.signal)
    return int(result.exit_code)


def _cmd_run(argv: list[str]) -> int:
    if argv and argv[0].startswith("-") and argv[0] not in ("-", "--"):
        _build_parser()  # knows which options take a value
    opts, command = _split_command(argv)
    ns: Any
    if opts:
        ns = _RUN_PARSER[0].parse_args(opts)
    else:
        import types

        ns = types.SimpleNamespace(
            **{k: list(v) if isinstance(v, list) else v for k, v in _RUN_DEFAULTS.items()}
        )
    _setup_logging(ns)
    if not command:
        raise _UsageError(
            "run: no command given (usage: nanobox run [options] [--] COMMAND [ARG...])"
        )
    from .errors import PolicyError

    try:
        policy = _policy_from_args(ns)
    except PolicyError as exc:
        raise _UsageError(_flag_message(exc)) from None
    result_file = _ResultFile.settle(ns.result) if ns.result is not None else None
    try:
        return _run_and_report(ns, command, policy, result_file)
    finally:
        if result_file is not None:
            result_file.close()


def _run_and_report(
    ns: Any, command: list[str], policy: Any, result_file: _ResultFile | None
) -> int:
    from . import _prepare
    from .errors import PolicyError, SandboxError

    stop = _Interrupts()

    def to_stdout(data: bytes) -> None:
        _relay(1, data, stop)

    def to_stderr(data: bytes) -> None:
        _relay(2, data, stop)

    try:
        stdin_fd: int | None = sys.stdin.fileno() if sys.stdin is not None else None
        os.fstat(stdin_fd) if stdin_fd is not None else None
    except (OSError, ValueError):
        stdin_fd = None
    try:
        _prepare.check_linux()
        # The CLI is single-threaded: its server is forked, not exec'd.
        # The plan goes to the server before the Sandbox, the Result and the
        # I/O loop are imported: the server builds the sandbox meanwhile.
        prep = _prepare.prepare(
            policy,
            command,
            fork_server=True,
            input=None,
            stdin=stdin_fd,
            cwd=ns.cwd,
            env=None,
            timeout=None,
            text=False,
            check=False,
            # What comes after the submit, imported while the server is
            # still starting (if it is: else after the submit, as before).
            meanwhile=[_importer(name) for name in _LATER_IMPORTS],
        )
        sent = _prepare.submit(prep, fork_server=True)
        try:
            from .sandbox import Sandbox

            _collect_again()
            box = Sandbox(policy)
        except BaseException:
            sent.close()
            raise
        box._fork_server = True
        with stop:
            result = box._run_submitted(prep, sent, to_stdout, to_stderr, on_io=stop.watch)
    except PolicyError as exc:
        raise _UsageError(_flag_message(exc)) from None
    except SandboxError as exc:
        if result_file is not None:
            result_file.write(_failure_result(command, str(exc)))
        _fail(str(exc))
    code = _exit_status(result)
    if any(v.kind == "interrupted" for v in result.violations):
        code = 128 + stop.signo
        if not ns.quiet and stop.signo != stop.signals.SIGPIPE:
            _say(f"nanobox: {stop.names[stop.signo]}: the run was killed\n")
    elif not ns.quiet:
        if result.exit_code == 127 and result.violations:
            _say(f"nanobox: {command[0]}: command not found\n")
        elif result.exit_code == 126 and result.violations:
            _say(f"nanobox: {command[0]}: cannot execute ({result.violations[-1].detail})\n")
        elif result.outcome.value in ("timeout", "cpu_limit", "output_limit"):
            _say(f"nanobox: {result.violations[0].detail}\n")
        for what, flag in (
            ("stdout", result.stdout_truncated),
            ("stderr", result.stderr_truncated),
        ):
            if flag:
                _say(f"nanobox: {what} truncated at {policy.limits.output} bytes\n")
    if stop.output_error is not None:  # (whatever else happened: the output is lost)
        stream, _, message = stop.output_error
        killed = any(v.kind == "output_error" and v.data.get("killed") for v in result.violations)
        then = "; the run was killed" if killed else ""
        _say(f"nanobox: error: cannot write the command's {stream}: {message}{then}\n")
        code = EXIT_NANOBOX
    if result_file is not None and not result_file.write(result.to_dict()):
        return EXIT_NANOBOX
    return code


class _Interrupts:
    """While a run goes on, SIGINT, SIGTERM and SIGHUP (Ctrl-C, an outer
    ``timeout``, a closed terminal) have the server kill the run, as a
    limit would; the CLI then reports it like any run, ``--result``
    included (a violation of kind ``interrupted``), and exits 128+N. Before,
    it died with no record of what the command did. A second signal acts
    at once; a signal the CLI was started with ignored (``nohup``) stays
    ignored."""

    def __init__(self) -> None:
        from ._linux import signals

        self.signals = signals
        self.names = {
            signals.SIGINT: "SIGINT",
            signals.SIGTERM: "SIGTERM",
            signals.SIGHUP: "SIGHUP",
        }
        self.handled = tuple(self.names)
        self.names[signals.SIGPIPE] = "SIGPIPE"
        self.signo = 0
        self.output_error: tuple[str, str, str] | None = None
        self.io: Any = None
        self.old: dict[int, Any] = {}

    def __enter__(self) -> _Interrupts:
        for num in self.handled:
            if self.signals.getsignal(num) != self.signals.SIG_IGN:
                try:
                    self.old[num] = self.signals.signal(num, self._on_signal)
                except ValueError:  # (``main`` called in another thread: none then)
                    break
        return self

    def __exit__(self, *exc_info: object) -> None:
        while self.old:
            num, handler = self.old.popitem()
            self.signals.signal(num, handler)

    def output_closed(self) -> None:
        """Whoever read the CLI's output is gone (``nanobox run yes | head
        -1``): the run is killed, as SIGPIPE would kill a writer, and still
        reported (``--result``); the CLI exits 141. It exited at once, and
        a judge piping a command's output through ``head -c`` lost the
        record of every run whose output was longer."""
        if not self.signo:
            self.signo = self.signals.SIGPIPE
            if self.io is not None:
                self.io.interrupt("SIGPIPE")

    def output_failed(self, stream: str, exc: OSError) -> None:
        """The command's output cannot be written where the CLI's goes
        (a full disk, a file over its size limit): the run is killed, as a
        writer that gets the error would stop, and reported (a violation of
        kind ``output_error``); the CLI says so and exits 125. Before, it
        ended with the error and no record."""
        if self.output_error is None:
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            self.output_error = (stream, name, os.strerror(exc.errno or 0))
            if self.io is not None:
                self.io.fail_output(*self.output_error)

    def watch(self, io: Any) -> None:
        """The run's I/O (``Sandbox._run_submitted``'s ``on_io``)."""
        self.io = io
        if self.signo:
            io.interrupt(self.names[self.signo])
        if self.output_error is not None:
            io.fail_output(*self.output_error)

    def _on_signal(self, signo: int, _frame: object) -> None:
        if self.signo:  # the second: what it does without this
            self.__exit__()
            if signo == self.signals.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signo)
            return
        self.signo = signo
        if self.io is not None:
            self.io.interrupt(self.names[signo])


# The modules ``nanobox run`` imports once its plan is made, in that order:
# while its server's hello is still to come, one module at a time (its own
# imports first: a step begun just before the hello delays the plan by its
# length, and typing with re and enum is ~10 ms here), the rest after the
# run is sent.
_LATER_IMPORTS = (
    "collections",
    "functools",
    "enum",
    "re",
    "typing",
    "nanobox.result",
    "nanobox.events",
    "nanobox._io",
    "nanobox.sandbox",
)


def _importer(name: str) -> Callable[[], object]:
    return lambda: __import__(name)


def _cmd_check(as_json: bool) -> int:
    from .check import check

    report = check()
    if as_json:
        import json

        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format_text())
    return 0 if report.default_policy_enforceable else 1


def _collect_again() -> None:
    """Garbage collection back on (``_entry`` turns it off while the CLI
    imports), with what was imported frozen, out of its way."""
    import gc

    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    from ._entry import start_server_early

    start_server_early(args)  # (already done when called through the console script)
    try:
        if args and args[0] == "run":
            return _cmd_run(args[1:])
        parser = _build_parser()
        ns = parser.parse_args(args)
        if ns.cmd == "check":
            return _cmd_check(ns.json)
        parser.print_help(sys.stderr)
        return 2 if not args else EXIT_NANOBOX
    except _UsageError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Whoever read our output is gone (`nanobox run yes | head -1`): the
        # run was killed when its channel closed; exit as a writer killed by
        # SIGPIPE would, and say nothing more on the closed stream.
        _to_devnull(1)
        return 128 + 13
    except Exception as exc:  # a bug: one line (the traceback with NANOBOX_DEBUG=1)
        if os.environ.get("NANOBOX_DEBUG"):
            raise
        _fail(f"internal error: {type(exc).__name__}: {exc} (NANOBOX_DEBUG=1 shows where)")


def entry() -> None:
    # Skip the interpreter's teardown (a few ms for every module imported):
    # flush, let the fork server end (it is this process's child; nothing
    # of nanobox's outlives the command, nor a CLI that failed), and go.
    try:
        code = main()
        try:
            for stream in (sys.stdout, sys.stderr):
                if stream is not None:  # (None: started with it closed)
                    stream.flush()
        except (OSError, ValueError):
            raise SystemExit(code) from None
    finally:
        _end_server()
    os._exit(code)


def _end_server() -> None:
    try:
        early = sys.modules.get("nanobox._linux.early")
        if early is not None:
            early.end_unadopted()  # forked, but the CLI failed before its run
        client = sys.modules.get("nanobox._linux.client")
        if client is not None:
            client.shutdown_before_exit()
    except KeyboardInterrupt:
        pass  # (a second Ctrl-C: stop waiting; the server ends by itself)


if __name__ == "__main__":
    entry()
