#!/usr/bin/env python
"""Compare pretraining runs: a markdown table and PNG plots, each optimizer at its best learning rate.

    python scripts/compare_runs.py runs/sweep-llama_tiny                 # a sweep's directory (or run dirs)
    python scripts/compare_runs.py runs/sweep-llama_tiny --source trainer_state --logx
    python scripts/compare_runs.py --wandb_project optimzoo --wandb_group sweep-llama_tiny   # online runs

Sources, one code path: every run becomes the same :class:`Run` (its log records with normalized keys, plus
its settings), whether it comes from a wandb offline run directory (read with wandb's own reader,
``wandb leet inspect --json``), from the Trainer's ``trainer_state.json``, or from the wandb API.
``--source auto`` (default) prefers the wandb run when a run directory has one.

Output (``--out``, default the first directory): ``results.md`` (optimizer, best lr and the lrs tried,
final train loss, eval loss, perplexity, tokens, tokens/s, optimizer step ms, optimizer state MB; best
first), ``eval_loss_vs_tokens.png`` and ``loss_vs_time.png``; the table is also printed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from optimzoo.cli import brief_usage, fail
from optimzoo.registry import get_spec

# canonical key <- names it has in trainer_state.json and in wandb (WandbCallback prefixes train/ and eval/)
KEYS = {
    "step": ("step", "train/global_step"),
    "loss": ("loss", "train/loss"),
    "eval_loss": ("eval_loss", "eval/loss"),
    "tokens": ("num_input_tokens_seen", "train/num_input_tokens_seen"),
    "elapsed_s": ("elapsed_s", "train/elapsed_s"),
    "step_ms": ("optim/step_ms", "train/optim/step_ms"),
    "state_MB": ("optim/state_MB", "train/optim/state_MB"),
    "train_runtime": ("train_runtime", "train/train_runtime"),
}


def normalize(record: dict) -> dict:
    """One log record with canonical keys (see ``KEYS``); keys it lacks are absent."""
    out = {}
    for key, names in KEYS.items():
        for name in names:
            value = record.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = float(value)
                break
    return out


@dataclass
class Run:
    """One training run, whatever it was read from."""

    name: str
    optim: str
    lr: float
    records: list[dict] = field(default_factory=list)  # normalized, in logging order
    source: str = ""

    def last(self, key: str) -> float | None:
        values = [r[key] for r in self.records if key in r]
        return values[-1] if values else None

    def series(self, x: str, y: str) -> tuple[list[float], list[float]]:
        pts = [(r[x], r[y]) for r in self.records if x in r and y in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    @property
    def score(self) -> float:
        """What "best" means: the final eval loss, else the final train loss."""
        value = self.last("eval_loss")
        value = self.last("loss") if value is None else value
        return math.inf if value is None or math.isnan(value) else value

    def row(self) -> dict:
        tokens = self.last("tokens")
        runtime = self.last("train_runtime") or self.last("elapsed_s")
        step_ms = [r["step_ms"] for r in self.records if "step_ms" in r][1:]  # the first step includes warm-up
        eval_loss = self.last("eval_loss")
        return {
            "final train loss": self.last("loss"),
            "eval loss": eval_loss,
            "perplexity": math.exp(eval_loss) if eval_loss is not None else None,
            "tokens": tokens,
            "tokens/s": tokens / runtime if tokens and runtime else None,
            "step ms": statistics.median(step_ms) if step_ms else None,
            "state MB": self.last("state_MB"),
        }


# ------------------------------------------------------------------ readers


def wandb_offline_records(run_dir: Path) -> tuple[dict, list[dict]]:
    """(config, history rows) of an offline wandb run, read with wandb's own reader."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                         capture_output=True, text=True, check=True).stdout
    summary = json.loads(subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", str(run_dir)],
        capture_output=True, text=True, check=True).stdout)
    rows = []
    for line in out.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            if rec.get("type") == "history":
                rows.append(rec["history"]["item"])
    return summary.get("config", {}), rows


def optimizer_name(config: dict) -> str:
    """The registry's canonical name of a run's optimizer (the config's ``optimizer`` key, else ``optim`` as
    typed), so that ``NorMuon`` and ``normuon`` runs are one optimizer in the table; other names as they are."""
    name = config.get("optimizer")
    name = name if isinstance(name, str) else str(config.get("optim", "?"))
    try:
        return get_spec(name).name
    except (TypeError, ValueError):
        return name


def _make_run(config: dict, rows: list[dict], source: str, fallback_name: str) -> Run:
    return Run(name=config.get("run_name") or fallback_name, optim=optimizer_name(config),
               lr=float(config.get("learning_rate", float("nan"))), records=[normalize(r) for r in rows],
               source=source)


