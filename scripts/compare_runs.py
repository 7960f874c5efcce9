#!/usr/bin/env python
"""Compare pretraining runs: each optimizer at its best learning rate by the mean over seeds, with intervals and
its speedup over AdamW at equal loss; a markdown table, ``results.json`` and PNG plots.

    python scripts/compare_runs.py runs/sweep-llama_tiny --budgets runs/sweep-llama_tiny/budgets
    python scripts/compare_runs.py runs/sweep-llama_tiny --source trainer_state --logx
    python scripts/compare_runs.py --wandb_project optimzoo --wandb_group sweep-llama_tiny   # online runs

Sources, one code path: every run becomes the same :class:`Run` (its log records with normalized keys, its
settings, its run clock), whether it comes from a wandb offline run directory (read with wandb's own reader,
``wandb leet inspect --json``), from the Trainer's ``trainer_state.json``, or from the wandb API.
``--source auto`` (default) prefers the wandb run when a run directory has one.

**Same settings or no table**: runs are compared only when every setting of their run identity
(:func:`optimzoo.hf.runs.run_identity`: ``run_identity.json`` or ``run_summary.json["identity"]`` in the run
directory) other than the swept ones (``SWEPT``: optimizer, lr, its options, seed) is the same; otherwise the
comparison stops and names the settings that differ (``--allow-mixed`` compares them anyway, and says so). A
run without a recorded identity is compared by the settings its files do record (:func:`recorded_settings`).

**Seeds**: per (optimizer, lr), the final eval loss's mean, sample std, n and 95% t-interval over seeds
(``scipy.stats.t``); the best lr is the one with the lowest mean. A best lr at either end of the lrs tried is
flagged ``edge: widen the grid``.

**Speedup over AdamW** (Wen et al. 2025, "Fantastic Pretraining Optimizers and Where to Find Them"): AdamW's
final eval losses at 3 or more token budgets (``--budgets``: AdamW runs at other ``max_steps``, each with its own
schedule, plus the AdamW runs at its best lr here) are fitted with ``L(D) = a D^-b + c``
(``scipy.optimize.curve_fit``); an optimizer reaching loss ``L`` with ``D`` tokens has ``D_eff = (a / (L - c))^(1/b)``
and speedup ``D_eff / D``, with a 95% bootstrap interval over seeds (runs resampled with replacement per budget
and per optimizer, the fit redone each time). A ``D_eff`` outside the fitted budgets is an extrapolation and is
flagged. Also, read from the curves without a fit: the tokens an optimizer needs to reach AdamW's final eval loss.

**Time**: tokens/s is the tokens over the run clock's wall time summed over every session of a resumed run; the
loss-vs-time plot uses steps x the run's median training step time (``TIME_MEASURE``), which other work on the
machine distorts much less than wall time. Timing measured under contention (the run clock's load average above
the cores) is marked ``*``.

Output (``--out``, default the first directory): ``results.md``, ``results.json`` (per optimizer: ``optimizer``,
``best_lr``, ``lrs``, ``seeds``, ``n``, ``eval_loss_mean``, ``eval_loss_std``, ``eval_loss_ci95``, ``tokens``,
``speedup_vs_adamw``, ``speedup_ci95``, ``edge_lr``, and more, see :func:`results_json`),
``eval_loss_vs_tokens.png``, ``loss_vs_time.png`` and ``lr_sensitivity.png``; the table is also printed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from optimzoo.cli import brief_usage, fail
from optimzoo.hf.runs import clock_summary, settings_diff
from optimzoo.registry import get_spec

# canonical key <- names it has in trainer_state.json and in wandb (WandbCallback prefixes train/ and eval/)
KEYS = {
    "step": ("step", "train/global_step"),
    "loss": ("loss", "train/loss"),
    "eval_loss": ("eval_loss", "eval/loss"),
    "tokens": ("num_input_tokens_seen", "train/num_input_tokens_seen"),
    "elapsed_s": ("elapsed_s", "train/elapsed_s"),
    "wall_s": ("time/wall_s", "train/time/wall_s"),
    "cpu_s": ("time/cpu_s", "train/time/cpu_s"),
    "step_ms": ("optim/step_ms", "train/optim/step_ms"),
    "state_MB": ("optim/state_MB", "train/optim/state_MB"),
    "train_runtime": ("train_runtime", "train/train_runtime"),
    "grad_norm": ("grad_norm", "train/grad_norm"),
    "clip_fraction": ("optim/clip_fraction", "train/optim/clip_fraction"),
    "resets": ("optim/resets", "train/optim/resets"),
}
#: settings that a comparison sweeps: they may differ between the runs of one table
SWEPT = frozenset({"optim", "learning_rate", "optim_args", "seed"})
TIME_MEASURE = "steps x median training step time (s)"
BOOTSTRAP = 1000


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
    seed: int | None = None
    settings: dict | None = None  # run identity settings (or what the files record)
    clock: dict | None = None  # :func:`optimzoo.hf.runs.clock_summary`
    eval_loss: float | None = None  # the final evaluation (run_summary.json), else the last logged one

    def last(self, key: str) -> float | None:
        values = [r[key] for r in self.records if key in r]
        return values[-1] if values else None

    def series(self, x: str, y: str) -> tuple[list[float], list[float]]:
        pts = [(r[x], r[y]) for r in self.records if x in r and y in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    @property
    def score(self) -> float:
        """What "best" means: the final eval loss, else the final train loss."""
        value = self.eval_loss if self.eval_loss is not None else self.last("eval_loss")
        value = self.last("loss") if value is None else value
        return math.inf if value is None or math.isnan(value) else value

    @property
    def tokens(self) -> float | None:
        return self.last("tokens")

    @property
    def budget(self) -> float | None:
        """The run's budget: its ``max_steps`` setting, else its last logged step (seeds of one budget see
        slightly different non-padding token counts, so tokens do not identify it)."""
        steps = (self.settings or {}).get("max_steps")
        return float(steps) if isinstance(steps, (int, float)) and steps > 0 else self.last("step")

    @property
    def tokens_per_s(self) -> float | None:
        """Tokens over the wall time summed over sessions (the run clock); without a clock, the last session's
        runtime, which is right only for a run that was never resumed."""
        seconds = self.clock["wall_s"] if self.clock else (self.last("train_runtime") or self.last("elapsed_s"))
        return self.tokens / seconds if self.tokens and seconds else None

    @property
    def median_step_s(self) -> float | None:
        if self.clock and self.clock["median_step_s"]:
            return self.clock["median_step_s"]
        ms = [r["step_ms"] for r in self.records if "step_ms" in r][1:]  # optimizer step only; first: warm-up
        return statistics.median(ms) / 1000.0 if ms else None


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


def recorded_settings(run_dir: Path) -> dict | None:
    """A run's settings: its run identity (``run_summary.json["identity"]``, else the sweep's
    ``run_identity.json``), else what ``run_summary.json``, ``optimizer_config.json`` and ``trainer_state.json``
    record (model, data, tokens per step, steps, batch, seed, optimizer, lr), marked ``identity: partial``."""
    summary = json.loads((run_dir / "run_summary.json").read_text()) if (run_dir / "run_summary.json").is_file() else {}
    if summary.get("identity"):
        return summary["identity"]["settings"]
    if (run_dir / "run_identity.json").is_file():
        return json.loads((run_dir / "run_identity.json").read_text())["settings"]
    settings = {k: summary[k] for k in ("model", "optim", "optim_args", "learning_rate", "seed", "world_size")
                if k in summary}
    config_file = run_dir / "optimizer_config.json"
    if config_file.is_file():
        rc = json.loads(config_file.read_text()).get("run_config", {})
        settings.update({k: rc[k] for k in ("dataset", "tokenizer", "max_length", "packing", "tokens_per_step")
                         if k in rc})
    state_file = run_dir / "trainer_state.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        settings.update({"max_steps": state.get("max_steps"), "train_batch_size": state.get("train_batch_size")})
    return {**settings, "identity": "partial"} if settings else None


def _make_run(config: dict, rows: list[dict], source: str, fallback_name: str, run_dir: Path | None = None) -> Run:
    run = Run(name=config.get("run_name") or fallback_name, optim=optimizer_name(config),
              lr=float(config.get("learning_rate", float("nan"))), records=[normalize(r) for r in rows],
              source=source, seed=config.get("seed"))
    if run_dir is not None:
        run.settings = recorded_settings(run_dir)
        state_file = run_dir / "trainer_state.json"
        if state_file.is_file():
            run.clock = clock_summary(json.loads(state_file.read_text()).get("stateful_callbacks", {}).get("RunClock"))
        summary_file = run_dir / "run_summary.json"
        if summary_file.is_file():
            summary = json.loads(summary_file.read_text())
            run.eval_loss = summary.get("eval_loss")
            run.seed = summary.get("seed", run.seed)
    return run


def load_run_dir(run_dir: Path, source: str = "auto") -> Run | None:
    """A recipe run directory: its wandb offline run or its ``trainer_state.json``."""
    wandb_runs = sorted(run_dir.glob("wandb/offline-run-*")) + sorted(run_dir.glob("wandb/run-*"))
    if source in ("auto", "wandb") and wandb_runs:
        config, rows = wandb_offline_records(wandb_runs[-1])
        return _make_run(config, rows, "wandb", run_dir.name, run_dir)
    state_file = run_dir / "trainer_state.json"
    if source in ("auto", "trainer_state") and state_file.exists():
        state = json.loads(state_file.read_text())
        config_file = run_dir / "run_summary.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        return _make_run(config, state["log_history"], "trainer_state", run_dir.name, run_dir)
    return None


def load_api_runs(project: str, group: str | None) -> list[Run]:
    """Runs of a wandb project (and group) through the wandb API (needs a login and the network)."""
    import wandb

    filters = {"group": group} if group else {}
    return [_make_run(dict(r.config), list(r.scan_history()), "wandb-api", r.name)
            for r in wandb.Api().runs(project, filters=filters)]


def find_run_dirs(paths: list[Path]) -> list[Path]:
    """Finished run directories under ``paths`` (a directory with ``run_summary.json``, or with
    ``trainer_state.json`` or a wandb run and no ``run_identity.json`` of an unfinished sweep run)."""
    found = []
    for p in paths:
        candidates = [p, *sorted(q for q in p.iterdir() if q.is_dir())] if p.is_dir() else []
        for c in candidates:
            if (c / "run_summary.json").exists() or (not (c / "run_identity.json").exists() and (
                    (c / "trainer_state.json").exists() or any(c.glob("wandb/offline-run-*")))):
                found.append(c)
    return found


def load_runs(paths: list[Path], source: str = "auto") -> list[Run]:
    """Every finished run under ``paths``."""
    return [r for d in find_run_dirs(paths) if (r := load_run_dir(d, source)) is not None]


# ------------------------------------------------------------------ same settings


def mixed_settings(runs: list[Run], ignore: frozenset[str] = SWEPT) -> dict[str, set[str]]:
    """``{setting: {values}}`` for each setting outside ``ignore`` that differs between the runs (a run without
    recorded settings counts as differing in ``settings``)."""
    known = [r for r in runs if r.settings is not None]
    out: dict[str, set[str]] = {}
    if len(known) < len(runs):
        out["settings"] = {"recorded", "not recorded: " + ", ".join(r.name for r in runs if r.settings is None)}
    for r in known[1:]:
        for key, (a, b) in settings_diff(known[0].settings, r.settings, ignore).items():
            out.setdefault(key, set()).update({json.dumps(a, default=str), json.dumps(b, default=str)})
    return out


def check_settings(runs: list[Run], what: str, ignore: frozenset[str] = SWEPT) -> str | None:
    """A message naming the settings in which ``runs`` differ, or ``None`` when they agree."""
    mixed = mixed_settings(runs, ignore)
    if not mixed:
        return None
    named = "; ".join(f"{k}: {', '.join(sorted(v))[:120]}" for k, v in mixed.items())
    return f"{what} differ in settings other than {', '.join(sorted(ignore))}: {named}"


# ------------------------------------------------------------------ seeds


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """The ``level`` Student-t interval of the mean of ``values`` (``None`` for fewer than 2)."""
    if len(values) < 2:
        return None
    from scipy import stats

    mean, sem = statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))
    half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1)) * sem
    return mean - half, mean + half


@dataclass
class LrPoint:
    """The runs of one optimizer at one lr, over seeds."""

    lr: float
    runs: list[Run]

    @property
    def losses(self) -> list[float]:
        return [r.score for r in self.runs]

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.losses)

    @property
    def std(self) -> float | None:
        finite = all(math.isfinite(x) for x in self.losses)  # a diverged run (inf) has no spread to report
        return statistics.stdev(self.losses) if self.n > 1 and finite else None

    @property
    def ci95(self) -> tuple[float, float] | None:
        finite = [x for x in self.losses if math.isfinite(x)]
        return t_interval(finite) if len(finite) == self.n else None

    @property
    def seeds(self) -> list:
        return sorted(r.seed for r in self.runs if r.seed is not None)


@dataclass
class Result:
    """One optimizer: its lrs, the best by the seed mean, and the comparison's extras."""

    optim: str
    points: list[LrPoint]  # by lr
    speedup: dict | None = None
    variant: str = ""  # with --allow-mixed: the mixed settings' values of these runs

    @property
    def label(self) -> str:
        return f"{self.optim} [{self.variant}]" if self.variant else self.optim

    @property
    def best(self) -> LrPoint:
        return min(self.points, key=lambda p: p.mean)

    @property
    def lrs(self) -> list[float]:
        return [p.lr for p in self.points]

    @property
    def edge(self) -> bool:
        """Best lr at either end of two or more lrs tried."""
        return len(self.points) > 1 and self.best.lr in (self.lrs[0], self.lrs[-1])


