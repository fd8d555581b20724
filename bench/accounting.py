"""5. Accounting overhead: does the sandbox slow the work itself?

The same workloads run outside (plain ``posix_spawn``) and inside nanobox
(warm ``Sandbox.run``: default policy, and with cgroup limits) and bwrap,
with the same interpreter (``/usr/bin/python3 -I -S``). Each workload times
its own work with ``perf_counter`` (best of 3 passes inside the process: the
host is shared and noise only ever adds time) and prints it, so sandbox
start-up is not in the number; the ratio to "direct" is the slow-down of the work itself
(cgroup accounting, seccomp filter, Landlock, namespaces):

- ``cpu``: a pure-Python integer loop (no syscalls);
- ``alloc``: allocation-heavy: 8 x 64 MiB bytearrays written page by page
  and freed (page faults, memory-cgroup charging) plus 1.5 M small objects;
- ``getppid``: 300 000 ``getppid()`` calls (the seccomp filter runs on
  every one; "nanobox, no seccomp" isolates its share);
- ``stat``: 100 000 ``stat("/usr/bin")`` (path walks in the sandbox's
  mount namespace, Landlock);
- ``connect``: 2 000 TCP connections to a listener of its own on loopback
  (every ``connect()`` in a sandbox is made by nanobox's connect helper, a
  seccomp notification each: see ``_linux/unixconnect.py``).

R rounds, the variants in alternating order; median of the work times.

    python bench/accounting.py [--quick] [--rounds 5] [--json FILE]
"""

from __future__ import annotations

import functools
import os
import subprocess
import time
from typing import Any

import _common as c

_HARNESS = """
import os, time
def work():
{body}
best = 1e9
for _ in range(3):
    t = time.perf_counter()
    work()
    best = min(best, time.perf_counter() - t)
print(best)
"""
WORKLOADS = {
    "cpu": """
    x = 0
    for i in range({n}):
        x = (x + i * i) % 1000003
""",
    "alloc": """
    for _ in range({n}):
        b = bytearray(64 << 20)
        for off in range(0, len(b), 4096):
            b[off] = 1
        del b
    objs = [(i, str(i)) for i in range(1500000)]
    del objs
""",
    "getppid": """
    for _ in range({n}):
        os.getppid()
""",
    "stat": """
    for _ in range({n}):
        os.stat("/usr/bin")
""",
    "connect": """
    import socket
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    where = srv.getsockname()
    for _ in range({n}):
        c = socket.socket()
        c.connect(where)
        a, _ = srv.accept()
        a.close()
        c.close()
    srv.close()
""",
}
SIZES = {"cpu": 2_000_000, "alloc": 4, "getppid": 300_000, "stat": 100_000, "connect": 2000}
QUICK_SIZES = {"cpu": 200_000, "alloc": 1, "getppid": 30_000, "stat": 10_000, "connect": 200}


