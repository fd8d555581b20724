"""1. Start latency of ``/bin/true``: nanobox (warm library, cold CLI) and peers.

Side by side in one run: R rounds; in each round every variant does 3
warm-up runs and then N timed runs, and the order of the variants is
reversed every other round. Times are pooled over the rounds (median, p10,
p90) and given as ratios to bubblewrap and to bare ``/bin/true``.

- Cold commands (``/bin/true``, peers, ``nanobox run -- /bin/true``, the
  bare venv interpreter ``python -c pass``): ``posix_spawn`` → ``waitpid``
  with stdio on /dev/null, from an empty directory (the same thing
  ``hyperfine -N`` times).
- Warm library: a worker process per variant keeps one ``nanobox.Sandbox``
  (and so its fork server) and times ``box.run(["/bin/true"])`` in a loop:
  default policy; ``Limits(memory="256M", pids=64)``; the allowlist proxy
  (skipped with a note while ``nanobox.Network`` has no allowlist mode);
  and the default policy as the unprivileged user ``nobody`` (root callers
  take nanobox's root path: a dedicated uid and idmapped workspace).
- Isolated starts: the default-policy warm library and bubblewrap again,
  with a pause of ``PAUSE_S`` before every run (a caller that does
  something else between runs, as an agent does). Back to back, a loop is
  bound by CPU per run; with a pause it measures the latency of one start
  on an idle host (for both: an idle vCPU wakes more slowly).

    python bench/startup.py [--quick] [--rounds 3] [--runs 50] [--json FILE]
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import time
from typing import Any

import _common as c

WARMUP = 3
PAUSE_S = 0.03
PAUSED_WARM = f"nanobox warm, {PAUSE_S * 1e3:.0f} ms apart"
PAUSED_BWRAP = f"bwrap, {PAUSE_S * 1e3:.0f} ms apart"
IN_CHECKOUT = "nanobox warm, in a git checkout"


# --------------------------------------------------------------------------- worker


def worker_main(variant: str) -> None:
    """Serve ``N`` lines on stdin with JSON lines of N warm-run times."""
    import nanobox

    if variant == "limits":
        policy = nanobox.Policy(limits=nanobox.Limits(memory="256M", pids=64))
    elif variant == "allowlist":
        net = c.allowlist_network(["127.0.0.1"])
        policy = nanobox.Policy(network=net)
    else:
        policy = nanobox.Policy()
    box = nanobox.Sandbox(policy)
    out = sys.stdout
    for line in sys.stdin:
        n, pause = int(line.split()[0]), float(line.split()[1])
        times: list[float] = []
        errors: list[str] = []
        for _ in range(n):
            if pause:
                time.sleep(pause)
            t0 = time.perf_counter()
            try:
                r = box.run(["/bin/true"])
                dt = time.perf_counter() - t0
                if r.returncode != 0:
                    errors.append(f"exit {r.returncode} ({r.outcome.value}) {r.stderr[-200:]!r}")
                    continue
            except Exception as exc:  # noqa: BLE001 - reported, not fatal
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            times.append(dt)
        out.write(json.dumps({"times": times, "errors": errors[:5], "failed": len(errors)}) + "\n")
        out.flush()


class Worker:
    """A warm-library variant living in its own process."""

    def __init__(self, variant: str, cwd: str, user: str | None = None) -> None:
        script = os.path.abspath(__file__)
        python = sys.executable
        env = dict(os.environ)
        kwargs: dict[str, Any] = {}
        if user is not None:
            # The venv's interpreter may sit under root's 0700 home: use the
            # system one with nanobox's source on the path.
            python = c.SYSTEM_PYTHON
            env["PYTHONPATH"] = os.path.join(c.REPO, "src") + os.pathsep + c.BENCH_DIR
            env["HOME"] = "/nonexistent"
            kwargs["user"] = user
            kwargs["group"] = pwd.getpwnam(user).pw_gid
            kwargs["extra_groups"] = []
        self.proc = subprocess.Popen(
            [python, script, "--worker", variant],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            text=True,
            **kwargs,
        )

    def batch(self, n: int, pause: float = 0.0) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(f"{n} {pause}\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError) as exc:
            line = ""
            err = str(exc)
        else:
            err = ""
        if not line:
            stderr = ""
            if self.proc.poll() is not None and self.proc.stderr is not None:
                stderr = self.proc.stderr.read()[-600:]
            raise RuntimeError(f"worker died {err} {stderr}".strip())
        data: dict[str, Any] = json.loads(line)
        return data

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --------------------------------------------------------------------------- driver


def measure(rounds: int, runs: int, *, nobody: bool = True) -> dict[str, Any]:
    skipped: dict[str, str] = {}
    errors: dict[str, str] = {}
    with c.workdir("nanobox-bench-cfg-") as cfg, c.workdir() as cwd:
        os.chmod(cwd, 0o777)  # the `nobody` worker's workspace too
        peers, peer_skips = c.working_peers(
            cfg, cwd, ["unshare", "bwrap", "firejail", "firejail-full", "srt"], full_firejail=True
        )
        skipped.update(peer_skips)
        cold: dict[str, list[str]] = {"true": ["/bin/true"]}
        for name, prefix in peers.items():
            cold[name] = [*prefix, "/bin/true"]
        if os.access(c.VENV_PYTHON, os.X_OK):
            cold["python -c pass (venv)"] = [c.VENV_PYTHON, "-c", "pass"]
        else:
            skipped["python -c pass (venv)"] = f"{c.VENV_PYTHON} not found"
        nb_cli = c.VENV_NANOBOX if os.access(c.VENV_NANOBOX, os.X_OK) else shutil.which("nanobox")
        compiled = c.compile_nanobox()
        if compiled is not None:
            errors["byte-compile nanobox"] = compiled
        if nb_cli:
            cold["nanobox CLI (cold)"] = [nb_cli, "run", "--", "/bin/true"]
        else:
            skipped["nanobox CLI (cold)"] = "the nanobox CLI is not installed"
        # The bare venv interpreter with site disabled (what the CLI could get).
        if os.access(c.VENV_PYTHON, os.X_OK):
            cold["python -S -c pass (venv)"] = [c.VENV_PYTHON, "-S", "-c", "pass"]

        workers: dict[str, Worker] = {}
        warm_specs: list[tuple[str, str, str | None]] = [
            ("nanobox warm", "default", None),
            ("nanobox warm +limits", "limits", None),
        ]
        ok, why = c.nanobox_allowlist_support()
        if ok:
            warm_specs.append(("nanobox warm +allowlist", "allowlist", None))
        else:
            skipped["nanobox warm +allowlist"] = why
        if nobody and os.getuid() == 0:
            try:
                pwd.getpwnam("nobody")
                warm_specs.append(("nanobox warm (uid nobody)", "default", "nobody"))
            except KeyError:
                skipped["nanobox warm (uid nobody)"] = "no user 'nobody'"
        warm_specs.append((PAUSED_WARM, "default", None))
        # The workspace a git checkout (this repository): every run's plan
        # looks for repositories below it to protect their hooks.
        checkout = c.REPO if os.path.isdir(os.path.join(c.REPO, ".git")) else None
        if checkout is not None:
            warm_specs.append((IN_CHECKOUT, "default", None))
        else:
            skipped[IN_CHECKOUT] = f"{c.REPO} is not a git checkout"
        for name, variant, user in warm_specs:
            try:
                w = Worker(variant, checkout if name == IN_CHECKOUT and checkout else cwd, user)
                probe = w.batch(1)
                if probe["failed"]:
                    raise RuntimeError("; ".join(probe["errors"]))
                workers[name] = w
            except Exception as exc:  # noqa: BLE001
                skipped[name] = f"{type(exc).__name__}: {exc}"

        pause = dict.fromkeys((PAUSED_WARM, PAUSED_BWRAP), PAUSE_S)
        if "bwrap" in cold:
            cold[PAUSED_BWRAP] = cold["bwrap"]
        names = list(cold) + list(workers)
        times: dict[str, list[float]] = {n: [] for n in names}
        failed: dict[str, int] = dict.fromkeys(names, 0)
        round_medians: dict[str, list[float]] = {n: [] for n in names}
        orders = []
        for r in range(rounds):
            order = c.alternating(names, r)
            orders.append(order)
            for name in order:
                got: list[float] = []
                if name in workers:
                    try:
                        workers[name].batch(WARMUP, pause.get(name, 0.0))
                        data = workers[name].batch(runs, pause.get(name, 0.0))
                    except Exception as exc:  # noqa: BLE001
                        errors[name] = f"{type(exc).__name__}: {exc}"
                        continue
                    got = data["times"]
                    failed[name] += data["failed"]
                    if data["errors"]:
                        errors[name] = "; ".join(data["errors"])
                else:
                    argv = cold[name]
                    for i in range(WARMUP + runs):
                        if name in pause:
                            time.sleep(pause[name])
                        dt, status = c.time_command(argv, cwd)
                        if status != 0:
                            failed[name] += 1
                            errors[name] = f"{' '.join(argv[:2])}: wait status {status}"
                            continue
                        if i >= WARMUP:
                            got.append(dt)
                times[name] += got
                if got:
                    round_medians[name].append(c.percentile(got, 50) * 1e3)
        for w in workers.values():
            w.close()
        hyperfine = c.guarded(errors, "hyperfine cross-check", lambda: _hyperfine(cold, cwd, runs))

    variants: dict[str, Any] = {}
    for name in names:
        s = c.summary(times[name], 1e3)
        s["failed"] = failed[name]
        s["round_medians"] = round_medians[name]
        s["kind"] = "warm" if name in workers else "cold"
        variants[name] = s
    base_true = variants.get("true", {}).get("median")
    for name, s in variants.items():
        # Isolated starts are compared with bwrap's isolated starts.
        bw = variants.get(PAUSED_BWRAP if name in pause else "bwrap", {})
        s["x_bwrap"] = c.ratio(s.get("median"), bw.get("median"))
        s["x_true"] = c.ratio(s.get("median"), base_true)
        # the same ratio within each round (robust to drift between rounds)
        bw_rounds = bw.get("round_medians", [])
        per = [c.ratio(a, b) for a, b in zip(s["round_medians"], bw_rounds, strict=False)]
        s["x_bwrap_rounds"] = [x for x in per if x is not None]
    return {
        "unit": "ms",
        "rounds": rounds,
        "runs_per_round": runs,
        "warmup": WARMUP,
        "pause_s": PAUSE_S,
        "orders": orders,
        "variants": variants,
        "skipped": skipped,
        "errors": errors,
        "hyperfine": hyperfine,
        "goals": goals(variants),
    }


def _hyperfine(cold: dict[str, list[str]], cwd: str, runs: int) -> dict[str, Any] | None:
    """Cross-check of the spawn timer: hyperfine -N on /bin/true and bwrap."""
    hf = shutil.which("hyperfine")
    if not hf or "bwrap" not in cold:
        return None
    import shlex

    with c.workdir("nanobox-bench-hf-") as tmp:
        out = os.path.join(tmp, "hf.json")
        cmd = [hf, "-N", "--warmup", "3", "--runs", str(max(10, runs)), "--export-json", out]
        for name in ("true", "bwrap"):
            cmd += ["-n", name, shlex.join(cold[name])]
        subprocess.run(cmd, cwd=cwd, capture_output=True, timeout=600, check=True)
        with open(out) as fh:
            data = json.load(fh)
    return {
        r["command"]: {"median_ms": r["median"] * 1e3, "mean_ms": r["mean"] * 1e3}
        for r in data["results"]
    }


def goals(v: dict[str, Any]) -> list[dict[str, Any]]:
    def med(name: str) -> float | None:
        m = v.get(name, {}).get("median")
        return None if m is None else float(m)

    out = []
    warm, lim, bw = med("nanobox warm"), med("nanobox warm +limits"), med("bwrap")
    cli, py, srt = med("nanobox CLI (cold)"), med("python -c pass (venv)"), med("srt")
    r = c.ratio(warm, bw)
    out.append(
        _goal(
            "warm library start (default policy) ≤ 1.0x bwrap (stretch ≤ 0.6x)",
            r,
            r is not None and r <= 1.0,
            c.fmt_ratio(r),
        )
    )
    r = c.ratio(med(PAUSED_WARM), med(PAUSED_BWRAP))
    out.append(
        _goal(
            f"(the same, starts {PAUSE_S * 1e3:.0f} ms apart: ≤ 1.0x bwrap started likewise)",
            r,
            r is not None and r <= 1.0,
            c.fmt_ratio(r),
        )
    )
    r = c.ratio(lim, bw)
    out.append(
        _goal(
            "warm library start with cgroup limits ≤ 1.3x bwrap",
            r,
            r is not None and r <= 1.3,
            c.fmt_ratio(r),
        )
    )
    r = c.ratio(cli, py)
    out.append(
        _goal(
            "cold CLI ≤ 3x bare venv interpreter (python -c pass)",
            r,
            r is not None and r <= 3.0,
            c.fmt_ratio(r),
        )
    )
    r = c.ratio(srt, cli)
    out.append(
        _goal(
            "cold CLI ≥ 10x faster than sandbox-runtime",
            r,
            r is not None and r >= 10.0,
            f"{c.fmt(r)}x faster" if r else "srt missing",
        )
    )
    return out


def _goal(name: str, value: float | None, met: bool, shown: str) -> dict[str, Any]:
    return {
        "goal": name,
        "value": value,
        "met": bool(met) if value is not None else None,
        "shown": shown,
    }


def table(res: dict[str, Any]) -> str:
    rows = []
    for name, s in sorted(res["variants"].items(), key=lambda kv: kv[1].get("median") or 1e9):
        rows.append(
            [
                f"**{name}**" if name.startswith("nanobox") or name == "bwrap" else name,
                s["kind"],
                c.fmt(s["median"]),
                f"{c.fmt(s['p10'])}-{c.fmt(s['p90'])}",
                c.fmt_ratio(s["x_bwrap"]),
                c.fmt_ratio(s["x_true"]),
                f"{s['n']}/{s['failed']}",
                " · ".join(c.fmt(m) for m in s["round_medians"]),
                " · ".join(f"{x:.2f}" for x in s.get("x_bwrap_rounds", [])),
            ]
        )
    text = c.md_table(
        [
            "variant",
            "kind",
            "median ms",
            "p10-p90 ms",
            "÷ bwrap",
            "÷ /bin/true",
            "runs/failed",
            "per-round medians",
            "÷ bwrap per round",
        ],
        rows,
    )
    notes = [
        f'- rows "... {res.get("pause_s", PAUSE_S) * 1e3:.0f} ms apart" pause before every run; '
        "their ÷ bwrap is to bwrap started the same way",
        f"- \"{IN_CHECKOUT}\": the workspace is this repository's checkout (the others' an "
        "empty directory): each run's plan looks for git repositories below it",
    ]
    notes += [f"- skipped **{k}**: {v}" for k, v in res["skipped"].items()]
    notes += [f"- error in **{k}**: {v}" for k, v in res["errors"].items()]
    if res.get("hyperfine"):
        hf = ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in res["hyperfine"].items())
        notes.append(f"- hyperfine -N cross-check (medians): {hf}")
    return text + ("\n\n" + "\n".join(notes) if notes else "")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2])
        return
    p = c.base_args(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--no-nobody", action="store_true", help="skip the uid-nobody variant")
    a = p.parse_args()
    rounds, runs = (2, 5) if a.quick else (a.rounds, a.runs)
    res = measure(rounds, runs, nobody=not a.no_nobody)
    c.emit(res, a.json, table)


if __name__ == "__main__":
    main()
