#!/usr/bin/env python
"""Optimizer-step time and optimizer-state memory of every registered optimizer, against peers.

For each algorithm the zoo's implementation (each of its paths), ``torch.optim.AdamW`` (foreach) and
every peer implementation of the same algorithm that is installed are built on the same parameter
set (the GaLore ``llama_60m`` shapes: 58.1M parameters) and stepped in interleaved repetitions after a
warm-up; the table reports median step time, the ratios to AdamW and to the fastest peer, measured in
the same run, and the state bytes, checked against the registry's declared figure.

It also measures this machine's memory-traffic floor and prints each element-wise optimizer's ratio
to the time its minimal memory traffic takes. The floor is a streaming kernel (``add_`` over two flat
tensors of the same size) stepped in the same interleaved rounds as the optimizers, and each ratio is
the median over repetitions of (step time / time of the floor kernel run just before that step, scaled
to the words moved): on a shared VM the bandwidth drifts by tens of percent within seconds, which
adjacent pairs cancel best. For
the Newton-Schulz optimizers: batched vs per-matrix orthogonalization; and AuON vs NorMuon cost.

    python scripts/bench_step.py                 # full run (several minutes on 2 cores)
    python scripts/bench_step.py --quick         # tiny shapes, one repetition (CI smoke test)
    python scripts/bench_step.py --only adamp,lion --reps 9 --json out.json --markdown out.md
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import optimzoo
from optimzoo.cli import brief_usage, resolve_optimizer, user_errors
from optimzoo.ops.orthogonalize import newton_schulz
from optimzoo.ops.orthogonalize import ns_compute_dtype

# ---------------------------------------------------------------------------------------------
# parameter sets
# ---------------------------------------------------------------------------------------------

LLAMA_60M = dict(vocab=32000, hidden=512, intermediate=1376, layers=8)  # GaLore configs/llama_60m.json
QUICK = dict(vocab=256, hidden=64, intermediate=176, layers=2)


def llama_shapes(vocab: int, hidden: int, intermediate: int, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Named parameter shapes of a LLaMA with untied embeddings (HF LlamaForCausalLM names)."""
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        pre = f"model.layers.{i}"
        shapes += [(f"{pre}.self_attn.{p}_proj.weight", (hidden, hidden)) for p in "qkvo"]
        shapes += [(f"{pre}.mlp.gate_proj.weight", (intermediate, hidden)),
                   (f"{pre}.mlp.up_proj.weight", (intermediate, hidden)),
                   (f"{pre}.mlp.down_proj.weight", (hidden, intermediate)),
                   (f"{pre}.input_layernorm.weight", (hidden,)),
                   (f"{pre}.post_attention_layernorm.weight", (hidden,))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def make_params(shapes, seed: int = 0) -> list[tuple[str, torch.nn.Parameter]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=g) * 0.02)
        p.grad = torch.randn(shape, generator=g) * 1e-3
        out.append((name, p))
    return out


# ---------------------------------------------------------------------------------------------
# candidates: ours, AdamW, peers
# ---------------------------------------------------------------------------------------------

# Minimal memory traffic of one element-wise step, in 4-byte words per parameter element (reads +
# writes), assuming an implementation that makes the fewest passes the math allows:
#  adamw/adam/spam: read p, g, m, v; write p, m, v = 7.
#  sgd/sgdp base: read p, g, b; write p, b = 5.  lion: read p, g, m; write p, m = 5.
#  diffgrad: read p, g, m, v, g_prev; write p, m, v, g_prev = 9.
#  adamp: the projection needs per-row statistics of the new update before writing p: pass 1 reads
#    p, g, m, v and writes m, v (statistics on the side), pass 2 reads p, m, v and writes p: 6 + 4 = 10.
#  sgdp: pass 1 reads p, g, b and writes b; pass 2 reads p and b and writes b (the projected update is
#    stored back into the buffer) or, with Nesterov, reads p, b, g and writes p: 4 + 4 = 8.
#  stable_spam: max|g| must be known before the clipped norm, which must be known before the update:
#    two reads of g, then the Adam pass: 1 + 1 + 7 = 9.
#  lion_k (sign kappa, the default): as lion, 5.
MIN_WORDS = {"adamw": 7, "adam": 7, "sgd": 5, "adamp": 10, "sgdp": 8, "diffgrad": 9, "lion": 5,
             "lion_k": 5, "spam": 7, "stable_spam": 9}


