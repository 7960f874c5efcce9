#!/usr/bin/env python
"""What an optimizer costs in training: tokens/s of the recipe's model on this machine, per optimizer.

For each model (recipes/configs: llama_tiny and llama_20m by default, with the byte tokenizer's
vocabulary as the recipe builds them) and each optimizer (torch's AdamW foreach and fused, every
registered zoo optimizer on its default path, and on its fused path where it has one), one training
step is a forward and backward pass of a batch (8 x 256 tokens, as the recipe's defaults) and
``opt.step()``. Every candidate has its own copy of the model; the candidates are interleaved step by
step over the repetitions (so a drift of the machine's speed hits all of them alike), after warm-up
steps (which also compile the fused kernels). Reported per candidate: the median step time, tokens/s,
the optimizer's share of the step (``opt.step()`` time / step time), and the ratios of both to torch's
AdamW (foreach) measured in the same run.

    .venv/bin/python scripts/bench_train.py                         # both models (about 10 minutes)
    .venv/bin/python scripts/bench_train.py --models llama_tiny --only adamw,normuon,lion
    .venv/bin/python scripts/bench_train.py --quick                 # llama_tiny, 2 reps: a smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import optimzoo
from optimzoo.cli import brief_usage, fail

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))
from pretrain_llama import ModelArguments, build_config, load_tokenizer  # noqa: E402


def build_model(name: str, seq: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    margs = ModelArguments(model_config=name)
    return LlamaForCausalLM(build_config(margs, load_tokenizer(margs, seq)))


def candidates(only: list[str] | None) -> list[tuple[str, str, dict]]:
    """(label, registry name, hyperparameters): AdamW foreach (the yardstick) and fused, then the zoo."""
    out = [("adamw (torch, foreach)", "adamw", {"foreach": True}), ("adamw (torch, fused)", "adamw", {"fused": True})]
    for spec in optimzoo.list_optimizers():
        if spec.baseline:
            continue
        out.append((f"{spec.name} (default)", spec.name, {}))
        if "fused" in spec.hparams:
            out.append((f"{spec.name} (fused)", spec.name, {"fused": True}))
    if only:
        out = [c for c in out if c[1] in only or c[0].startswith("adamw (torch, foreach)")]
    return out


def bench_model(model_name: str, cands, batch: int, seq: int, warmup: int, reps: int) -> dict:
    base = build_model(model_name, seq)
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(4)]
    runs = []
    for label, name, hp in cands:
        model = copy.deepcopy(base)
        runs.append({"label": label, "model": model, "opt": optimzoo.create_optimizer(model, name, **hp),
                     "step": [], "opt_step": []})

    def one_step(run, ids) -> tuple[float, float]:
        start = time.perf_counter()
        loss = run["model"](input_ids=ids, labels=ids).loss
        loss.backward()
        mid = time.perf_counter()
        run["opt"].step()
        run["opt"].zero_grad(set_to_none=True)
        end = time.perf_counter()
        return end - start, end - mid

    for i in range(warmup):
        for run in runs:
            one_step(run, batches[i % len(batches)])
    for i in range(reps):
        for run in runs:
            total, opt_time = one_step(run, batches[i % len(batches)])
            run["step"].append(total)
            run["opt_step"].append(opt_time)
    rows = []
    for run in runs:
        step = statistics.median(run["step"])
        rows.append({"candidate": run["label"], "step_ms": 1e3 * step, "tokens_per_s": batch * seq / step,
                     "optimizer_share": statistics.median(o / s for o, s in zip(run["opt_step"], run["step"])),
                     "optimizer_ms": 1e3 * statistics.median(run["opt_step"])})
    ref = rows[0]
    for r in rows:
        r["x_adamw_tokens_per_s"] = r["tokens_per_s"] / ref["tokens_per_s"]
        r["x_adamw_optimizer_ms"] = r["optimizer_ms"] / ref["optimizer_ms"]
    return {"model": model_name, "params": sum(p.numel() for p in base.parameters()), "batch": batch, "seq": seq,
            "warmup": warmup, "reps": reps, "rows": rows}


def report(results: list[dict]) -> str:
    lines = [f"Machine: {torch.get_num_threads()} threads, torch {torch.__version__}, CPU capability "
             f"{torch.backends.cpu.get_cpu_capability()}"]
    for r in results:
        lines += ["", f"**{r['model']}** ({r['params'] / 1e6:.2f}M parameters), batch {r['batch']} x {r['seq']} tokens, "
                  f"median of {r['reps']} interleaved steps after {r['warmup']} warm-up", "",
                  "| optimizer | step ms | tokens/s | x AdamW tokens/s | optimizer ms | optimizer share | "
                  "x AdamW optimizer ms |", "|---|---:|---:|---:|---:|---:|---:|"]
        for row in r["rows"]:
            lines.append(f"| {row['candidate']} | {row['step_ms']:.1f} | {row['tokens_per_s']:.0f} | "
                         f"{row['x_adamw_tokens_per_s']:.2f} | {row['optimizer_ms']:.1f} | "
                         f"{100 * row['optimizer_share']:.1f}% | {row['x_adamw_optimizer_ms']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = brief_usage(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    ap.add_argument("--models", default="llama_tiny,llama_20m", help="recipe configs (default llama_tiny,llama_20m)")
    ap.add_argument("--only", default="", help="comma-separated optimizer names (AdamW foreach is always timed)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="llama_tiny, batch 2 x 64, 1 warm-up, 2 reps")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--markdown", help="write the report here")
    args = ap.parse_args(argv)
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    try:
        only = [optimzoo.get_spec(n).name for n in only]
    except (KeyError, ValueError) as e:
        fail(ap, f"--only: {e}")
    if args.quick:
        args.models, args.batch, args.seq, args.warmup, args.reps = "llama_tiny", 2, 64, 1, 2
    cands = candidates(only)
    results = [bench_model(m.strip(), cands, args.batch, args.seq, args.warmup, args.reps)
               for m in args.models.split(",") if m.strip()]
    text = report(results)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