def aggregate(runs: list[Run], split: tuple[str, ...] = ()) -> list[Result]:
    """Runs grouped per (optimizer, lr), over seeds; best optimizer (lowest mean at its best lr) first. ``split``:
    settings whose values make separate rows (``--allow-mixed``). Runs of one row and lr must agree in everything
    but the seed (else ``ValueError`` naming the settings)."""
    by: dict[tuple[str, str], dict[float, list[Run]]] = {}
    for r in runs:
        variant = ", ".join(f"{k}={json.dumps((r.settings or {}).get(k), default=str)}" for k in split)
        by.setdefault((r.optim, variant), {}).setdefault(r.lr, []).append(r)
    results = []
    for (optim, variant), per_lr in by.items():
        for lr, rs in per_lr.items():
            message = check_settings(rs, f"the {optim} runs at lr {lr:g}", frozenset({"seed"}))
            if message:
                raise ValueError(message)
        results.append(Result(optim, [LrPoint(lr, per_lr[lr]) for lr in sorted(per_lr)], variant=variant))
    return sorted(results, key=lambda r: r.best.mean)


# ------------------------------------------------------------------ speedup over AdamW


def power_law(d, a, b, c):
    """``L(D) = a D^-b + c`` (Wen et al. 2025's AdamW scaling curve in tokens ``D``)."""
    return a * d ** (-b) + c


