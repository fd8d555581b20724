"""4. Proxy throughput: nanobox's allowlist proxy vs a direct loopback transfer.

An upstream server of our own (asyncio, in its own process) on 127.0.0.1
serves ``/100M`` (100 MB from a file with ``sendfile``) and ``/small`` (a
64-byte body). Paths measured:

- ``direct``: the client talks to the upstream itself (host loopback).
- ``module``: ``nanobox.net.proxy.Proxy`` run standalone in its own process
  (asyncio, listeners on 127.0.0.1, ``Ruleset(allow=["127.0.0.1"])``): the
  proxy code path alone, without a sandbox.
- ``sandbox``: the client runs inside a nanobox sandbox with
  ``Network.allow("127.0.0.1:PORT")`` and uses the proxy nanobox announces
  (``HTTP_PROXY`` = 127.0.0.1:3128, SOCKS5 on 1080): the real data path,
  sandbox network namespace → proxy thread in the caller → upstream. Reported
  as "not available" while ``nanobox.Network`` has no allowlist mode.

Bulk: ``curl -o /dev/null --noproxy "" -w "%{speed_download} %{size_download}
%{http_code}"`` of /100M, as plain HTTP proxying (``-x``), a CONNECT tunnel
(``-p -x``) and SOCKS5 (``-x socks5h://``); one warm-up, R rounds in
alternating order; a run counts only with code 200 and all bytes.

Requests/s: a load client of our own (asyncio, raw sockets, its own
process) with 50 parallel clients for D seconds per mode: a new connection
per request (``Connection: close``), and keep-alive (``-ka``: one
connection or tunnel per client; for plain HTTP the proxy still opens one
upstream connection per request).

    python bench/proxy.py [--quick] [--rounds 5] [--seconds 3] [--json FILE]
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import _common as c

BULK_BYTES = 100_000_000
SMALL_BODY = b"x" * 63 + b"\n"
CLIENTS = 50


# --------------------------------------------------------------------------- upstream server


class _Upstream(asyncio.Protocol):
    bulk_path = ""

    def connection_made(self, transport: Any) -> None:
        self.t = transport
        self.buf = b""
        self.busy = False

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next()

    def _next(self) -> None:
        while b"\r\n\r\n" in self.buf and not self.busy:
            head, _, self.buf = self.buf.partition(b"\r\n\r\n")
            first = head.split(b"\r\n", 1)[0].split()
            path = first[1] if len(first) > 1 else b"/"
            close = b"connection: close" in head.lower()
            if path.endswith(b"/100M"):
                self.busy = True
                self.task = asyncio.ensure_future(self._bulk())
                return
            if path.endswith(b"/small"):
                body, status = SMALL_BODY, b"200 OK"
            else:
                body, status = b"not found\n", b"404 Not Found"
            self.t.write(
                b"HTTP/1.1 "
                + status
                + b"\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\nContent-Type: text/plain\r\n"
                + (b"Connection: close\r\n" if close else b"")
                + b"\r\n"
                + body
            )
            if close:
                self.t.close()
                return

    async def _bulk(self) -> None:
        loop = asyncio.get_running_loop()
        self.t.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: "
            + str(BULK_BYTES).encode()
            + b"\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
        )
        try:
            with open(self.bulk_path, "rb") as fh:
                await loop.sendfile(self.t, fh)
        except (ConnectionError, OSError):
            pass
        self.t.close()


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def upstream_main(directory: str) -> None:
    path = os.path.join(directory, "100M.bin")
    if not os.path.exists(path) or os.path.getsize(path) != BULK_BYTES:
        with open(path, "wb") as fh:
            chunk = os.urandom(1 << 20)
            left = BULK_BYTES
            while left:
                n = min(left, len(chunk))
                fh.write(chunk[:n])
                left -= n
    _Upstream.bulk_path = path

    async def go() -> None:
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(_Upstream, "127.0.0.1", 0, backlog=1024)
        port = srv.sockets[0].getsockname()[1]
        print(json.dumps({"port": port}), flush=True)
        stop = loop.create_future()
        loop.add_reader(0, _set_once, stop)
        await stop

    asyncio.run(go())


# --------------------------------------------------------------------------- standalone proxy


def proxy_main() -> None:
    from nanobox.net.proxy import Proxy
    from nanobox.net.rules import Ruleset

    async def go() -> None:
        loop = asyncio.get_running_loop()
        proxy = Proxy(Ruleset(allow=["127.0.0.1"]), max_connections=1024)
        socks = []
        for _ in range(2):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", 0))
            s.listen(1024)
            socks.append(s)
        ports = [s.getsockname()[1] for s in socks]
        proxy.start_run("bench", socks[0], socks[1])
        print(json.dumps({"http": ports[0], "socks5": ports[1]}), flush=True)
        stop = loop.create_future()
        loop.add_reader(0, _set_once, stop)
        await stop
        summary = await proxy.finish_run("bench")
        await proxy.aclose()
        print(json.dumps(summary), flush=True)

    asyncio.run(go())


# --------------------------------------------------------------------------- load client


async def _recv_until(
    loop: Any, s: socket.socket, buf: bytes, marker: bytes
) -> tuple[bytes, bytes]:
    while marker not in buf:
        chunk = await loop.sock_recv(s, 65536)
        if not chunk:
            raise ConnectionError("closed early")
        buf += chunk
    head, _, rest = buf.partition(marker)
    return head, rest


async def _response(loop: Any, s: socket.socket, buf: bytes) -> bytes:
    """Read one HTTP response (Content-Length framed); return leftover bytes."""
    head, rest = await _recv_until(loop, s, buf, b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200") and not head.startswith(b"HTTP/1.0 200"):
        raise ConnectionError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    while len(rest) < length:
        chunk = await loop.sock_recv(s, 65536)
        if not chunk:
            raise ConnectionError("short body")
        rest += chunk
    return rest[length:]


async def _open(loop: Any, mode: str, host: str, port: int, target: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        await loop.sock_connect(s, (host, port))
        if mode == "connect":
            await loop.sock_sendall(
                s,
                f"CONNECT 127.0.0.1:{target} HTTP/1.1\r\nHost: 127.0.0.1:{target}\r\n\r\n".encode(),
            )
            head, rest = await _recv_until(loop, s, b"", b"\r\n\r\n")
            if b" 200" not in head.split(b"\r\n", 1)[0] or rest:
                raise ConnectionError(f"CONNECT: {head[:60]!r}")
        elif mode == "socks5":
            await loop.sock_sendall(s, b"\x05\x01\x00")
            got = b""
            while len(got) < 2:
                chunk = await loop.sock_recv(s, 2 - len(got))
                if not chunk:
                    raise ConnectionError("socks5 closed")
                got += chunk
            await loop.sock_sendall(
                s, b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + target.to_bytes(2, "big")
            )
            got = b""
            while len(got) < 10:
                chunk = await loop.sock_recv(s, 10 - len(got))
                if not chunk:
                    raise ConnectionError("socks5 closed")
                got += chunk
            if got[1] != 0:
                raise ConnectionError(f"socks5 reply {got[1]}")
    except BaseException:
        s.close()
        raise
    return s


def load_main(mode: str, host: str, port: int, target: int, clients: int, seconds: float) -> None:
    keep = mode.endswith("-ka")
    base = mode.removesuffix("-ka")
    path = f"http://127.0.0.1:{target}/small" if base == "http" else "/small"
    conn_hdr = "" if keep else "Connection: close\r\n"
    req = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{target}\r\n{conn_hdr}\r\n".encode()
    done = 0
    errors: dict[str, int] = {}

    async def client(stop_at: float) -> None:
        nonlocal done
        loop = asyncio.get_running_loop()
        s: socket.socket | None = None
        buf = b""
        while time.monotonic() < stop_at:
            try:
                if s is None:
                    s = await _open(loop, base, host, port, target)
                    buf = b""
                await loop.sock_sendall(s, req)
                buf = await _response(loop, s, buf)
                done += 1
                if not keep:
                    s.close()
                    s = None
            except (OSError, ConnectionError, ValueError) as exc:
                key = f"{type(exc).__name__}: {exc}"[:80]
                errors[key] = errors.get(key, 0) + 1
                if s is not None:
                    s.close()
                s = None
                await asyncio.sleep(0.01)
        if s is not None:
            s.close()

    async def go() -> float:
        warm = time.monotonic() + min(0.5, seconds / 4)
        await asyncio.gather(*(client(warm) for _ in range(clients)))
        nonlocal done
        done = 0
        errors.clear()
        t0 = time.monotonic()
        await asyncio.gather(*(client(t0 + seconds) for _ in range(clients)))
        return time.monotonic() - t0

    elapsed = asyncio.run(go())
    print(
        json.dumps(
            {
                "requests": done,
                "seconds": elapsed,
                "rps": done / elapsed,
                "errors": sum(errors.values()),
                "error_kinds": errors,
            }
        )
    )


# --------------------------------------------------------------------------- driver


class _Server:
    def __init__(self, args: list[str], python: str = sys.executable) -> None:
        self.proc = subprocess.Popen(
            [python, os.path.abspath(__file__), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"{args[0]} did not start: {err[-600:]}")
        self.info: dict[str, Any] = json.loads(line)

    def close(self) -> dict[str, Any] | None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            rest = self.proc.stdout.read()
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            return None
        lines = [ln for ln in rest.splitlines() if ln.strip()]
        return json.loads(lines[-1]) if lines else None


CURL_FMT = "%{speed_download} %{size_download} %{http_code}\\n"


def _curl_argv(curl: str, url: str, proxy_args: list[str]) -> list[str]:
    return [
        curl,
        "-sS",
        "-o",
        "/dev/null",
        "--noproxy",
        "",
        "-w",
        CURL_FMT.replace("\\n", "\n"),
        *proxy_args,
        url,
    ]


def _parse_curl(out: str) -> tuple[float | None, str | None]:
    parts = out.strip().split()
    if len(parts) != 3:
        return None, f"curl printed {out.strip()[:120]!r}"
    speed, size, code = float(parts[0]), int(float(parts[1])), parts[2]
    if code != "200" or size != BULK_BYTES:
        return None, f"code {code}, {size} bytes"
    return speed / 1e6, None


def measure(rounds: int, seconds: float) -> dict[str, Any]:
    skipped: dict[str, str] = {}
    errors: dict[str, str] = {}
    bulk: dict[str, dict[str, Any]] = {}
    rps: dict[str, dict[str, Any]] = {}
    curl = shutil.which("curl")
    if not curl:
        return {
            "skipped": {"all": "curl not found (apt-get install curl)"},
            "errors": {},
            "bulk": {},
            "rps": {},
            "goals": [],
        }
    try:
        import nanobox.net.proxy

        module_ok = True
    except Exception as exc:  # noqa: BLE001
        module_ok = False
        skipped["module"] = f"nanobox.net.proxy cannot be imported: {exc}"
    sandbox_ok, why = c.nanobox_allowlist_support()
    if not sandbox_ok:
        skipped["sandbox"] = why + ": the sandboxed path is not available"

    with c.workdir("nanobox-bench-www-") as www, c.workdir() as cwd:
        up = _Server(["--upstream", www])
        port = up.info["port"]
        url = f"http://127.0.0.1:{port}/100M"
        prx = None
        box = None
        try:
            if module_ok:
                prx = c.guarded(errors, "module proxy", lambda: _Server(["--serve-proxy"]))
            if sandbox_ok:
                import nanobox

                box = nanobox.Sandbox(
                    nanobox.Policy(network=c.allowlist_network([f"127.0.0.1:{port}"]))
                )

            # -- bulk ------------------------------------------------------
            paths: dict[str, Any] = {"direct": ("host", [])}
            if prx is not None:
                hp, sp = prx.info["http"], prx.info["socks5"]
                paths["module http"] = ("host", ["-x", f"http://127.0.0.1:{hp}"])
                paths["module connect"] = ("host", ["-p", "-x", f"http://127.0.0.1:{hp}"])
                paths["module socks5"] = ("host", ["-x", f"socks5h://127.0.0.1:{sp}"])
            if box is not None:
                paths["sandbox http"] = ("box", ["-x", "http://127.0.0.1:3128"])
                paths["sandbox connect"] = ("box", ["-p", "-x", "http://127.0.0.1:3128"])
                paths["sandbox socks5"] = ("box", ["-x", "socks5h://127.0.0.1:1080"])

            def one_bulk(name: str) -> tuple[float | None, str | None]:
                where, pargs = paths[name]
                argv = _curl_argv(curl, url, pargs)
                if where == "host":
                    p = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=cwd)
                    out, err = p.stdout, p.stderr
                else:
                    assert box is not None
                    r = box.run(argv, text=True, timeout=300, cwd=cwd)
                    out, err = r.stdout, r.stderr
                speed, problem = _parse_curl(out)
                if problem and err.strip():
                    problem += f" ({err.strip()[-160:]})"
                return speed, problem

            for name in paths:  # warm-up
                c.guarded(errors, f"bulk warm-up {name}", functools.partial(one_bulk, name))
            speeds: dict[str, list[float]] = {n: [] for n in paths}
            fails: dict[str, list[str]] = {n: [] for n in paths}
            for r in range(rounds):
                for name in c.alternating(list(paths), r):
                    got = c.guarded(errors, f"bulk {name}", functools.partial(one_bulk, name))
                    if got is None:
                        fails[name].append("exception")
                        continue
                    speed, problem = got
                    if speed is None:
                        fails[name].append(problem or "?")
                    else:
                        speeds[name].append(speed)
            direct = c.percentile(speeds["direct"], 50) if speeds["direct"] else None
            for name in paths:
                s = c.summary(speeds[name])
                s["failed"] = len(fails[name])
                s["fail_reasons"] = fails[name][:3]
                s["x_direct"] = c.ratio(s.get("median"), direct)
                bulk[name] = s

            # -- requests per second -------------------------------------
            loads: dict[str, tuple[str, list[str]]] = {}
            for mode in ("direct", "direct-ka"):
                loads[mode] = ("host", [mode, "127.0.0.1", str(port)])
            if prx is not None:
                for mode, pp in (("http", hp), ("connect", hp), ("socks5", sp)):
                    for ka in ("", "-ka"):
                        loads[f"module {mode}{ka}"] = ("host", [mode + ka, "127.0.0.1", str(pp)])
            if box is not None:
                for mode, pp in (("http", 3128), ("connect", 3128), ("socks5", 1080)):
                    for ka in ("", "-ka"):
                        loads[f"sandbox {mode}{ka}"] = ("box", [mode + ka, "127.0.0.1", str(pp)])

            def one_load(name: str) -> dict[str, Any]:
                where, largs = loads[name]
                argv = [
                    c.SYSTEM_PYTHON,
                    os.path.abspath(__file__),
                    "--load",
                    *largs,
                    str(port),
                    str(CLIENTS),
                    str(seconds),
                ]
                if where == "host":
                    p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
                    out, err = p.stdout, p.stderr
                else:
                    assert box is not None
                    r = box.run(argv, text=True, timeout=120, cwd=cwd)
                    out, err = r.stdout, r.stderr
                if not out.strip():
                    raise RuntimeError(f"load client failed: {err.strip()[-400:]}")
                data: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
                return data

            for name in c.alternating(list(loads), 0):
                got = c.guarded(errors, f"rps {name}", functools.partial(one_load, name))
                if got is not None:
                    rps[name] = got
            for name, d in rps.items():
                base = rps.get("direct-ka" if name.endswith("-ka") else "direct", {}).get("rps")
                d["x_direct"] = c.ratio(d.get("rps"), base)
        finally:
            if box is not None:
                box.close()
            if prx is not None:
                summary = prx.close()
                if summary:
                    bulk.setdefault("_module_proxy_summary", {}).update(summary)
            up.close()
    return {
        "unit": "MB/s (10^6 bytes)",
        "rounds": rounds,
        "seconds": seconds,
        "clients": CLIENTS,
        "bulk": bulk,
        "rps": rps,
        "skipped": skipped,
        "errors": errors,
        "goals": goals(bulk),
    }


def goals(bulk: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for where in ("sandbox", "module"):
        vals = {
            m: bulk.get(f"{where} {m}", {}).get("x_direct") for m in ("http", "connect", "socks5")
        }
        if all(v is None for v in vals.values()):
            continue
        worst = min(v for v in vals.values() if v is not None)
        out.append(
            {
                "goal": f"proxy ≥ 0.8x direct loopback throughput ({where})",
                "value": worst,
                "met": worst >= 0.8,
                "shown": ", ".join(f"{m} {c.fmt_ratio(v)}" for m, v in vals.items()),
            }
        )
    if not out:
        out.append(
            {
                "goal": "proxy ≥ 0.8x direct loopback throughput",
                "value": None,
                "met": None,
                "shown": "not measured",
            }
        )
    return out


def table(res: dict[str, Any]) -> str:
    rows = []
    for name, s in res["bulk"].items():
        if name.startswith("_"):
            continue
        rows.append(
            [
                f"**{name}**" if name != "direct" else name,
                c.fmt(s.get("median"), 0),
                f"{c.fmt(s.get('p10'), 0)}-{c.fmt(s.get('p90'), 0)}",
                c.fmt_ratio(s.get("x_direct")),
                f"{s.get('n', 0)}/{s.get('failed', 0)}",
            ]
        )
    text = "100 MB download (curl):\n\n" + c.md_table(
        ["path", "median MB/s", "p10-p90", "÷ direct", "ok/failed"], rows
    )
    rrows = []
    for name, d in res["rps"].items():
        rrows.append(
            [name, c.fmt(d.get("rps"), 0), c.fmt_ratio(d.get("x_direct")), d.get("errors", 0)]
        )
    text += (
        f"\n\nSmall responses, {res.get('clients', CLIENTS)} parallel clients, "
        f"{res.get('seconds')} s each (`-ka` = keep-alive; else one connection per "
        "request):\n\n"
    )
    text += c.md_table(["path", "requests/s", "÷ direct", "errors"], rrows)
    notes = [f"- skipped **{k}**: {v}" for k, v in res["skipped"].items()]
    notes += [f"- error in **{k}**: {v}" for k, v in res["errors"].items()]
    for name, s in res["bulk"].items():
        if not name.startswith("_") and s.get("fail_reasons"):
            notes.append(f"- {name} failures: {'; '.join(s['fail_reasons'])}")
    return text + ("\n\n" + "\n".join(notes) if notes else "")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--upstream":
        upstream_main(sys.argv[2])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-proxy":
        proxy_main()
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--load":
        a = sys.argv[2:]
        load_main(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), float(a[5]))
        return
    p = c.base_args(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0)
    a = p.parse_args()
    rounds, seconds = (1, 1.0) if a.quick else (a.rounds, a.seconds)
    res = measure(rounds, seconds)
    c.emit(res, a.json, table)


if __name__ == "__main__":
    main()
