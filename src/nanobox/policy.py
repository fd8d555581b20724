"""Policy objects: immutable, keyword-only dataclasses with human units.

``Policy()`` with no arguments is the default policy. Values are validated and
normalised when the object is built (``"512M"`` becomes ``536870912``,
``"30s"`` becomes ``30.0``); an invalid value raises :class:`PolicyError`
naming the field and what would be valid. :func:`policy_from_mapping` and
:func:`load_policy` build the same objects from TOML data, rejecting unknown
keys.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ._deferred import provide_typing
from ._valuetype import FACTORY, field_names, fill, replace
from .errors import PolicyError
from .units import DURATION_HELP, SIZE_HELP, parse_duration, parse_size

TYPE_CHECKING = False
if TYPE_CHECKING:
    import typing
    from dataclasses import dataclass as value_type  # what the classes are
    from dataclasses import field
else:
    from ._valuetype import field, value_type  # the same, without generated code
# The name ``typing`` in the annotations, for ``typing.get_type_hints``:
# a stand-in that imports ``typing`` when it is read (see ``_deferred``).
provide_typing(globals())

__all__ = [
    "Filesystem",
    "Limits",
    "Network",
    "Policy",
    "load_policy",
    "policy_from_mapping",
]

SizeLike = int | str
DurationLike = int | float | str

DEFAULT_OUTPUT_LIMIT = 16 * 1024 * 1024
DEFAULT_OPEN_FILES = 1024
_ENV_NAME_FORBIDDEN = ("=", "\0")
# Upper bounds, so that a value too large for the kernel is refused here,
# naming its field, rather than failing the sandbox's setup.
MAX_SECONDS = 1e9  # ~31.7 years (an rlimit of CPU seconds, a timer)
MAX_SIZE = 2**63 - 1  # bytes: the kernel's limits are signed 64-bit
MIN_TMPFS_SIZE = 4096  # one page: a tmpfs of size 0 would have no limit
MAX_COUNT = 2**31 - 1
# pids.max takes less than the kernel's PID_MAX_LIMIT (4194304 on 64-bit),
# and the server adds one for stage A's own task while it lives.
MAX_PIDS = 4194302


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


def _norm_duration(obj: object, prefix: str, name: str, *, allow_zero: bool = False) -> None:
    value = getattr(obj, name)
    if value is None:
        return
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise PolicyError(f"{prefix}{name}", f"expected {DURATION_HELP}, got {value!r}") from None
    if seconds <= 0 and not allow_zero:
        raise PolicyError(f"{prefix}{name}", f"must be greater than 0, got {value!r}")
    if seconds > MAX_SECONDS:
        raise PolicyError(
            f"{prefix}{name}",
            f"must be at most {MAX_SECONDS:.0f} seconds (~31 years), got {value!r}",
        )
    _set(obj, name, seconds)


def _norm_size(obj: object, prefix: str, name: str, *, minimum: int = 0) -> None:
    value = getattr(obj, name)
    if value is None:
        return
    try:
        size = parse_size(value)
    except ValueError:
        raise PolicyError(f"{prefix}{name}", f"expected {SIZE_HELP}, got {value!r}") from None
    if size < minimum:
        raise PolicyError(f"{prefix}{name}", f"must be at least {minimum}, got {value!r}")
    if size > MAX_SIZE:
        raise PolicyError(f"{prefix}{name}", f"must be at most {MAX_SIZE} bytes, got {value!r}")
    _set(obj, name, size)


def _norm_count(
    obj: object,
    prefix: str,
    name: str,
    *,
    minimum: int = 1,
    maximum: int = MAX_COUNT,
    why: str = "",
) -> None:
    value = getattr(obj, name)
    if value is None:
        return
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise PolicyError(
            f"{prefix}{name}",
            f"expected a whole number from {minimum} to {maximum}{why}, got {getattr(obj, name)!r}",
        )
    _set(obj, name, value)


def _norm_cpus(obj: Limits) -> None:
    value = obj.cpus
    if value is None:
        return
    try:
        cpus = float(value) if not isinstance(value, bool) else -1.0
    except (TypeError, ValueError):
        cpus = -1.0
    if not (0.01 <= cpus <= 4096):
        raise PolicyError(
            "limits.cpus", f"expected a number of CPUs from 0.01 to 4096 (e.g. 0.5), got {value!r}"
        )
    _set(obj, "cpus", cpus)


@value_type(frozen=True, kw_only=True)
class Limits:
    """Resource limits of one run.

    ``memory`` (bytes of RAM, swap excluded), ``pids`` (tasks, threads
    included) and ``cpus`` (CPU bandwidth, e.g. ``0.5``) are enforced with
    cgroups. ``cpu_time`` counts every process and thread of the sandbox.
    ``wall_time``/``cpu_time`` are durations, ``file_size``/``output`` sizes;
    ``None`` means no limit (``output`` always has one: the caller must never
    be flooded). ``output`` caps each of stdout and stderr separately.
    """

    wall_time: DurationLike | None = None
    cpu_time: DurationLike | None = None
    memory: SizeLike | None = None
    pids: int | None = None
    cpus: float | int | str | None = None
    file_size: SizeLike | None = None
    open_files: int | None = DEFAULT_OPEN_FILES
    output: SizeLike = DEFAULT_OUTPUT_LIMIT
    on_output_limit: typing.Literal["truncate", "kill"] = "truncate"

    def __init__(
        self,
        *,
        wall_time: DurationLike | None = None,
        cpu_time: DurationLike | None = None,
        memory: SizeLike | None = None,
        pids: int | None = None,
        cpus: float | int | str | None = None,
        file_size: SizeLike | None = None,
        open_files: int | None = DEFAULT_OPEN_FILES,
        output: SizeLike = DEFAULT_OUTPUT_LIMIT,
        on_output_limit: typing.Literal["truncate", "kill"] = "truncate",
    ) -> None:
        fill(
            self,
            wall_time=wall_time,
            cpu_time=cpu_time,
            memory=memory,
            pids=pids,
            cpus=cpus,
            file_size=file_size,
            open_files=open_files,
            output=output,
            on_output_limit=on_output_limit,
        )

    def __post_init__(self) -> None:
        _norm_duration(self, "limits.", "wall_time")
        _norm_duration(self, "limits.", "cpu_time")
        _norm_size(self, "limits.", "memory", minimum=1024 * 1024)
        _norm_count(self, "limits.", "pids", minimum=1, maximum=MAX_PIDS)
        _norm_cpus(self)
        _norm_size(self, "limits.", "file_size")
        # With 3 (stdin, stdout, stderr) no dynamically linked program can
        # open its libraries, and the sandbox's setup cannot take the one
        # more fd its seccomp listener needs before the command starts.
        _norm_count(
            self,
            "limits.",
            "open_files",
            minimum=4,
            why=" (stdin, stdout, stderr and at least one more)",
        )
        if self.output is None:
            raise PolicyError("limits.output", f"expected {SIZE_HELP}, got None")
        _norm_size(self, "limits.", "output")
        if self.on_output_limit not in ("truncate", "kill"):
            raise PolicyError(
                "limits.on_output_limit",
                f"expected 'truncate' or 'kill', got {self.on_output_limit!r}",
            )


@value_type(frozen=True, kw_only=True)
class Network:
    """Network policy.

    - ``mode="none"`` (default): an empty network namespace with only
      loopback.
    - ``mode="allowlist"``: the same empty namespace, whose only way out is
      nanobox's proxy (HTTP/HTTPS on 127.0.0.1:3128, SOCKS5 on
      127.0.0.1:1080, announced in ``HTTP_PROXY``/``HTTPS_PROXY``/
      ``ALL_PROXY``); it lets through only destinations matching ``allowed``
      and not ``denied`` (checked first). Rules: ``NAME[:PORT]``,
      ``*.suffix[:PORT]``, ``IP[:PORT]``, ``CIDR[:PORT]``, ``[IPv6]:PORT``.
      ``Network.allow("pypi.org", "*.githubusercontent.com")`` builds one.
      ``resolve`` pins names to addresses for the proxy (like an
      ``/etc/hosts`` entry of its own); the usual address checks still apply.
    - ``mode="host"``: the host's network (explicit opt-in; flagged in
      results).
    """

    mode: typing.Literal["none", "allowlist", "host"] = "none"
    allowed: tuple[str, ...] = ()
    denied: tuple[str, ...] = ()
    connect_timeout: DurationLike = 30.0
    idle_timeout: DurationLike = 300.0
    max_connections: int = 256
    check_sni: bool = True
    resolve: Mapping[str, str] = field(default_factory=dict)

    def __init__(
        self,
        *,
        mode: typing.Literal["none", "allowlist", "host"] = "none",
        allowed: tuple[str, ...] = (),
        denied: tuple[str, ...] = (),
        connect_timeout: DurationLike = 30.0,
        idle_timeout: DurationLike = 300.0,
        max_connections: int = 256,
        check_sni: bool = True,
        resolve: Mapping[str, str] = FACTORY,
    ) -> None:
        fill(
            self,
            mode=mode,
            allowed=allowed,
            denied=denied,
            connect_timeout=connect_timeout,
            idle_timeout=idle_timeout,
            max_connections=max_connections,
            check_sni=check_sni,
            resolve=resolve,
        )

    def __post_init__(self) -> None:
        if not isinstance(self.resolve, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.resolve.items()
        ):
            raise PolicyError(
                "network.resolve", f"expected NAME = ADDRESS pairs, got {self.resolve!r}"
            )
        if self.resolve:
            import ipaddress

            from .net.rules import canonical_host
        for name, addr in self.resolve.items():
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                raise PolicyError(
                    f"network.resolve.{name}", f"{addr!r} is not an IP address"
                ) from None
            try:
                canon = canonical_host(name)
            except ValueError as exc:
                raise PolicyError(f"network.resolve.{name}", f"not a host name: {exc}") from None
            if not isinstance(canon, str):
                raise PolicyError(
                    f"network.resolve.{name}", "expected a host name, not an IP address"
                )
        _set(self, "resolve", dict(self.resolve))
        if self.mode not in ("none", "allowlist", "host"):
            raise PolicyError(
                "network.mode", f"expected 'none', 'allowlist' or 'host', got {self.mode!r}"
            )
        for name in ("allowed", "denied"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, (tuple, list)):
                raise PolicyError(f"network.{name}", f"expected a list of rules, got {value!r}")
            if value:
                from .net.rules import parse_rule
            for rule in value:
                try:
                    parse_rule(rule)
                except (ValueError, TypeError) as exc:
                    raise PolicyError(f"network.{name}", str(exc)) from None
            _set(self, name, tuple(value))
        if self.allowed and self.mode == "none":
            _set(self, "mode", "allowlist")
        if self.mode != "allowlist" and (self.allowed or self.denied):
            raise PolicyError("network.allowed", f"rules need mode 'allowlist', not {self.mode!r}")
        _norm_duration(self, "network.", "connect_timeout")
        _norm_duration(self, "network.", "idle_timeout")
        _norm_count(self, "network.", "max_connections", minimum=1)
        if not isinstance(self.check_sni, bool):
            raise PolicyError(
                "network.check_sni", f"expected true or false, got {self.check_sni!r}"
            )

    @classmethod
    def allow(cls, *rules: str, deny: tuple[str, ...] = (), **options: typing.Any) -> Network:
        """An allowlist network: ``Network.allow("pypi.org", "*.pythonhosted.org")``."""
        return cls(mode="allowlist", allowed=tuple(rules), denied=tuple(deny), **options)


DEFAULT_HIDES = (
    "~/.ssh",
    "~/.gnupg",
    "~/.aws",
    "~/.azure",
    "~/.config/gcloud",
    "~/.kube",
    "~/.docker",
    "~/.netrc",
    "~/.git-credentials",
    "~/.npmrc",
    "~/.pypirc",
)

# At the top of every writable root: protected even before they exist.
PROTECTED_TOP = (
    ".gitmodules",
    ".bashrc",
    ".bash_profile",
    ".zshrc",
    ".zprofile",
    ".profile",
    ".vscode",
    ".idea",
)
# In every git repository found in a writable root, at any depth.
PROTECTED_GIT = (".git/hooks", ".git/config")


def unprotect_by_name(item: str) -> bool:
    """Does an ``unprotect`` entry name protected paths wherever they are
    (``.vscode`` in every writable root, ``.git/hooks`` in every
    repository), rather than give one path?"""
    return ("/" not in item and not item.startswith("~")) or item in PROTECTED_GIT


def _paths(obj: object, name: str, *, with_dest: bool, with_size: bool = False) -> None:
    value = getattr(obj, name)
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (tuple, list)):
        raise PolicyError(f"filesystem.{name}", f"expected a list of paths, got {value!r}")
    out = []
    for item in value:
        if not isinstance(item, str) or not item or "\0" in item:
            raise PolicyError(f"filesystem.{name}", f"expected a path string, got {item!r}")
        parts = item.split(":")
        path = parts[0]
        if not (path.startswith("/") or path.startswith("~")):
            raise PolicyError(
                f"filesystem.{name}",
                f"{item!r}: paths must be absolute or start with '~'",
            )
        if len(parts) > 2 or (len(parts) == 2 and not (with_dest or with_size)):
            raise PolicyError(f"filesystem.{name}", f"{item!r}: unexpected ':'")
        if len(parts) == 2 and with_dest and not parts[1].startswith("/"):
            raise PolicyError(f"filesystem.{name}", f"{item!r}: DEST must be an absolute path")
        if len(parts) == 2 and with_size:
            try:
                size = parse_size(parts[1])
            except ValueError:
                raise PolicyError(
                    f"filesystem.{name}", f"{item!r}: expected DEST[:SIZE] with {SIZE_HELP}"
                ) from None
            # (The kernel takes a tmpfs size of 0 as no limit at all.)
            if not MIN_TMPFS_SIZE <= size <= MAX_SIZE:
                raise PolicyError(
                    f"filesystem.{name}",
                    f"{item!r}: SIZE must be from {MIN_TMPFS_SIZE} bytes (4K) to "
                    f"{MAX_SIZE} bytes, got {parts[1]!r}",
                )
        out.append(item)
    _set(obj, name, tuple(out))


@value_type(frozen=True, kw_only=True)
class Filesystem:
    """The filesystem view. Default: the host root read-only, the working
    directory writable, private ``/tmp``, ``/run``, ``/dev``, ``/proc``,
    secrets hidden (``DEFAULT_HIDES``), protected paths read-only inside
    writable roots, and Landlock as a second layer.

    Entries are ``PATH`` or ``PATH:DEST`` (``DEST`` defaults to ``PATH``;
    ``~`` is the caller's ``$HOME``); ``tmpfs`` entries are ``DEST[:SIZE]``.
    A path ending in ``?`` (``"~/.cache?"``) is optional: skipped when
    missing instead of an error. The most specific path wins.
    """

    read_only: tuple[str, ...] = ()
    read_write: tuple[str, ...] = ()
    tmpfs: tuple[str, ...] = ()
    hide: tuple[str, ...] = ()
    default_hides: bool = True
    workspace: bool = True
    protect: bool = True
    unprotect: tuple[str, ...] = ()
    rootfs: typing.Literal["host", "minimal"] = "host"
    tmp_size: SizeLike = "512M"
    landlock: bool = True

    def __init__(
        self,
        *,
        read_only: tuple[str, ...] = (),
        read_write: tuple[str, ...] = (),
        tmpfs: tuple[str, ...] = (),
        hide: tuple[str, ...] = (),
        default_hides: bool = True,
        workspace: bool = True,
        protect: bool = True,
        unprotect: tuple[str, ...] = (),
        rootfs: typing.Literal["host", "minimal"] = "host",
        tmp_size: SizeLike = "512M",
        landlock: bool = True,
    ) -> None:
        fill(
            self,
            read_only=read_only,
            read_write=read_write,
            tmpfs=tmpfs,
            hide=hide,
            default_hides=default_hides,
            workspace=workspace,
            protect=protect,
            unprotect=unprotect,
            rootfs=rootfs,
            tmp_size=tmp_size,
            landlock=landlock,
        )

    def __post_init__(self) -> None:
        _paths(self, "read_only", with_dest=True)
        _paths(self, "read_write", with_dest=True)
        _paths(self, "tmpfs", with_dest=False, with_size=True)
        _paths(self, "hide", with_dest=False)
        if isinstance(self.unprotect, str):
            _set(self, "unprotect", (self.unprotect,))
        if not all(isinstance(p, str) and p for p in self.unprotect):
            raise PolicyError(
                "filesystem.unprotect", f"expected path strings, got {self.unprotect!r}"
            )
        for item in self.unprotect:
            is_path = item.startswith("/") or item == "~" or item.startswith("~/")
            if not (unprotect_by_name(item) or is_path):
                raise PolicyError(
                    "filesystem.unprotect",
                    f"{item!r}: expected a name (e.g. '.vscode'), one of "
                    f"{', '.join(repr(g) for g in PROTECTED_GIT)}, or an absolute path",
                )
        _set(self, "unprotect", tuple(self.unprotect))
        for name in ("default_hides", "workspace", "protect", "landlock"):
            if not isinstance(getattr(self, name), bool):
                raise PolicyError(
                    f"filesystem.{name}", f"expected true or false, got {getattr(self, name)!r}"
                )
        if self.rootfs not in ("host", "minimal"):
            raise PolicyError(
                "filesystem.rootfs", f"expected 'host' or 'minimal', got {self.rootfs!r}"
            )
        _norm_size(self, "filesystem.", "tmp_size", minimum=MIN_TMPFS_SIZE)


@value_type(frozen=True, kw_only=True)
class Policy:
    """Everything a sandbox enforces. ``Policy()`` is the default policy."""

    limits: Limits = field(default_factory=Limits)
    network: Network = field(default_factory=Network)
    filesystem: Filesystem = field(default_factory=Filesystem)
    syscalls: typing.Any = "default"  # "default", "none" or a nanobox.Syscalls
    env: Mapping[str, str] = field(default_factory=dict)
    inherit_env: bool = False
    allow_degraded: bool = False
    hostname: str = "nanobox"

    def __init__(
        self,
        *,
        limits: Limits = FACTORY,
        network: Network = FACTORY,
        filesystem: Filesystem = FACTORY,
        syscalls: typing.Any = "default",
        env: Mapping[str, str] = FACTORY,
        inherit_env: bool = False,
        allow_degraded: bool = False,
        hostname: str = "nanobox",
    ) -> None:
        fill(
            self,
            limits=limits,
            network=network,
            filesystem=filesystem,
            syscalls=syscalls,
            env=env,
            inherit_env=inherit_env,
            allow_degraded=allow_degraded,
            hostname=hostname,
        )

    def __post_init__(self) -> None:
        if not isinstance(self.limits, Limits):
            raise PolicyError(
                "limits", f"expected nanobox.Limits, got {type(self.limits).__name__}"
            )
        if not isinstance(self.filesystem, Filesystem):
            raise PolicyError(
                "filesystem", f"expected nanobox.Filesystem, got {type(self.filesystem).__name__}"
            )
        if isinstance(self.syscalls, str):
            if self.syscalls not in ("default", "none"):
                raise PolicyError(
                    "syscalls",
                    f"expected 'default', 'none' or a nanobox.Syscalls, got {self.syscalls!r}",
                )
        else:
            from .syscalls import Syscalls

            if not isinstance(self.syscalls, Syscalls):
                raise PolicyError(
                    "syscalls",
                    f"expected 'default', 'none' or a nanobox.Syscalls, got {self.syscalls!r}",
                )
        if not isinstance(self.network, Network):
            raise PolicyError(
                "network", f"expected nanobox.Network, got {type(self.network).__name__}"
            )
        _set(self, "env", validate_env(self.env, "env"))
        for name in ("inherit_env", "allow_degraded"):
            if not isinstance(getattr(self, name), bool):
                raise PolicyError(name, f"expected true or false, got {getattr(self, name)!r}")
        host = self.hostname
        if (
            not isinstance(host, str)
            or not 1 <= len(host) <= 64
            or not all(c.isalnum() or c in "-." for c in host)
        ):
            raise PolicyError(
                "hostname", f"expected 1-64 letters, digits, '-' or '.', got {host!r}"
            )

    def replace(self, **changes: typing.Any) -> Policy:
        """Return a copy with ``changes`` applied (validated again)."""
        return replace(self, **changes)


def validate_env(env: object, field_name: str) -> dict[str, str]:
    """Check an environment mapping: str keys without '=' or NUL, str values."""
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise PolicyError(field_name, f"expected a mapping of names to strings, got {env!r}")
    out: dict[str, str] = {}
    for key, value in env.items():
        if not isinstance(key, str) or not key or any(c in key for c in _ENV_NAME_FORBIDDEN):
            raise PolicyError(field_name, f"invalid variable name {key!r}")
        if not isinstance(value, str) or "\0" in value:
            raise PolicyError(
                f"{field_name}.{key}", f"expected a string without NUL, got {value!r}"
            )
        out[key] = value
    return out


# --- building policies from mappings (TOML) ---------------------------------

_SECTIONS: dict[str, type[typing.Any]] = {
    "limits": Limits,
    "network": Network,
    "filesystem": Filesystem,
}


def _build(cls: type[typing.Any], data: Mapping[str, typing.Any], prefix: str) -> typing.Any:
    if not isinstance(data, Mapping):
        raise PolicyError(prefix.rstrip(".") or "policy", f"expected a table, got {data!r}")
    names = set(field_names(cls))
    kwargs: dict[str, typing.Any] = {}
    for key, value in data.items():
        if key not in names:
            valid = ", ".join(sorted(names))
            raise PolicyError(f"{prefix}{key}", f"unknown key (valid keys: {valid})")
        if cls is Policy and key in _SECTIONS:
            value = _build(_SECTIONS[key], value, f"{key}.")
        elif cls is Policy and key == "syscalls" and isinstance(value, Mapping):
            from .syscalls import syscalls_from_mapping

            value = syscalls_from_mapping(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except PolicyError:
        raise
    except (TypeError, ValueError) as exc:  # pragma: no cover - defensive
        raise PolicyError(prefix.rstrip(".") or "policy", str(exc)) from None


def policy_from_mapping(data: Mapping[str, typing.Any]) -> Policy:
    """Build a :class:`Policy` from a mapping using the dataclass field names."""
    result: Policy = _build(Policy, data, "")
    return result


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read a TOML policy file. Unknown keys are an error."""
    from ._toml import read_toml

    data = read_toml(path, "policy")
    return policy_from_mapping(data)
