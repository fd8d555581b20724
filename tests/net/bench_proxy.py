"""Throughput of the proxy, measured like perf-baselines.md section 4: curl
downloads from a loopback HTTP server directly, through plain HTTP proxying,
through a CONNECT tunnel and through SOCKS5. Loopback only; the proxy resolves
``bench.test`` with a fake resolver. Besides MB/s (noisy on a small machine:
server, proxy and curl share the cores) it prints the proxy's CPU seconds
per GB relayed (this process's CPU time, which is the proxy thread's).

    .venv/bin/python tests/net/bench_proxy.py [--size 200000000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import textwrap
import time

from nanobox.net import ProxyThread, Ruleset

SERVER = textwrap.dedent(
    """
    import socket, sys, threading
    size = int(sys.argv[1])
    block = bytes(range(256)) * 4096
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    print(srv.getsockname()[1], flush=True)
    def serve(conn):
        with conn:
            buf = b""
            while b"\\r\\n\\r\\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n"
                         b"Connection: close\\r\\n\\r\\n" % size)
            view = memoryview(block)
            left = size
            while left:
                n = min(left, len(block))
                conn.sendall(view[:n])
                left -= n
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass
    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
    """
)


async def resolve(host: str) -> list[str]:
    if host != "bench.test":
        raise socket.gaierror(socket.EAI_NONAME, host)
    return ["127.0.0.1"]


def listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def curl(size: int, url: str, *args: str) -> None:
    fmt = "%{size_download} %{http_code}"
    out = subprocess.run(
        ["curl", "-sS", "--noproxy", "", "-o", "/dev/null", "-w", fmt, *args, url],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    got, code = out.stdout.split()
    if int(got) != size or code != "200":
        raise RuntimeError(f"curl {args}: {out.stdout} {out.stderr}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=200_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--copy", action="store_true", help="relay without os.splice")
    args = parser.parse_args()
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(args.size)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        proxy = ProxyThread(
            Ruleset(["bench.test", "127.0.0.1/32"]),
            resolver=resolve,
            use_splice=not args.copy,
        )
        proxy.start()
        http_l, socks_l = listener(), listener()
        hp, sp = http_l.getsockname()[1], socks_l.getsockname()[1]
        proxy.add_run("bench", http_l, socks_l)
        modes = {
            "direct": (f"http://127.0.0.1:{port}/", ()),
            "plain HTTP": (f"http://bench.test:{port}/", ("-x", f"http://127.0.0.1:{hp}")),
            "CONNECT": (f"http://bench.test:{port}/", ("-p", "-x", f"http://127.0.0.1:{hp}")),
            "SOCKS5": (f"http://bench.test:{port}/", ("-x", f"socks5h://127.0.0.1:{sp}")),
        }
        times: dict[str, list[float]] = {m: [] for m in modes}
        cpu: dict[str, float] = dict.fromkeys(modes, 0.0)
        for url, extra in modes.values():  # warm-up
            curl(args.size, url, *extra)
        for r in range(args.rounds):
            order = list(modes.items())
            if r % 2:
                order.reverse()
            for name, (url, extra) in order:
                start, cpu_start = time.perf_counter(), time.process_time()
                curl(args.size, url, *extra)
                times[name].append(time.perf_counter() - start)
                cpu[name] += time.process_time() - cpu_start
        summary = proxy.finish_run("bench")
        proxy.close()
        relay = "copy" if args.copy else "splice"
        print(f"{args.size / 1e6:.0f} MB x {args.rounds} rounds, tunnel relay: {relay}")
        for name, samples in times.items():
            rate = args.size / statistics.median(samples) / 1e6
            per_gb = cpu[name] / (args.size * args.rounds / 1e9)
            print(f"  {name:<11} {rate:7.0f} MB/s (median), proxy CPU {per_gb:5.2f} s/GB")
        print(f"  proxy summary: {summary}")
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
