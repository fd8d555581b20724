"""3. Concurrent scaling: N sandboxes started at once from one process, and
the throughput of short runs.

Start-up at scale (N = 10, 100, 1000): one fresh process per (variant, N)
enters a new memory cgroup (a child of the caller's) and starts N sandboxes
of ``/bin/sh -c 'echo "$0"; exec /bin/sleep S' INDEX`` at once:

- nanobox (threads): N threads each calling ``Sandbox.run`` (one shared
  ``Sandbox``; its fork server warmed by one run first); nanobox (asyncio):
  ``asyncio.gather`` of N ``run_async``. Each INDEX line is timestamped by
  the ``on_stdout`` callback.
- peers: N ``os.posix_spawn`` of ``PEER /bin/sh -c ...``, all writing to one
  pipe that a thread reads and timestamps (perf-baselines.md §3).

"all running" = first launch → last INDEX line; p50/p90 = own launch → own
line; failures = non-zero exits, exceptions, missing lines. Peak memory:
the cgroup's usage (plus, for nanobox, its run groups' hierarchical usage)
sampled every 50 ms, minus the idle level before the launch; and
system-wide MemTotal-MemAvailable the same way (noisy on a shared host).
S = 2 s for N ≤ 100 and 25 s for N = 1000 ("peak alive" says how many
were running at the same moment).

Throughput: M runs of ``/bin/true`` with K concurrent callers (threads,
asyncio tasks, or K threads each spawning a peer), runs per second.

    python bench/scaling.py [--quick] [--counts 10,100,1000] [--json FILE]
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import _common as c

SAMPLE_S = 0.05
SCRIPT = 'echo "$0"; exec /bin/sleep {s}'


class Sampler(threading.Thread):
    def __init__(self, group: c.MemoryGroup, nanobox: bool) -> None:
        super().__init__(daemon=True)
        self.group = group
        self.nanobox = nanobox
        self.stop = threading.Event()
        self.peak_cg = 0
        self.peak_sys = 0
        self.base_cg = self._cg()
        self.base_sys = c.meminfo_used()

    def _cg(self) -> int:
        total = self.group.usage() or 0
        if self.nanobox:
            total += c.nanobox_cgroup_usage() or 0
        return total

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak_cg = max(self.peak_cg, self._cg())
            self.peak_sys = max(self.peak_sys, c.meminfo_used())
            self.stop.wait(SAMPLE_S)

    def result(self) -> dict[str, Any]:
        self.stop.set()
        self.join()
        return {
            "peak_cgroup_delta_mib": max(0, self.peak_cg - self.base_cg) / 2**20,
            "peak_cgroup_mib": self.peak_cg / 2**20,
            "peak_system_delta_mib": max(0, self.peak_sys - self.base_sys) / 2**20,
            "cgroup": self.group.path,
            "cgroup_error": self.group.error,
        }


def _peak_alive(line: list[float | None], end: list[float | None]) -> int:
    """Most sandboxes whose payload was running at the same moment."""
    events = []
    for a, b in zip(line, end, strict=True):
        if a is not None and b is not None:
            events += [(a, 1), (b, -1)]
    alive = peak = 0
    for _t, d in sorted(events):
        alive += d
        peak = max(peak, alive)
    return peak


def _finish(
    n: int,
    t0: float,
    launch: list[float],
    line: list[float | None],
    fails: list[str],
    done_t: float,
    mem: dict[str, Any],
    end: list[float | None],
) -> dict[str, Any]:
    got = [t for t in line if t is not None]
    lat = [lt - la for lt, la in zip(line, launch, strict=True) if lt is not None]
    missing = n - len(got)
    return {
        "n": n,
        "all_running_s": (max(got) - t0) if len(got) == n else None,
        "last_line_s": (max(got) - t0) if got else None,
        "start_p50_s": c.percentile(lat, 50) if lat else None,
        "start_p90_s": c.percentile(lat, 90) if lat else None,
        "launch_span_s": (max(launch) - t0) if launch else None,
        "all_done_s": done_t - t0,
        "failed": len(fails) + missing if missing > len(fails) else max(len(fails), missing),
        "missing_lines": missing,
        "peak_alive": _peak_alive(line, end),
        "errors": fails[:5],
        **mem,
    }


def one_peer(prefix: list[str], n: int, sleep_s: int) -> dict[str, Any]:
    group = c.MemoryGroup(f"nbbench-{os.getpid()}")
    group.join()
    sampler = Sampler(group, nanobox=False)
    sampler.start()
    r, w = os.pipe()
    line: list[float | None] = [None] * n
    end: list[float | None] = [None] * n
    launch: list[float] = [0.0] * n

    def reader() -> None:
        buf = b""
        with os.fdopen(r, "rb", buffering=0) as fh:
            while True:
                chunk = fh.read(65536)
                if not chunk:
                    return
                now = time.perf_counter()
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for ln in lines:
                    if ln.strip().isdigit() and int(ln) < n:
                        line[int(ln)] = now

    rt = threading.Thread(target=reader, daemon=True)
    rt.start()
    fails: list[str] = []
    pids: dict[int, int] = {}
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, w, 1),
        (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
    ]
    t0 = time.perf_counter()
    for i in range(n):
        argv = [*prefix, "/bin/sh", "-c", SCRIPT.format(s=sleep_s), str(i)]
        launch[i] = time.perf_counter()
        try:
            pids[os.posix_spawn(argv[0], argv, os.environ, file_actions=actions)] = i
        except OSError as exc:
            fails.append(f"spawn {i}: {exc}")
    os.close(w)
    while pids:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        i = pids.pop(pid, -1)
        if i >= 0:
            end[i] = time.perf_counter()
        if i >= 0 and status != 0:
            fails.append(f"{i}: wait status {status}")
    done_t = time.perf_counter()
    rt.join(10)
    mem = sampler.result()
    group.remove()
    return _finish(n, t0, launch, line, fails, done_t, mem, end)


def one_nanobox(mode: str, n: int, sleep_s: int) -> dict[str, Any]:
    import nanobox

    c.raise_nofile()
    group = c.MemoryGroup(f"nbbench-{os.getpid()}")
    group.join()  # before the fork server starts: it lands in the group too
    box = nanobox.Sandbox()
    box.run(["/bin/true"])  # warm: the fork server exists
    sampler = Sampler(group, nanobox=True)
    sampler.start()
    line: list[float | None] = [None] * n
    end: list[float | None] = [None] * n
    launch: list[float] = [0.0] * n
    fails: list[str] = []
    argv = ["/bin/sh", "-c", SCRIPT.format(s=sleep_s)]

    def seen(i: int) -> Any:
        def cb(_chunk: bytes) -> None:
            if line[i] is None:
                line[i] = time.perf_counter()

        return cb

    def check(i: int, res: Any) -> None:
        end[i] = time.perf_counter()
        if isinstance(res, BaseException):
            fails.append(f"{i}: {type(res).__name__}: {res}")
        elif res.returncode != 0:
            fails.append(f"{i}: exit {res.returncode} {res.outcome.value} {res.stderr[-200:]!r}")

    t0 = time.perf_counter()
    if mode == "threads":

        def work(i: int) -> None:
            launch[i] = time.perf_counter()
            try:
                res: Any = box.run([*argv, str(i)], on_stdout=seen(i))
            except Exception as exc:  # noqa: BLE001
                res = exc
            check(i, res)

        ths = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(n)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
    else:

        async def go() -> None:
            async def one(i: int) -> None:
                launch[i] = time.perf_counter()
                try:
                    res: Any = await box.run_async([*argv, str(i)], on_stdout=seen(i))
                except Exception as exc:  # noqa: BLE001
                    res = exc
                check(i, res)

            await asyncio.gather(*(one(i) for i in range(n)))

        asyncio.run(go())
    done_t = time.perf_counter()
    mem = sampler.result()
    box.close()
    try:  # stop the fork server: it lives in the group too
        from nanobox._linux import client

        client.shutdown()
    except Exception:  # noqa: BLE001 - best effort
        pass
    group.remove()
    return _finish(n, t0, launch, line, fails, done_t, mem, end)


def throughput(variant: str, prefix: list[str] | None, k: int, m: int) -> dict[str, Any]:
    fails: list[str] = []
    if variant.startswith("nanobox"):
        import nanobox

        box = nanobox.Sandbox()
        box.run(["/bin/true"])
        if variant == "nanobox (asyncio)":

            async def go() -> None:
                sem = asyncio.Semaphore(k)

                async def one() -> None:
                    async with sem:
                        try:
                            r = await box.run_async(["/bin/true"])
                            if r.returncode:
                                fails.append(f"exit {r.returncode}")
                        except Exception as exc:  # noqa: BLE001
                            fails.append(str(exc))

                await asyncio.gather(*(one() for _ in range(m)))

            t0 = time.perf_counter()
            asyncio.run(go())
            return {
                "k": k,
                "m": m,
                "runs_per_s": m / (time.perf_counter() - t0),
                "failed": len(fails),
                "errors": fails[:3],
            }

        def call() -> None:
            r = box.run(["/bin/true"])
            if r.returncode:
                raise RuntimeError(f"exit {r.returncode}")
    else:
        assert prefix is not None
        argv = [*prefix, "/bin/true"]

        def call() -> None:
            _dt, status = c.time_command(argv)
            if status:
                raise RuntimeError(f"wait status {status}")

    counter = iter(range(m))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if next(counter, None) is None:
                    return
            try:
                call()
            except Exception as exc:  # noqa: BLE001
                fails.append(str(exc))

    t0 = time.perf_counter()
    ths = [threading.Thread(target=worker) for _ in range(k)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    return {
        "k": k,
        "m": m,
        "runs_per_s": m / (time.perf_counter() - t0),
        "failed": len(fails),
        "errors": fails[:3],
    }


# --------------------------------------------------------------------------- driver


def _sub(args: list[str], timeout: float) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip()[-800:]}")
    data: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return data


def measure(counts: list[int], tp_k: list[int], tp_m: int) -> dict[str, Any]:
    skipped: dict[str, str] = {}
    errors: dict[str, str] = {}
    with c.workdir("nanobox-bench-cfg-") as cfg, c.workdir() as cwd:
        peers, peer_skips = c.working_peers(cfg, cwd, ["bwrap", "unshare", "firejail", "srt"])
        skipped.update(peer_skips)
        variants = ["nanobox (threads)", "nanobox (asyncio)", *peers]
        start: dict[str, dict[str, Any]] = {}
        for n in counts:
            sleep_s = 2 if n <= 100 else 25
            for name in c.alternating(variants, counts.index(n)):
                if name == "srt" and n > 10:
                    skipped[f"srt @{n}"] = "not run above 10 (fails at 100, perf-baselines.md §3)"
                    continue
                if name == "firejail" and n > 100:
                    skipped[f"firejail @{n}"] = "not run at 1000 (time budget)"
                    continue
                key = f"{name}@{n}"
                args = ["--one", name, str(n), str(sleep_s), cfg]
                got = c.guarded(errors, key, functools.partial(_sub, args, 120 + n * 0.5))
                if got is not None:
                    got["sleep_s"] = sleep_s
                    start.setdefault(name, {})[str(n)] = got
        tput: dict[str, dict[str, Any]] = {}
        tp_variants = ["nanobox (threads)", "nanobox (asyncio)"] + [
            p for p in ("bwrap", "unshare") if p in peers
        ]
        for i, k in enumerate(tp_k):
            for name in c.alternating(tp_variants, i):
                key = f"throughput {name} k={k}"
                args = ["--throughput", name, str(k), str(tp_m), cfg]
                got = c.guarded(errors, key, functools.partial(_sub, args, 300))
                if got is not None:
                    tput.setdefault(name, {})[str(k)] = got
    return {
        "counts": counts,
        "start": start,
        "throughput": tput,
        "throughput_m": tp_m,
        "skipped": skipped,
        "errors": errors,
        "goals": goals(start, counts),
    }


def goals(start: dict[str, Any], counts: list[int]) -> list[dict[str, Any]]:
    n = str(max(counts))
    bw = start.get("bwrap", {}).get(n, {})
    out = []
    for mode in ("threads", "asyncio"):
        nb = start.get(f"nanobox ({mode})", {}).get(n, {})
        t_nb, t_bw = nb.get("all_running_s"), bw.get("all_running_s")
        failed = nb.get("failed")
        met = None
        if nb:
            met = failed == 0 and t_nb is not None and t_bw is not None and t_nb <= t_bw
        out.append(
            {
                "goal": f"{n} concurrent sandboxes ({mode}): zero failures, all running within "
                "bwrap's time",
                "value": c.ratio(t_nb, t_bw),
                "met": met,
                "shown": f"{failed} failed; all running in {c.fmt(t_nb)} s "
                f"vs bwrap {c.fmt(t_bw)} s",
            }
        )
    return out


def table(res: dict[str, Any]) -> str:
    rows = []
    for n in res["counts"]:
        for name, per_n in res["start"].items():
            d = per_n.get(str(n))
            if d is None:
                continue
            bw = res["start"].get("bwrap", {}).get(str(n), {}).get("all_running_s")
            rows.append(
                [
                    f"**{name}**" if name.startswith("nanobox") or name == "bwrap" else name,
                    n,
                    d["sleep_s"],
                    c.fmt(d["all_running_s"]),
                    c.fmt_ratio(c.ratio(d["all_running_s"], bw)),
                    f"{c.fmt(d['start_p50_s'], 3)} / {c.fmt(d['start_p90_s'], 3)}",
                    d["failed"],
                    c.fmt(d["peak_cgroup_delta_mib"], 0),
                    c.fmt(d["peak_cgroup_delta_mib"] / n),
                    c.fmt(d["peak_system_delta_mib"], 0),
                    d.get("peak_alive", "-"),
                ]
            )
    text = c.md_table(
        [
            "variant",
            "N",
            "sleep s",
            "all running s",
            "÷ bwrap",
            "start p50 / p90 s",
            "failed",
            "peak cgroup Δ MiB",
            "per sandbox MiB",
            "peak system Δ MiB",
            "peak alive",
        ],
        rows,
    )
    trows = []
    ks = sorted({int(k) for per in res["throughput"].values() for k in per})
    for name, per_k in res["throughput"].items():
        trows.append(
            [name]
            + [
                c.fmt(per_k.get(str(k), {}).get("runs_per_s"), 1)
                + (
                    f" ({per_k[str(k)]['failed']} failed)"
                    if per_k.get(str(k), {}).get("failed")
                    else ""
                )
                for k in ks
            ]
        )
    text += "\n\nThroughput of `/bin/true` runs (runs/s, "
    text += f"{res['throughput_m']} runs, K concurrent callers):\n\n"
    text += c.md_table(["variant"] + [f"K={k}" for k in ks], trows)
    notes = [f"- skipped **{k}**: {v}" for k, v in res["skipped"].items()]
    notes += [f"- error in **{k}**: {v}" for k, v in res["errors"].items()]
    for name, per_n in res["start"].items():
        for n, d in per_n.items():
            if d.get("errors"):
                notes.append(f"- {name}@{n} first errors: {'; '.join(d['errors'])[:400]}")
    return text + ("\n\n" + "\n".join(notes) if notes else "")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("--one", "--throughput"):
        what, name = sys.argv[1], sys.argv[2]
        a, b, cfg = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        prefix = None
        if not name.startswith("nanobox"):
            p = c.peer_prefixes(cfg)[name]
            assert isinstance(p, list)
            prefix = p
        with c.workdir() as cwd:
            os.chdir(cwd)
            if what == "--one":
                if prefix is None:
                    out = one_nanobox(name.split("(")[1].rstrip(")"), a, b)
                else:
                    out = one_peer(prefix, a, b)
            else:
                out = throughput(name, prefix, a, b)
            os.chdir("/")
        print(json.dumps(out))
        return
    p = c.base_args(__doc__.splitlines()[0])
    p.add_argument("--counts", default="10,100,1000")
    p.add_argument("--throughput-k", default="1,8")
    p.add_argument("--throughput-m", type=int, default=120)
    a = p.parse_args()
    counts = [int(x) for x in a.counts.split(",")]
    ks = [int(x) for x in a.throughput_k.split(",")]
    m = a.throughput_m
    if a.quick:
        counts, ks, m = [10, 50], [1, 4], 20
    res = measure(counts, ks, m)
    c.emit(res, a.json, table)


if __name__ == "__main__":
    main()
