"""Draw the benchmark PNGs from a results JSON (needs matplotlib: the
``bench`` extra).

    .venv/bin/python bench/plot.py [bench/results/<date>.json] [--out-dir docs]

Writes ``benchmarks-startup.png`` (median start latency per peer and
variant, p10-p90 whiskers, log scale) and ``benchmarks-scaling.png`` (time
until all N sandboxes run, and peak memory per sandbox, vs N). Without an
argument the newest file in bench/results/ is used.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from typing import Any

import _common as c

COLORS = {
    "nanobox": "#d62728",
    "bwrap": "#1f77b4",
    "unshare": "#7f7f7f",
    "firejail": "#2ca02c",
    "srt": "#9467bd",
    "python": "#bcbd22",
    "true": "#17becf",
}


def _color(name: str) -> str:
    for key, col in COLORS.items():
        if name.startswith(key):
            return col
    return "#8c564b"


def plot_startup(res: dict[str, Any], path: str, plt: Any) -> None:
    variants = res["variants"]
    items = sorted(
        ((n, v) for n, v in variants.items() if v.get("median") is not None),
        key=lambda kv: kv[1]["median"],
    )
    names = [n for n, _ in items]
    med = [v["median"] for _, v in items]
    lo = [v["median"] - v["p10"] for _, v in items]
    hi = [v["p90"] - v["median"] for _, v in items]
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(names) + 1.6))
    ax.barh(names, med, xerr=[lo, hi], color=[_color(n) for n in names], capsize=3)
    ax.set_xscale("log")
    ax.set_xlabel("start latency of /bin/true, ms (median, p10-p90; log scale)")
    bw = variants.get("bwrap", {}).get("median")
    if bw:
        ax.axvline(bw, color=COLORS["bwrap"], linestyle="--", linewidth=1)
    for i, (_n, v) in enumerate(items):
        label = f"{v['median']:.1f} ms" + (
            f"  ({v['x_bwrap']:.2f}x bwrap)" if v.get("x_bwrap") else ""
        )
        ax.text(v["p90"] * 1.08, i, label, va="center", fontsize=8)
    ax.set_xlim(min(med) / 2, max(v["p90"] for _, v in items) * 12)
    ax.invert_yaxis()
    ax.set_title(
        f"Start-up, {res['rounds']} rounds x {res['runs_per_round']} runs, alternating order"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(res: dict[str, Any], path: str, plt: Any) -> None:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, per_n in res["start"].items():
        ns = sorted(int(n) for n in per_n)
        t = [per_n[str(n)].get("last_line_s") for n in ns]
        mem = [per_n[str(n)].get("peak_cgroup_delta_mib", 0) / n for n in ns]
        style = "-o" if name.startswith("nanobox") or name == "bwrap" else "--."
        a1.plot(
            ns, t, style, label=name, color=_color(name), alpha=0.6 if "asyncio" in name else 1.0
        )
        a2.plot(
            ns, mem, style, label=name, color=_color(name), alpha=0.6 if "asyncio" in name else 1.0
        )
        for n in ns:
            if per_n[str(n)].get("failed"):
                a1.annotate(
                    f"{per_n[str(n)]['failed']} failed",
                    (n, per_n[str(n)].get("last_line_s") or 0),
                    fontsize=7,
                )
    for ax in (a1, a2):
        ax.set_xscale("log")
        ax.set_xlabel("sandboxes started at once (N)")
        ax.grid(True, which="both", alpha=0.3)
    a1.set_yscale("log")
    a1.set_ylabel("seconds until all N are running")
    a2.set_ylabel("peak memory per sandbox, MiB (cgroup Δ)")
    a2.set_yscale("log")
    a1.legend(fontsize=8)
    a1.set_title("time until all sandboxes run")
    a2.set_title("peak memory per sandbox")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="?")
    p.add_argument("--out-dir", default=os.path.join(c.REPO, "docs"))
    a = p.parse_args()
    path = a.results
    if path is None:
        files = sorted(glob.glob(os.path.join(c.RESULTS_DIR, "*.json")))
        if not files:
            raise SystemExit("no results in bench/results/: run bench/run_all.py first")
        path = files[-1]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(
            "matplotlib is missing: pip install 'matplotlib>=3.8' (the bench extra)"
        ) from None
    with open(path) as fh:
        res = json.load(fh)
    os.makedirs(a.out_dir, exist_ok=True)
    done = []
    if res.get("startup", {}).get("variants"):
        out = os.path.join(a.out_dir, "benchmarks-startup.png")
        plot_startup(res["startup"], out, plt)
        done.append(out)
    if res.get("scaling", {}).get("start"):
        out = os.path.join(a.out_dir, "benchmarks-scaling.png")
        plot_scaling(res["scaling"], out, plt)
        done.append(out)
    print("\n".join(done) if done else "nothing to plot")


if __name__ == "__main__":
    main()
