"""Network policy at the sandbox level: the only way out of an allowlist
sandbox is nanobox's proxy. Every server here is started by the test on
127.0.0.1; test names (``*.test``) are pinned to it with
``Network(resolve=...)``, and loopback must then be allowed explicitly."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import nanobox
from conftest import SPY, nanobox_cli

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def www(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "hello.txt").write_text("hello from the host")
    handler = functools.partial(_Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield root, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def allow(port: int, *extra: str) -> nanobox.Policy:
    net = nanobox.Network.allow(
        f"files.test:{port}", "127.0.0.1/32", *extra, resolve={"files.test": "127.0.0.1"}
    )
    return nanobox.Policy(network=net)


def sh(cmd: str, policy: nanobox.Policy, **kw: object) -> nanobox.Result:
    return nanobox.run(["sh", "-c", cmd], policy=policy, timeout=120, **kw)  # type: ignore[arg-type]


def test_proxy_environment(workspace: Path, www: tuple[Path, int]) -> None:
    r = sh("env | grep -i -E '^(http|https|all|no)_proxy=' | sort", allow(www[1]))
    env = dict(line.split("=", 1) for line in r.stdout.decode().splitlines())
    assert env["HTTP_PROXY"] == env["https_proxy"] == "http://127.0.0.1:3128"
    assert env["ALL_PROXY"] == "socks5h://127.0.0.1:1080"
    assert env["NO_PROXY"] == env["no_proxy"] == "localhost,127.0.0.1,::1"


def test_allowed_name_with_curl_http_connect_and_socks(
    workspace: Path, www: tuple[Path, int]
) -> None:
    port = www[1]
    url = f"http://files.test:{port}/hello.txt"
    r = sh(
        f'curl -sS {url}; echo; curl -sS -p {url}; echo; curl -sS -x "$ALL_PROXY" {url}',
        allow(port),
    )
    assert r.stdout == b"hello from the host\n" * 2 + b"hello from the host", r.stderr
    assert r.network is not None and r.network["allowed"] == 3 and r.network["denied"] == 0


def test_python_urllib(workspace: Path, www: tuple[Path, int]) -> None:
    code = (
        f"import urllib.request; print(urllib.request.urlopen("
        f"'http://files.test:{www[1]}/hello.txt').read().decode())"
    )
    r = nanobox.run([SPY, "-c", code], policy=allow(www[1]), timeout=60)
    assert r.stdout == b"hello from the host\n", r.stderr


def test_name_not_on_the_list_is_denied_with_an_event(
    workspace: Path, www: tuple[Path, int]
) -> None:
    seen: list[nanobox.Event] = []
    box = nanobox.Sandbox(allow(www[1]), on_event=seen.append)
    with box:
        r = box.run(
            [
                "sh",
                "-c",
                "curl -s -o /dev/null -w '%{http_code}' http://other.test/; "
                'curl -s -x "$ALL_PROXY" http://other.test/ || echo " socks=$?"',
            ]
        )
    assert r.stdout.startswith(b"403") and b"socks=97" in r.stdout, r.stdout
    assert r.network is not None and r.network["denied"] == 2
    assert any(v.kind == "network" and "other.test:80" in v.detail for v in r.violations)
    net_events = [e for e in seen if e.kind == "network"]
    assert {e.data["decision"] for e in net_events} == {"denied"}
    assert {e.data["host"] for e in net_events} == {"other.test"}


def test_allowed_name_resolving_to_loopback_is_refused(
    workspace: Path, www: tuple[Path, int]
) -> None:
    net = nanobox.Network.allow(f"files.test:{www[1]}", resolve={"files.test": "127.0.0.1"})
    r = sh(
        f"curl -s -o /dev/null -w '%{{http_code}}' http://files.test:{www[1]}/hello.txt",
        nanobox.Policy(network=net),
    )
    assert r.stdout == b"403"


@pytest.mark.parametrize(
    "spelling",
    [
        "127.0.0.1",
        "2130706433",
        "0x7f.1",
        "127.1",
        "0177.0.0.1",
        "[::ffff:127.0.0.1]",
        "169.254.169.254",
        "2852039166",
        "0xa9.0xfe.0xa9.0xfe",
        "[::1]",
        "localhost",
    ],
)
def test_numeric_spellings_of_loopback_and_metadata_are_refused(
    workspace: Path, www: tuple[Path, int], spelling: str
) -> None:
    net = nanobox.Network.allow(f"files.test:{www[1]}", resolve={"files.test": "127.0.0.1"})
    # --noproxy '': curl would itself send 127.0.0.1 spellings around the
    # proxy (NO_PROXY), where there is no route; make the proxy judge them.
    r = sh(
        f"curl -s -o /dev/null -w '%{{http_code}}' --noproxy '' -x $HTTP_PROXY "
        f"http://{spelling}:{www[1]}/hello.txt",
        nanobox.Policy(network=net),
    )
    assert r.stdout == b"403", (spelling, r.stdout, r.stderr)


BYPASS = """
import socket, sys
tcp_port, udp_port, tcp2_port, v6_port = map(int, sys.argv[1:5])
def attempt(name, fn):
    try:
        fn()
        print(name, "OK")
    except OSError as e:
        print(name, "FAILED", e.errno)
