"""Landlock: rights masking and plan round trip (pure), then enforcement on the
real kernel. Every enforcement runs in a child interpreter (Landlock cannot be
undone) and is paired with a control run of the same action without Landlock,
so a denial is known to come from Landlock rather than from the setup."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nanobox._linux import landlock as ll
from nanobox._linux.landlock import LandlockError, LandlockPlan

ABI = ll.abi_version()

needs_landlock = pytest.mark.skipif(
    ABI == 0, reason="Landlock unavailable here (no kernel support, disabled at boot or filtered)"
)


def needs_abi(n: int) -> pytest.MarkDecorator:
    return pytest.mark.skipif(ABI < n, reason=f"needs Landlock ABI >= {n}, kernel has {ABI}")


# --- pure: rights per ABI ---------------------------------------------------

FS_BY_ABI = {0: 0, 1: 0x1FFF, 2: 0x3FFF, 3: 0x7FFF, 4: 0x7FFF, 5: 0xFFFF, 6: 0xFFFF, 7: 0xFFFF}


@pytest.mark.parametrize("abi", range(8))
def test_rights_masked_per_abi(abi: int) -> None:
    fs = ll.fs_rights_for_abi(abi)
    assert fs == FS_BY_ABI[abi]
    assert bool(fs & ll.REFER) == (abi >= 2)
    assert bool(fs & ll.TRUNCATE) == (abi >= 3)
    assert bool(fs & ll.IOCTL_DEV) == (abi >= 5)
    assert ll.net_rights_for_abi(abi) == (ll.BIND_TCP | ll.CONNECT_TCP if abi >= 4 else 0)
    assert ll.scope_rights_for_abi(abi) == (ll.ABSTRACT_UNIX_SOCKET | ll.SIGNAL if abi >= 6 else 0)
    # Directory rules: read = read/list/execute, write = everything handled.
    assert ll.write_access(abi, is_dir=True) == fs
    read_dir = ll.read_access(abi, is_dir=True)
    assert read_dir == (ll.READ_FILE | ll.READ_DIR | ll.EXECUTE if abi else 0)
    # File rules never carry directory rights (the kernel says EINVAL).
    for is_write in (False, True):
        rights = (ll.write_access if is_write else ll.read_access)(abi, False)
        assert rights & ~ll.FILE_RIGHTS == 0
        assert rights & ~fs == 0
    assert ll.read_access(abi, False) == (ll.READ_FILE | ll.EXECUTE if abi else 0)


def test_file_rights_per_abi() -> None:
    base = ll.EXECUTE | ll.WRITE_FILE | ll.READ_FILE
    assert ll.write_access(1, False) == base
    assert ll.write_access(2, False) == base
    assert ll.write_access(3, False) == base | ll.TRUNCATE
    assert ll.write_access(5, False) == base | ll.TRUNCATE | ll.IOCTL_DEV
    assert ll.write_access(7, False) == ll.FILE_RIGHTS


def test_constants_are_the_uapi_bits() -> None:
    fs = [
        ll.EXECUTE,
        ll.WRITE_FILE,
        ll.READ_FILE,
        ll.READ_DIR,
        ll.REMOVE_DIR,
        ll.REMOVE_FILE,
        ll.MAKE_CHAR,
        ll.MAKE_DIR,
        ll.MAKE_REG,
        ll.MAKE_SOCK,
        ll.MAKE_FIFO,
        ll.MAKE_BLOCK,
        ll.MAKE_SYM,
        ll.REFER,
        ll.TRUNCATE,
        ll.IOCTL_DEV,
    ]
    assert fs == [1 << i for i in range(16)]
    assert (ll.BIND_TCP, ll.CONNECT_TCP) == (1, 2)
    assert (ll.ABSTRACT_UNIX_SOCKET, ll.SIGNAL) == (1, 2)


def test_ruleset_size_matches_filled_fields() -> None:
    assert ll.ruleset_size(0, 0) == 8
    assert ll.ruleset_size(ll.BIND_TCP, 0) == 16
    assert ll.ruleset_size(0, ll.SIGNAL) == 24
    assert ll.ruleset_size(ll.BIND_TCP, ll.SIGNAL) == 24


def test_describe() -> None:
    assert ll.describe(0) == "Landlock unavailable"
    assert ll.describe(1) == "ABI 1: filesystem (no cross-directory rename/link)"
    assert ll.describe(3) == "ABI 3: filesystem (with refer, truncate)"
    assert ll.describe(4) == "ABI 4: filesystem (with refer, truncate), TCP bind/connect"
    assert ll.describe(7) == (
        "ABI 7: filesystem (with refer, truncate, ioctl_dev), TCP bind/connect, "
        "scopes (abstract unix sockets, signals)"
    )
    assert "unused" in ll.describe(8)


# --- pure: the plan ---------------------------------------------------------


def test_plan_json_round_trip() -> None:
    plan = LandlockPlan(
        read=("/usr", "/etc/hosts"),
        write=("/tmp/x", "/dev/null"),
        scope_abstract_unix=True,
        scope_signal=True,
        restrict_tcp=True,
        allowed_connect_ports=(443, 80),
        allowed_bind_ports=(8000,),
        min_abi=4,
    )
    data = json.loads(json.dumps(plan.to_json()))
    assert data["read"] == ["/usr", "/etc/hosts"]
    assert LandlockPlan.from_json(data) == plan
    assert LandlockPlan.from_json(LandlockPlan().to_json()) == LandlockPlan()


def test_plan_validation() -> None:
    with pytest.raises(ValueError, match="unknown"):
        LandlockPlan.from_json({"read": [], "bogus": 1})
    with pytest.raises(ValueError, match="out of range"):
        LandlockPlan(restrict_tcp=True, allowed_connect_ports=(70000,))
    with pytest.raises(TypeError):
        LandlockPlan(allowed_bind_ports=(True,))
    with pytest.raises(TypeError):
        LandlockPlan(read=["/usr"])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        LandlockPlan(write=("",))
    with pytest.raises(ValueError):
        LandlockPlan(min_abi=-1)


def test_error_carries_errno_and_step() -> None:
    err = LandlockError(13, "add_rule /x")
    assert isinstance(err, OSError)
    assert err.errno == 13
    assert err.step == "add_rule /x"
    assert "add_rule /x" in str(err)
    again = pickle.loads(pickle.dumps(err))
    assert (again.errno, again.step, str(again)) == (13, "add_rule /x", str(err))


# --- real kernel --------------------------------------------------------------

CHILD = """\
import errno, json, os, socket, sys
from nanobox._linux import landlock as ll
cfg = json.loads(sys.argv[1])
args = sys.argv[2:]
if cfg is not None:
    ll.apply(ll.LandlockPlan.from_json(cfg["plan"]), max_abi=cfg["max_abi"])