def fit_power_law(tokens: list[float], losses: list[float]) -> tuple[float, float, float]:
    """(a, b, c) of :func:`power_law` fitted by least squares (``scipy.optimize.curve_fit``, bounded to
    ``a > 0``, ``0 < b < 3``, ``0 <= c < min(L)``), D scaled by its largest value for conditioning. Needs 3 or
    more distinct budgets; raises ``RuntimeError`` when the fit fails."""
    import numpy as np
    from scipy.optimize import curve_fit

    d = np.asarray(tokens, dtype=float)
    y = np.asarray(losses, dtype=float)
    if len(set(d.tolist())) < 3:
        raise ValueError(f"the speedup fit needs AdamW at 3 or more token budgets, got {sorted(set(d.tolist()))}")
    scale = d.max()
    x = d / scale
    c0 = 0.5 * y.min()
    p0 = (max(y.max() - c0, 1e-3), 0.5, c0)
    (a, b, c), _ = curve_fit(power_law, x, y, p0=p0, bounds=([1e-12, 1e-4, 0.0], [np.inf, 3.0, y.min()]),
                             maxfev=20000)
    return float(a * scale ** b), float(b), float(c)


def effective_tokens(loss: float, fit: tuple[float, float, float]) -> float:
    """``D_eff``: the tokens the fitted AdamW curve needs to reach ``loss`` (``inf`` at or below its floor c)."""
    a, b, c = fit
    return (a / (loss - c)) ** (1.0 / b) if loss > c else math.inf


