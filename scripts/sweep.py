#!/usr/bin/env python
"""Run the pretraining recipe for several optimizers, learning rates and seeds, then compare them.

    python scripts/sweep.py                        # the main job: every zoo optimizer + AdamW on llama_tiny (~10 min, 2 CPU cores)
    python scripts/sweep.py --optims adamw,normuon --lrs "normuon=0.02,0.05;adamw=1e-3,3e-3" --seeds 0,1,2
    python scripts/sweep.py --optims adamw,lion --lrs grid --extend-edges    # each optimizer's own 5-point grid
    python scripts/sweep.py --model_config llama_60m --nproc 8 --group c4-60m -- --dataset allenai/c4 \\
        --dataset_config en --streaming --tokenizer t5-base --per_device_train_batch_size 64

Every run gets the same model, data and token budget; runs go one after another (``torchrun`` when
``--nproc > 1``), all in one wandb group, into ``runs/<group>/<run name>/`` (its log: ``recipe.log`` there).

**Learning rates**, in each optimizer's own units: without ``--lrs`` each optimizer runs at ``DEFAULT_LRS``
(a grid search on llama_tiny, see the README; a matrix optimizer's vector parameters use ``MATRIX_ADAMW_LR``
like AdamW's). ``--lrs`` takes ``;``-separated parts, each ``name=LR,LR,...`` (that optimizer), ``LR,LR,...``
(every optimizer without its own part) or ``grid`` in place of the numbers: ``LR_MULTIPLIERS`` times the
optimizer's default lr. A best lr at the edge of its grid is flagged in the table; ``--extend-edges`` adds the
next grid point beyond that edge and runs it, until the best lr is inside (at most ``MAX_EXTENSIONS`` times).

**Seeds**: ``--seeds 0,1,2`` runs every (optimizer, lr) at each seed; the comparison takes the mean over seeds.

**Speedup over AdamW**: with AdamW in the sweep, AdamW also runs at the ``--budgets`` (``max_steps`` values,
default a third and two thirds of ``--max_steps``; ``none`` turns it off), at its best lr and every seed
(``--budget_seeds``), each with its own full schedule, into ``runs/<group>/budgets/``; the comparison fits
AdamW's loss against tokens there.

**Run identity and reuse**: the settings of every planned run (:func:`optimzoo.hf.runs.run_identity`, computed
from the recipe's own argument parser) are written to ``run_identity.json`` in its directory before it starts. A
finished run is reused only when they match; an unfinished one is run again (resumed from its last checkpoint
when it has one). A directory holding a run with other settings is refused before anything runs, naming the
settings that differ: use another ``--group``. So an interrupted sweep resumes where it stopped.

**Output**: a banner (runs planned, reused, where the logs are), a progress line per run at least every
``--progress_s`` seconds (default ``PROGRESS_EVERY_S``: step, loss, tokens/s, ETA), a line per finished run, then
``scripts/compare_runs.py`` writes ``results.md``, ``results.json`` and the plots into the group directory.
``--optim_args`` takes ``;``-separated parts: ``k=v,...`` for every optimizer, ``name:k=v,...`` for one
(``lion_k:kappa=huber,a=0.001``); they replace ``DEFAULT_OPTIM_ARGS``' value of the same key.
Arguments after ``--`` go to every recipe run. Names, lrs and ``--optim_args`` values are checked before the first run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import optimzoo  # noqa: E402
from optimzoo.cli import brief_usage, check_optimizer_args, merge_kv, parse_kv, resolve_optimizer, user_errors  # noqa: E402
from optimzoo.hf.runs import run_identity, settings_diff  # noqa: E402

RECIPE = ROOT / "recipes" / "pretrain_llama.py"

#: learning rate per optimizer for llama_tiny on the embedded corpus, the best of a grid search at 150 steps
#: (README, "Learning rates"); matrix optimizers: the matrix lr, their vector parameters use
#: ``MATRIX_ADAMW_LR`` like AdamW's
DEFAULT_LRS = {
    "adamw": 3e-3, "adamp": 3e-3, "sgdp": 0.1, "diffgrad": 3e-3, "lion": 1e-3, "lion_k": 1e-3, "spam": 3e-3,
    "stable_spam": 3e-3, "muon": 0.05, "normuon": 0.05, "swan": 0.01, "sinkgd": 3e-3, "auon": 0.03,
    "hybrid_auon": 0.05,
}
#: per-optimizer recipe options of the default sweep; Lion-K with a non-sign kappa (with ``sign`` it is Lion),
#: the best of {tanh, huber, relativistic} at lr 1e-3, llama_tiny, 150 steps (README, "Learning rates")
DEFAULT_OPTIM_ARGS = {"sgdp": "momentum=0.9,nesterov=True", "lion_k": "kappa=tanh,a=1000"}
MATRIX_ADAMW_LR = 3e-3
#: a default grid: these multiples of the optimizer's default lr
LR_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)
MAX_EXTENSIONS = 3
PROGRESS_EVERY_S = 15.0


def default_optimizers() -> list[str]:
    """AdamW and every registered zoo optimizer."""
    return ["adamw"] + optimzoo.list_optimizers(baselines=False).names()


def parse_optim_args(text: str | None, optims: list[str]) -> dict[str, str | None]:
    """Each optimizer's part of ``--optim_args``: ``;``-separated parts, each ``name:k=v,...`` (that optimizer) or
    ``k=v,...`` (every optimizer); an optimizer's own parts come after the shared ones, so their keys win."""
    shared: list[str] = []
    own: dict[str, list[str]] = {}
    for part in (text or "").split(";"):
        part = part.strip()
        if not part:
            continue
        named = re.fullmatch(r"([A-Za-z][\w-]*)\s*:(.*)", part, re.S)
        if named:
            canonical = resolve_optimizer(named.group(1)).name
            if canonical not in optims:
                raise ValueError(f"--optim_args names {named.group(1)!r}, which is not in --optims "
                                 f"({','.join(optims)})")
            own.setdefault(canonical, []).append(named.group(2))
        else:
            shared.append(part)
    return {o: merge_kv(*shared, *own.get(o, []), what="--optim_args") for o in optims}


