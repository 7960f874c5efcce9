#!/usr/bin/env python
"""Which optimizer survives low-bit training? Runs of the same sweep at several ``--quant`` settings, side
by side: the final eval loss with its seed interval, and the signs of instability in each run's log.

    .venv/bin/python scripts/sweep.py --optims adamw,adam,spam,stable_spam --seeds 0,1,2 --budgets none \\
        --group lowbit-none
    .venv/bin/python scripts/sweep.py --optims adamw,adam,spam,stable_spam --seeds 0,1,2 --budgets none \\
        --group lowbit-int4 -- --quant int4           # and --group lowbit-fp4 -- --quant fp4
    .venv/bin/python scripts/compare_lowbit.py runs/lowbit-none runs/lowbit-int4 runs/lowbit-fp4 --out docs/results/lowbit

Runs are read and grouped by ``compare_runs.py`` (per optimizer, lr and quantization, over seeds); runs that
differ in anything but those and the seed are refused, naming the settings. Per row: ``n`` seeds, the mean final eval loss and its 95% t-interval,
its difference from AdamW without quantization (the paper's yardstick is 16-bit Adam), and from the logged
records (every ``--logging_steps``): **loss spikes** (records whose training loss is above the previous
record's by more than ``SPIKE``, relative), **grad-norm spike** (the largest logged gradient norm over the
run's median, averaged over seeds), **diverged** (runs whose final loss is not finite or above their first
logged loss), and the spike-aware optimizers' own counters (mean ``optim/clip_fraction``, total
``optim/resets``). Writes ``lowbit.md``, ``lowbit.json`` and ``lowbit.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_runs import SWEPT, aggregate, check_settings, load_runs  # noqa: E402

from optimzoo.cli import brief_usage, fail  # noqa: E402

#: a logged training loss this much (relative) above the previous record's is a spike
SPIKE = 0.05


def instability(run) -> dict:
    """Spike counts and divergence of one run, from its logged records."""
    losses = [r["loss"] for r in run.records if "loss" in r]
    norms = [r["grad_norm"] for r in run.records if "grad_norm" in r and math.isfinite(r["grad_norm"])]
    spikes = sum(1 for a, b in zip(losses, losses[1:]) if b > a * (1 + SPIKE))
    diverged = not losses or not math.isfinite(losses[-1]) or losses[-1] > losses[0] or not math.isfinite(run.score)
    clip = [r["clip_fraction"] for r in run.records if "clip_fraction" in r]
    return {"loss_spikes": spikes, "grad_norm_spike": max(norms) / statistics.median(norms) if norms else None,
            "diverged": diverged, "clip_fraction": statistics.fmean(clip) if clip else None,
            "resets": sum(r.get("resets", 0.0) for r in run.records)}


def rows_of(runs) -> list[dict]:
    results = aggregate(runs, split=("quant",))
    quants = [(json.loads(r.variant.split("=", 1)[1]) if r.variant else None) or "none" for r in results]
    baseline = next((r.best.mean for r, q in zip(results, quants) if r.optim == "adamw" and q == "none"), None)
    rows = []
    for res, quant in zip(results, quants):
        point = res.best
        signs = [instability(r) for r in point.runs]
        ci = point.ci95
        spikes = [s["grad_norm_spike"] for s in signs if s["grad_norm_spike"] is not None]
        clips = [s["clip_fraction"] for s in signs if s["clip_fraction"] is not None]
        rows.append({"optimizer": res.optim, "quant": quant, "lr": point.lr, "n": point.n, "seeds": point.seeds,
                     "eval_loss_mean": point.mean, "eval_loss_std": point.std,
                     "eval_loss_ci95": list(ci) if ci else None,
                     "vs_adamw_none": None if baseline is None else point.mean - baseline,
                     "loss_spikes": sum(s["loss_spikes"] for s in signs),
                     "grad_norm_spike": statistics.fmean(spikes) if spikes else None,
                     "diverged": sum(s["diverged"] for s in signs),
                     "clip_fraction": statistics.fmean(clips) if clips else None,
                     "resets": sum(s["resets"] for s in signs)})
    order = {"none": 0}
    return sorted(rows, key=lambda r: (order.get(r["quant"], 1), r["quant"], r["eval_loss_mean"]))


def markdown(rows: list[dict]) -> str:
    def f(x, d=3):
        return "-" if x is None else f"{x:.{d}f}"

    lines = ["| quant | optimizer | lr | n | eval loss (mean) | 95% interval | vs AdamW (none) | loss spikes | "
             "grad-norm spike | diverged | clip fraction | resets |", "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ci = "-" if r["eval_loss_ci95"] is None else f"{r['eval_loss_ci95'][0]:.3f}-{r['eval_loss_ci95'][1]:.3f}"
        vs = "-" if r["vs_adamw_none"] is None else f"{r['vs_adamw_none']:+.3f}"
        lines.append(f"| {r['quant']} | {r['optimizer']} | {r['lr']:g} | {r['n']} | {f(r['eval_loss_mean'])} | {ci} | "
                     f"{vs} | {r['loss_spikes']} | {f(r['grad_norm_spike'], 2)} | {r['diverged']} | "
                     f"{f(r['clip_fraction'], 5)} | {r['resets']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quants = list(dict.fromkeys(r["quant"] for r in rows))
    optims = sorted({r["optimizer"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(quants)
    for j, q in enumerate(quants):
        xs, ys, errs = [], [], []
        for i, o in enumerate(optims):
            r = next((r for r in rows if r["optimizer"] == o and r["quant"] == q), None)
            if r is None or not math.isfinite(r["eval_loss_mean"]):
                continue
            xs.append(i + (j - (len(quants) - 1) / 2) * width)
            ys.append(r["eval_loss_mean"])
            ci = r["eval_loss_ci95"]
            errs.append(0.0 if ci is None else (ci[1] - ci[0]) / 2)
        ax.bar(xs, ys, width, yerr=errs, capsize=3, label=q)
    ax.set_xticks(range(len(optims)), optims)
    ax.set_ylabel("final eval loss (mean, 95% interval over seeds)")
    low = min(r["eval_loss_mean"] for r in rows if math.isfinite(r["eval_loss_mean"]))
    ax.set_ylim(bottom=low * 0.95)
    ax.legend(title="--quant")
    fig.tight_layout()
    path = out / "lowbit.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> str:
    ap = brief_usage(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    ap.add_argument("paths", nargs="+", type=Path, help="sweep group directories (one per --quant setting)")
    ap.add_argument("--out", type=Path, help="output directory (default: the first path)")
    args = ap.parse_args(argv)
    runs = load_runs(args.paths)
    if not runs:
        fail(ap, f"no finished runs under {', '.join(map(str, args.paths))}")
    mixed = check_settings(runs, "the runs", SWEPT | {"quant"})  # one comparison: only quant may differ
    if mixed:
        fail(ap, mixed)
    try:
        rows = rows_of(runs)
    except ValueError as e:
        fail(ap, str(e))
    out = args.out or args.paths[0]
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows)
    (out / "lowbit.md").write_text(text + "\n")
    (out / "lowbit.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, out)
    print(text)
    return text


if __name__ == "__main__":
    main()