def tokens_to_reach(run_series: tuple[list[float], list[float]], target: float) -> float | None:
    """The tokens at which an eval-loss curve first reaches ``target`` (linear between eval points), or ``None``."""
    xs, ys = run_series
    for i, (x, y) in enumerate(zip(xs, ys)):
        if y <= target:
            if i == 0:
                return x
            x0, y0 = xs[i - 1], ys[i - 1]
            return x0 + (x - x0) * (y0 - target) / (y0 - y)
    return None


@dataclass
class AdamWCurve:
    """AdamW's fitted loss curve: ``fit`` (a, b, c) on every budget run, the ``budgets`` (mean tokens of each
    budget's runs) and the fits on ``BOOTSTRAP`` resamples of the runs (with replacement, per budget; empty when
    every budget has one run)."""

    fit: tuple[float, float, float]
    budgets: list[float]
    resampled: list[tuple[float, float, float]]


def adamw_curve(budget_runs: list[Run], rng: random.Random, bootstrap: int = BOOTSTRAP) -> AdamWCurve | None:
    """The :class:`AdamWCurve` of AdamW runs at 3 or more budgets (:attr:`Run.budget`), or ``None`` when the fit is
    not possible."""
    by_budget: dict[float, list] = {}
    for r in budget_runs:
        if r.tokens and math.isfinite(r.score):
            by_budget.setdefault(r.budget, []).append((r.tokens, r.score))
    if len(by_budget) < 3:
        return None
    try:
        fit = fit_power_law(*zip(*[p for v in by_budget.values() for p in v]))
    except (ValueError, RuntimeError):
        return None
    resampled = []
    if any(len(v) > 1 for v in by_budget.values()):
        for _ in range(bootstrap):
            try:
                resampled.append(fit_power_law(*zip(*[rng.choice(v) for v in by_budget.values() for _ in v])))
            except (ValueError, RuntimeError):
                continue
    return AdamWCurve(fit, sorted(statistics.fmean(t for t, _ in v) for v in by_budget.values()), resampled)


