"""2. Memory kept alive per sandbox while ``/bin/sleep 30`` runs.

For N = 1, 10, 100 sandboxes at once, sum ``/proc/PID/smaps_rollup`` (Pss;
Private_Dirty = heap and stack, the marginal cost) over every process that
exists beside the workloads, the ``sleep`` processes excluded, once all N
``sleep`` are running plus 1 s. Median of ``--repeats``; reported per
sandbox (total ÷ N).

- nanobox: the fork server and every sandbox's init (PID 1), found as the
  process tree below the fork server (a child of this process); the runs
  are ``Sandbox.run_async`` tasks of this process, cancelled afterwards.
  ``caller Δ`` is the growth of this (calling) process's own PSS: the
  client's per-run state, plus the allowlist proxy thread when it exists.
- peers: the process tree of each ``PEER /bin/sleep 30`` (bwrap, unshare,
  firejail; sandbox-runtime at 1 and 10 only: it cannot start 100).

    python bench/memory.py [--quick] [--counts 1,10,100] [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import sys
import time
from typing import Any

import _common as c

SLEEP = ["/bin/sleep", "30"]
SETTLE_S = 1.0
START_TIMEOUT_S = 120.0


def _measure_tree(roots: list[int], expect_sleeps: int) -> dict[str, Any]:
    """Wait for ``expect_sleeps`` sleeps below ``roots``, settle, sum PSS."""
    deadline = time.monotonic() + START_TIMEOUT_S
    t0 = time.monotonic()
    while True:
        pids = c.descendants(roots)
        sleeps = [p for p in pids if c.comm(p) == "sleep"]
        if len(sleeps) >= expect_sleeps:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(sleeps)} of {expect_sleeps} sleeps started")
        time.sleep(0.05)
    started_s = time.monotonic() - t0
    time.sleep(SETTLE_S)
    pids = c.descendants(roots)
    total: dict[str, int] = {}
    procs = threads = 0
    by_comm: dict[str, int] = {}
    for pid in pids:
        name = c.comm(pid)
        if name == "sleep":
            continue
        roll = c.smaps_rollup(pid)
        if not roll:
            continue  # gone meanwhile, or a kernel thread
        procs += 1
        threads += c.threads(pid)
        by_comm[name] = by_comm.get(name, 0) + 1
        for key in ("Pss", "Rss", "Private_Dirty", "Private_Clean", "Shared_Clean"):
            total[key] = total.get(key, 0) + roll.get(key, 0)
    return {
        "pss": total.get("Pss", 0),
        "rss": total.get("Rss", 0),
        "private_dirty": total.get("Private_Dirty", 0),
        "private_clean": total.get("Private_Clean", 0),
        "procs": procs,
        "threads": threads,
        "by_comm": by_comm,
        "wait_started_s": started_s,
    }


def measure_peer(prefix: list[str], n: int, cwd: str) -> dict[str, Any]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(n):
            procs.append(
                subprocess.Popen(
                    [*prefix, *SLEEP],
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        return _measure_tree([p.pid for p in procs], n)
    finally:
        c.kill_tree([p.pid for p in procs])
        for p in procs:
            p.wait()


def _server_pid() -> int | None:
    for pid in c.children_map().get(os.getpid(), []):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"forkserver" in fh.read():
                    return pid
        except OSError:
            continue
    return None


def measure_nanobox(policy: Any, n: int, cwd: str) -> dict[str, Any]:
    import nanobox

    async def go() -> dict[str, Any]:
        before = c.smaps_rollup(os.getpid()).get("Pss", 0)
        box = nanobox.Sandbox(policy)
        tasks = [asyncio.ensure_future(box.run_async(SLEEP, cwd=cwd)) for _ in range(n)]
        try:
            await asyncio.sleep(0.05)
            deadline = time.monotonic() + START_TIMEOUT_S
            server = _server_pid()
            while server is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                server = _server_pid()
            if server is None:
                raise RuntimeError("the nanobox fork server was not found")
            failed = [t for t in tasks if t.done() and t.exception() is not None]
            if failed:
                raise RuntimeError(f"run failed: {failed[0].exception()}")
            loop = asyncio.get_running_loop()
            res = await loop.run_in_executor(None, _measure_tree, [server], n)
            res["caller_delta_pss"] = c.smaps_rollup(os.getpid()).get("Pss", 0) - before
            return res
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            box.close()

    return asyncio.run(go())


def measure(counts: list[int], repeats: int) -> dict[str, Any]:
    import nanobox

    c.raise_nofile()
    skipped: dict[str, str] = {}
    errors: dict[str, str] = {}
    variants: dict[str, Any] = {}
    with c.workdir("nanobox-bench-cfg-") as cfg, c.workdir() as cwd:
        peers, peer_skips = c.working_peers(cfg, cwd, ["bwrap", "unshare", "firejail", "srt"])
        skipped.update(peer_skips)
        runners: dict[str, Any] = {
            "nanobox": lambda n: measure_nanobox(nanobox.Policy(), n, cwd),
        }
        ok, why = c.nanobox_allowlist_support()
        if ok:
            try:
                net = c.allowlist_network(["127.0.0.1"])
                runners["nanobox +allowlist"] = lambda n: measure_nanobox(
                    nanobox.Policy(network=net), n, cwd
                )
            except Exception as exc:  # noqa: BLE001
                skipped["nanobox +allowlist"] = str(exc)
        else:
            skipped["nanobox +allowlist"] = why
        for name, prefix in peers.items():
            runners[name] = lambda n, p=prefix: measure_peer(p, n, cwd)
        for n in counts:
            # 100 at once is slow to start and steady: fewer repeats
            for r in range(repeats if n <= 10 else max(1, repeats - 2)):
                for name in c.alternating(list(runners), r):
                    if name == "srt" and n > 10:
                        skipped["srt @100"] = (
                            "not measured at 100: srt fails to start 100 at once "
                            "(perf-baselines.md §3)"
                        )
                        continue
                    key = f"{name}@{n}"
                    got = c.guarded(errors, key, functools.partial(runners[name], n))
                    if got is not None:
                        variants.setdefault(name, {}).setdefault(str(n), []).append(got)
    table_rows: dict[str, Any] = {}
    for name, per_n in variants.items():
        table_rows[name] = {}
        for n, samples in per_n.items():
            k = int(n)
            row: dict[str, Any] = {"samples": samples}
            for key in ("pss", "private_dirty", "rss", "caller_delta_pss"):
                vals = [s[key] for s in samples if key in s]
                if vals:
                    row[f"{key}_total_mib"] = c.percentile(vals, 50) / 2**20
                    row[f"{key}_per_sandbox_mib"] = c.percentile(vals, 50) / 2**20 / k
            row["procs"] = samples[-1]["procs"]
            row["threads"] = samples[-1]["threads"]
            row["by_comm"] = samples[-1]["by_comm"]
            table_rows[name][n] = row
    return {
        "unit": "MiB",
        "counts": counts,
        "repeats": repeats,
        "variants": table_rows,
        "skipped": skipped,
        "errors": errors,
        "goals": goals(table_rows, counts),
    }


def goals(v: dict[str, Any], counts: list[int]) -> list[dict[str, Any]]:
    n = str(max(counts))
    val = v.get("nanobox", {}).get(n, {}).get("pss_per_sandbox_mib")
    bw = v.get("bwrap", {}).get(n, {}).get("pss_per_sandbox_mib")
    shown = f"{c.fmt(val)} MiB PSS per sandbox at {n} (bwrap {c.fmt(bw)})"
    return [
        {
            "goal": f"supervisor memory per sandbox at {n} concurrent ≤ 1 MiB PSS",
            "value": val,
            "met": None if val is None else val <= 1.0,
            "shown": shown,
        }
    ]


def table(res: dict[str, Any]) -> str:
    rows = []
    bw = res["variants"].get("bwrap", {})
    for name, per_n in res["variants"].items():
        for n in sorted(per_n, key=int):
            row = per_n[n]
            base = bw.get(n, {}).get("pss_per_sandbox_mib")
            rows.append(
                [
                    f"**{name}**" if name.startswith("nanobox") or name == "bwrap" else name,
                    n,
                    f"{row['procs']} / {row['threads']}",
                    c.fmt(row.get("pss_total_mib")),
                    c.fmt(row.get("pss_per_sandbox_mib")),
                    c.fmt_ratio(c.ratio(row.get("pss_per_sandbox_mib"), base)),
                    c.fmt(row.get("private_dirty_per_sandbox_mib")),
                    c.fmt(row.get("caller_delta_pss_total_mib")),
                ]
            )
    text = c.md_table(
        [
            "peer",
            "N",
            "procs / threads",
            "PSS total MiB",
            "PSS per sandbox MiB",
            "÷ bwrap",
            "private dirty per sandbox MiB",
            "caller Δ PSS MiB",
        ],
        rows,
    )
    notes = [f"- skipped **{k}**: {v}" for k, v in res["skipped"].items()]
    notes += [f"- error in **{k}**: {v}" for k, v in res["errors"].items()]
    return text + ("\n\n" + "\n".join(notes) if notes else "")


def main() -> None:
    p = c.base_args(__doc__.splitlines()[0])
    p.add_argument("--counts", default="1,10,100")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    counts = [int(x) for x in a.counts.split(",")]
    repeats = a.repeats
    if a.quick:
        counts, repeats = [1, 10], 1
    res = measure(counts, repeats)
    c.emit(res, a.json, table)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
