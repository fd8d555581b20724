"""Pure parts: units, policy validation, TOML loading (no kernel needed)."""

from __future__ import annotations

import copy
import inspect
import pickle
import typing
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanobox
from nanobox.policy import policy_from_mapping
from nanobox.units import parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (0, 0),
        (1, 1),
        ("1", 1),
        ("1K", 1024),
        ("1k", 1024),
        ("64M", 64 << 20),
        ("2G", 2 << 30),
        ("1T", 1 << 40),
        ("1.5K", 1536),
        ("10MiB", 10 << 20),
        ("512 KB", 512 << 10),
        (" 3m ", 3 << 20),
        ("0g", 0),
        ("\u0661\u0662M", 12 << 20),  # Arabic-Indic digits, as ``\\d`` and ``float`` take them
    ],
)
def test_parse_size(text: object, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(
    "bad", ["", "-1", -1, "12Q", "1.3", "M", True, None, 1.5, "1e3", "\u00b2M", "1 2M", "+1M"]
)
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (5, 5.0),
        (2.5, 2.5),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        (".5", 0.5),
        ("10", 10.0),
    ],
)
def test_parse_duration(text: object, value: float) -> None:
    assert parse_duration(text) == value


@pytest.mark.parametrize(
    "bad", ["", "abc", "-1s", -2, float("inf"), float("nan"), "1d", True, 10**400]
)
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


# The grammar of sizes and durations, as the regular expressions once used
# (units.py parses by hand: the CLI starts without ``re``).
_SIZE_RE = r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$"
_DUR_RE = r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h|min)?\s*$"
_SIZE_MULT = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_DUR_MULT = {"ms": 0.001, "s": 1.0, "": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_PIECES = [*"0123456789.kKmMgGtTbBiIsShHe+-x", "in", "ms", "min", " ", "\t", "\n", "\xa0", "\u2003"]
_PIECES += ["\u0663", "\u00b2", "\u212a", "\u017f"]  # a digit, not one, Kelvin, long s


def _by_regex(text: str, kind: str) -> float | None:
    import re

    m = re.match(_SIZE_RE if kind == "size" else _DUR_RE, text, re.IGNORECASE)
    if m is None:
        return None
    suffix = (m.group(2) or "").lower()
    if not "".join(m.groups("")[1:]).isascii():
        return None  # (re's case folding: Kelvin sign for k, long s for s; now refused)
    if kind == "size":
        value = float(m.group(1)) * _SIZE_MULT[suffix]
        return int(value) if value - value == 0 and value == int(value) else None
    return float(m.group(1)) * _DUR_MULT[suffix]


@given(st.lists(st.sampled_from(_PIECES), max_size=7).map("".join))
@settings(max_examples=3000)
def test_sizes_and_durations_parse_as_the_old_expressions_did(text: str) -> None:
    for kind, parse in (("size", parse_size), ("duration", parse_duration)):
        expected = _by_regex(text, kind)
        if expected is None:
            with pytest.raises(ValueError, match=kind):
                parse(text)
        else:
            assert parse(text) == expected, (kind, text)


@pytest.mark.parametrize("bad", ["9" * 400, "9" * 400 + "T", "5\u017f", "1\u212a", "2\u212aB"])
def test_huge_sizes_and_odd_letters_are_refused_clearly(bad: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)
    if not bad.startswith("9"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


def test_policy_defaults_and_units() -> None:
    p = nanobox.Policy()
    assert p.network.mode == "none"
    assert p.limits.wall_time is None
    lim = nanobox.Limits(wall_time="30s", cpu_time="10s", file_size="1M", output="2K")
    assert (lim.wall_time, lim.cpu_time, lim.file_size, lim.output) == (30.0, 10.0, 1 << 20, 2048)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"wall_time": "soon"}, "limits.wall_time"),
        ({"wall_time": 0}, "limits.wall_time"),
        ({"cpu_time": -1}, "limits.cpu_time"),
        ({"file_size": "big"}, "limits.file_size"),
        ({"open_files": 0}, "limits.open_files"),
        ({"open_files": 3}, "limits.open_files"),  # (nothing dynamic could start)
        ({"open_files": "many"}, "limits.open_files"),
        ({"output": "lots"}, "limits.output"),
        ({"on_output_limit": "explode"}, "limits.on_output_limit"),
        # Too large for the kernel: refused here, not at the sandbox's setup.
        ({"wall_time": 10**400}, "limits.wall_time"),
        ({"cpu_time": 1e300}, "limits.cpu_time"),
        ({"cpu_time": "1000000000.5s"}, "limits.cpu_time"),
        ({"memory": 2**63}, "limits.memory"),
        ({"file_size": 2**70}, "limits.file_size"),
        ({"output": 2**64}, "limits.output"),
        ({"pids": 4194303}, "limits.pids"),
        ({"open_files": 2**31}, "limits.open_files"),
    ],
)
def test_limits_errors_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(nanobox.PolicyError) as info:
        nanobox.Limits(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert field in str(info.value)
    assert isinstance(info.value, nanobox.SandboxError)


def test_policy_is_immutable() -> None:
    p = nanobox.Policy()
    with pytest.raises(AttributeError):
        p.inherit_env = True  # type: ignore[misc]


def test_policy_rejects_bad_env_and_hostname() -> None:
    with pytest.raises(nanobox.PolicyError, match="env"):
        nanobox.Policy(env={"A=B": "x"})
    with pytest.raises(nanobox.PolicyError, match="env"):
        nanobox.Policy(env={"A": 1})  # type: ignore[dict-item]
    with pytest.raises(nanobox.PolicyError, match="hostname"):
        nanobox.Policy(hostname="bad host")
    with pytest.raises(nanobox.PolicyError, match=r"network\.mode"):
        nanobox.Network(mode="everything")  # type: ignore[arg-type]


def test_policy_from_mapping_and_toml(tmp_path: Path) -> None:
    p = policy_from_mapping({"limits": {"wall_time": "2s", "output": "1M"}, "inherit_env": True})
    assert p.limits.wall_time == 2.0 and p.limits.output == 1 << 20 and p.inherit_env
    f = tmp_path / "p.toml"
    f.write_text('hostname = "judge"\n[limits]\ncpu_time = "1s"\n[network]\nmode = "none"\n')
    q = nanobox.load_policy(f)
    assert q.hostname == "judge" and q.limits.cpu_time == 1.0


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"limit": {}}, "limit"),
        ({"limits": {"walltime": 1}}, "limits.walltime"),
        ({"limits": {"wall_time": "x"}}, "limits.wall_time"),
        ({"limits": 5}, "limits"),
        ({"network": {"mode": "all"}}, "network.mode"),
    ],
)
def test_policy_from_mapping_errors(data: dict[str, object], field: str) -> None:
    with pytest.raises(nanobox.PolicyError) as info:
        policy_from_mapping(data)
    assert info.value.field == field