attempt("tcp", lambda: socket.create_connection(("127.0.0.1", tcp_port), timeout=3))
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.sendto(b"ping", ("127.0.0.1", udp_port))
    if s.recv(16) != b"ping":
        raise OSError(0, "no echo")
attempt("udp", udp)
attempt("literal", lambda: socket.create_connection(("127.0.0.2", tcp2_port), timeout=3))
if v6_port:
    attempt("ipv6", lambda: socket.create_connection(("::1", v6_port), timeout=3))
attempt("raw", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
"""


@pytest.fixture
def host_servers() -> Iterator[list[str]]:
    """Servers on the host's loopback: TCP, UDP echo, TCP on 127.0.0.2, TCP on ::1."""
    socks: list[socket.socket] = []
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    tcp2 = socket.socket()
    tcp2.bind(("127.0.0.2", 0))
    tcp2.listen()
    socks += [tcp, udp, tcp2]
    v6_port = 0
    try:
        v6 = socket.socket(socket.AF_INET6)
        v6.bind(("::1", 0))
        v6.listen()
        socks.append(v6)
        v6_port = v6.getsockname()[1]
    except OSError:
        pass

    def echo() -> None:
        while True:
            try:
                data, addr = udp.recvfrom(16)
                udp.sendto(data, addr)
            except OSError:
                return

    threading.Thread(target=echo, daemon=True).start()
    try:
        yield [
            str(p)
            for p in (tcp.getsockname()[1], udp.getsockname()[1], tcp2.getsockname()[1], v6_port)
        ]
    finally:
        for s in socks:
            s.close()


def test_without_proxy_variables_there_is_no_way_out(
    workspace: Path, www: tuple[Path, int], host_servers: list[str]
) -> None:
    r = nanobox.run(
        [SPY, "-c", BYPASS, *host_servers],
        policy=allow(www[1]),
        timeout=60,
        env={"HTTP_PROXY": "", "HTTPS_PROXY": "", "ALL_PROXY": ""},
    )
    inside = dict(line.split(" ", 1) for line in r.stdout.decode().splitlines())
    assert inside and all(v.startswith("FAILED") for v in inside.values()), inside
    # Control: outside the sandbox the same attempts succeed (raw needs root).
    ctl = subprocess.run([SPY, "-c", BYPASS, *host_servers], capture_output=True, timeout=60)
    outside = dict(line.split(" ", 1) for line in ctl.stdout.decode().splitlines())
    for name, verdict in outside.items():
        if name != "raw" or os.geteuid() == 0:
            assert verdict == "OK", (name, verdict)


def _wheel(root: Path) -> str:
    name = "nanobox_testpkg-0.1-py3-none-any.whl"
    files = {
        "nanobox_testpkg/__init__.py": b"VALUE = 42\n",
        "nanobox_testpkg-0.1.dist-info/METADATA": (
            b"Metadata-Version: 2.1\nName: nanobox-testpkg\nVersion: 0.1\n"
        ),
        "nanobox_testpkg-0.1.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = ""
    for path, data in files.items():
        digest = hashlib.sha256(data).digest()
        import base64

        b64 = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        record += f"{path},sha256={b64},{len(data)}\n"
    record += "nanobox_testpkg-0.1.dist-info/RECORD,,\n"
    files["nanobox_testpkg-0.1.dist-info/RECORD"] = record.encode()
    pkg = root / "simple" / "nanobox-testpkg"
    pkg.mkdir(parents=True)
    with zipfile.ZipFile(pkg / name, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    (pkg / "index.html").write_text(f'<a href="{name}">{name}</a>\n')
    return name


def test_pip_install_from_a_local_index(workspace: Path, www: tuple[Path, int]) -> None:
    _wheel(www[0])
    port = www[1]
    r = sh(
        f"{SPY} -m pip install --no-cache-dir --disable-pip-version-check --target /tmp/t "
        f"--index-url http://files.test:{port}/simple/ --trusted-host files.test "
        f"nanobox-testpkg && "
        f"PYTHONPATH=/tmp/t {SPY} -c 'import nanobox_testpkg as m; print(m.VALUE)'",
        allow(port),
    )
    if b"No module named pip" in r.stderr:
        pytest.skip(f"{SPY} has no pip")
    assert r.stdout.endswith(b"42\n"), r.stderr[-2000:]


def test_git_clone_over_http(workspace: Path, www: tuple[Path, int], tmp_path: Path) -> None:
    src = tmp_path / "src"
    subprocess.run(["git", "init", "-q", str(src)], check=True)
    (src / "f").write_text("versioned")
    subprocess.run(["git", "-C", str(src), "add", "f"], check=True)
    subprocess.run(
        [
            "git",
            "-C",
            str(src),
            "-c",
            "user.email=a@b",
            "-c",
            "user.name=n",
            "commit",
            "-qm",
            "one",
        ],
        check=True,
    )
    subprocess.run(["git", "clone", "-q", "--bare", str(src), str(www[0] / "repo.git")], check=True)
    subprocess.run(["git", "-C", str(www[0] / "repo.git"), "update-server-info"], check=True)
    r = sh(f"git clone -q http://files.test:{www[1]}/repo.git clone && cat clone/f", allow(www[1]))
    assert r.stdout == b"versioned", r.stderr


def test_cli_allow_net_and_result_network(
    workspace: Path, www: tuple[Path, int], tmp_path: Path
) -> None:
    pol = tmp_path / "p.toml"
    pol.write_text('[network]\nresolve = { "files.test" = "127.0.0.1" }\n')
    res = tmp_path / "r.json"
    p = nanobox_cli(
        "run",
        "--policy",
        str(pol),
        "--allow-net",
        f"files.test:{www[1]}",
        "--allow-net",
        "127.0.0.1",
        "--deny-net",
        "*.blocked.test",
        "--result",
        str(res),
        "--",
        "curl",
        "-s",
        f"http://files.test:{www[1]}/hello.txt",
    )
    assert p.returncode == 0 and p.stdout == b"hello from the host", p.stderr
    data = json.loads(res.read_text())
    assert data["network"]["mode"] == "allowlist" and data["network"]["allowed"] == 1


def test_network_none_has_no_result_network_key(workspace: Path, tmp_path: Path) -> None:
    res = tmp_path / "r.json"
    assert nanobox_cli("run", "--result", str(res), "true").returncode == 0
    assert "network" not in json.loads(res.read_text())


def test_host_network_mode_is_flagged(workspace: Path, host_servers: list[str]) -> None:
    r = nanobox.run(
        [SPY, "-c", BYPASS, *host_servers],
        policy=nanobox.Policy(network=nanobox.Network(mode="host")),
        timeout=60,
    )
    assert r.stdout.startswith(b"tcp OK\nudp OK"), (r.stdout, r.stderr)
    assert r.network == {"mode": "host"}


def test_proxy_listeners_are_not_held_by_the_command(
    workspace: Path, www: tuple[Path, int]
) -> None:
    code = "import os; print(sorted(int(f) for f in os.listdir('/proc/self/fd')))"
    r = nanobox.run([SPY, "-c", code], policy=allow(www[1]), timeout=30)
    assert json.loads(r.stdout) == [0, 1, 2, 3]  # stdio and listdir's own fd


def test_bad_network_options(workspace: Path) -> None:
    for args, named in (
        (["--allow-net", "bad rule"], "--allow-net"),
        (["--deny-net", "*."], "--deny-net"),
        (["--network", "everywhere"], "--network"),
        (["--net-connect-timeout", "soon", "--allow-net", "a.test"], "--net-connect-timeout"),
    ):
        p = nanobox_cli("run", *args, "true")
        assert p.returncode == 125 and named.encode() in p.stderr, (args, p.stderr)
        assert len(p.stderr.splitlines()) == 1
    assert sys.version_info >= (3, 10)
    assert os.environ.get("HTTP_PROXY") is None or True