#: relative slack of the extrapolation flag: a ``D_eff`` within 1% of AdamW's budgets is read as inside them
#: (see :func:`speedup`; a speedup is not known to 1% from a 3-point fit anyway)
FIT_RTOL = 1e-2


def speedup(curve: AdamWCurve | None, runs: list[Run], rng: random.Random, bootstrap: int = BOOTSTRAP) -> dict | None:
    """``D_eff/D`` of ``runs`` (one optimizer at its best lr, seeds) against AdamW's ``curve``, with a 95% bootstrap
    interval over seeds (the optimizer's runs resampled with replacement, each draw against one of the curve's
    resampled fits; ``None`` with one run and no resampled fits) and the extrapolation flag; ``None`` without a
    curve or runs."""
    mine = [(r.tokens, r.score) for r in runs if r.tokens and math.isfinite(r.score)]
    if curve is None or not mine:
        return None
    d = statistics.fmean(t for t, _ in mine)
    value = effective_tokens(statistics.fmean(l for _, l in mine), curve.fit) / d
    ci = None
    if len(mine) > 1 or curve.resampled:
        fits = curve.resampled or [curve.fit]
        draws = []
        for i in range(bootstrap):
            own = [rng.choice(mine) for _ in mine]
            draws.append(effective_tokens(statistics.fmean(l for _, l in own), fits[i % len(fits)])
                         / statistics.fmean(t for t, _ in own))
        draws.sort()
        ci = (draws[int(0.025 * (len(draws) - 1))], draws[int(0.975 * (len(draws) - 1))])
    a, b, c = curve.fit
    # inside the budgets up to FIT_RTOL: AdamW's own runs at the largest budget read back D_eff = D within the
    # fit's residual (0.19% in the main job), which must not flag AdamW as extrapolated against itself
    low, high = min(curve.budgets) * (1 - FIT_RTOL), max(curve.budgets) * (1 + FIT_RTOL)
    return {"value": value, "ci95": ci, "fit": {"a": a, "b": b, "c": c, "budgets": curve.budgets},
            "extrapolated": not low <= value * d <= high}


# ------------------------------------------------------------------ output


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _bound(value: float) -> str:
    """An interval end: ``inf`` for an unbounded one (a speedup whose loss lies below some bootstrap fit's floor)."""
    return "inf" if value == math.inf else _num(value, 2)


