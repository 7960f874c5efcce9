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
adjacent pairs cancel best.

Transient memory: for every candidate, the peak memory one step allocates beyond what exists before it
(parameters, gradients, optimizer state), after the timed rounds, in one extra step: on CPU from the
profiler's allocation events (``profile_memory=True``), on CUDA from ``torch.cuda.max_memory_allocated``;
in bytes and as a multiple of the largest parameter of the set the candidate steps.

For the Newton-Schulz optimizers: batched vs per-matrix orthogonalization; float32 vs bf16 (the
``ns_dtype="auto"`` choice of this machine is marked); the accuracy per iteration of the default
coefficients and of the Polar Express schedule against the SVD polar factor, and their cost; the
Newton-Schulz share of a NorMuon step; NorMuon with the default ``batch_budget`` vs one batch per shape;
and AuON vs NorMuon cost.

    python scripts/bench_step.py                 # full run (several minutes on 2 cores)
    python scripts/bench_step.py --quick         # tiny shapes, one repetition (CI smoke test)
    python scripts/bench_step.py --only adamp,lion --reps 9 --json out.json --markdown out.md
    python scripts/bench_step.py --device cuda   # on a GPU: CUDA-event timing, max_memory_allocated
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile

import optimzoo
from optimzoo.cli import brief_usage, resolve_optimizer, user_errors
from optimzoo.ops.orthogonalize import NS_COEFFICIENTS, newton_schulz, ns_compute_dtype, ns_schedule

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


def make_params(shapes, seed: int = 0, device: str = "cpu") -> list[tuple[str, torch.nn.Parameter]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.02).to(device))
        p.grad = (torch.randn(shape, generator=g) * 1e-3).to(device)
        out.append((name, p))
    return out


def is_hidden(name: str, p: torch.Tensor) -> bool:
    """A hidden matrix: what the matrix optimizers orthogonalize (not the embedding or the head)."""
    return p.dim() == 2 and "embed" not in name and "lm_head" not in name


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
    transient_bytes: int | None = None  # peak extra memory of one step (see step_transient_bytes)


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


def reference_adamw(device: str) -> Candidate:
    """The yardstick: torch.optim.AdamW foreach on CPU, fused on CUDA (the fastest torch path of each)."""
    path = "fused" if device == "cuda" else "foreach"
    return Candidate(f"torch.optim.AdamW ({path})", "adamw",
                     lambda n: torch.optim.AdamW(_plain(n), **{path: True}), reference=True)


def candidates_for(spec, named, fused: bool, device: str = "cpu") -> list[Candidate]:
    out = []
    if spec.name != "adamw":
        out.append(reference_adamw(device))
    if spec.baseline:
        if spec.name == "adamw":
            out.append(Candidate("torch.optim.AdamW (foreach)", "adamw",
                                 lambda n: optimzoo.create_optimizer(n, "adamw", foreach=True),
                                 ours=True, reference=device != "cuda"))
            out.append(Candidate("torch.optim.AdamW (fused)", "adamw",
                                 lambda n: optimzoo.create_optimizer(n, "adamw", fused=True), ours=True,
                                 reference=device == "cuda"))
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
        if spec.name == "normuon":  # the cost of the default batch_budget: one batch per shape instead
            out.append(Candidate(UNBOUNDED, spec.name,
                                 lambda n: optimzoo.create_optimizer(n, spec.name, batch_budget=2.0**62), ours=True))
    for label, make in peers_of(spec.name):
        out.append(Candidate(label, spec.name, make))
    return out


UNBOUNDED = "optimzoo (one batch per shape)"

# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds ``fn()`` takes: wall clock on CPU, CUDA events (device time, synchronized) on CUDA."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_transient_bytes(step: Callable[[], object], device: str) -> int:
    """Peak bytes ``step()`` holds beyond what exists before it and what it leaves behind.

    Everything allocated before the call (parameters, gradients, existing state) is the baseline; the
    peak of (allocated - freed) during the call, minus what is still allocated at its end (state created
    by this step), is the step's transient memory. CPU: the profiler's allocation events
    (``profile_memory=True``) summed in time order; CUDA: ``max_memory_allocated``.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - max(base, torch.cuda.memory_allocated())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak - max(held, 0)


def run_interleaved(cands: list[Candidate], named, reps: int, warmup: int, budget_s: float,
                    device: str = "cpu", transient: bool = True) -> None:
    """Step every candidate ``warmup`` times, then ``reps`` rounds of one step each, interleaved; then
    (``transient``) one more step each, measured by :func:`step_transient_bytes`.

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
            took = timed(opt.step, device)
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
                c.floor_times.append(timed(floor.step, device))
            reattach()
            c.times.append(timed(opt.step, device))
    for c, opt in zip(cands, opts):
        if transient and not c.floor:
            reattach()
            c.transient_bytes = step_transient_bytes(opt.step, device)
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

    def __init__(self, numel: int, device: str = "cpu"):
        self.a, self.b = torch.randn(numel, device=device), torch.randn(numel, device=device)
        self.state: dict = {}

    def step(self) -> None:
        self.a.add_(self.b)