def optim_args(name: str, extra: str | None) -> str | None:
    """The recipe's ``--optim_args`` for ``name``: a matrix optimizer's ``adamw_lr`` (``MATRIX_ADAMW_LR``),
    ``DEFAULT_OPTIM_ARGS``, then ``extra`` (the user's part for ``name``), a later key replacing an earlier one."""
    matrix = f"adamw_lr={MATRIX_ADAMW_LR}" if optimzoo.get_spec(name).kind == "matrix" else None
    return merge_kv(matrix, DEFAULT_OPTIM_ARGS.get(name), extra)


def default_lr(name: str) -> float:
    """``DEFAULT_LRS``, else the optimizer's own registry default (the recipe's default too)."""
    return DEFAULT_LRS.get(name, optimzoo.get_spec(name).defaults.get("lr", 1e-3))


def lr_grid(name: str) -> list[float]:
    """The default grid of ``name``: ``LR_MULTIPLIERS`` times :func:`default_lr`, to 3 significant digits."""
    return [float(f"{default_lr(name) * m:.3g}") for m in LR_MULTIPLIERS]


def _lr_values(name: str, text: str) -> list[float]:
    if text.strip() == "grid":
        return lr_grid(name)
    out = []
    for x in text.split(","):
        try:
            out.append(float(x))
        except ValueError:
            raise ValueError(f"--lrs: {x.strip()!r} is not a number (nor 'grid')") from None
    return out