def test_load_policy_errors(tmp_path: Path) -> None:
    with pytest.raises(nanobox.PolicyError, match="cannot read"):
        nanobox.load_policy(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits\n")
    with pytest.raises(nanobox.PolicyError, match=r"not valid TOML"):
        nanobox.load_policy(bad)
    bad.write_bytes(b"\xff\xfe[limits]\n")  # (UTF-16's byte order mark)
    with pytest.raises(nanobox.PolicyError, match=r"^policy: .* not UTF-8 text \(byte 0xff"):
        nanobox.load_policy(bad)
    with pytest.raises(nanobox.PolicyError, match=r"^seccomp: .* not UTF-8 text \(byte 0xff"):
        nanobox.load_syscalls(bad)


def test_public_type_hints_resolve_at_runtime() -> None:
    """Type hints of the public API resolve with ``typing.get_type_hints``
    (pydantic, cattrs and the like read them), which a name imported only
    under ``TYPE_CHECKING`` would break without mypy or ruff noticing."""
    failed = []
    for name in nanobox.__all__:
        obj = getattr(nanobox, name)
        targets = [obj]
        if inspect.isclass(obj):
            targets += [
                m for n, m in vars(obj).items() if inspect.isfunction(m) and not n.startswith("__")
            ]
            targets.append(obj.__init__)
        for target in targets:
            if not (inspect.isclass(target) or inspect.isfunction(target)):
                continue
            try:
                typing.get_type_hints(target)
            except Exception as exc:
                failed.append(f"{name}: {target.__qualname__}: {exc!r}")
    assert not failed, failed


def test_errors_survive_pickling_and_copying() -> None:
    """nanobox's exceptions cross process boundaries (a process pool's
    worker) and copies with their context; PolicyError was rebuilt from its
    joined message and raised a TypeError."""
    errors = [
        nanobox.PolicyError("limits.memory", "expected a size, got 'x'"),
        nanobox.SandboxError("boom", step="mount", syscall="mount", errno=1),
        nanobox.UnsupportedError("no landlock", step="landlock"),
        nanobox.SetupError("failed", step="exec"),
    ]
    for exc in errors:
        for back in (pickle.loads(pickle.dumps(exc)), copy.copy(exc), copy.deepcopy(exc)):
            assert type(back) is type(exc) and str(back) == str(exc)
            assert (back.step, back.syscall, back.errno) == (exc.step, exc.syscall, exc.errno)
    back = pickle.loads(pickle.dumps(errors[0]))
    assert isinstance(back, nanobox.PolicyError) and back.field == "limits.memory"


@pytest.mark.parametrize("entry", ["/x:0", "/x:4095", "/x:9223372036854775808"])
def test_a_tmpfs_size_out_of_range_is_refused(entry: str) -> None:
    """The kernel reads a tmpfs ``size=0`` as no limit at all: ``/x:0`` once
    gave the command an unlimited tmpfs (100 MB written to it)."""
    with pytest.raises(nanobox.PolicyError, match=r"filesystem\.tmpfs.*SIZE must be from 4096"):
        nanobox.Filesystem(tmpfs=(entry,))
    assert nanobox.Filesystem(tmpfs=("/x:4K",)).tmpfs == ("/x:4K",)


@pytest.mark.parametrize(
    ("message", "shown", "syscall"),
    [
        (
            "[Errno 1] clone(CLONE_NEWUSER): Operation not permitted",
            "clone(CLONE_NEWUSER): Operation not permitted"
            " [clone: EPERM (Operation not permitted)]",
            "clone",
        ),
        (
            "[Errno 22] cannot shift ownership of the writable roots for a root caller "
            "(idmapped mounts): /dev/null cannot be idmapped",
            "cannot shift ownership of the writable roots for a root caller "
            "(idmapped mounts): /dev/null cannot be idmapped",
            None,
        ),
    ],
)
def test_a_setup_error_names_the_call_only_when_there_is_one(
    message: str, shown: str, syscall: str | None
) -> None:
    """Stage A reports an OSError as its ``str()``: the "[Errno N]" went into
    the message and into ``syscall``, and a message with a parenthesis
    that named no call was repeated in brackets as if it were one."""
    import types

    errno_ = 1 if syscall else 22
    exc = nanobox.Sandbox()._setup_error(
        types.SimpleNamespace(run_id="x"),  # type: ignore[arg-type]
        {"step": "prepare", "errno": errno_, "message": message},
    )
    assert str(exc) == f"sandbox setup failed at step 'prepare': {shown}"
    assert (exc.syscall, exc.errno) == (syscall, errno_)


def test_resolve_pins_name_host_names() -> None:
    """A pin's key must be a host name: an IP address or a malformed name
    was accepted and never matched anything."""
    from nanobox import Network

    for bad in ("1.2.3.4", "[::1]", "bad name", "a..b", ""):
        with pytest.raises(nanobox.PolicyError) as info:
            Network.allow("x.test", resolve={bad: "127.0.0.1"})
        assert info.value.field == f"network.resolve.{bad}", info.value
    assert Network.allow("x.test", resolve={"bücher.test": "127.0.0.1"}).resolve


def test_a_timeout_past_the_limits_bound_is_refused(workspace: Path) -> None:
    """``timeout=`` is bounded as ``Limits.wall_time`` is (1e10 was taken)."""
    for bad in (1e10, "1000000000000h"):
        with pytest.raises(nanobox.PolicyError) as info:
            nanobox.run(["true"], timeout=bad)
        assert info.value.field == "timeout" and "at most" in str(info.value)