def load_run_dir(run_dir: Path, source: str = "auto") -> Run | None:
    """A recipe run directory: its wandb offline run or its ``trainer_state.json``."""
    wandb_runs = sorted(run_dir.glob("wandb/offline-run-*")) + sorted(run_dir.glob("wandb/run-*"))
    if source in ("auto", "wandb") and wandb_runs:
        config, rows = wandb_offline_records(wandb_runs[-1])
        return _make_run(config, rows, "wandb", run_dir.name)
    state_file = run_dir / "trainer_state.json"
    if source in ("auto", "trainer_state") and state_file.exists():
        state = json.loads(state_file.read_text())
        config_file = run_dir / "run_summary.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        return _make_run(config, state["log_history"], "trainer_state", run_dir.name)
    return None


def load_api_runs(project: str, group: str | None) -> list[Run]:
    """Runs of a wandb project (and group) through the wandb API (needs a login and the network)."""
    import wandb

    filters = {"group": group} if group else {}
    return [_make_run(dict(r.config), list(r.scan_history()), "wandb-api", r.name)
            for r in wandb.Api().runs(project, filters=filters)]


def find_run_dirs(paths: list[Path]) -> list[Path]:
    """Run directories under ``paths`` (a directory with trainer_state.json, run_summary.json or a wandb run)."""
    found = []
    for p in paths:
        candidates = [p, *sorted(q for q in p.iterdir() if q.is_dir())] if p.is_dir() else []
        for c in candidates:
            if (c / "trainer_state.json").exists() or (c / "run_summary.json").exists() or any(
                    c.glob("wandb/offline-run-*")):
                found.append(c)
    return found


# ------------------------------------------------------------------ comparison


def best_per_optimizer(runs: list[Run]) -> list[tuple[Run, list[float]]]:
    """Each optimizer's best run (lowest :attr:`Run.score`) and the lrs tried, best optimizer first."""
    by_optim: dict[str, list[Run]] = {}
    for r in runs:
        by_optim.setdefault(r.optim, []).append(r)
    best = [(min(rs, key=lambda r: r.score), sorted(r.lr for r in rs)) for rs in by_optim.values()]
    return sorted(best, key=lambda b: b[0].score)


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and (abs(value) >= 1e5):
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def markdown_table(best: list[tuple[Run, list[float]]]) -> str:
    head = ["optimizer", "best lr", "lrs tried", "final train loss", "eval loss", "perplexity", "tokens", "tokens/s",
            "opt step ms", "opt state MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, lrs in best:
        row = run.row()
        cells = [run.optim, f"{run.lr:g}", ", ".join(f"{lr:g}" for lr in lrs), _fmt(row["final train loss"]),
                 _fmt(row["eval loss"]), _fmt(row["perplexity"]), _fmt(row["tokens"]), _fmt(row["tokens/s"], 3),
                 _fmt(row["step ms"], 3), _fmt(row["state MB"], 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(best: list[tuple[Run, list[float]]], out: Path, logx: bool = False, title: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    specs = [("eval_loss_vs_tokens.png", "tokens", "eval_loss", "tokens seen (non-padding)", "eval loss"),
             ("loss_vs_time.png", "elapsed_s", "loss", "wall time (s)", "train loss")]
    for fname, x, y, xlabel, ylabel in specs:
        fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
        for i, (run, _) in enumerate(best):
            xs, ys = run.series(x, y)
            if not xs and y == "eval_loss":  # no eval during training: fall back to the train loss
                xs, ys = run.series(x, "loss")
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3, linewidth=1.4,
                        linestyle=("-", "--", ":")[i // 10 % 3],  # the colour cycle has 10 colours
                        label=f"{run.optim} (lr {run.lr:g})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if logx:
            ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        ax.set_title(title or f"{ylabel} vs {xlabel}, each optimizer at its best lr")
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        path = out / fname
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> str:
    parser = brief_usage(argparse.ArgumentParser(description=__doc__,
                                                 formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("paths", nargs="*", type=Path, help="run directories or directories of runs")
    parser.add_argument("--source", choices=["auto", "wandb", "trainer_state"], default="auto")
    parser.add_argument("--wandb_project", help="read runs through the wandb API instead (entity/project)")
    parser.add_argument("--wandb_group")
    parser.add_argument("--out", type=Path, help="output directory (default: the first path)")
    parser.add_argument("--logx", action="store_true", help="log-scale x axes")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)

    if args.wandb_project:
        runs = load_api_runs(args.wandb_project, args.wandb_group)
    else:
        if not args.paths:
            fail(parser, "give run directories, or --wandb_project")
        missing = [str(p) for p in args.paths if not p.is_dir()]
        if missing:
            fail(parser, f"no such directory: {', '.join(missing)}")
        runs = [r for d in find_run_dirs(args.paths) if (r := load_run_dir(d, args.source)) is not None]
    if not runs:
        raise SystemExit("no runs found")
    out = args.out or (args.paths[0] if args.paths else Path("."))
    out.mkdir(parents=True, exist_ok=True)
    best = best_per_optimizer(runs)
    table = markdown_table(best)
    (out / "results.md").write_text(table + "\n")
    plots = plot(best, out, args.logx, args.title)
    print(table)
    print(f"\n{len(runs)} runs, {len(best)} optimizers -> {out / 'results.md'}, " + ", ".join(str(p) for p in plots))
    return table


if __name__ == "__main__":
    main()