@dataclass
class Candidate:
    label: str
    algorithm: str
    make: Callable[[list], torch.optim.Optimizer]
    ours: bool = False
    reference: bool = False  # torch.optim.AdamW foreach, the common yardstick
    floor: bool = False  # the streaming kernel that measures the memory-traffic floor
    floor_times: list[float] = field(default_factory=list)  # the floor kernel just before each timed step
    times: list[float] = field(default_factory=list)
    state_bytes: int = 0
    expected_bytes: int | None = None


def _plain(named):
    return [p for _, p in named]


def _torch_optimizer(cls_name, **kw):
    def make(named):
        import torch_optimizer
        return getattr(torch_optimizer, cls_name)(_plain(named), **kw)
    return make


def _pytorch_optimizer(cls_name, matrix=False, **kw):
    def make(named):
        import pytorch_optimizer
        cls = getattr(pytorch_optimizer, cls_name)
        if matrix:
            return cls([{"params": _plain(named), "use_muon": True}], **kw)
        return cls(_plain(named), **kw)
    return make


def _lion_pytorch(named):
    from lion_pytorch import Lion
    return Lion(_plain(named), lr=1e-4, use_triton=False)


def _heavyball_muon(named):
    import heavyball
    import heavyball.utils as hu
    hu.compile_mode = None
    hu.compile_mode_recommended_to_none = None
    return heavyball.Muon(_plain(named), lr=0.02)


def _torch_muon(named):
    return torch.optim.Muon(_plain(named), lr=0.02, weight_decay=0.0, adjust_lr_fn="original")


def peers_of(algorithm: str) -> list[tuple[str, Callable]]:
    """Peer implementations of the same algorithm (default hyperparameters matched to ours)."""
    table = {
        "adamp": [("torch-optimizer AdamP", _torch_optimizer("AdamP")),
                  ("pytorch-optimizer AdamP", _pytorch_optimizer("AdamP", foreach=True))],
        "sgdp": [("torch-optimizer SGDP", _torch_optimizer("SGDP", lr=1e-3)),
                 ("pytorch-optimizer SGDP", _pytorch_optimizer("SGDP", lr=1e-3))],
        "diffgrad": [("torch-optimizer DiffGrad", _torch_optimizer("DiffGrad")),
                     ("pytorch-optimizer DiffGrad", _pytorch_optimizer("DiffGrad", foreach=True))],
        "lion": [("lion-pytorch Lion", _lion_pytorch),
                 ("pytorch-optimizer Lion", _pytorch_optimizer("Lion", foreach=True))],
        "spam": [("pytorch-optimizer SPAM", _pytorch_optimizer("SPAM", foreach=True))],
        "stable_spam": [("pytorch-optimizer StableSPAM", _pytorch_optimizer("StableSPAM", foreach=True))],
        "muon": [("torch.optim.Muon", _torch_muon), ("heavyball Muon (compile off)", _heavyball_muon),
                 ("pytorch-optimizer Muon", _pytorch_optimizer("Muon", matrix=True))],
        "normuon": [("pytorch-optimizer NorMuon", _pytorch_optimizer("NorMuon", matrix=True))],
    }
    out = []
    for label, make in table.get(algorithm, []):
        try:
            make([("probe", torch.nn.Parameter(torch.zeros(2, 2)))])
        except ImportError:
            continue  # not installed: skipped, and said so in the table's footnote
        out.append((label, make))
    return out


def our_variants(spec) -> list[tuple[str, dict]]:
    """Our implementation's paths: foreach (default) and fused where the class has one."""
    variants = []
    if "foreach" in spec.hparams:
        variants.append(("optimzoo (foreach)", {"foreach": True}))
        if spec.kind == "elementwise":
            variants.append(("optimzoo (single-tensor)", {"foreach": False}))
    else:
        variants.append(("optimzoo", {}))
    if "fused" in spec.hparams and not spec.baseline:
        variants.append(("optimzoo (fused)", {"fused": True}))
    return variants


