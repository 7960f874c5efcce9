"""Machinery shared by every optimzoo optimizer.

Nothing here is an algorithm. It is the bookkeeping that torch.optim's own optimizers repeat in each
file and that we keep once:

* hyperparameter validation with messages that name the field and the allowed range;
* refusal of sparse and complex gradients, by optimizer and parameter name;
* the lazy per-parameter step counter (a 0-d tensor, as in torch.optim, so ``state_dict`` round-trips);
* the choice between the single-tensor, multi-tensor (``torch._foreach_*``) and fused
  (``torch.compile``-generated) paths;
* accounting of optimizer-state bytes and an optional ``metrics()`` hook for loggers.
* checkpoints that refuse another optimizer's state (:mod:`optimzoo.optim._checkpoint`).
"""

from __future__ import annotations

import math
import numbers
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.fx.experimental import _config as shape_config
from torch.optim import Optimizer

from ..ops.reduce import local_tensor, reduce_shards, sharded_alike
from ._checkpoint import CheckpointMixin

__all__ = [
    "ZooOptimizer",
    "check_betas",
    "check_choice",
    "check_int",
    "check_lr",
    "check_paths",
    "check_range",
    "chunk_views",
    "foreach_adam_moments_",
    "foreach_chunks",
    "eager_kernel",
    "fused_kernel",
    "piecewise",
    "state_bytes",
]


# --------------------------------------------------------------------------------------------
# Validation. Each check raises ValueError("Invalid <name>: <value> (<name> must be ...)").
# --------------------------------------------------------------------------------------------


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: a tensor {name} must hold one value, got shape {tuple(value.shape)}")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"Invalid {name}: {value!r} ({name} must be a real number)")
    return float(value)


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Check ``low <= value <= high`` (strict where ``*_open``); return ``value`` as a float.

    NaN and infinite values are always refused.
    """
    x = _as_float(name, value)
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    rng = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    bad = not math.isfinite(x)
    if low is not None:
        bad |= x <= low if low_open else x < low
    if high is not None:
        bad |= x >= high if high_open else x > high
    if bad:
        raise ValueError(f"Invalid {name}: {value!r} ({name} must be in {rng})")
    return x


def check_lr(lr: Any, name: str = "lr") -> float:
    """A learning rate: finite and >= 0 (a 1-element tensor is accepted, as in torch.optim)."""
    return check_range(name, lr, 0.0)


def check_int(name: str, value: Any, low: int = 1, high: int | None = None) -> int:
    """An integer in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"Invalid {name}: {value!r} ({name} must be an integer >= {low})")
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"Invalid {name}: {value!r} ({name} must be an integer {rng})")
    return int(value)


