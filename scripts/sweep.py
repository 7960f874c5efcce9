#!/usr/bin/env python
"""Run the pretraining recipe for several optimizers and learning rates, then compare them.

    python scripts/sweep.py                        # the main job: every zoo optimizer + AdamW on llama_tiny (~10 min, 2 CPU cores)
    python scripts/sweep.py --optims adamw,normuon,stable_spam --lrs 1e-3,3e-3 --max_steps 400
    python scripts/sweep.py --model_config llama_60m --nproc 8 --group c4-60m -- --dataset allenai/c4 \\
        --dataset_config en --streaming --tokenizer t5-base --per_device_train_batch_size 64

Every run gets the same model, data, seed and token budget; runs go one after another (``torchrun`` when
``--nproc > 1``), all in one wandb group, into ``runs/<group>/<run name>/``. A run whose directory already
holds ``run_summary.json`` is skipped, so an interrupted sweep resumes where it stopped. Each optimizer
runs at its learning rate from ``DEFAULT_LRS`` (chosen by a grid search on llama_tiny, see the README)
unless ``--lrs`` gives a grid (an optimizer without an entry: its own registry default). Arguments after
``--`` go to every recipe run. Names and ``--optim_args`` values are checked before the first run. At the end
``scripts/compare_runs.py`` writes the table and plots into the group directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import optimzoo  # noqa: E402
from optimzoo.cli import brief_usage, check_optimizer_args, parse_kv, resolve_optimizer, user_errors  # noqa: E402

RECIPE = ROOT / "recipes" / "pretrain_llama.py"

#: learning rate per optimizer for llama_tiny on the embedded corpus, the best of a grid search at 150 steps
#: (README, "Learning rates"); matrix optimizers: the matrix lr, their vector parameters use
#: ``MATRIX_ADAMW_LR`` like AdamW's
DEFAULT_LRS = {
    "adamw": 3e-3, "adamp": 3e-3, "sgdp": 0.1, "diffgrad": 3e-3, "lion": 1e-3, "lion_k": 1e-3, "spam": 3e-3,
    "stable_spam": 3e-3, "muon": 0.05, "normuon": 0.05, "swan": 0.01, "sinkgd": 3e-3, "auon": 0.03,
    "hybrid_auon": 0.05,
}
#: per-optimizer recipe options of the default sweep
DEFAULT_OPTIM_ARGS = {"sgdp": "momentum=0.9,nesterov=True"}
MATRIX_ADAMW_LR = 3e-3


def default_optimizers() -> list[str]:
    """AdamW and every registered zoo optimizer."""
    return ["adamw"] + optimzoo.list_optimizers(baselines=False).names()


def optim_args(name: str, extra: str | None) -> str | None:
    parts = []
    if optimzoo.get_spec(name).kind == "matrix":
        parts.append(f"adamw_lr={MATRIX_ADAMW_LR}")
    if name in DEFAULT_OPTIM_ARGS:
        parts.append(DEFAULT_OPTIM_ARGS[name])
    if extra:
        parts.append(extra)
    return ",".join(parts) or None


def default_lr(name: str) -> float:
    """``DEFAULT_LRS``, else the optimizer's own registry default (the recipe's default too)."""
    return DEFAULT_LRS.get(name, optimzoo.get_spec(name).defaults.get("lr", 1e-3))


def _lr(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--lrs: {text.strip()!r} is not a number") from None


def run_name(model: str, optim: str, lr: float, seed: int) -> str:
    return f"{model}-{optim}-lr{lr:g}-s{seed}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = brief_usage(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--optims", default=None, help="comma-separated names (default: adamw + every zoo optimizer)")
    p.add_argument("--lrs", default=None, help="comma-separated lr grid for every optimizer (default: DEFAULT_LRS)")
    p.add_argument("--model_config", default="llama_tiny")
    p.add_argument("--max_steps", type=int, default=150)
    p.add_argument("--batch_size", type=int, default=8, help="per-device batch size (sequences)")
    p.add_argument("--eval_steps", type=int, default=25)
    p.add_argument("--max_eval_samples", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun when > 1)")
    p.add_argument("--group", default=None, help="wandb group and directory name (default: sweep-<model>)")
    p.add_argument("--runs_dir", type=Path, default=Path("runs"))
    p.add_argument("--optim_args", default=None, help="extra optimizer arguments for every run ('k=v,...')")
    p.add_argument("--dry_run", action="store_true", help="print the commands only")
    args = p.parse_args(argv)

    with user_errors(p):  # names and values are checked before the first run starts (exit 2, no traceback)
        optims = [resolve_optimizer(o.strip()).name for o in args.optims.split(",")] if args.optims \
            else default_optimizers()
        grid = [_lr(x) for x in args.lrs.split(",")] if args.lrs else None
        jobs = [(o, lr) for o in optims for lr in (grid or [default_lr(o)])]
        for o, lr in jobs:
            extra = parse_kv(optim_args(o, args.optim_args))
            check_optimizer_args(o, {"lr": lr, **extra}, user_keys=parse_kv(args.optim_args).keys())
    model = Path(args.model_config).stem
    group = args.group or f"sweep-{model}"
    group_dir = args.runs_dir / group
    env = {**os.environ, "WANDB_PROJECT": os.environ.get("WANDB_PROJECT", "optimzoo")}
    started = time.time()
    failed = []
    for i, (optim, lr) in enumerate(jobs, 1):
        name = run_name(model, optim, lr, args.seed)
        out = group_dir / name
        prefix = f"[{i}/{len(jobs)}] {optim:<12} lr={lr:<8g}"
        if (out / "run_summary.json").exists():
            print(f"{prefix} done earlier, skipped", flush=True)
            continue
        launcher = [sys.executable] if args.nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc)]
        cmd = [*launcher, str(RECIPE), "--model_config", args.model_config, "--optim", optim,
               "--learning_rate", f"{lr:g}", "--max_steps", str(args.max_steps), "--seed", str(args.seed),
               "--per_device_train_batch_size", str(args.batch_size), "--eval_strategy", "steps",
               "--eval_steps", str(args.eval_steps), "--output_dir", str(out), "--run_name", name,
               "--wandb_group", group, "--disable_tqdm", "true"]
        extra = optim_args(optim, args.optim_args)
        if extra:
            cmd += ["--optim_args", extra]
        if args.max_eval_samples:
            cmd += ["--max_eval_samples", str(args.max_eval_samples)]
        cmd += passthrough
        if args.dry_run:
            print(" ".join(cmd))
            continue
        t0 = time.time()
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "recipe.log", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        if rc != 0 or not (out / "run_summary.json").exists():
            failed.append(name)
            print(f"{prefix} FAILED (exit {rc}), see {out / 'recipe.log'}", flush=True)
            continue
        s = json.loads((out / "run_summary.json").read_text())
        print(f"{prefix} loss {s['final_loss']:.3f}  eval {s.get('eval_loss', float('nan')):.3f} "
              f"(ppl {s.get('eval_perplexity', float('nan')):.1f})  {s['tokens_per_second']:,.0f} tok/s  "
              f"{time.time() - t0:.0f} s  [{time.time() - started:.0f} s total]", flush=True)
    if args.dry_run:
        return 0
    import compare_runs

    compare_runs.main([str(group_dir), "--title", f"{model}, {args.max_steps} steps, seed {args.seed}"])
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