def candidates_for(spec, named, fused: bool) -> list[Candidate]:
    out = []
    if spec.name != "adamw":
        out.append(Candidate("torch.optim.AdamW (foreach)", "adamw",
                             lambda n: torch.optim.AdamW(_plain(n), foreach=True), reference=True))
    if spec.baseline:
        if spec.name == "adamw":
            out.append(Candidate("torch.optim.AdamW (foreach)", "adamw",
                                 lambda n: optimzoo.create_optimizer(n, "adamw", foreach=True),
                                 ours=True, reference=True))
            out.append(Candidate("torch.optim.AdamW (fused)", "adamw",
                                 lambda n: optimzoo.create_optimizer(n, "adamw", fused=True), ours=True))
        else:
            kw = {"momentum": 0.9} if spec.name == "sgd" else {}
            out.append(Candidate(f"torch.optim.{spec.cls.__name__} (foreach)", spec.name,
                                 lambda n, kw=kw: optimzoo.create_optimizer(n, spec.name, foreach=True, **kw),
                                 ours=True))
    else:
        for label, kw in our_variants(spec):
            if "fused" in kw and not fused:
                continue
            out.append(Candidate(label, spec.name,
                                 lambda n, kw=kw: optimzoo.create_optimizer(n, spec.name, **kw), ours=True))
    for label, make in peers_of(spec.name):
        out.append(Candidate(label, spec.name, make))
    return out


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------


def run_interleaved(cands: list[Candidate], named, reps: int, warmup: int, budget_s: float) -> None:
    """Step every candidate ``warmup`` times, then ``reps`` rounds of one step each, interleaved.

    A candidate whose warm-up step takes long (bf16 Newton-Schulz on a CPU without native bf16 takes
    minutes) gets fewer repetitions: as many as fit in ``budget_s``, at least one.
    Gradients are re-attached before every step (some peers consume them, e.g. heavyball sets
    ``p.grad = None``), outside the timed region.
    """
    grads = [(p, p.grad) for _, p in named]

    def reattach():
        for p, g in grads:
            p.grad = g

    opts, quota = [], []
    for c in cands:
        opt = c.make(named)
        for i in range(warmup):
            reattach()
            t0 = time.perf_counter()
            opt.step()
            took = time.perf_counter() - t0
            if took > budget_s / 4:
                break
        opts.append(opt)
        quota.append(max(1, min(reps, int(budget_s / max(took, 1e-9)))))
    floor = next((opt for c, opt in zip(cands, opts) if c.floor), None)
    for r in range(reps):
        for c, opt, q in zip(cands, opts, quota):
            if r >= q:
                continue
            if floor is not None and not c.floor:  # the floor kernel right before each timed step
                t0 = time.perf_counter()
                floor.step()
                c.floor_times.append(time.perf_counter() - t0)
            reattach()
            t0 = time.perf_counter()
            opt.step()
            c.times.append(time.perf_counter() - t0)
    for c, opt in zip(cands, opts):
        c.state_bytes = optimzoo.state_bytes(opt)
        plan = getattr(opt, "routing_plan", None)
        if c.ours and plan is not None:
            spec = optimzoo.get_spec(c.algorithm)
            c.expected_bytes = spec.expected_state_bytes(plan, {"momentum": 0.9} if c.algorithm == "sgd" else None)
    del opts
    gc.collect()


class StreamingFloor:
    """``a.add_(b)`` over two flat float32 tensors of ``numel`` elements (3 words per element: the
    fastest torch streaming kernel here), with the ``step()`` of an optimizer so that it is timed in
    the same interleaved rounds as the candidates."""

    WORDS = 3

    def __init__(self, numel: int):
        self.a, self.b = torch.randn(numel), torch.randn(numel)
        self.state: dict = {}

    def step(self) -> None:
        self.a.add_(self.b)


def floor_candidate(numel: int) -> Candidate:
    return Candidate("memory-traffic floor (add_, same bytes)", "floor", lambda n: StreamingFloor(numel), floor=True)