def measure(rounds: int, quick: bool) -> dict[str, Any]:
    import nanobox

    sizes = QUICK_SIZES if quick else SIZES
    skipped: dict[str, str] = {}
    errors: dict[str, str] = {}
    py = [c.SYSTEM_PYTHON, "-I", "-S", "-c"]
    with c.workdir("nanobox-bench-cfg-") as cfg, c.workdir() as cwd:
        peers, peer_skips = c.working_peers(cfg, cwd, ["bwrap"])
        skipped.update(peer_skips)
        boxes = {
            "nanobox": nanobox.Sandbox(),
            "nanobox +limits": nanobox.Sandbox(
                nanobox.Policy(limits=nanobox.Limits(memory="1G", pids=64))
            ),
            "nanobox, no seccomp": nanobox.Sandbox(nanobox.Policy(syscalls="none")),
        }
        for box in boxes.values():
            box.run(["/bin/true"], cwd=cwd)

        def run(variant: str, code: str) -> tuple[float, float]:
            argv = [*py, code]
            t0 = time.perf_counter()
            if variant in boxes:
                r = boxes[variant].run(argv, cwd=cwd, text=True)
                out, err, rc = r.stdout, r.stderr, r.returncode
            else:
                prefix = peers.get(variant, [])
                p = subprocess.run(
                    [*prefix, *argv], cwd=cwd, capture_output=True, text=True, timeout=300
                )
                out, err, rc = p.stdout, p.stderr, p.returncode
            wall = time.perf_counter() - t0
            if rc != 0:
                raise RuntimeError(f"exit {rc}: {err.strip()[-300:]}")
            return float(out.strip().splitlines()[-1]), wall

        variants = ["direct", *boxes, *peers]
        work: dict[str, dict[str, list[float]]] = {w: {v: [] for v in variants} for w in WORKLOADS}
        walls: dict[str, dict[str, list[float]]] = {w: {v: [] for v in variants} for w in WORKLOADS}
        for wl, tmpl in WORKLOADS.items():
            code = _HARNESS.format(body=tmpl.format(n=sizes[wl]).strip("\n"))
            for v in variants:  # warm-up
                c.guarded(errors, f"{wl} warm-up {v}", functools.partial(run, v, code))
            for r in range(rounds):
                for v in c.alternating(variants, r):
                    got = c.guarded(errors, f"{wl} {v}", functools.partial(run, v, code))
                    if got is not None:
                        work[wl][v].append(got[0])
                        walls[wl][v].append(got[1])
        for box in boxes.values():
            box.close()
    results: dict[str, Any] = {}
    for wl in WORKLOADS:
        direct = c.percentile(work[wl]["direct"], 50) if work[wl]["direct"] else None
        results[wl] = {}
        for v in variants:
            s = c.summary(work[wl][v], 1e3)
            s["x_direct"] = c.ratio(s.get("median"), None if direct is None else direct * 1e3)
            s["wall_median_ms"] = c.percentile(walls[wl][v], 50) * 1e3 if walls[wl][v] else None
            results[wl][v] = s
    return {
        "unit": "ms of work (measured inside the workload)",
        "rounds": rounds,
        "sizes": sizes,
        "workloads": results,
        "skipped": skipped,
        "errors": errors,
        "goals": goals(results),
    }


def goals(res: dict[str, Any]) -> list[dict[str, Any]]:
    worst = None
    shown = []
    for wl, per in res.items():
        for v in ("nanobox", "nanobox +limits"):  # the policies users run
            x = per.get(v, {}).get("x_direct")
            if x is not None:
                worst = x if worst is None else max(worst, x)
                shown.append(f"{wl}/{v} {c.fmt_ratio(x)}")
    return [
        {
            "goal": "the sandbox slows the work itself by at most a few percent (≤ 1.05x)",
            "value": worst,
            "met": None if worst is None else worst <= 1.05,
            "shown": "; ".join(shown),
        }
    ]


def table(res: dict[str, Any]) -> str:
    rows = []
    for wl, per in res["workloads"].items():
        for v, s in per.items():
            rows.append(
                [
                    wl,
                    f"**{v}**" if v.startswith("nanobox") else v,
                    c.fmt(s.get("median")),
                    f"{c.fmt(s.get('p10'))}-{c.fmt(s.get('p90'))}",
                    c.fmt_ratio(s.get("x_direct")),
                    c.fmt(s.get("wall_median_ms")),
                    s.get("n"),
                ]
            )
    text = c.md_table(
        ["workload", "variant", "work median ms", "p10-p90", "÷ direct", "wall median ms", "n"],
        rows,
    )
    notes = [f"- skipped **{k}**: {v}" for k, v in res["skipped"].items()]
    notes += [f"- error in **{k}**: {v}" for k, v in res["errors"].items()]
    return text + ("\n\n" + "\n".join(notes) if notes else "")


def main() -> None:
    p = c.base_args(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    res = measure(2 if a.quick else a.rounds, a.quick)
    c.emit(res, a.json, table)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