def _json_safe(value):
    """``value`` with infinite and NaN floats as None, so that ``results.json`` is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _mean_series(runs: list[Run], x: str, y: str) -> tuple[list[float], list[float], list[float]]:
    """(mean x, mean y, 95% half-width of y) over the runs, at the steps where every run logged both (seeds
    see different token counts at one step, so the runs are aligned by step)."""
    per = [{r["step"]: (r[x], r[y]) for r in run.records if "step" in r and x in r and y in r} for run in runs]
    common = sorted(set.intersection(*(set(p) for p in per))) if per else []
    xs, means, halves = [], [], []
    for step in common:
        values = [p[step][1] for p in per]
        ci = t_interval(values)
        xs.append(statistics.fmean(p[step][0] for p in per))
        means.append(statistics.fmean(values))
        halves.append((ci[1] - ci[0]) / 2 if ci else 0.0)
    return xs, means, halves


def adamw_target(results: list[Result]) -> float | None:
    adamw = next((r for r in results if r.optim == "adamw"), None)
    return adamw.best.mean if adamw is not None else None


def row(result: Result, target: float | None) -> dict:
    """The numbers of one optimizer (the ``results.json`` entry)."""
    best = result.best
    ci = best.ci95
    tokens = statistics.fmean(r.tokens for r in best.runs if r.tokens) if any(r.tokens for r in best.runs) else None
    reach = [tokens_to_reach(r.series("tokens", "eval_loss"), target) for r in best.runs] if target else []
    reach = [x for x in reach if x is not None]
    rates = [r.tokens_per_s for r in best.runs if r.tokens_per_s]
    steps = [r.median_step_s for r in best.runs if r.median_step_s]
    flags = [r.clock["contended"] for r in best.runs if r.clock and r.clock["contended"] is not None]
    sp = result.speedup
    return {
        "optimizer": result.label, "best_lr": best.lr, "lrs": result.lrs, "seeds": best.seeds, "n": best.n,
        "eval_loss_mean": best.mean, "eval_loss_std": best.std, "eval_loss_ci95": list(ci) if ci else None,
        "perplexity": math.exp(best.mean) if math.isfinite(best.mean) else None, "tokens": tokens,
        "speedup_vs_adamw": sp["value"] if sp else None,
        "speedup_ci95": list(sp["ci95"]) if sp and sp["ci95"] else None,
        "speedup_extrapolated": sp["extrapolated"] if sp else None,
        "tokens_to_adamw_loss": statistics.fmean(reach) if reach and len(reach) == best.n else None,
        "edge_lr": result.edge,
        "tokens_per_s": statistics.fmean(rates) if rates else None,
        "median_step_ms": 1000 * statistics.fmean(steps) if steps else None,
        "timing_contended": any(flags) if flags else None,
        "state_MB": best.runs[0].last("state_MB"),
        "per_lr": [{"lr": p.lr, "n": p.n, "eval_loss_mean": p.mean, "eval_loss_std": p.std,
                    "eval_loss_ci95": list(p.ci95) if p.ci95 else None} for p in result.points],
    }


def markdown_table(rows: list[dict]) -> str:
    head = ["optimizer", "best lr", "lrs tried", "n", "eval loss", "95% CI", "perplexity", "speedup vs AdamW",
            "tokens to AdamW loss", "tokens", "tokens/s", "step ms", "opt state MB", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ci = f"{_num(r['eval_loss_ci95'][0])}-{_num(r['eval_loss_ci95'][1])}" if r["eval_loss_ci95"] else "-"
        loss = _num(r["eval_loss_mean"]) + (f" ± {_num(r['eval_loss_std'])}" if r["eval_loss_std"] is not None else "")
        sp = _num(r["speedup_vs_adamw"], 2)
        if r["speedup_ci95"]:
            sp += f" ({_bound(r['speedup_ci95'][0])}-{_bound(r['speedup_ci95'][1])})"
        star = "*" if r["timing_contended"] else ""
        notes = [n for n, on in (("edge: widen the grid", r["edge_lr"]),
                                 ("speedup extrapolated", r["speedup_extrapolated"]),
                                 ("* timing under contention", r["timing_contended"])) if on]
        cells = [r["optimizer"], f"{r['best_lr']:g}", ", ".join(f"{lr:g}" for lr in r["lrs"]), str(r["n"]), loss, ci,
                 _num(r["perplexity"], 2), sp,
                 f"{r['tokens_to_adamw_loss']:,.0f}" if r["tokens_to_adamw_loss"] else "-",
                 f"{r['tokens']:,.0f}" if r["tokens"] else "-",
                 (f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-") + star,
                 _num(r["median_step_ms"], 1) + star if r["median_step_ms"] else "-", _num(r["state_MB"], 2),
                 "; ".join(notes)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_json(rows: list[dict], title: str, settings: dict | None, fit: dict | None, mixed: str | None) -> dict:
    """``results.json``: ``optimizers`` (one entry per optimizer, best first: ``optimizer``, ``best_lr``, ``lrs``,
    ``seeds``, ``n``, ``eval_loss_mean``, ``eval_loss_std``, ``eval_loss_ci95`` [low, high], ``tokens``,
    ``speedup_vs_adamw``, ``speedup_ci95`` [low, high], ``edge_lr``, plus ``speedup_extrapolated``,
    ``tokens_to_adamw_loss``, ``tokens_per_s``, ``median_step_ms``, ``timing_contended``, ``state_MB``,
    ``perplexity``, ``per_lr``; null where not estimable, and an unbounded end of ``speedup_ci95`` is null too),
    ``adamw_fit`` (a, b, c, budgets), ``settings`` (the common run settings), ``time_measure``,
    ``mixed_settings`` (the note when ``--allow-mixed`` let them in). Strict JSON: no ``Infinity`` or ``NaN``."""
    return _json_safe({"title": title, "optimizers": rows, "adamw_fit": fit, "settings": settings,
                       "time_measure": TIME_MEASURE, "mixed_settings": mixed})


def _colours(n: int):
    """``n`` distinct colours: tab20 (20 colours, darker and lighter of each hue one after the other), then more
    hues from a continuous map beyond 20."""
    import matplotlib

    base = list(matplotlib.colormaps["tab20"].colors)
    base = base[0::2] + base[1::2]  # the 10 dark hues first, then their light partners
    if n <= len(base):
        return base[:n]
    return base + [matplotlib.colormaps["hsv"](i / (n - len(base))) for i in range(n - len(base))]


MARKERS = "osD^v<>pPX*hH8d"


def plot(results: list[Result], out: Path, logx: bool = False, title: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = _colours(len(results))
    written = []
    # loss curves: each optimizer at its best lr, mean over seeds with a 95% band
    curves = [("eval_loss_vs_tokens.png", "tokens", "eval_loss", "tokens seen (non-padding)", "eval loss"),
              ("loss_vs_time.png", "time", "loss", TIME_MEASURE, "train loss")]
    for fname, x, y, xlabel, ylabel in curves:
        fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
        for i, res in enumerate(results):
            runs = res.best.runs
            if x == "time":
                xs, ys, half = _mean_series(runs, "step", y)
                step_s = statistics.fmean(r.median_step_s for r in runs if r.median_step_s) if any(
                    r.median_step_s for r in runs) else None
                if step_s is None:
                    continue
                xs = [s * step_s for s in xs]
            else:
                xs, ys, half = _mean_series(runs, x, y)
            if not xs:
                continue
            label = f"{res.label} (lr {res.best.lr:g}, n={res.best.n})"
            ax.plot(xs, ys, color=colours[i], marker=MARKERS[i % len(MARKERS)], markersize=3.5, markevery=max(
                1, len(xs) // 8), linewidth=1.3, alpha=0.9, label=label, zorder=3 + i % 5)
            if any(half):
                ax.fill_between(xs, [a - h for a, h in zip(ys, half)], [a + h for a, h in zip(ys, half)],
                                color=colours[i], alpha=0.15, linewidth=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if logx:
            ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        ax.set_title(title or f"{ylabel}, each optimizer at its best lr (mean, 95% band)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / fname)
        plt.close(fig)
        written.append(out / fname)
    # lr sensitivity: final eval loss vs lr / best lr
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    for i, res in enumerate(results):
        if len(res.points) < 2:
            continue
        xs = [p.lr / res.best.lr for p in res.points]
        ys = [p.mean for p in res.points]
        err = [[p.mean - p.ci95[0] if p.ci95 else 0 for p in res.points],
               [p.ci95[1] - p.mean if p.ci95 else 0 for p in res.points]]
        ax.errorbar(xs, ys, yerr=err, color=colours[i], marker=MARKERS[i % len(MARKERS)], markersize=4, capsize=2,
                    linewidth=1.2, label=f"{res.label} (best {res.best.lr:g})")
    ax.set_xscale("log")
    ax.set_xlabel("lr / best lr")
    ax.set_ylabel("final eval loss (mean over seeds, 95% interval)")
    ax.grid(True, alpha=0.3)
    ax.set_title(title or "lr sensitivity")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "lr_sensitivity.png")
    plt.close(fig)
    written.append(out / "lr_sensitivity.png")
    return written


def compare(runs: list[Run], budget_runs: list[Run], allow_mixed: bool = False, seed: int = 0
            ) -> tuple[list[Result], list[dict], dict | None, str | None]:
    """(results, rows, AdamW fit, mixed-settings note). Raises ``ValueError`` naming the settings when the runs
    (and the budget runs, apart from ``max_steps``) differ in non-swept settings, unless ``allow_mixed``."""
    mixed = check_settings(runs, "the runs")
    if budget_runs and not mixed:
        mixed = check_settings(runs + budget_runs, "the budget runs and the runs", SWEPT | {"max_steps"})
    if mixed and not allow_mixed:
        raise ValueError(mixed + " (compare them anyway with --allow-mixed)")
    split = tuple(sorted(set(mixed_settings(runs)) - {"settings"})) if mixed else ()
    results = aggregate(runs, split)
    rng = random.Random(seed)
    adamw = next((r for r in results if r.optim == "adamw"), None)
    fit = None
    if adamw is not None and budget_runs:
        curve = adamw_curve([r for r in budget_runs if r.optim == "adamw"] + adamw.best.runs, rng)
        for res in results:
            res.speedup = speedup(curve, res.best.runs, rng)
        if curve is not None:
            fit = {"a": curve.fit[0], "b": curve.fit[1], "c": curve.fit[2], "budgets": curve.budgets}
    target = adamw_target(results)
    return results, [row(r, target) for r in results], fit, mixed


def main(argv: list[str] | None = None) -> str:
    parser = brief_usage(argparse.ArgumentParser(description=__doc__,
                                                 formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("paths", nargs="*", type=Path, help="run directories or directories of runs")
    parser.add_argument("--budgets", nargs="*", type=Path, default=[],
                        help="directories of AdamW runs at other token budgets (the speedup fit)")
    parser.add_argument("--source", choices=["auto", "wandb", "trainer_state"], default="auto")
    parser.add_argument("--wandb_project", help="read runs through the wandb API instead (entity/project)")
    parser.add_argument("--wandb_group")
    parser.add_argument("--out", type=Path, help="output directory (default: the first path)")
    parser.add_argument("--logx", action="store_true", help="log-scale x axes")
    parser.add_argument("--allow-mixed", "--allow_mixed", dest="allow_mixed", action="store_true",
                        help="compare runs whose non-swept settings differ (the table says so)")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)

    if args.wandb_project:
        runs = load_api_runs(args.wandb_project, args.wandb_group)
    else:
        if not args.paths:
            fail(parser, "give run directories, or --wandb_project")
        missing = [str(p) for p in args.paths + args.budgets if not p.is_dir()]
        if missing:
            fail(parser, f"no such directory: {', '.join(missing)}")
        runs = load_runs(args.paths, args.source)
    if not runs:
        raise SystemExit("no runs found")
    budget_runs = load_runs(args.budgets, "trainer_state") if args.budgets else []
    try:
        results, rows, fit, mixed = compare(runs, budget_runs, args.allow_mixed)
    except ValueError as e:
        fail(parser, str(e))
    out = args.out or (args.paths[0] if args.paths else Path("."))
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    if mixed:
        table += f"\n\nMixed settings (--allow-mixed): {mixed}"
    (out / "results.md").write_text(table + "\n")
    common = {k: v for k, v in (runs[0].settings or {}).items() if k not in SWEPT} if not mixed else None
    (out / "results.json").write_text(json.dumps(results_json(rows, args.title, common, fit, mixed), indent=1,
                                                 default=str, allow_nan=False) + "\n")
    plots = plot(results, out, args.logx, args.title)
    print(table)
    print(f"\n{len(runs)} runs, {len(results)} optimizers -> {out / 'results.md'}, {out / 'results.json'}, "
          + ", ".join(str(p) for p in plots) + f"; loss vs time: {TIME_MEASURE}")
    return table


if __name__ == "__main__":
    main()
