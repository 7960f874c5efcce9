#!/usr/bin/env python
"""Owner-based orthogonalization on row-sharded (FSDP2) matrices: per-rank Newton-Schulz time and bytes.

On the hidden matrices of a LLaMA-60M-shaped model (GaLore ``llama_60m``: 8 layers of q/k/v/o
512x512, gate/up 1376x512, down 512x1376; 56 matrices, 25.2M parameters), with random gradients,
one NorMuon step is timed three ways:

* **owner** (what optimzoo does): parameters are ``DTensor`` row shards on ``W`` gloo ranks; each
  matrix is assembled on one owner rank by ``all_to_all``, orthogonalized and normalized there, and
  sent back (:mod:`optimzoo.distributed`);
* **replicated** (the naive alternative): every rank holds every full matrix and orthogonalizes all
  of them (the bytes of the all-gather that would assemble them are counted, not the time);
* **one process**: rank 0 alone (the others wait) steps the full matrices: one device's cost.

Reported per rank: matrices transformed per step, time inside ``_transform`` (Newton-Schulz and the
normalization) per step, step time, and bytes sent and received per step; then the ratios.

The second part (``--suite elementwise``) times the element-wise optimizers on all the parameters of
the same model (58.1M, embeddings and head included), row-sharded as FSDP2 shards them: for each
algorithm, the zoo's default path on ``DTensor`` s, its foreach and single-tensor paths, torch's
AdamW (foreach) and the peer packages (those that run on ``DTensor`` s; the others are listed with
their error), interleaved over the repetitions. A step's time is the slowest rank's.
Each rank uses one thread (CPU cores play the devices).

    python scripts/bench_distributed.py              # spawns 2 gloo ranks (a few minutes on 2 cores)
    python scripts/bench_distributed.py --quick      # small shapes, one repetition (smoke test)
    python scripts/bench_distributed.py --suite elementwise --only lion,diffgrad
    torchrun --nproc_per_node 2 scripts/bench_distributed.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist

import optimzoo
from bench_step import LLAMA_60M as LLAMA_60M_ALL, QUICK as QUICK_ALL, llama_shapes, peers_of
from optimzoo.cli import brief_usage, fail
from optimzoo.distributed import shard_rows

LLAMA_60M = dict(hidden=512, intermediate=1376, layers=8)
QUICK = dict(hidden=128, intermediate=344, layers=2)


def hidden_matrix_shapes(hidden: int, intermediate: int, layers: int) -> list[tuple[int, int]]:
    """The hidden matrices of a LLaMA (the ones a matrix optimizer orthogonalizes), in model order."""
    per_layer = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]
    return per_layer * layers


class Probe:
    """Counts matrices and time in ``opt._transform`` and bytes through ``all_to_all_single`` (this
    rank's traffic to and from the other ranks)."""

    def __init__(self, opt, rank: int):
        self.matrices = 0
        self.seconds = 0.0
        self.sent = 0
        self.received = 0
        inner = opt._transform

        def timed(group, U, rows):
            start = time.perf_counter()
            out = inner(group, U, rows)
            self.seconds += time.perf_counter() - start
            self.matrices += U.shape[0]
            return out

        opt._transform = timed
        self._rank = rank

    def count_bytes(self, input, output_split_sizes, input_split_sizes) -> None:
        size = input.element_size()
        self.sent += size * (sum(input_split_sizes) - input_split_sizes[self._rank])
        self.received += size * (sum(output_split_sizes) - output_split_sizes[self._rank])

    def reset(self) -> None:
        self.matrices, self.seconds, self.sent, self.received = 0, 0.0, 0, 0


def timed_steps(opt, probe: Probe, reps: int, barrier) -> dict:
    """One warm-up step, then ``reps`` timed steps; per-step medians of the probe's figures."""
    opt.step()
    rows = []
    for _ in range(reps):
        barrier()
        probe.reset()
        start = time.perf_counter()
        opt.step()
        rows.append((time.perf_counter() - start, probe.seconds, probe.matrices, probe.sent, probe.received))
    step, ns, matrices, sent, received = (statistics.median(col) for col in zip(*rows))
    return dict(step_s=step, ns_s=ns, matrices=matrices, sent_bytes=sent, received_bytes=received)


def make_optimizer(params):
    return optimzoo.get_optimizer("normuon")([{"params": params, "role": "matrix"}], ns_dtype="float32")


def run_rank(cfg: dict, reps: int) -> dict | None:
    """The three measurements on this rank; rank 0 returns the gathered report."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    shapes = hidden_matrix_shapes(**cfg)
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=gen) / s[1] ** 0.5 for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    report: dict = {"world": world, "matrices": len(shapes), "parameters": sum(w.numel() for w in weights)}

    # owner-based, on DTensor row shards
    params = []
    for w, g in zip(weights, grads):
        p = torch.nn.Parameter(distribute_tensor(w, mesh, [Shard(0)], src_data_rank=None))
        p.grad = distribute_tensor(g, mesh, [Shard(0)], src_data_rank=None)
        params.append(p)
    opt = make_optimizer(params)
    probe = Probe(opt, rank)
    inner_a2a = dist.all_to_all_single

    def counting_a2a(output, input, output_split_sizes=None, input_split_sizes=None, **kwargs):
        probe.count_bytes(input, output_split_sizes, input_split_sizes)
        return inner_a2a(output, input, output_split_sizes, input_split_sizes, **kwargs)

    dist.all_to_all_single = counting_a2a
    try:
        owner = timed_steps(opt, probe, reps, dist.barrier)
    finally:
        dist.all_to_all_single = inner_a2a

    # replicated: every rank steps every full matrix
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    for p, g in zip(params, grads):
        p.grad = g
    opt = make_optimizer(params)
    probe = Probe(opt, rank)
    replicated = timed_steps(opt, probe, reps, dist.barrier)
    mine = [shard_rows(s[0], world)[rank] * s[1] for s in shapes]
    replicated["sent_bytes"] = 4 * sum(mine) * (world - 1)  # an all-gather of the fp32 updates
    replicated["received_bytes"] = 4 * sum(s[0] * s[1] - r for s, r in zip(shapes, mine))

    # one process: rank 0 alone
    dist.barrier()
    single = None
    if rank == 0:
        opt = make_optimizer(params)
        probe = Probe(opt, rank)
        single = timed_steps(opt, probe, reps, lambda: None)
        single["sent_bytes"] = single["received_bytes"] = 0
    dist.barrier()

    per_rank = [None] * world
    dist.all_gather_object(per_rank, {"owner": owner, "replicated": replicated})
    if rank:
        return None
    report["ranks"] = per_rank
    report["single"] = single
    owner_ns = max(r["owner"]["ns_s"] for r in per_rank)
    report["ratio_owner_vs_replicated_ns"] = owner_ns / max(r["replicated"]["ns_s"] for r in per_rank)
    report["ratio_owner_vs_single_ns"] = owner_ns / single["ns_s"]
    report["each_matrix_once"] = sum(r["owner"]["matrices"] for r in per_rank) == len(shapes)
    return report


#: the element-wise optimizers of the registry (their default path on DTensors is what this times)
ELEMENTWISE = ("adamp", "sgdp", "diffgrad", "lion", "spam", "stable_spam")


def elementwise_candidates(algorithm: str) -> list[tuple[str, object]]:
    """(label, factory of an optimizer over named parameters): torch AdamW, our three paths, the peers."""
    ours = [(f"optimzoo ({label})", kw) for label, kw in
            (("default", {}), ("foreach", {"foreach": True}), ("single-tensor", {"foreach": False}))]
    return ([("torch.optim.AdamW (foreach)", lambda named: torch.optim.AdamW([p for _, p in named], foreach=True))]
            + [(label, lambda named, kw=kw: optimzoo.create_optimizer(named, algorithm, **kw)) for label, kw in ours]
            + peers_of(algorithm))


def run_elementwise(cfg: dict, reps: int, algorithms: list[str]) -> dict | None:
    """Step times of every candidate of each algorithm on row-sharded parameters; rank 0 returns them."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.set_num_threads(1)
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(0)
    named = []
    for name, shape in llama_shapes(**cfg):
        p = torch.nn.Parameter(distribute_tensor(torch.randn(shape, generator=gen) * 0.02, mesh, [Shard(0)],
                                                 src_data_rank=None))
        p.grad = distribute_tensor(torch.randn(shape, generator=gen) * 1e-3, mesh, [Shard(0)], src_data_rank=None)
        named.append((name, p))
    report = {"parameters": sum(p.numel() for _, p in named), "world": world, "reps": reps, "algorithms": {}}
    for algorithm in algorithms:
        opts, failed = [], {}
        for label, make in elementwise_candidates(algorithm):
            try:
                opt = make(named)
                opt.step()  # warm-up (creates the state)
                error = ""
            except Exception as e:  # a peer that does not run on DTensors fails the same way on every rank
                error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"
            errors = [None] * world
            dist.all_gather_object(errors, error)
            if any(errors):
                failed[label] = next(e for e in errors if e)
            else:
                opts.append((label, opt))
        times: dict[str, list[float]] = {label: [] for label, _ in opts}
        for _ in range(reps):
            for label, opt in opts:
                dist.barrier()
                start = time.perf_counter()
                opt.step()
                elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                times[label].append(float(elapsed))
        del opts
        report["algorithms"][algorithm] = {"ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
                                           "failed": failed}
    return report if dist.get_rank() == 0 else None


def print_elementwise(r: dict) -> None:
    print(f"\nElement-wise optimizers on {r['parameters'] / 1e6:.1f}M row-sharded parameters, {r['world']} gloo "
          f"ranks (1 thread each), median of {r['reps']} interleaved steps (slowest rank)")
    print(f"{'optimizer':<12}{'implementation':<34}{'step ms':>10}{'x AdamW':>9}{'x fastest peer':>16}")
    for algorithm, a in r["algorithms"].items():
        ms = a["ms"]
        adamw = ms.get("torch.optim.AdamW (foreach)")
        peers = [v for k, v in ms.items() if not k.startswith(("optimzoo", "torch.optim.AdamW"))]
        best_peer = min(peers) if peers else None
        for label, v in ms.items():
            if label.startswith("torch.optim.AdamW") and algorithm != next(iter(r["algorithms"])):
                continue  # the yardstick once (it is re-timed beside each algorithm for the ratios)
            x_adamw = f"{v / adamw:.2f}" if adamw else "-"
            x_peer = f"{v / best_peer:.2f}" if best_peer and label.startswith("optimzoo") else "-"
            print(f"{algorithm:<12}{label:<34}{v:>10.1f}{x_adamw:>9}{x_peer:>16}")
        for label, error in a["failed"].items():
            print(f"{algorithm:<12}{label:<34}{'fails':>10}  ({error})")


def print_report(r: dict) -> None:
    mb = 1 / 2**20
    print(f"{r['matrices']} hidden matrices, {r['parameters'] / 1e6:.1f}M parameters, {r['world']} gloo ranks "
          "(1 thread each), NorMuon float32, per step")
    print(f"{'run':<12}{'rank':>5}{'matrices':>10}{'NS s':>9}{'step s':>9}{'sent MiB':>10}{'recv MiB':>10}")
    rows = [(kind, i, rr[kind]) for kind in ("owner", "replicated") for i, rr in enumerate(r["ranks"])]
    rows.append(("one process", 0, r["single"]))
    for kind, i, x in rows:
        print(f"{kind:<12}{i:>5}{x['matrices']:>10.0f}{x['ns_s']:>9.3f}{x['step_s']:>9.3f}"
              f"{x['sent_bytes'] * mb:>10.1f}{x['received_bytes'] * mb:>10.1f}")
    print(f"each matrix transformed once in the job: {r['each_matrix_once']}")
    print(f"per-rank NS time, owner / replicated:  {r['ratio_owner_vs_replicated_ns']:.2f}")
    print(f"per-rank NS time, owner / one process: {r['ratio_owner_vs_single_ns']:.2f}")


def _spawned(rank: int, world: int, port: int, args) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        main_rank(args)
    finally:
        dist.destroy_process_group()


def main_rank(args) -> None:
    reps = 1 if args.quick else args.reps
    report: dict = {}
    if args.suite in ("all", "owner"):
        report["owner"] = run_rank(QUICK if args.quick else LLAMA_60M, reps)
    if args.suite in ("all", "elementwise"):
        report["elementwise"] = run_elementwise(QUICK_ALL if args.quick else LLAMA_60M_ALL, reps, args.only)
    if dist.get_rank() == 0:
        if "owner" in report:
            print_report(report["owner"])
        if "elementwise" in report:
            print_elementwise(report["elementwise"])
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)


def main() -> None:
    parser = brief_usage(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--quick", action="store_true", help="small shapes, one repetition")
    parser.add_argument("--reps", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks to spawn when not under torchrun")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--suite", choices=("all", "owner", "elementwise"), default="all",
                        help="owner: NorMuon's owner-based transforms; elementwise: the element-wise optimizers' "
                             "paths on DTensors (default: both)")
    parser.add_argument("--only", default=",".join(ELEMENTWISE),
                        help=f"element-wise optimizers to time (default: {','.join(ELEMENTWISE)})")
    args = parser.parse_args()
    if args.nproc < 1 or args.reps < 1:
        fail(parser, "--nproc and --reps must be at least 1")
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in args.only if n not in ELEMENTWISE]
    if unknown:
        fail(parser, f"--only: {', '.join(unknown)} not among the element-wise optimizers {', '.join(ELEMENTWISE)}")
    if "RANK" in os.environ:  # under torchrun
        dist.init_process_group("gloo")
        try:
            main_rank(args)
        finally:
            dist.destroy_process_group()
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_spawned, args=(args.nproc, port, args), nprocs=args.nproc,
                                          start_method="spawn")


if __name__ == "__main__":
    main()
