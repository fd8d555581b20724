"""Run every nanobox benchmark side by side and report.

    .venv/bin/python bench/run_all.py            # full run (~10 min on 2 cores)
    .venv/bin/python bench/run_all.py --quick    # tiny counts, for development
    .venv/bin/python bench/run_all.py --only startup,memory

Each measurement module runs in its own process (a crash or a hang of one
is recorded, the others still run); the merged results go to
``bench/results/<date>.json`` and a markdown report is printed to stdout
(``--markdown FILE`` also writes it). ``bench/plot.py`` then draws the PNGs.
Install the peers first: ``bash bench/install_peers.sh``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import _common as c
import accounting
import floor
import hotpath
import memory
import proxy
import scaling
import startup

MODULES = {
    "startup": (startup, 900),
    "memory": (memory, 900),
    "scaling": (scaling, 1200),
    "proxy": (proxy, 600),
    "accounting": (accounting, 600),
    "hotpath": (hotpath, 300),
    "floor": (floor, 600),
}
TITLES = {
    "startup": "1. Start latency of /bin/true",
    "memory": "2. Memory per sandbox (sleep 30 running)",
    "scaling": "3. Concurrent scaling",
    "proxy": "4. Proxy throughput",
    "accounting": "5. Accounting overhead (work measured inside the workload)",
    "hotpath": "Profile: where a warm run's milliseconds go",
    "floor": "The floor of a forked-Python sandbox (no server, bwrap's mounts)",
}


def run_module(name: str, quick: bool, out_dir: str) -> dict[str, Any]:
    _mod, timeout = MODULES[name]
    path = os.path.join(out_dir, f"{name}.json")
    argv = [sys.executable, os.path.join(c.BENCH_DIR, f"{name}.py"), "--json", path]
    if quick:
        argv.append("--quick")
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s", "elapsed_s": time.monotonic() - t0}
    elapsed = time.monotonic() - t0
    if proc.returncode != 0 or not os.path.exists(path):
        return {
            "error": f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}",
            "elapsed_s": elapsed,
        }
    with open(path) as fh:
        data: dict[str, Any] = json.load(fh)
    data["elapsed_s"] = elapsed
    if proc.stderr.strip():
        data["stderr_tail"] = proc.stderr.strip()[-600:]
    return data


def goals_table(results: dict[str, Any]) -> str:
    rows = []
    for name in MODULES:
        for g in results.get(name, {}).get("goals", []) or []:
            status = {True: "met", False: "**missed**", None: "not measured"}[g.get("met")]
            rows.append([g["goal"], g.get("shown", ""), status])
    return c.md_table(["goal", "measured", "status"], rows)


def report(results: dict[str, Any]) -> str:
    m = results["machine"]
    mem = (m.get("memory_bytes") or 0) / 2**30
    lines = [
        f"# nanobox benchmarks — {m['date']}",
        "",
        f"Machine: {m.get('os')}, kernel {m.get('kernel')}, {m.get('cpus')} x {m.get('cpu')}, "
        f"{mem:.0f} GiB, uid {m.get('uid')}, load average at start "
        f"{', '.join(f'{x:.2f}' for x in m.get('loadavg', ()))}. Python {m.get('python')} "
        f"(workloads: {m.get('system_python')}), nanobox {m.get('nanobox')} "
        f"({m.get('commit')}); {m.get('bwrap')}, firejail {m.get('firejail')}, "
        f"{m.get('unshare')}, srt {m.get('srt')} (node {m.get('node')}).",
        "",
        "## Goals",
        "",
        goals_table(results),
    ]
    for name, title in TITLES.items():
        if name not in results:
            continue
        lines += ["", f"## {title}", ""]
        data = results[name]
        if "error" in data and len(data) <= 2:
            lines.append(f"**failed**: {data['error']}")
            continue
        mod = MODULES[name][0]
        try:
            lines.append(mod.table(data))
        except Exception as exc:  # noqa: BLE001 - a broken table must not lose the rest
            lines.append(f"(cannot format: {type(exc).__name__}: {exc})")
        lines.append(f"\n_({data.get('elapsed_s', 0):.0f} s)_")
    return "\n".join(lines) + "\n"


def main() -> None:
    c.private_tmpdir()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny counts (development)")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(MODULES)}")
    p.add_argument("--skip", default="", help="comma-separated modules to skip")
    p.add_argument("--out", help="results JSON (default bench/results/<date>.json)")
    p.add_argument("--markdown", help="also write the markdown report here")
    p.add_argument("--plot", action="store_true", help="run bench/plot.py afterwards")
    a = p.parse_args()
    names = a.only.split(",") if a.only else list(MODULES)
    names = [n for n in names if n not in a.skip.split(",")]
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        p.error(f"unknown module(s): {', '.join(unknown)}")
    stamp = time.strftime("%Y-%m-%d-%H%M%S")
    out = a.out or os.path.join(c.RESULTS_DIR, f"{stamp}.json")
    part_dir = os.path.join(c.RESULTS_DIR, f"{stamp}.parts")
    os.makedirs(part_dir, exist_ok=True)
    results: dict[str, Any] = {"machine": c.machine_info(), "quick": a.quick}
    t0 = time.monotonic()
    for name in names:
        print(f"[run_all] {name} ...", file=sys.stderr, flush=True)
        results[name] = run_module(name, a.quick, part_dir)
        print(
            f"[run_all] {name}: {results[name].get('elapsed_s', 0):.0f} s"
            + (f" ERROR {results[name]['error'][:200]}" if "error" in results[name] else ""),
            file=sys.stderr,
            flush=True,
        )
        c.write_json(out, results)  # keep what we have if a later module hangs
    results["elapsed_s"] = time.monotonic() - t0
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["goals"] = [g for n in MODULES for g in (results.get(n, {}).get("goals") or [])]
    c.write_json(out, results)
    text = report(results)
    if a.markdown:
        with open(a.markdown, "w") as fh:
            fh.write(text)
    print(text)
    print(f"[run_all] results: {out} ({results['elapsed_s']:.0f} s)", file=sys.stderr)
    if a.plot:
        subprocess.run([sys.executable, os.path.join(c.BENCH_DIR, "plot.py"), out], check=False)


if __name__ == "__main__":
    main()
