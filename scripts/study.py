#!/usr/bin/env python
"""The published study: every registered optimizer at two model sizes, per-optimizer lr grids, 3 seeds at the best
lr, AdamW at 3 budgets per size for the speedup fit, and the papers' headline claims beside what it measures.

    python scripts/study.py --dry-run        # the plan: stages, runs, rough time, the sweep commands
    python scripts/study.py                  # the whole study, ~2 h on 2 uncontended CPU cores; resumable
    python scripts/study.py --smoke          # the same stages at toy scale (2 optimizers, 12 steps), minutes
    python scripts/study.py --report         # the report from the runs finished so far; runs nothing

Stages, each made of ``scripts/sweep.py`` calls (so each is resumable: finished runs with the same settings are
reused; run it again after an interruption):

0. ``kappa``: Lion-K with each K of ``KAPPA_GRID`` on its lr grid (``--lrs grid --extend-edges``; small size,
   seed 0), one group each (``runs/study-kappa<i>/``). The K with the lowest loss at its best lr wins and the
   later stages run Lion-K with it (``--optim_args lion_k:<K>``); the report says whether it is the main job's
   (``sweep.DEFAULT_OPTIM_ARGS["lion_k"]``).
1. ``grid``: every optimizer at the small size on its own ``LR_MULTIPLIERS`` grid (5 points around its default
   lr, ``sweep.py --lrs grid --extend-edges``), seed 0, into ``runs/study-<small>/``.
2. ``seeds-small``: every optimizer at its best lr of stage 1, seeds ``SEEDS`` (seed 0 is reused), plus AdamW at
   2 more budgets (a third and two thirds of the steps) for the speedup fit, same group.
3. ``seeds-mid``: the same lrs and seeds at the mid size (``MID_CONFIG``, about 4.9M parameters, written to
   ``runs/study-mid.json``), with AdamW's budgets, into ``runs/study-<mid>/``.
4. ``report``: ``runs/study.md``: the machine, the command, the time the runs took, each size's table
   (``results.md``, with intervals and speedups), the plots, and the claims table (:data:`CLAIMS`, verdicts by
   :func:`verdict`).

This scale (1-5M parameters, a few hundred thousand tokens of Shakespeare) cannot settle claims the papers make at
60M-1B parameters and billions of tokens; the papers' harness on GPUs is ``recipes/pretrain_llama.py`` with
``--model_config llama_60m`` (or 130m, 350m, 1b) on C4, see the recipe's docstring.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import sweep  # noqa: E402
from optimzoo.cli import resolve_optimizer, user_errors  # noqa: E402

SEEDS = (0, 1, 2)
SMALL = "llama_tiny"
#: the mid size: llama_tiny's shape widened and deepened (about 4.9M parameters with the byte tokenizer)
MID_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4, "num_hidden_layers": 6,
              "initializer_range": 0.02, "max_sequence_length": 1024, "rms_norm_eps": 1e-6, "use_cache": True,
              "vocab_size": 32000, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": -1}
STEPS = {"small": 150, "mid": 100}
#: rough seconds per step on 2 uncontended cores and per run start, for the plan's estimate only
SECONDS_PER_STEP = {"small": 0.12, "mid": 0.7}
START_S = 8.0
#: Lion-K's non-sign K candidates (``tanh(a x)`` and ``clip(x / a, -1, 1)`` are soft signs; gradients here are
#: ~1e-3, so ``a`` sets how much of the update stays linear)
KAPPA_GRID = ("kappa=tanh,a=100", "kappa=tanh,a=1000", "kappa=huber,a=0.001")
SMOKE = {"optims": "adamw,lion", "lrs": "adamw=1e-3,3e-3;lion=1e-4,3e-4", "seeds": (0, 1),
         "steps": {"small": 12, "mid": 4}}

#: (optimizer, its paper's headline claim, comparisons (optimizer, "better" | "matches", other))
CLAIMS = [
    ("normuon", "NorMuon beats Muon and Adam", [("normuon", "better", "muon"), ("normuon", "better", "adamw")]),
    ("stable_spam", "Stable-SPAM beats Adam", [("stable_spam", "better", "adamw")]),
    ("spam", "SPAM beats Adam", [("spam", "better", "adamw")]),
    ("swan", "SWAN matches Adam without optimizer state", [("swan", "matches", "adamw")]),
    ("sinkgd", "SinkGD matches Adam without optimizer state", [("sinkgd", "matches", "adamw")]),
    ("auon", "AuON is near Muon at a fraction of its cost", [("auon", "matches", "muon")]),
    ("hybrid_auon", "Hybrid AuON is near Muon", [("hybrid_auon", "matches", "muon")]),
    ("muon", "Muon beats AdamW", [("muon", "better", "adamw")]),
    ("lion", "Lion matches AdamW", [("lion", "matches", "adamw")]),
    ("lion_k", "Lion-K (a non-sign K) matches Lion", [("lion_k", "matches", "lion")]),
    ("adamp", "AdamP beats AdamW", [("adamp", "better", "adamw")]),
    ("diffgrad", "diffGrad beats Adam", [("diffgrad", "better", "adamw")]),
]


def difference_interval(a: dict, b: dict, level: float = 0.95) -> tuple[float, float, float] | None:
    """(mean of b - a, low, high): Welch's t-interval of the difference of two optimizers' mean eval losses over
    seeds (``results.json`` entries); ``None`` with fewer than 2 seeds on either side."""
    from scipy import stats

    if a["n"] < 2 or b["n"] < 2 or a["eval_loss_std"] is None or b["eval_loss_std"] is None:
        return None
    va, vb = a["eval_loss_std"] ** 2 / a["n"], b["eval_loss_std"] ** 2 / b["n"]
    diff = b["eval_loss_mean"] - a["eval_loss_mean"]
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff
    dof = (va + vb) ** 2 / (va ** 2 / (a["n"] - 1) + vb ** 2 / (b["n"] - 1))
    half = float(stats.t.ppf(0.5 + level / 2, dof)) * se
    return diff, diff - half, diff + half


def verdict(a: dict, relation: str, b: dict) -> str:
    """``agrees``, ``disagrees`` or ``inside the noise`` for "a is better than / matches b" from the 95% interval
    of ``loss(b) - loss(a)``: "better" agrees when it is above 0, disagrees below 0; "matches" agrees when it
    holds 0, and otherwise agrees only when a is the better one."""
    d = difference_interval(a, b)
    if d is None:
        return "not estimable (fewer than 2 seeds)"
    diff, low, high = d
    if relation == "better":
        return "agrees" if low > 0 else "disagrees" if high < 0 else "inside the noise"
    return "agrees (inside the noise)" if low <= 0 <= high else "agrees (better)" if low > 0 else "disagrees"


def claims_table(results: dict) -> str:
    """The claims table for one size's ``results.json``."""
    by = {r["optimizer"]: r for r in results["optimizers"]}
    lines = ["| claim | comparison | loss difference (95% CI) | this study |", "|---|---|---|---|"]
    for name, claim, comparisons in CLAIMS:
        for a, relation, b in comparisons:
            if a not in by or b not in by:
                lines.append(f"| {claim} | {a} {relation} {b} | - | not measured |")
                continue
            d = difference_interval(by[a], by[b])
            cell = f"{d[0]:+.3f} ({d[1]:+.3f} to {d[2]:+.3f})" if d else "-"
            lines.append(f"| {claim} | {a} {relation} than {b} | {cell} | {verdict(by[a], relation, by[b])} |"
                         .replace("matches than", "matches"))
    return "\n".join(lines)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    from optimzoo.hf.runs import usable_cores

    return f"{cpu}, {usable_cores()} usable cores, {platform.system()} {platform.release()}"