def parse_lrs(text: str | None, optims: list[str]) -> dict[str, list[float]]:
    """Each optimizer's lrs from ``--lrs`` (see the module docstring); an optimizer without a part: its default lr."""
    own: dict[str, str] = {}
    shared = None
    for part in (text or "").split(";"):
        part = part.strip()
        if not part:
            continue
        name, sep, values = part.partition("=")
        if sep:
            canonical = resolve_optimizer(name.strip()).name
            if canonical not in optims:
                raise ValueError(f"--lrs names {name.strip()!r}, which is not in --optims ({','.join(optims)})")
            own[canonical] = values
        else:
            shared = part
    return {o: _lr_values(o, own[o]) if o in own else _lr_values(o, shared) if shared else [default_lr(o)]
            for o in optims}


def parse_budgets(text: str, max_steps: int, optims: list[str]) -> list[int]:
    """AdamW's extra budgets (``max_steps`` values): ``auto`` (a third and two thirds of ``max_steps``), ``none``
    or a list; none without AdamW in the sweep."""
    if "adamw" not in optims or text == "none":
        return []
    steps = [max_steps // 3, 2 * max_steps // 3] if text == "auto" else [int(x) for x in text.split(",")]
    bad = [s for s in steps if not 0 < s < max_steps]
    if bad:
        raise ValueError(f"--budgets: {bad} not between 0 and --max_steps {max_steps} (exclusive)")
    return sorted(set(steps))


def run_name(model: str, optim: str, lr: float, seed: int) -> str:
    return f"{model}-{optim}-lr{lr:g}-s{seed}"


def _recipe():
    """The recipe module (its argument dataclasses and config lookup), imported from its file."""
    spec = importlib.util.spec_from_file_location("_optimzoo_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@dataclass
class Job:
    """One planned recipe run."""

    optim: str
    lr: float
    seed: int
    max_steps: int
    name: str
    out: Path
    cmd: list[str]
    identity: dict
    status: str = "new"  # new | done | rerun | resume

    @property
    def label(self) -> str:
        return f"{self.optim:<12} lr={self.lr:<8g} s{self.seed}" + (f" {self.max_steps} steps" if "budgets" in
                                                                     self.out.parts else "")


def recipe_args(args, optim: str, lr: float, seed: int, max_steps: int, name: str, out: Path, group: str,
                passthrough: list[str]) -> list[str]:
    """The recipe's arguments for one run."""
    cmd = ["--model_config", args.model_config, "--optim", optim, "--learning_rate", f"{lr:g}",
           "--max_steps", str(max_steps), "--seed", str(seed), "--per_device_train_batch_size", str(args.batch_size),
           "--eval_strategy", "steps", "--eval_steps", str(args.eval_steps), "--output_dir", str(out),
           "--run_name", name, "--wandb_group", group, "--disable_tqdm", "true"]
    extra = optim_args(optim, args.own_optim_args[optim])
    if extra:
        cmd += ["--optim_args", extra]
    if args.max_eval_samples:
        cmd += ["--max_eval_samples", str(args.max_eval_samples)]
    return cmd + passthrough


def planned_identity(recipe, cmd: list[str], world_size: int) -> dict:
    """The run identity of a recipe command, parsed by the recipe's own parser (nothing is loaded or run)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser((recipe.ModelArguments, recipe.DataArguments, recipe.RecipeTrainingArguments))
    margs, dargs, targs = parser.parse_args_into_dataclasses(args=cmd)
    config = json.loads(recipe.resolve_config(margs.model_config).read_text())
    return run_identity(margs, dargs, targs, world_size=world_size, model_config=config)


def recorded_identity(out: Path) -> dict | None:
    """The identity a run directory records: the run's own (``run_summary.json``, when the recipe writes it),
    else the one the sweep wrote before starting it."""
    summary = out / "run_summary.json"
    if summary.is_file():
        found = json.loads(summary.read_text()).get("identity")
        if found:
            return found
    planned = out / "run_identity.json"
    return json.loads(planned.read_text()) if planned.is_file() else None


def reuse_status(job: Job) -> tuple[str, dict]:
    """(status, differing settings): ``done`` (finished, same settings: reused), ``resume``/``rerun`` (unfinished,
    same settings), ``new``, or ``conflict`` with the settings that differ."""
    finished = (job.out / "run_summary.json").is_file()
    recorded = recorded_identity(job.out)
    if recorded is None:
        if finished:
            return "conflict", {"run identity": ("not recorded (a run made before run identity)", "recorded")}
        return "new", {}
    if recorded["hash"] != job.identity["hash"]:
        diff = settings_diff(recorded["settings"], job.identity["settings"])
        if diff:
            return "conflict", diff
    if finished:
        return "done", {}
    return ("resume" if any(job.out.glob("checkpoint-*")) else "rerun"), {}


def _fmt_value(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def conflict_message(job: Job, diff: dict) -> str:
    parts = "; ".join(f"{k}: {_fmt_value(a)} there, {_fmt_value(b)} now" for k, (a, b) in diff.items())
    return f"{job.out} holds a run with other settings ({parts})"


def progress_line(job: Job, started: float) -> str:
    """One line on a running job from its ``progress.json`` (written by the recipe's run clock)."""
    path = job.out / "progress.json"
    elapsed = time.time() - started
    try:
        p = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return f"  ... {job.name}: starting ({elapsed:.0f} s: loading model and data)"
    loss = f"{p['loss']:.3f}" if p.get("loss") is not None else "-"
    rate = f"{p['tokens_per_s']:,.0f}" if p.get("tokens_per_s") else "-"
    eta = f"{p['eta_s']:.0f} s" if p.get("eta_s") is not None else "-"
    return f"  ... {job.name}: step {p['step']}/{p['max_steps']}, loss {loss}, {rate} tok/s, ETA {eta}"


def run_job(job: Job, args, env: dict, index: str, sweep_start: float) -> bool:
    """Run one job (its output in ``recipe.log``), printing progress; whether it finished."""
    launcher = [sys.executable] if args.nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc)]
    cmd = [*launcher, str(RECIPE), *job.cmd]
    if job.status == "resume":
        cmd += ["--resume_from_checkpoint", "last"]
    job.out.mkdir(parents=True, exist_ok=True)
    (job.out / "progress.json").unlink(missing_ok=True)
    (job.out / "run_identity.json").write_text(json.dumps(job.identity, indent=1) + "\n")
    t0 = time.time()
    print(f"{index} {job.label} {'resuming' if job.status == 'resume' else 'started'}, log {job.out / 'recipe.log'}",
          flush=True)
    with open(job.out / "recipe.log", "a" if job.status == "resume" else "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        while True:
            try:
                rc = proc.wait(timeout=args.progress_s)
                break
            except subprocess.TimeoutExpired:
                print(progress_line(job, t0), flush=True)
    summary_file = job.out / "run_summary.json"
    if rc != 0 or not summary_file.exists():
        print(f"{index} {job.label} FAILED (exit {rc}), see {job.out / 'recipe.log'}", flush=True)
        return False
    s = json.loads(summary_file.read_text())
    own = s.get("identity")
    if own and own["hash"] != job.identity["hash"]:
        print(f"{index} warning: the run recorded other settings than planned: "
              f"{conflict_message(job, settings_diff(own['settings'], job.identity['settings']))}", flush=True)
    print(f"{index} {job.label} loss {s['final_loss']:.3f}  eval {s.get('eval_loss', float('nan')):.3f} "
          f"(ppl {s.get('eval_perplexity', float('nan')):.1f})  {s['tokens_per_second']:,.0f} tok/s  "
          f"{time.time() - t0:.0f} s  [{time.time() - sweep_start:.0f} s total]", flush=True)
    return True


def best_lrs(group_dir: Path, optims: list[str]) -> dict:
    """Each optimizer's aggregated result from the finished runs in ``group_dir`` (best lr by the seed mean)."""
    import compare_runs

    runs = compare_runs.load_runs([group_dir], "trainer_state")
    return {r.optim: r for r in compare_runs.aggregate([run for run in runs if run.optim in optims])}


def extension(result, lrs: list[float]) -> float | None:
    """The next lr beyond the grid's edge when the best lr is at it (the grid's own ratio), else ``None``."""
    grid = sorted(lrs)
    if len(grid) < 2 or not result.edge:
        return None
    if result.best.lr == grid[0]:
        return float(f"{grid[0] * grid[0] / grid[1]:.3g}")
    return float(f"{grid[-1] * grid[-1] / grid[-2]:.3g}")


def compare_group(group_dir: Path, title: str) -> str:
    """``compare_runs.py`` on a sweep's group directory (and its AdamW budgets): ``results.md``, ``results.json``
    and the plots, from the runs finished so far; returns the table."""
    import compare_runs

    compare_args = [str(group_dir), "--title", title, "--source", "trainer_state"]  # same numbers, no wandb reader
    if (group_dir / "budgets").is_dir():
        compare_args += ["--budgets", str(group_dir / "budgets")]
    return compare_runs.main(compare_args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = brief_usage(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--optims", default=None, help="comma-separated names (default: adamw + every zoo optimizer)")
    p.add_argument("--lrs", default=None, help="'name=LR,LR;...', 'LR,LR' or 'grid' (default: DEFAULT_LRS)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--budgets", default="auto", help="AdamW's extra max_steps for the speedup fit: auto, none or N,N")
    p.add_argument("--budget_seeds", default=None, help="seeds of the budget runs (default: --seeds)")
    p.add_argument("--extend-edges", "--extend_edges", dest="extend_edges", action="store_true",
                   help="extend a grid whose best lr is at its edge, and run the new points")
    p.add_argument("--model_config", default="llama_tiny")
    p.add_argument("--max_steps", type=int, default=150)
    p.add_argument("--batch_size", type=int, default=8, help="per-device batch size (sequences)")
    p.add_argument("--eval_steps", type=int, default=25)
    p.add_argument("--max_eval_samples", type=int, default=None)
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun when > 1)")
    p.add_argument("--group", default=None, help="wandb group and directory name (default: sweep-<model>)")
    p.add_argument("--runs_dir", type=Path, default=Path("runs"))
    p.add_argument("--optim_args", default=None,
                   help="extra optimizer arguments: 'k=v,...' (every optimizer), 'name:k=v,...' (one), ';' between parts")
    p.add_argument("--progress_s", type=float, default=PROGRESS_EVERY_S, help="seconds between progress lines")
    p.add_argument("--title", default=None, help="title of the plots (default: model, steps, seeds)")
    p.add_argument("--dry_run", "--dry-run", dest="dry_run", action="store_true",
                   help="print the plan and the commands only")
    args = p.parse_args(argv)

    with user_errors(p):  # names and values are checked before the first run starts (exit 2, no traceback)
        optims = [resolve_optimizer(o.strip()).name for o in args.optims.split(",")] if args.optims \
            else default_optimizers()
        lrs = parse_lrs(args.lrs, optims)
        seeds = [int(s) for s in args.seeds.split(",")]
        budgets = parse_budgets(args.budgets, args.max_steps, optims)
        budget_seeds = [int(s) for s in args.budget_seeds.split(",")] if args.budget_seeds else seeds
        args.own_optim_args = parse_optim_args(args.optim_args, optims)
        for o in optims:
            extra = parse_kv(optim_args(o, args.own_optim_args[o]))
            for lr in lrs[o]:
                check_optimizer_args(o, {"lr": lr, **extra}, user_keys=parse_kv(args.own_optim_args[o]).keys())
    recipe = _recipe()
    model = Path(args.model_config).stem
    group = args.group or f"sweep-{model}"
    group_dir = args.runs_dir / group

    def job(o: str, lr: float, seed: int, steps: int) -> Job:
        name = run_name(model, o, lr, seed) + ("" if steps == args.max_steps else f"-steps{steps}")
        out = group_dir / ("budgets" if steps != args.max_steps else "") / name
        cmd = recipe_args(args, o, lr, seed, steps, name, out, group, passthrough)
        with user_errors(p):
            identity = planned_identity(recipe, cmd, args.nproc)
        return Job(o, lr, seed, steps, name, out, cmd, identity)

    def plan(jobs: list[Job]) -> None:
        conflicts = []
        for j in jobs:
            j.status, diff = reuse_status(j)
            if j.status == "conflict":
                conflicts.append(conflict_message(j, diff))
        if conflicts:
            for c in conflicts:
                print(f"sweep.py: error: {c}", file=sys.stderr)
            print(f"sweep.py: error: {len(conflicts)} run(s) in {group_dir} were made with other settings; "
                  "use another --group for these settings (or delete those directories)", file=sys.stderr)
            raise SystemExit(2)

    jobs = [job(o, lr, s, args.max_steps) for o in optims for lr in lrs[o] for s in seeds]
    plan(jobs)
    reused = sum(j.status == "done" for j in jobs)
    print(f"sweep {group}: {len(jobs)} runs planned ({len(optims)} optimizers x their lrs x {len(seeds)} seed(s)), "
          f"{reused} done earlier and reused, {len(jobs) - reused} to run; {model}, {args.max_steps} steps, "
          f"batch {args.batch_size} x {args.nproc} process(es)"
          + (f"; then AdamW at {budgets} steps x {len(budget_seeds)} seed(s) at its best lr" if budgets else "")
          + (f"; grids extended at their edges (up to {MAX_EXTENSIONS} times)" if args.extend_edges else ""),
          flush=True)
    print(f"  each run's log: {group_dir}/<run name>/recipe.log; results: {group_dir}/results.md, results.json",
          flush=True)
    if args.dry_run:
        for j in jobs:
            print(f"[{j.status}] {' '.join([sys.executable, str(RECIPE), *j.cmd])}")
        if budgets:
            print(f"[later] AdamW at max_steps {budgets} at the best AdamW lr of the runs above, "
                  f"into {group_dir}/budgets")
        return 0
    env = {**os.environ, "WANDB_PROJECT": os.environ.get("WANDB_PROJECT", "optimzoo")}
    started = time.time()
    failed: list[str] = []

    def run_all(batch: list[Job]) -> None:
        todo = [j for j in batch if j.status != "done"]
        for i, j in enumerate(todo, 1):
            if not run_job(j, args, env, f"[{i}/{len(todo)}]", started):
                failed.append(j.name)

    run_all(jobs)
    if args.extend_edges:
        for _ in range(MAX_EXTENSIONS):
            results = best_lrs(group_dir, optims)
            new = {o: lr for o in optims if o in results and (lr := extension(results[o], lrs[o])) is not None}
            if not new:
                break
            print(f"best lr at the edge of its grid, extending: " + ", ".join(f"{o} +{lr:g}" for o, lr in new.items()),
                  flush=True)
            more = [job(o, lr, s, args.max_steps) for o, lr in new.items() for s in seeds]
            for o, lr in new.items():
                lrs[o].append(lr)
            plan(more)
            run_all(more)
    if budgets:
        adamw = best_lrs(group_dir, ["adamw"]).get("adamw")
        if adamw is None:
            print("no finished AdamW run: no budget runs, no speedup fit", flush=True)
        else:
            more = [job("adamw", adamw.best.lr, s, steps) for steps in budgets for s in budget_seeds]
            plan(more)
            print(f"AdamW budgets for the speedup fit: {budgets} steps at lr {adamw.best.lr:g}", flush=True)
            run_all(more)
    compare_group(group_dir, args.title or f"{model}, {args.max_steps} steps, seeds {','.join(map(str, seeds))}")
    print(f"sweep {group}: {time.time() - started:.0f} s", flush=True)
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