def check_betas(betas: Any, name: str = "betas", n: int = 2) -> tuple[float, ...]:
    """A tuple of ``n`` coefficients, each in [0, 1)."""
    if not isinstance(betas, Sequence) or isinstance(betas, str) or len(betas) != n:
        raise ValueError(f"Invalid {name}: {betas!r} ({name} must be a tuple of {n} floats in [0, 1))")
    return tuple(check_range(f"{name}[{i}]", b, 0.0, 1.0, high_open=True) for i, b in enumerate(betas))


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """One of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} ({name} must be one of {', '.join(map(repr, choices))})")
    return value


def check_paths(foreach: Any, fused: Any) -> None:
    """``foreach=True`` and ``fused=True`` exclude each other, as in torch.optim."""
    if foreach and fused:
        raise ValueError("Invalid foreach/fused: foreach=True and fused=True cannot be used together")


# --------------------------------------------------------------------------------------------
# Multi-tensor and fused kernels
# --------------------------------------------------------------------------------------------


def foreach_adam_moments_(exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], grads: list[torch.Tensor],
                          beta1: float, beta2: float) -> None:
    """Adam's moment updates in place with ``torch._foreach_*`` ops:
    ``m <- beta1 m + (1-beta1) g``, ``v <- beta2 v + (1-beta2) g^2``."""
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)  # one pass, no temporaries (as torch.optim.Adam)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)


#: elements per piece of :func:`chunk_views` and group of :func:`foreach_chunks`: 1 MB of float32 per
#: tensor, about a core's L2 cache. On a 2-core Zen 4 (15 tensors of the llama_60m shapes, 22.7M
#: parameters, 2 threads, interleaved), 4 MB pieces made the eager single-tensor steps up to 5.6x slower
#: (Lion 128 vs 23 ms, SGDP 151 vs 38 ms, diffGrad 73 vs 49 ms; their temporaries then come from fresh
#: mappings of the allocator, page-faulted in at every step) and the foreach steps up to 1.6x
#: (Stable-SPAM 165 vs 102 ms, AdamP 106 vs 76 ms).
CHUNK_ELEMENTS = 1 << 18


def chunk_views(tensors: Sequence[torch.Tensor], elements: int | None = None) -> list[list[torch.Tensor]]:
    """Same-shaped ``tensors`` as pieces of about ``elements`` elements: a list of pieces, each a list
    of flat views (one per tensor) covering the same elements.

    Non-contiguous and sharded (``DTensor``) tensors come back whole (one piece), so are empty ones.
    ``elements`` defaults to :data:`CHUNK_ELEMENTS` (read at call time).
    """
    elements = elements or CHUNK_ELEMENTS
    first = tensors[0]
    n = first.numel()
    if n <= elements or hasattr(first, "device_mesh") or not all(t.is_contiguous() for t in tensors):
        return [list(tensors)]
    flat = [t.view(-1) for t in tensors]
    return [[f[s:s + elements] for f in flat] for s in range(0, n, elements)]


def foreach_chunks(tensor_lists: Sequence[Sequence[torch.Tensor]],
                   elements: int | None = None) -> Iterator[tuple[list[list[torch.Tensor]], list[int]]]:
    """Split parallel lists of same-shaped tensors into groups of flat pieces (views) of about
    ``elements`` elements, for element-wise ``torch._foreach_*`` updates run group by group.

    Yields ``(lists, sources)``: the pieces of each list, and for each piece the index of the tensor it
    comes from (to pick per-tensor scalars). A foreach update run group by group makes its passes over
    data that is still in cache, and its temporaries are small: on a CPU a temporary the size of an
    embedding matrix (> 32 MB) is a fresh mapping from the allocator, page-faulted in at every step.
    ``DTensor`` s sharded alike (FSDP2's parameters, gradients and state) are split as their local shards
    (:func:`_local_pieces`): the pieces are plain tensors, so the foreach ops skip DTensor's dispatch,
    and the pieces of one tensor may number differently on each rank (anything counted per piece must be
    summed per tensor before it is all-reduced). Non-contiguous tensors are passed whole. Only for
    updates without whole-tensor reductions. ``elements`` defaults to :data:`CHUNK_ELEMENTS`.
    """
    elements = elements or CHUNK_ELEMENTS
    groups: list[list[torch.Tensor]] = [[] for _ in tensor_lists]
    sources: list[int] = []
    size = 0
    for i in range(len(tensor_lists[0])):
        for piece in _local_pieces([lst[i] for lst in tensor_lists], elements)[0]:
            for group, t in zip(groups, piece):
                group.append(t)
            sources.append(i)
            size += piece[0].numel()
            if size >= elements:
                yield groups, sources
                groups, sources, size = [[] for _ in tensor_lists], [], 0
    if sources:
        yield groups, sources


def _local_pieces(tensors: Sequence[torch.Tensor],
                  elements: int | None = None) -> tuple[list[list[torch.Tensor]], torch.Tensor | None]:
    """:func:`chunk_views` of ``tensors``, of their local shards when they are ``DTensor`` s sharded alike
    (an element-wise update of the shards is the update of the whole); and the ``DTensor`` over whose shards
    the pieces' counts must be summed (None for plain tensors)."""
    if sharded_alike(tensors):
        return chunk_views([local_tensor(t) for t in tensors], elements), tensors[0]
    return chunk_views(tensors, elements), None


def piecewise(fn: Callable) -> Callable:
    """``fn``, an element-wise single-tensor update ``fn(*tensors, *scalars, **static)``, as an eager
    runner ``run(tensors, scalars, **static)`` over the pieces of :func:`chunk_views`: the same numbers
    as one call (every output element depends only on the same element of the inputs), with piece-sized
    temporaries instead of tensor-sized ones. ``fn`` returns None or a 0-d tensor that adds up over the
    pieces (a count). ``DTensor`` s sharded alike are updated through their local shards (no DTensor
    dispatch per op), and a count is then summed over the shards."""

    def run(tensors: Sequence[torch.Tensor], scalars: Sequence, **static):
        pieces, sharded = _local_pieces(tensors)
        results = [fn(*piece, *scalars, **static) for piece in pieces]
        if results[0] is None:
            return None
        total = results[0] if len(results) == 1 else torch.stack(results).sum()
        return total if sharded is None else reduce_shards(total.clone(), sharded, dist.ReduceOp.SUM)

    run.__name__ = f"piecewise_{fn.__name__}"
    return run


#: Inductor chooses whether a CPU loop nest runs on several threads from the sizes of the first call;
#: with dynamic shapes a kernel first called on a small tensor would stay single-threaded for every
#: later (large) one. Dynamic threads leave that choice to the OpenMP runtime at each call.
_COMPILE_OPTIONS = {"cpp.dynamic_threads": True}

#: tensors per compiled call of a fused kernel; shorter groups have power-of-two lengths
FUSED_GROUP = 16


def _power_of_two_groups(items: Sequence) -> Iterator[Sequence]:
    """``items`` in groups of :data:`FUSED_GROUP`, the remainder split into power-of-two lengths, so
    that a compiled kernel sees at most five group lengths whatever the number of tensors."""
    i = 0
    size = FUSED_GROUP
    while i < len(items):
        while size > len(items) - i:
            size //= 2
        yield items[i:i + size]
        i += size


def eager_kernel(fn: Callable) -> Callable:
    """A runner of ``fn`` (not compiled) with :func:`fused_kernel`'s calling convention: a list of
    argument tuples, one per tensor, and static keyword arguments; returns ``fn``'s results."""

    def run(items: Sequence[tuple], **static) -> list:
        return [fn(*item, **static) for item in items]

    run.__wrapped__ = fn  # type: ignore[attr-defined]
    run.__name__ = fn.__name__
    return run


def fused_kernel(fn: Callable, eager: Callable | None = None) -> Callable:
    """Return a runner of ``fn`` compiled by ``torch.compile`` over groups of tensors.

    ``fn`` is a single-tensor update written without data-dependent Python control flow, with its
    hyperparameters as 0-d tensors (see :meth:`ZooOptimizer._scalars`). The runner takes a list of
    argument tuples, one per tensor, and keyword arguments that are static Python values, and returns
    the list of ``fn``'s results. Each compiled graph covers up to :data:`FUSED_GROUP` tensors (the
    Python loop is unrolled at trace time): one call and one guard check per group instead of per
    tensor, which on a CPU costs ~50-150 us each. Shapes are dynamic and not duck-typed, so one graph
    serves every group of the same length and every learning rate; Inductor emits one fused loop nest
    per tensor (C++/OpenMP on CPU, Triton on GPU), so the step makes close to one pass over memory
    instead of one pass per elementary op. Compiled on first use (seconds).

    ``eager`` is what :meth:`ZooOptimizer._run_kernel` runs off the fused path, as
    ``eager(tensors, scalars, **static)`` (the runner's ``eager`` attribute): by default ``fn`` itself
    (whole tensors), :func:`piecewise` ``(fn)`` for an element-wise ``fn``, or a hand-written equivalent.
    """

    # The eager runner with a code object of its own: torch.compile keeps (a bounded number of)
    # graphs per code object.
    unrolled = eager_kernel(fn)
    over = types.FunctionType(unrolled.__code__.replace(co_name=f"fused_{fn.__name__}"), unrolled.__globals__,
                              f"fused_{fn.__name__}", None, unrolled.__closure__)
    compiled: list[Callable] = []

    def run(items: Sequence[tuple], **static) -> list:
        if not compiled:
            compiled.append(torch.compile(over, dynamic=True, fullgraph=True, options=_COMPILE_OPTIONS))
        out: list = []
        # graphs: group lengths x dtypes x static arguments; sizes not duck-typed, so that groups whose
        # tensors happen to have equal sizes do not get graphs of their own
        with torch._dynamo.config.patch(recompile_limit=64), shape_config.patch(use_duck_shape=False):
            for group in _power_of_two_groups(items):
                out += compiled[0](group, **static)
        return out

    run.__wrapped__ = fn  # type: ignore[attr-defined]
    run.eager = eager or (lambda tensors, scalars, **static: fn(*tensors, *scalars, **static))  # type: ignore[attr-defined]
    run.__name__ = f"fused_{fn.__name__}"
    return run


# --------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------

class ZooOptimizer(CheckpointMixin, Optimizer):
    """Base class of optimzoo optimizers: a ``torch.optim.Optimizer`` plus shared bookkeeping.

    Subclasses implement ``step``; they create state lazily on the first step (never in
    ``__init__``), so an optimizer can be built before its parameters are sharded or moved.
    ``state_dict()`` records the optimizer's registry name and ``load_state_dict`` refuses another
    optimizer's state and matches state to parameters by name (:mod:`optimzoo.optim._checkpoint`).
    """

    #: whether sparse gradients are supported (none of the zoo's algorithms is)
    supports_sparse: bool = False

    #: whether each step counts non-finite gradient entries (``metrics()["nonfinite_grads"]``). The count
    #: costs one read of the gradients per step (on llama_60m shapes, 2 CPU threads: ~8 ms, +20% on a
    #: foreach Lion step, +37% on a fused one, +1-4% on AdamP, Stable-SPAM, NorMuon); set it False on an
    #: instance when a guard upstream already keeps non-finite gradients away (optimzoo.hf's guard does).
    count_nonfinite: bool = True

    # ------------------------------------------------------------------ steps

    def _param_name(self, group: dict, index: int) -> str:
        names = group.get("param_names")
        return names[index] if names is not None else f"#{index} of param group {self.param_groups.index(group)}"

    def _grads(self, group: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The ``(param, grad)`` pairs of ``group`` with a gradient, after refusing bad gradients."""
        out = []
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse and not self.supports_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients "
                    f"(parameter {self._param_name(group, i)}); use a dense gradient, e.g. "
                    "nn.Embedding(sparse=False)"
                )
            if torch.is_complex(p) or torch.is_complex(g):
                raise RuntimeError(
                    f"{type(self).__name__} does not support complex parameters or gradients "
                    f"(parameter {self._param_name(group, i)}); optimize torch.view_as_real(p) instead"
                )
            out.append((p, g))
        if self.count_nonfinite:
            self._count_nonfinite([g for _, g in out])
        return out

    @torch.compiler.disable  # dynamo drops attribute writes on the optimizer made inside a compiled step
    def _count_nonfinite(self, grads: list[torch.Tensor]) -> None:
        """Add the number of non-finite (NaN/Inf) entries of ``grads`` to a running device counter,
        reported by :meth:`metrics` as ``nonfinite_grads``.

        One fused read pass (``torch._foreach_norm``) finds the tensors with a non-finite entry (a
        non-finite 2-norm; a finite tensor whose norm overflows float32, entries beyond ~1e19, counts
        too); their entries are counted exactly. On CPU reading the norms is no synchronization, so only
        flagged tensors are counted; on accelerators every tensor is counted on the device, without a
        host sync. Under ``torch.compile(opt.step)`` this runs eagerly (a graph break). DTensor gradients count their local shard (a per-rank figure).
        """
        local = [local_tensor(g) for g in grads]
        if not local:
            return
        if all(g.device.type == "cpu" for g in local):
            norms = torch._foreach_norm(local)
            flagged = [g for g, n in zip(local, norms) if not math.isfinite(n)]
            if not flagged:
                return
            count = sum(torch.count_nonzero(~torch.isfinite(g)) for g in flagged)
        else:
            count = sum(torch.count_nonzero(~torch.isfinite(g)).to(local[0].device) for g in local)
        total = self.__dict__.get("_nonfinite")
        self._nonfinite = count if total is None else total + count.to(total.device)

    @staticmethod
    def _step_counter(state: dict) -> torch.Tensor:
        """The parameter's step counter (a float32 0-d CPU tensor, as in torch.optim), created lazily."""
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        return state["step"]

    @staticmethod
    def _zeros_state(state: dict, p: torch.Tensor, *keys: str) -> list[torch.Tensor]:
        """The state tensors ``keys`` of ``p``, each created as zeros like ``p`` on first use (lazy state)."""
        for key in keys:
            if key not in state:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return [state[key] for key in keys]

    @staticmethod
    def _use_foreach(foreach: bool | None, tensors: Sequence[torch.Tensor]) -> bool:
        """Resolve ``foreach=None``: use the multi-tensor path when every tensor is a plain tensor or a
        ``DTensor`` (FSDP2 shards).

        Unlike torch.optim we default to it on CPU too, where it was measured faster than the
        single-tensor loop (ENVIRONMENT.md). On DTensors every zoo foreach path is tested exact against
        one process (tests/test_distributed.py) and is the faster path (scripts/bench_distributed.py);
        other tensor subclasses take the single-tensor path.
        """
        if foreach is not None:
            return foreach
        return all(type(t) in (torch.Tensor, torch.nn.Parameter) or hasattr(t, "device_mesh") for t in tensors)

    def _path(self, group: dict, params: Sequence[torch.Tensor]) -> str:
        """``"fused"``, ``"foreach"`` or ``"single"`` for this group's ``fused``/``foreach`` flags."""
        if group.get("fused"):
            return "fused"
        return "foreach" if self._use_foreach(group["foreach"], params) else "single"

    @staticmethod
    def _fusable(*tensors: torch.Tensor) -> bool:
        """Whether a fused kernel can take flat views of ``tensors`` (contiguous, more than one element)."""
        return tensors[0].numel() > 1 and all(t.is_contiguous() for t in tensors)

    @classmethod
    def _run_kernel(cls, runner: Callable, items: Sequence[tuple[tuple[torch.Tensor, ...], tuple]], fused: bool,
                    **static) -> list:
        """Run ``(tensors, scalars)`` items, one per parameter, through ``runner`` (a :func:`fused_kernel`):
        on the fused path flat views of the tensors it can take, the others (and everything off the fused
        path) through its ``eager`` runner. Results in item order."""
        compiled = [i for i, (tensors, _) in enumerate(items) if fused and cls._fusable(*tensors)]
        results = runner([(*(t.view(-1) for t in items[i][0]), *items[i][1]) for i in compiled], **static)
        out = dict(zip(compiled, results))
        for i, (tensors, scalars) in enumerate(items):
            if i not in out:
                out[i] = runner.eager(tensors, scalars, **static)
        return [out[i] for i in range(len(items))]

    @staticmethod
    def _closure_loss(closure: Callable | None) -> Any:
        """The loss from ``closure`` (re-evaluated with gradients enabled), or None."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    @staticmethod
    def _scalars(device: torch.device, *values: float) -> tuple[torch.Tensor, ...]:
        """Hyperparameters as float32 0-d tensors on ``device``, the calling convention of fused kernels."""
        t = torch.tensor(values, dtype=torch.float32, device=device)
        return tuple(t.unbind())

    def metrics(self) -> dict[str, float]:
        """Counters for loggers since the last call (then reset): ``nonfinite_grads``, the number of NaN/Inf
        gradient entries the optimizer was given (see :meth:`_count_nonfinite`), for every optimizer;
        subclasses add their own (e.g. clipped fraction) to this dict.

        Implementations must be cheap: they read counters accumulated during ``step`` and reset them.
        """
        total = self.__dict__.pop("_nonfinite", None)
        return {"nonfinite_grads": 0.0 if total is None else float(total)}


def state_bytes(optimizer: Optimizer) -> int:
    """Bytes of persistent optimizer state: all state tensors except 0-d ones (step counters, scalars).

    This is the figure the registry declares per parameter (``OptimizerSpec.state``). For DTensors
    the local shard is counted.
    """
    total = 0
    for st in optimizer.state.values():
        if not isinstance(st, dict):  # some peers keep global counters in ``state`` (the official SPAM code)
            continue
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                local = local_tensor(v)
                total += local.numel() * local.element_size()
    return total