def best_lrs(results_file: Path) -> str:
    """``--lrs`` for the seeds stages: each optimizer's best lr of the grid stage."""
    results = json.loads(results_file.read_text())
    return ";".join(f"{r['optimizer']}={r['best_lr']:g}" for r in results["optimizers"])


def missing_runs(runs_dir: Path, groups: dict[str, str], optims: list[str], n_seeds: int) -> list[str]:
    """What a partial study lacks: per size group, the optimizers with fewer than ``n_seeds`` seeds at their best
    lr (or none)."""
    missing = []
    for group in groups.values():
        results = runs_dir / group / "results.json"
        found = {r["optimizer"]: r["n"] for r in json.loads(results.read_text())["optimizers"]} \
            if results.exists() else {}
        short = [o for o in optims if found.get(o, 0) < n_seeds]
        if short:
            missing.append(f"{group}: {', '.join(short)}" if found else f"{group}: every run")
    return missing


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs_dir", type=Path, default=Path("runs"))
    which = p.add_mutually_exclusive_group()
    which.add_argument("--smoke", action="store_true", help="toy scale: 2 optimizers, 2 lrs, 2 seeds, a few steps")
    p.add_argument("--dry_run", "--dry-run", dest="dry_run", action="store_true", help="print the plan only")
    which.add_argument("--optims", default=None,
                   help="comma-separated optimizers (default: AdamW and every zoo optimizer); the runs go into the "
                        "same groups, so a later full study reuses them")
    p.add_argument("--report", action="store_true",
                   help="run nothing: compare the runs finished so far and write the report (a partial study "
                        "shows n < 3 seeds where runs are missing; run without --report to finish it)")
    args = p.parse_args(argv)

    optims = SMOKE["optims"].split(",") if args.smoke else sweep.default_optimizers()
    if args.optims:
        with user_errors(p):
            optims = [resolve_optimizer(o.strip()).name for o in args.optims.split(",")]
    seeds = SMOKE["seeds"] if args.smoke else SEEDS
    steps = SMOKE["steps"] if args.smoke else STEPS
    tag = "study-smoke" if args.smoke else "study"
    mid_config = args.runs_dir / f"{tag}-mid.json"
    groups = {"small": f"{tag}-{SMALL}", "mid": f"{tag}-mid"}
    seed_list = ",".join(map(str, seeds))
    common = ["--optims", ",".join(optims), "--progress_s", "15"]
    kappa_groups = [f"{tag}-kappa{i}" for i in range(len(KAPPA_GRID))] if "lion_k" in optims else []

    def kappa_stage(i: int) -> list[str]:
        return ["--optims", "lion_k", "--lrs", "grid", "--extend-edges", "--seeds", "0", "--budgets", "none",
                "--max_steps", str(steps["small"]), "--optim_args", f"lion_k:{KAPPA_GRID[i]}", "--progress_s", "15",
                "--group", kappa_groups[i], "--runs_dir", str(args.runs_dir)]

    def grid_stage(kappa: list[str]) -> list[str]:
        return [*common, *kappa, "--model_config", SMALL, "--lrs", SMOKE["lrs"] if args.smoke else "grid",
                "--extend-edges", "--seeds", "0", "--budgets", "none", "--max_steps", str(steps["small"]),
                "--group", groups["small"], "--runs_dir", str(args.runs_dir)]

    def seeds_stage(size: str, lrs: str, kappa: list[str]) -> list[str]:
        model = SMALL if size == "small" else str(mid_config)
        return [*common, *kappa, "--model_config", model, "--lrs", lrs, "--seeds", seed_list, "--budgets", "auto",
                "--max_steps", str(steps[size]), "--group", groups[size], "--runs_dir", str(args.runs_dir)]

    n_grid = sum(map(len, sweep.parse_lrs(SMOKE["lrs"] if args.smoke else "grid", optims).values())) \
        + len(sweep.LR_MULTIPLIERS) * len(kappa_groups)
    n_seeds = len(optims) * len(seeds)
    budget_runs = 2 * len(seeds) if "adamw" in optims else 0
    est = (n_grid * (START_S + steps["small"] * SECONDS_PER_STEP["small"])
           + (n_seeds - len(optims) + budget_runs) * (START_S + steps["small"] * SECONDS_PER_STEP["small"])
           + (n_seeds + budget_runs) * (START_S + steps["mid"] * SECONDS_PER_STEP["mid"]))
    print(f"study{' (smoke)' if args.smoke else ''}: {len(optims)} optimizers, sizes {SMALL} and "
          f"{mid_config.name} ({steps['small']} and {steps['mid']} steps), seeds {seed_list}; about "
          f"{n_grid + n_seeds - len(optims) + budget_runs + n_seeds + budget_runs} runs, roughly {est / 60:.0f} min "
          "on 2 uncontended cores; resumable (run it again after an interruption)", flush=True)
    best_k = ["--optim_args", "lion_k:<best K of stage 0>"] if kappa_groups else []
    for i in range(len(kappa_groups)):
        print(f"  0. kappa:       sweep.py {' '.join(kappa_stage(i))}")
    print(f"  1. grid:        sweep.py {' '.join(grid_stage(best_k))}")
    print(f"  2. seeds-small: sweep.py {' '.join(seeds_stage('small', '<best lrs of stage 1>', best_k))}")
    print(f"  3. seeds-mid:   sweep.py {' '.join(seeds_stage('mid', '<best lrs of stage 1>', best_k))}")
    print(f"  4. report:      {args.runs_dir / (tag + '.md')}", flush=True)
    if args.dry_run:
        return 0
    started = time.time()
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    mid_config.write_text(json.dumps(MID_CONFIG, indent=1) + "\n")
    failed = 0
    kappa: dict[str, dict] = {}  # each K's best entry of its lr grid
    for i, group in enumerate(kappa_groups):
        if not args.report:
            failed |= sweep.main(kappa_stage(i))
        if (args.runs_dir / group / "results.json").exists():
            kappa[KAPPA_GRID[i]] = json.loads((args.runs_dir / group / "results.json").read_text())["optimizers"][0]
    best = min(kappa, key=lambda k: kappa[k]["eval_loss_mean"]) if kappa else None
    best_k = ["--optim_args", f"lion_k:{best}"] if best else []
    if args.report:  # the sweeps' comparisons of what has finished, nothing run
        for size, group in groups.items():
            if (args.runs_dir / group).is_dir():
                model = SMALL if size == "small" else mid_config.stem
                sweep.compare_group(args.runs_dir / group, f"{model}, {steps[size]} steps, seeds {seed_list}")
    else:
        if best:
            print(f"study: Lion-K's K: {best} (lr {kappa[best]['best_lr']:g}); the later stages use it", flush=True)
        failed |= sweep.main(grid_stage(best_k))
        lrs = best_lrs(args.runs_dir / groups["small"] / "results.json")
        print(f"study: best lrs of the grid: {lrs}", flush=True)
        failed |= sweep.main(seeds_stage("small", lrs, best_k))
        failed |= sweep.main(seeds_stage("mid", lrs, best_k))
    command = (f".venv/bin/python scripts/study.py{' --smoke' if args.smoke else ''}"
               + (f" --optims {','.join(optims)}" if args.optims else ""))
    missing = missing_runs(args.runs_dir, groups, optims, len(seeds))
    report = [f"# optimzoo study{' (smoke)' if args.smoke else ''}", "",
              f"Command: `{command}`; machine: {machine()}; "
              + (f"this report was written by `{command} --report` from the runs finished so far ("
                 + (f"runs missing: {', '.join(missing)}; `{command}` finishes them)." if missing else
                    "every planned run had finished).") if args.report else
                 f"this invocation took {(time.time() - started) / 60:.1f} min (runs reused from earlier "
                 "invocations are not timed again)."), ""]
    if kappa:
        default = sweep.DEFAULT_OPTIM_ARGS["lion_k"]
        report += ["## Lion-K's K", "", "Each K on Lion-K's lr grid, llama_tiny, seed 0.", "",
                   "| K | best lr | lrs tried | eval loss at the best lr |", "|---|---|---|---|",
                   *[f"| {k} | {e['best_lr']:g} | {', '.join(f'{x:g}' for x in e['lrs'])} | "
                     f"{e['eval_loss_mean']:.3f} |" for k, e in kappa.items()], "",
                   f"Best: {best}; the stages below run Lion-K with it"
                   + ("; the main job's default (sweep.DEFAULT_OPTIM_ARGS) is the same." if best == default else
                      f"; the main job's default (sweep.DEFAULT_OPTIM_ARGS) is another K, {default}."),
                   ""]
    for size, group in groups.items():
        gdir = args.runs_dir / group
        if not (gdir / "results.json").exists():
            report += [f"## {SMALL if size == 'small' else mid_config.stem}: no runs yet", ""]
            continue
        results = json.loads((gdir / "results.json").read_text())
        step_ms = {r["optimizer"]: r["median_step_ms"] for r in results["optimizers"] if r["median_step_ms"]}
        report += [f"## {SMALL if size == 'small' else mid_config.stem}, {steps[size]} steps", "",
                   (gdir / "results.md").read_text().strip(), "",
                   f"Plots: {gdir / 'eval_loss_vs_tokens.png'}, {gdir / 'loss_vs_time.png'}, "
                   f"{gdir / 'lr_sensitivity.png'}" + (" (the lr grid)" if size == "small" else ""), "",
                   "### Claims", "", claims_table(results), ""]
        if "auon" in step_ms and "muon" in step_ms:
            report += [f"AuON's median step: {step_ms['auon']:.1f} ms, Muon's {step_ms['muon']:.1f} ms "
                       f"({step_ms['auon'] / step_ms['muon']:.2f}x).", ""]
    report += ["This scale cannot settle the papers' claims, made at 60M-1B parameters on billions of tokens. "
               "The papers' harness on GPUs: `.venv/bin/torchrun --nproc_per_node 4 recipes/pretrain_llama.py "
               "--model_config recipes/configs/llama_60m.json --dataset allenai/c4 --dataset_config en --streaming "
               "--tokenizer t5-base "
               "--optim stable_spam --learning_rate 1e-3 --max_steps 10000 --per_device_train_batch_size 128 --bf16 "
               "--eval_strategy steps --eval_steps 1000 --max_eval_samples 51200` (one optimizer; "
               "`scripts/sweep.py --model_config llama_60m --nproc 4 ... -- --dataset allenai/c4 ...` for all).", ""]
    out = args.runs_dir / f"{tag}.md"
    out.write_text("\n".join(report))
    print(f"study: {out} ({(time.time() - started) / 60:.1f} min)", flush=True)
    return int(bool(failed))


if __name__ == "__main__":
    sys.exit(main())