try:
{action}
except OSError as exc:
    print("ERR", errno.errorcode.get(exc.errno, exc.errno))
else:
    print("OK")
"""


def _child(
    action: str, plan: LandlockPlan | None, args: tuple[object, ...], max_abi: int | None
) -> list[str]:
    code = CHILD.replace("{action}", textwrap.indent(textwrap.dedent(action).strip(), "    "))
    cfg = None if plan is None else {"plan": plan.to_json(), "max_abi": max_abi}
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(cfg), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def confined(action: str, plan: LandlockPlan, *args: object, max_abi: int | None = None) -> str:
    """The verdict of ``action`` under ``plan``; then checks that the same
    action succeeds without Landlock (the control run, second so that a
    denied creation is not masked by the control's file)."""
    verdict = _child(action, plan, args, max_abi)[-1]
    assert _child(action, None, args, None)[-1] == "OK", "control run failed"
    return verdict


WRITE = "open(args[0], 'a').write('x')"
READ = "open(args[0]).read()"


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    """``w``, ``w2`` (writable), ``r`` (read-only) and ``out`` (not granted),
    each holding a file ``f``."""
    out = {}
    for name in ("w", "w2", "r", "out"):
        d = tmp_path / name
        d.mkdir()
        (d / "f").write_text("data\n")
        out[name] = d
    return out


def fs_plan(d: dict[str, Path]) -> LandlockPlan:
    return LandlockPlan(read=(str(d["r"]),), write=(str(d["w"]), str(d["w2"])))


@needs_landlock
def test_write_inside_allowed_outside_denied(dirs: dict[str, Path]) -> None:
    plan = fs_plan(dirs)
    assert confined(WRITE, plan, dirs["w"] / "new") == "OK"
    assert confined(WRITE, plan, dirs["w"] / "f") == "OK"
    assert confined(WRITE, plan, dirs["out"] / "new") == "ERR EACCES"
    assert confined(WRITE, plan, dirs["out"] / "f") == "ERR EACCES"


@needs_landlock
def test_read_outside_read_set_denied(dirs: dict[str, Path]) -> None:
    plan = fs_plan(dirs)
    assert confined(READ, plan, dirs["r"] / "f") == "OK"
    assert confined(READ, plan, dirs["w"] / "f") == "OK"
    assert confined(READ, plan, dirs["out"] / "f") == "ERR EACCES"
    assert confined("os.listdir(args[0])", plan, dirs["out"]) == "ERR EACCES"


@needs_landlock
def test_read_dir_listable_not_writable(dirs: dict[str, Path]) -> None:
    plan = fs_plan(dirs)
    assert confined("assert os.listdir(args[0]) == ['f']", plan, dirs["r"]) == "OK"
    assert confined(WRITE, plan, dirs["r"] / "new") == "ERR EACCES"
    assert confined(WRITE, plan, dirs["r"] / "f") == "ERR EACCES"
    assert confined("os.mkdir(args[0])", plan, dirs["r"] / "sub") == "ERR EACCES"
    unlink = "os.unlink(args[0])"
    assert _child(unlink, plan, (dirs["r"] / "f",), None)[-1] == "ERR EACCES"
    assert (dirs["r"] / "f").exists()
    assert _child(unlink, None, (dirs["r"] / "f",), None)[-1] == "OK"


@needs_landlock
def test_read_rules_are_never_made_through_a_link(dirs: dict[str, Path], tmp_path: Path) -> None:
    """Read and list rules are planned around hidden paths, never on a link:
    a link put in a planned path's place since (to a directory the plan
    left out) gets no rule, where following it would grant that directory.
    Write rules still follow links (``/var/run`` is one)."""
    link = tmp_path / "swapped"
    link.symlink_to(dirs["out"])
    plan = LandlockPlan(read=(str(link),), list=(str(link),), write=(str(dirs["w"]),))
    assert confined(READ, plan, dirs["out"] / "f") == "ERR EACCES"
    assert confined("os.listdir(args[0])", plan, dirs["out"]) == "ERR EACCES"
    followed = LandlockPlan(write=(str(link),))
    assert confined(WRITE, followed, dirs["out"] / "f") == "OK"


@needs_landlock
def test_single_file_rules(dirs: dict[str, Path]) -> None:
    wfile, rfile = dirs["out"] / "f", dirs["r"] / "f"
    # A file (and a device node) take file rights only: no EINVAL from add_rule.
    plan = LandlockPlan(read=(str(rfile),), write=(str(wfile), "/dev/null"))
    assert confined(WRITE, plan, wfile) == "OK"
    assert confined(READ, plan, wfile) == "OK"
    assert confined("os.truncate(args[0], 0)", plan, wfile) == "OK"
    assert confined(WRITE, plan, "/dev/null") == "OK"
    assert confined(READ, plan, rfile) == "OK"
    assert confined(WRITE, plan, rfile) == "ERR EACCES"
    assert confined(WRITE, plan, dirs["out"] / "sibling") == "ERR EACCES"
    assert confined("os.listdir(args[0])", plan, dirs["out"]) == "ERR EACCES"


RENAME = "os.rename(args[0], args[1])"
LINK = "os.link(args[0], args[1])"


@needs_abi(2)
def test_cross_directory_rename_and_link_with_refer(tmp_path: Path, dirs: dict[str, Path]) -> None:
    plan = fs_plan(dirs)
    w, w2 = dirs["w"], dirs["w2"]
    # The control run moves the file, so put it back for the confined run.
    assert _child(RENAME, None, (w / "f", w2 / "a"), None)[-1] == "OK"
    os.rename(w2 / "a", w / "f")
    assert _child(RENAME, plan, (w / "f", w2 / "a"), None)[-1] == "OK"
    assert (w2 / "a").exists() and not (w / "f").exists()
    assert _child(LINK, plan, (w2 / "a", w / "b"), None)[-1] == "OK"
    assert (w / "b").exists()


@needs_landlock
def test_abi1_forbids_any_cross_directory_rename(dirs: dict[str, Path]) -> None:
    plan = fs_plan(dirs)
    w, w2 = dirs["w"], dirs["w2"]
    assert _child(LINK, None, (w / "f", w2 / "ctl"), None)[-1] == "OK"
    assert _child(LINK, plan, (w / "f", w2 / "g"), 1)[-1] == "ERR EXDEV"
    assert _child(RENAME, plan, (w / "f", w2 / "g"), 1)[-1] == "ERR EXDEV"
    # Within one directory, ABI 1 is fine.
    assert _child(RENAME, plan, (w / "f", w / "g"), 1)[-1] == "OK"


@needs_landlock
def test_rename_into_read_only_dir_denied(dirs: dict[str, Path]) -> None:
    plan = fs_plan(dirs)
    src, dst = dirs["w"] / "f", dirs["r"] / "moved"
    assert _child(RENAME, None, (src, dst), None)[-1] == "OK"
    os.rename(dst, src)
    assert _child(RENAME, plan, (src, dst), None)[-1] == "ERR EACCES"
    assert src.exists() and not dst.exists()
    # ...and out of it: removing from a read-only dir is denied too.
    assert _child(RENAME, plan, (dirs["r"] / "f", dirs["w"] / "r"), None)[-1] == "ERR EACCES"


@needs_landlock
def test_symlink_out_of_write_dir_gives_nothing(dirs: dict[str, Path]) -> None:
    w, out = dirs["w"], dirs["out"]
    (w / "to_file").symlink_to(out / "f")
    (w / "to_dir").symlink_to(out)
    plan = fs_plan(dirs)
    assert confined(WRITE, plan, w / "to_file") == "ERR EACCES"
    assert confined(WRITE, plan, w / "to_dir" / "new") == "ERR EACCES"
    assert confined(READ, plan, w / "to_file") == "ERR EACCES"


@needs_abi(3)
def test_truncate_in_read_only_path_denied(dirs: dict[str, Path]) -> None:
    plan = fs_plan(dirs)
    action = "os.truncate(args[0], 0)"
    assert confined(action, plan, dirs["r"] / "f") == "ERR EACCES"
    assert confined(action, plan, dirs["w"] / "f") == "OK"
    # Best effort: emulating ABI 2, where TRUNCATE is not handled, lets it pass.
    (dirs["r"] / "f").write_text("data\n")
    assert _child(action, plan, (dirs["r"] / "f",), 2)[-1] == "OK"
    assert (dirs["r"] / "f").stat().st_size == 0


@needs_landlock
def test_missing_paths_are_skipped(tmp_path: Path, dirs: dict[str, Path]) -> None:
    plan = LandlockPlan(
        read=(str(tmp_path / "missing"), str(dirs["r"]), str(dirs["r"] / "f" / "sub")),
        write=(str(tmp_path / "missing2"),),
    )
    assert confined(READ, plan, dirs["r"] / "f") == "OK"
    assert confined(WRITE, plan, dirs["w"] / "f") == "ERR EACCES"


@needs_landlock
def test_min_abi_above_running_raises(tmp_path: Path) -> None:
    action = """
    try:
        ll.apply(ll.LandlockPlan(min_abi=ll.abi_version() + 1))
    except ll.LandlockError as e:
        print("raised", e.step, e.errno == errno.EOPNOTSUPP)
    open(args[0], "w").write("still unrestricted")
    """
    lines = _child(action, None, (tmp_path / "x",), None)
    assert lines == ["raised abi True", "OK"]


@needs_landlock
def test_apply_returns_abi_and_closes_its_fds() -> None:
    action = """
    before = sorted(os.listdir("/proc/self/fd"))
    print("abi", ll.apply(ll.LandlockPlan(read=("/proc", "/nonexistent"), write=("/dev/null",))))
    after = sorted(os.listdir("/proc/self/fd"))
    assert before == after, (before, after)
    """
    assert _child(action, None, (), None) == [f"abi {min(ABI, ll.MAX_KNOWN_ABI)}", "OK"]


# --- network and scopes -----------------------------------------------------


@pytest.fixture
def tcp_servers() -> Iterator[tuple[int, int]]:
    socks = []
    for _ in range(2):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        socks.append(s)
    try:
        yield socks[0].getsockname()[1], socks[1].getsockname()[1]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CONNECT = """
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(("127.0.0.1", int(args[0])))
"""
BIND = """
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind(("127.0.0.1", int(args[0])))
"""


@needs_abi(4)
def test_tcp_connect_only_to_allowed_port(tcp_servers: tuple[int, int]) -> None:
    p1, p2 = tcp_servers
    plan = LandlockPlan(read=("/",), restrict_tcp=True, allowed_connect_ports=(p1,))
    assert confined(CONNECT, plan, p1) == "OK"
    assert confined(CONNECT, plan, p2) == "ERR EACCES"
    # Without restrict_tcp the port lists mean nothing: TCP is not handled.
    loose = LandlockPlan(read=("/",), allowed_connect_ports=(p1,))
    assert confined(CONNECT, loose, p2) == "OK"


@needs_abi(4)
def test_tcp_bind_only_to_allowed_port() -> None:
    p3, p4 = free_port(), free_port()
    plan = LandlockPlan(read=("/",), restrict_tcp=True, allowed_bind_ports=(p3,))
    assert confined(BIND, plan, p3) == "OK"
    assert confined(BIND, plan, p4) == "ERR EACCES"
    assert confined(BIND, plan, 0) == "ERR EACCES"  # ephemeral needs a rule on port 0


@needs_abi(4)
def test_udp_is_never_restricted() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        action = """
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.sendto(b"hi", ("127.0.0.1", int(args[0])))
        """
        plan = LandlockPlan(read=("/",), restrict_tcp=True)
        assert confined(action, plan, port) == "OK"
        assert server.recv(16) == b"hi"  # from the control run


@needs_abi(6)
def test_scope_abstract_unix_socket() -> None:
    name = f"nanobox-test-{uuid.uuid4().hex}"
    action = """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("\\0" + args[0])
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind("\0" + name)
        server.listen(16)
        plan = LandlockPlan(read=("/",), scope_abstract_unix=True)
        assert confined(action, plan, name) == "ERR EPERM"
        # Only the scope denies it.
        assert confined(action, LandlockPlan(read=("/",)), name) == "OK"


@needs_abi(6)
def test_scope_signal() -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        action = "os.kill(int(args[0]), 0)"
        plan = LandlockPlan(read=("/",), scope_signal=True)
        assert confined(action, plan, sleeper.pid) == "ERR EPERM"
        # A real signal too (no control run: it would kill the sleeper).
        term = f"os.kill(int(args[0]), {int(signal.SIGTERM)})"
        assert _child(term, plan, (sleeper.pid,), None)[-1] == "ERR EPERM"
        assert sleeper.poll() is None
        # Signals inside the domain (to itself) still work.
        assert confined("os.kill(os.getpid(), 0)", plan) == "OK"
        assert confined(action, LandlockPlan(read=("/",)), sleeper.pid) == "OK"
    finally:
        sleeper.kill()
        sleeper.wait()