def floor_candidate(numel: int, device: str = "cpu") -> Candidate:
    return Candidate("memory-traffic floor (add_, same bytes)", "floor", lambda n: StreamingFloor(numel, device),
                     floor=True)


def paired_ratio(times: list[float], floor_times: list[float], words: int) -> float:
    """Median over repetitions of ``t / (floor t * words / 3)``: the ratio to the time ``words`` words
    per element take at the bandwidth measured just before the step."""
    return statistics.median(t / (f * words / StreamingFloor.WORDS) for t, f in zip(times, floor_times))


def log_spaced_matrix(m: int, n: int, cond: float = 1e3, seed: int = 0) -> torch.Tensor:
    """An ``m x n`` float32 matrix with singular values log-spaced in ``[1/cond, 1]`` (a hard case for
    Newton-Schulz: after the Frobenius normalization the smallest is ~1e-3 / sqrt(min(m, n)) x ...)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return ((U * torch.logspace(0, -math.log10(cond), k, dtype=torch.float64)) @ V.T).float()


def ns_accuracy(G: torch.Tensor, coefficients, dtype: torch.dtype) -> list[dict]:
    """After each iteration ``k`` of the schedule: ``orth`` = ``||O O^T - I||_F / sqrt(s)`` (short side
    ``s``) and ``dist`` = ``||O - U V^T||_F / sqrt(s)`` (RMS distance of the singular values to 1, to
    first order), against the float64 SVD polar factor of ``G``."""
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    P = U @ Vh
    schedule = ns_schedule(coefficients)
    s = min(G.shape[-2:])
    out = []
    for k in range(1, len(schedule) + 1):
        O = newton_schulz(G, k, schedule[:k], dtype=dtype).double()
        gram = O @ O.mT if G.size(-2) <= G.size(-1) else O.mT @ O
        out.append({"iteration": k,
                    "orth": float(torch.linalg.matrix_norm(gram - torch.eye(s, dtype=gram.dtype, device=gram.device)))
                    / math.sqrt(s),
                    "dist": float(torch.linalg.matrix_norm(O - P)) / math.sqrt(s)})
    return out


def bench_newton_schulz(named, reps: int, device: str = "cpu") -> dict:
    """Newton-Schulz over the hidden matrices: batched (one matmul chain per shape) vs per-matrix,
    float32 vs bf16, Keller Jordan's coefficients vs the Polar Express schedule (time and accuracy per
    iteration on a matrix of the largest hidden shape with singular values in [1e-3, 1])."""
    mats = [p.grad for n, p in named if is_hidden(n, p)]
    auto = ns_compute_dtype("auto", mats[0].device)
    by_shape: dict[tuple, list] = {}
    for m in mats:
        by_shape.setdefault(tuple(m.shape), []).append(m)
    stacks = [torch.stack(v) for v in by_shape.values()]
    shape = max(by_shape, key=lambda s: s[0] * s[1])
    G = log_spaced_matrix(*shape).to(device)
    accuracy = {name: ns_accuracy(G, name, torch.float32) for name in NS_COEFFICIENTS}
    target = accuracy["muon"][-1]["dist"]
    # the fewest Polar Express iterations that reach the default's 5-iteration distance, if any
    match = next((a["iteration"] for a in accuracy["polar_express"] if a["dist"] <= target), None)
    bf16_final = {name: ns_accuracy(G, name, torch.bfloat16)[-1] for name in NS_COEFFICIENTS}
    polar = ns_schedule("polar_express")

    def chain(dtype, schedule=None, batched=True):
        def run():
            for x in (stacks if batched else mats):
                newton_schulz(x, None, schedule or "muon", dtype=dtype)
        return run

    fns = {"batched float32": chain(torch.float32), "batched bfloat16": chain(torch.bfloat16),
           "per-matrix auto": chain(auto, batched=False), "polar_express auto": chain(auto, polar)}
    if match is not None and match < len(polar):
        fns["polar_express prefix auto"] = chain(auto, polar[:match])
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    batched_auto = med[f"batched {str(auto).replace('torch.', '')}"]
    return {"matrices": len(mats), "shapes": len(stacks), "dtype": str(auto).replace("torch.", ""),
            "native_bf16_cpu": device == "cpu" and auto == torch.bfloat16,
            "batched_ms": batched_auto, "per_matrix_ms": med["per-matrix auto"],
            "speedup": med["per-matrix auto"] / batched_auto,
            "float32_ms": med["batched float32"], "bfloat16_ms": med["batched bfloat16"],
            "polar_express_ms": med["polar_express auto"],
            "accuracy_shape": list(shape), "accuracy": accuracy, "bf16_final": bf16_final,
            "polar_express_match_iterations": match,
            "polar_express_match_ms": med.get("polar_express prefix auto")}


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
             "Transient: peak memory of one step beyond parameters, gradients and state, in MB and as a multiple "
             "of the largest parameter the candidate steps.",
             "",
             "| optimizer | implementation | step ms | x AdamW | x fastest peer | x bound | state MB | "
             "B/param | registry B/param | transient MB | transient x largest |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results["rows"]:
        transient = row["transient_bytes"]
        lines.append(
            f"| {row['algorithm']} | {row['label']} | {row['ms']:.1f} | {fmt(row['x_adamw'])} | "
            f"{fmt(row['x_fastest_peer'])} | {fmt(row['x_bound'])} | {row['state_MB']:.1f} | "
            f"{row['bytes_per_param']:.2f} | {fmt(row['registry_bytes_per_param'])} | "
            f"{fmt(None if transient is None else transient / 2**20, '.1f')} | {fmt(row['transient_x_largest'])} |")
    ns = results.get("newton_schulz")
    if ns:
        auto = ns["dtype"] + (" (native bf16 on this CPU)" if ns["native_bf16_cpu"] else "")
        lines += ["", f"Newton-Schulz (5 steps, ns_dtype=\"auto\" = {auto}) over the {ns['matrices']} hidden "
                      f"matrices ({ns['shapes']} shapes): batched {ns['batched_ms']:.0f} ms, per-matrix "
                      f"{ns['per_matrix_ms']:.0f} ms, speed-up x{ns['speedup']:.2f}; batched float32 "
                      f"{ns['float32_ms']:.0f} ms vs bf16 {ns['bfloat16_ms']:.0f} ms "
                      f"(float32 / bf16 = x{ns['float32_ms'] / ns['bfloat16_ms']:.2f}).",
                  f"Accuracy per iteration against the SVD polar factor (float32, one {ns['accuracy_shape'][0]}x"
                  f"{ns['accuracy_shape'][1]} matrix, singular values log-spaced in [1e-3, 1]): orth = "
                  "||O O^T - I||_F / sqrt(s), dist = ||O - U V^T||_F / sqrt(s).", "",
                  "| coefficients | " + " | ".join(f"it {a['iteration']} orth / dist" for a in ns["accuracy"]["muon"])
                  + " | bf16 it 5 dist | ms (5 it, batched) |",
                  "|---|" + "---:|" * (len(ns["accuracy"]["muon"]) + 2)]
        for name, acc in ns["accuracy"].items():
            ms = ns["batched_ms"] if name == "muon" else ns["polar_express_ms"]
            lines.append(f"| {name} | " + " | ".join(f"{a['orth']:.3f} / {a['dist']:.3f}" for a in acc)
                         + f" | {ns['bf16_final'][name]['dist']:.3f} | {ms:.0f} |")
        k = ns["polar_express_match_iterations"]
        if k is None:
            lines.append("Polar Express does not reach the default's 5-iteration distance within its 5 iterations.")
        elif ns["polar_express_match_ms"] is not None:
            lines.append(f"Polar Express reaches the default's 5-iteration distance after {k} iterations: "
                         f"{ns['polar_express_match_ms']:.0f} ms instead of {ns['batched_ms']:.0f} ms "
                         f"(saves {1 - ns['polar_express_match_ms'] / ns['batched_ms']:.0%}).")
        else:
            lines.append(f"Polar Express needs all {k} iterations to reach the default's 5-iteration distance.")
        if ns.get("share_of_normuon") is not None:
            lines.append(f"Newton-Schulz share of a NorMuon step (batched NS / step): {ns['share_of_normuon']:.0%}.")
    if results.get("batch_budget"):
        b = results["batch_budget"]
        lines.append(f"NorMuon with the default batch_budget vs one batch per shape: {b['default_ms']:.1f} ms vs "
                     f"{b['unbounded_ms']:.1f} ms (x{b['ratio']:.2f}); transient {fmt(b['default_x_largest'])}x vs "
                     f"{fmt(b['unbounded_x_largest'])}x the largest parameter.")
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
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where to step (cuda: CUDA-event timing, max_memory_allocated, fused AdamW as the yardstick)")
    ap.add_argument("--no-transient", action="store_true", help="skip the transient-memory step of each candidate")
    ap.add_argument("--json", default=None, help="write the results as JSON here")
    ap.add_argument("--markdown", default=None, help="write the report as markdown here")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device cuda: no CUDA device here (torch {torch.__version__}, "
                 f"{'built without CUDA' if torch.version.cuda is None else 'no GPU visible'}); "
                 "run it on a machine with a GPU, or use --device cpu")
    with user_errors(ap):  # an unknown name is an argparse error (exit 2), before any benchmark runs
        specs = [resolve_optimizer(n.strip()) for n in args.only.split(",")] if args.only \
            else list(optimzoo.list_optimizers())

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.set_flush_denormal(True)
    reps = args.reps or (1 if args.quick else 7)
    warmup = args.warmup or (1 if args.quick else 2)
    cfg = QUICK if args.quick else LLAMA_60M
    device = args.device
    named = make_params(llama_shapes(**cfg), device=device)
    numel = sum(p.numel() for _, p in named)
    fused = not (args.quick or args.no_fused)

    results = {"machine": machine() + (f", {torch.cuda.get_device_name()}" if device == "cuda" else ""),
               "device": device, "params": "llama_tiny-quick" if args.quick else "llama_60m (GaLore)",
               "numel": numel, "hidden_numel": sum(p.numel() for n, p in named if is_hidden(n, p)),
               "reps": reps, "warmup": warmup, "rows": []}
    floor_times: list[float] = []
    hidden = [(n, p) for n, p in named if is_hidden(n, p)]
    for spec in specs:
        # Matrix optimizers (and their peers, some of which take 2-D parameters only) are timed on the
        # hidden matrices; their AdamW part on embeddings/head/norms is torch's AdamW kernel.
        fam = hidden if spec.kind == "matrix" else named
        fam_numel = sum(p.numel() for _, p in fam)
        bound = MIN_WORDS.get(spec.name) if spec.kind == "elementwise" else None
        largest = max(p.numel() * p.element_size() for _, p in fam)
        cands = candidates_for(spec, fam, fused, device) + ([floor_candidate(fam_numel, device)] if bound else [])
        print(f"[bench] {spec.name}: {', '.join(c.label for c in cands)}", file=sys.stderr, flush=True)
        run_interleaved(cands, fam, reps, warmup, args.budget_s, device, transient=not args.no_transient)
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
                "transient_bytes": c.transient_bytes,
                "transient_x_largest": None if c.transient_bytes is None else c.transient_bytes / largest,
            })
    rates = [StreamingFloor.WORDS * 4 / t / 1e9 for t in floor_times] or [float("nan")]
    results["bandwidth_GBps"] = statistics.median(rates)
    results["bandwidth_range_GBps"] = (min(rates), max(rates))
    if not args.only or any(s.kind == "matrix" for s in specs):
        results["newton_schulz"] = ns = bench_newton_schulz(named, reps, device)
        rows = {r["algorithm"]: r for r in results["rows"] if r["ours"] and r["label"] != UNBOUNDED}
        unbounded = next((r for r in results["rows"] if r["label"] == UNBOUNDED), None)
        if "normuon" in rows:
            ns["share_of_normuon"] = ns["batched_ms"] / rows["normuon"]["ms"]
        if unbounded is not None:
            default = rows["normuon"]
            results["batch_budget"] = {"default_ms": default["ms"], "unbounded_ms": unbounded["ms"],
                                       "ratio": default["ms"] / unbounded["ms"],
                                       "default_x_largest": default["transient_x_largest"],
                                       "unbounded_x_largest": unbounded["transient_x_largest"]}
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