def paired_ratio(times: list[float], floor_times: list[float], words: int) -> float:
    """Median over repetitions of ``t / (floor t * words / 3)``: the ratio to the time ``words`` words
    per element take at the bandwidth measured just before the step."""
    return statistics.median(t / (f * words / StreamingFloor.WORDS) for t, f in zip(times, floor_times))


def bench_newton_schulz(named, reps: int) -> dict:
    """Batched (one matmul chain per shape) vs per-matrix Newton-Schulz over the hidden matrices."""
    mats = [p.grad for n, p in named if p.dim() == 2 and "embed" not in n and "lm_head" not in n]
    dtype = ns_compute_dtype("auto", mats[0].device)
    by_shape: dict[tuple, list] = {}
    for m in mats:
        by_shape.setdefault(tuple(m.shape), []).append(m)
    stacks = [torch.stack(v) for v in by_shape.values()]

    def batched():
        for s in stacks:
            newton_schulz(s, 5, dtype=dtype)

    def looped():
        for m in mats:
            newton_schulz(m, 5, dtype=dtype)

    times = {"batched": [], "per-matrix": []}
    batched(), looped()
    for _ in range(reps):
        for k, fn in (("batched", batched), ("per-matrix", looped)):
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"matrices": len(mats), "shapes": len(stacks), "dtype": str(dtype).replace("torch.", ""),
            "batched_ms": 1e3 * med["batched"], "per_matrix_ms": 1e3 * med["per-matrix"],
            "speedup": med["per-matrix"] / med["batched"]}


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()}")


def fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def report(results: dict) -> str:
    lines = [f"Machine: {results['machine']}",
             f"Parameter set: {results['params']} ({results['numel']:,} parameters); median of "
             f"{results['reps']} interleaved repetitions after {results['warmup']} warm-up steps.",
             f"Memory-traffic floor: {results['bandwidth_GBps']:.1f} GB/s median (add_ streaming kernel, interleaved "
             f"with the steps; range {results['bandwidth_range_GBps'][0]:.1f}-"
             f"{results['bandwidth_range_GBps'][1]:.1f} GB/s). x bound: median ratio to the floor run just before each step.",
             "Matrix optimizers and their peers are timed on the hidden matrices only "
             f"({results['hidden_numel']:,} parameters).", "",
             "| optimizer | implementation | step ms | x AdamW | x fastest peer | x bound | state MB | "
             "B/param | registry B/param |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results["rows"]:
        lines.append(
            f"| {row['algorithm']} | {row['label']} | {row['ms']:.1f} | {fmt(row['x_adamw'])} | "
            f"{fmt(row['x_fastest_peer'])} | {fmt(row['x_bound'])} | {row['state_MB']:.1f} | "
            f"{row['bytes_per_param']:.2f} | {fmt(row['registry_bytes_per_param'])} |")
    ns = results.get("newton_schulz")
    if ns:
        lines += ["", f"Newton-Schulz (5 steps, {ns['dtype']}) over the {ns['matrices']} hidden matrices "
                      f"({ns['shapes']} shapes): batched {ns['batched_ms']:.0f} ms, per-matrix "
                      f"{ns['per_matrix_ms']:.0f} ms, speed-up x{ns['speedup']:.2f}."]
    if results.get("auon_vs_normuon"):
        a = results["auon_vs_normuon"]
        lines.append(f"AuON vs NorMuon (full step, same shapes): {a['auon_ms']:.1f} ms vs {a['normuon_ms']:.1f} ms: "
                     f"AuON x{a['ratio']:.1f} cheaper.")
    if results.get("missing_peers"):
        lines.append("Peers not installed (skipped): " + ", ".join(results["missing_peers"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = brief_usage(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 1 repetition, no fused paths")
    ap.add_argument("--only", default="", help="comma-separated optimizer names (default: every registered one)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7; 1 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2; 1 with --quick)")
    ap.add_argument("--budget-s", type=float, default=60.0,
                    help="time budget per candidate; slower candidates get fewer repetitions (default 60)")
    ap.add_argument("--no-fused", action="store_true", help="skip the fused (torch.compile) paths")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--json", default=None, help="write the results as JSON here")
    ap.add_argument("--markdown", default=None, help="write the report as markdown here")
    args = ap.parse_args(argv)
    with user_errors(ap):  # an unknown name is an argparse error (exit 2), before any benchmark runs
        specs = [resolve_optimizer(n.strip()) for n in args.only.split(",")] if args.only \
            else list(optimzoo.list_optimizers())

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.set_flush_denormal(True)
    reps = args.reps or (1 if args.quick else 7)
    warmup = args.warmup or (1 if args.quick else 2)
    cfg = QUICK if args.quick else LLAMA_60M
    named = make_params(llama_shapes(**cfg))
    numel = sum(p.numel() for _, p in named)
    fused = not (args.quick or args.no_fused)

    results = {"machine": machine(), "params": "llama_tiny-quick" if args.quick else "llama_60m (GaLore)",
               "numel": numel, "hidden_numel": sum(p.numel() for n, p in named if p.dim() == 2
                                                   and "embed" not in n and "lm_head" not in n),
               "reps": reps, "warmup": warmup, "rows": []}
    floor_times: list[float] = []
    hidden = [(n, p) for n, p in named if p.dim() == 2 and "embed" not in n and "lm_head" not in n]
    for spec in specs:
        # Matrix optimizers (and their peers, some of which take 2-D parameters only) are timed on the
        # hidden matrices; their AdamW part on embeddings/head/norms is torch's AdamW kernel.
        fam = hidden if spec.kind == "matrix" else named
        fam_numel = sum(p.numel() for _, p in fam)
        bound = MIN_WORDS.get(spec.name) if spec.kind == "elementwise" else None
        cands = candidates_for(spec, fam, fused) + ([floor_candidate(fam_numel)] if bound else [])
        print(f"[bench] {spec.name}: {', '.join(c.label for c in cands)}", file=sys.stderr, flush=True)
        run_interleaved(cands, fam, reps, warmup, args.budget_s)
        med = {c.label: statistics.median(c.times) for c in cands}
        ref = next((med[c.label] for c in cands if c.reference), None)
        peer_times = [med[c.label] for c in cands if not c.ours and not c.reference and not c.floor]
        floor = next((c for c in cands if c.floor), None)
        if floor:
            floor_times += [t / fam_numel for c in cands for t in c.floor_times + (c.times if c.floor else [])]
        for c in cands:
            if c.floor:
                continue
            if not c.ours and c.reference and spec.name != "adamw":
                continue
            if not c.ours and c.algorithm != spec.name:
                continue
            t = med[c.label]
            results["rows"].append({
                "algorithm": spec.name, "label": c.label, "ours": c.ours, "ms": 1e3 * t, "kind": spec.kind,
                "x_adamw": t / ref if ref else None,
                "x_fastest_peer": (t / min(peer_times)) if (peer_times and c.ours) else None,
                "x_bound": paired_ratio(c.times, c.floor_times, bound) if floor else None,
                "state_MB": c.state_bytes / 2**20, "state_bytes": c.state_bytes,
                "bytes_per_param": c.state_bytes / fam_numel,
                "registry_bytes": c.expected_bytes,
                "registry_bytes_per_param": (c.expected_bytes / fam_numel) if c.expected_bytes is not None else None,
            })
    rates = [StreamingFloor.WORDS * 4 / t / 1e9 for t in floor_times] or [float("nan")]
    results["bandwidth_GBps"] = statistics.median(rates)
    results["bandwidth_range_GBps"] = (min(rates), max(rates))
    if not args.only or any(s.kind == "matrix" for s in specs):
        results["newton_schulz"] = bench_newton_schulz(named, reps)
        rows = {r["algorithm"]: r for r in results["rows"] if r["ours"]}
        if "auon" in rows and "normuon" in rows:
            results["auon_vs_normuon"] = {"auon_ms": rows["auon"]["ms"], "normuon_ms": rows["normuon"]["ms"],
                                          "ratio": rows["normuon"]["ms"] / rows["auon"]["ms"]}
    text = report(results)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    mismatched = [r for r in results["rows"] if r["registry_bytes"] is not None and r["registry_bytes"] != r["state_bytes"]]
    for r in mismatched:
        print(f"state bytes differ from the registry: {r['algorithm']} {r['label']}: "
              f"{r['state_bytes']} vs {r['registry_bytes']}", file=sys.stderr)
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
