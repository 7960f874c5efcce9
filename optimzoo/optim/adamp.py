"""AdamP and SGDP: Adam and SGD that project updates off scale-invariant weights.

Heo, Chun, Oh, Han, Yun, Kim, Uh, Ha, "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
Scale-invariant Weights", ICLR 2021, arXiv 2006.08217. Official code: clovaai/AdamP
``adamp/adamp.py`` and ``adamp/sgdp.py`` at commit 7f6f0383ff6a (pip ``adamp`` 0.3.0); torch-optimizer's
``AdamP``/``SGDP`` are ports of it and are this module's test oracles.

Layout (CONTRIBUTING.md): the projection is four small functions (:func:`projection_stats`,
:func:`projection_scale`, :func:`apply_projection_` and the row-blocked statistics of the eager
paths). Each algorithm has three one-tensor kernels with 0-d tensor hyperparameters and no
data-dependent Python control flow: ``*_vector`` (1-D tensors, one pass) and, for tested tensors,
``*_pass1`` (moments and the projection's statistics) and ``*_pass2`` (the update). Compiled whole by
:func:`~optimzoo.optim._base.fused_kernel` they are the fused path; run over cache-sized pieces by
:func:`_eager_runners` (flat pieces for ``*_vector``, row blocks for the passes) the eager
single-tensor path. ``_multi_tensor_*`` is the same math with ``torch._foreach_*`` ops.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from ..ops.reduce import global_amax, global_sum, reduce_shards_many, sharded_alike
from . import _base
from ._base import (
    ZooOptimizer,
    check_betas,
    check_lr,
    check_paths,
    check_range,
    foreach_adam_moments_,
    fused_kernel,
    piecewise,
)

__all__ = ["SGDP", "AdamP", "apply_projection_", "projection_scale", "projection_stats"]


# --------------------------------------------------------------------------------------------
# The projection (shared by AdamP and SGDP)
# --------------------------------------------------------------------------------------------

def row_sums(x: torch.Tensor) -> torch.Tensor:
    """Per-row sums of a ``(C, D)`` view (the channel view): local to a row shard."""
    return x.sum(dim=1)


def total_sum(rows: torch.Tensor) -> torch.Tensor:
    """Sum over all rows (the layer view): a whole-tensor reduction, all-reduced across row shards."""
    return global_sum(rows)


def total_max(rows: torch.Tensor) -> torch.Tensor:
    """Maximum over all rows: a whole-tensor reduction, all-reduced across row shards."""
    return global_amax(rows)


def projection_stats(param: torch.Tensor, grad: torch.Tensor, update: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The per-row statistics the projection needs, for ``(C, D)`` views: ``g.w``, ``g.g``, ``w.w``, ``w.u``."""
    return row_sums(grad * param), row_sums(grad * grad), row_sums(param * param), row_sums(param * update)


def row_blocks(param: torch.Tensor, block_elements: int | None = None) -> list[slice]:
    """Slices of the rows of a ``(C, D)`` view, about ``block_elements`` (default
    :data:`~optimzoo.optim._base.CHUNK_ELEMENTS`, as :func:`~optimzoo.optim._base.foreach_chunks`)
    elements each, for the eager paths: per-block temporaries stay small (in cache and in the
    allocator's free lists, where a full-size one would be page-faulted in). A sharded tensor is one
    block."""
    block_elements = block_elements or _base.CHUNK_ELEMENTS
    per_block = max(1, block_elements // max(1, param.size(1)))
    if hasattr(param, "device_mesh") or param.size(0) <= per_block:
        return [slice(None)]
    return [slice(i, i + per_block) for i in range(0, param.size(0), per_block)]


def blocked_projection_stats(stats: Callable[..., tuple[torch.Tensor, ...]], *tensors: torch.Tensor,
                             block_elements: int | None = None) -> tuple[torch.Tensor, ...]:
    """The per-row statistics ``stats(*tensors)`` (e.g. :func:`projection_stats` of an update computed
    from ``tensors``, ``(C, D)`` views) as ``stats`` of the row blocks of :func:`row_blocks`,
    concatenated (the same values, rows being independent): neither the update nor any product is
    materialized whole."""
    blocks = [stats(*(t[rows] for t in tensors)) for rows in row_blocks(tensors[0], block_elements)]
    return blocks[0] if len(blocks) == 1 else tuple(torch.cat(parts) for parts in zip(*blocks))


def projection_scale(
    stats: tuple[torch.Tensor, ...],
    eps: torch.Tensor,
    threshold_channel: torch.Tensor,
    threshold_layer: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""AdamP's projection of an update ``u`` of one weight ``w`` viewed as ``(C, D)`` (rows = output
    channels), from the row statistics of :func:`projection_stats`.

    The official two tests, in order, on the *raw gradient* ``g`` and the weight ``w``
    (``cos(x, y) = |x.y| / (||x|| + eps) / (||y|| + eps)``):

    1. channel view: if ``max_i cos(g_i, w_i) < delta / sqrt(D)``, every row is projected,
       ``u_i <- u_i - (w^_i . u_i) w^_i`` with ``w^_i = w_i / (||w_i|| + eps)``;
    2. otherwise layer view: if ``cos(g, w) < delta / sqrt(C D)`` the whole tensor is projected the same way;
    3. otherwise nothing changes.

    Both tests are evaluated on the device and selected with ``torch.where`` (no host synchronization,
    compilable). Returns ``(scale, project)``: the projected update is ``u - w * scale[:, None]``
    (:func:`apply_projection_`; ``scale = (w.u) / (||w|| + eps)^2`` per row or for the whole tensor,
    0 where nothing is projected) and ``project`` is a 0-d bool (the weight decay of a projected
    tensor is multiplied by ``wd_ratio``).
    """
    totals = tuple(total_sum(rows) for rows in stats)
    return projection_from_totals(stats, total_max(channel_cosines(stats, eps)), totals, eps, threshold_channel,
                                  threshold_layer)


def channel_cosines(stats: tuple[torch.Tensor, ...], eps: torch.Tensor) -> torch.Tensor:
    """Per row, ``cos(g_i, w_i)`` from the row statistics of :func:`projection_stats`."""
    dot_gw, sq_g, sq_w, _ = stats
    return dot_gw.abs() / (sq_g.sqrt() + eps) / (sq_w.sqrt() + eps)


def projection_from_totals(stats: tuple[torch.Tensor, ...], channel_max: torch.Tensor,
                           totals: tuple[torch.Tensor, ...], eps: torch.Tensor, threshold_channel: torch.Tensor,
                           threshold_layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`projection_scale` from the row statistics, the largest channel cosine and the statistics'
    sums over all rows (``totals``, the layer view): the whole-tensor reductions done by the caller (on
    shards, all-reduced together for many tensors: :func:`_foreach_projections`)."""
    _, _, sq_w, dot_wu = stats
    total_gw, total_g, total_w, total_wu = totals
    channel = channel_max < threshold_channel
    layer_norm_w = total_w.sqrt()
    cos_layer = total_gw.abs() / (total_g.sqrt() + eps) / (layer_norm_w + eps)
    project = torch.logical_or(channel, cos_layer < threshold_layer)
    scale = torch.where(channel, dot_wu / (sq_w.sqrt() + eps).square(), total_wu / (layer_norm_w + eps).square())
    return torch.where(project, scale, torch.zeros_like(scale)), project


def apply_projection_(update: torch.Tensor, param: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``update <- update - param * scale[:, None]`` in place (``(C, D)`` views); returns ``update``."""
    return update.addcmul_(param, scale.unsqueeze(1), value=-1)


def _decay_factor(project: torch.Tensor, wd_ratio: torch.Tensor) -> torch.Tensor:
    """The weight-decay multiplier: ``wd_ratio`` for a projected tensor, else 1."""
    return torch.where(project, wd_ratio, torch.ones_like(wd_ratio))


def _scale_of(stats: tuple[torch.Tensor, ...], hp) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`projection_scale` of row statistics with a kernel's hyperparameters ``hp``."""
    return projection_scale(stats, hp.eps, hp.threshold_channel, hp.threshold_layer)


def _eager_runners(kernels: dict[str, Callable], stats: Callable) -> dict[str, Callable]:
    """The eager single-tensor path: runners of an algorithm's one-tensor ``kernels`` with the calling
    convention of their :func:`~optimzoo.optim._base.fused_kernel` runners (a list of argument tuples,
    static keyword arguments), whose temporaries are cache-sized instead of tensor-sized (on a CPU a
    temporary > 32 MB is a fresh mapping, page-faulted in at every step):

    * ``vector``: the element-wise kernel over flat pieces (:func:`~optimzoo.optim._base.piecewise`),
      the same bits as one call;
    * ``pass1``: ``stats(param, grad, *state, hp, **static)``, the row statistics of the projection, over
      :func:`row_blocks` (:func:`blocked_projection_stats`), then :func:`projection_scale` of the whole
      tensor's rows: returns ``(scale, project)`` per tensor;
    * ``pass2``: the kernel over the same row blocks, each with its rows of ``scale`` (None on the CPU
      when nothing is projected: :func:`_skips`).
    """
    vector = piecewise(kernels["vector"])
    pass2 = kernels["pass2"]

    def run_vector(items: list[tuple], **static) -> None:
        for *tensors, hp in items:
            vector(tensors, (hp,), **static)

    def run_pass1(items: list[tuple], **static) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [_scale_of(blocked_projection_stats(lambda *rows: stats(*rows, hp, **static), *tensors), hp)
                for *tensors, hp in items]

    def run_pass2(items: list[tuple], **static) -> None:
        for *tensors, scale, project, hp in items:
            skip = _skips(project)  # nothing projected: the unprojected step, the same numbers
            for rows in row_blocks(tensors[0]):
                pass2(*(t[rows] for t in tensors), None if skip else scale[rows], project, hp, **static)

    return {"vector": run_vector, "pass1": run_pass1, "pass2": run_pass2}


def _skips(project: torch.Tensor) -> bool:
    """Whether an eager path may skip the projection's pass: on the CPU, where reading the flag costs
    no synchronization, when nothing is projected (the result would be the update unchanged)."""
    return project.device.type == "cpu" and not bool(project)


def _matrix_view(t: torch.Tensor) -> torch.Tensor:
    """The channel view ``(size(0), -1)`` of a weight (a view, as the tensors are contiguous)."""
    return t.view(t.size(0), t.shape[1:].numel())  # (not -1: an empty row shard has 0 rows)


def _thresholds(p: torch.Tensor, delta: float) -> tuple[float, float]:
    rows = p.size(0)
    cols = p.numel() // rows
    return delta / math.sqrt(cols), delta / math.sqrt(rows * cols)


def _projects(p: torch.Tensor) -> bool:
    """Only tensors with more than one dimension are tested for scale invariance (official code)."""
    return p.dim() > 1


def _fusable(*tensors: torch.Tensor) -> bool:
    """:meth:`ZooOptimizer._fusable`, and no size-1 dimension in the ``(C, D)`` view of a tested tensor
    (torch.compile specializes sizes 0 and 1, which would cost graphs of their own)."""
    t = tensors[0]
    if not ZooOptimizer._fusable(*tensors):
        return False
    return not _projects(t) or (t.size(0) > 1 and t.numel() // t.size(0) > 1)


# --------------------------------------------------------------------------------------------
# AdamP kernels. A projected tensor takes two passes: pass 1 computes the new moments and the update
# without writing anything, only the projection's row statistics; pass 2 recomputes them and writes
# the moments and the weight. Compiled, each pass is one parallel loop nest and nothing of the
# tensor's size is allocated: 4 + 7 words per element.
# --------------------------------------------------------------------------------------------


class AdamPScalars(NamedTuple):
    """AdamP's per-tensor hyperparameters as 0-d float32 tensors (the kernels' calling convention)."""

    beta1: torch.Tensor
    one_minus_beta1: torch.Tensor
    beta2: torch.Tensor
    one_minus_beta2: torch.Tensor
    bc2_sqrt: torch.Tensor  # sqrt(1 - beta2^t)
    step_size: torch.Tensor  # lr / (1 - beta1^t)
    eps: torch.Tensor
    lr_wd: torch.Tensor  # lr * weight_decay
    wd_ratio: torch.Tensor
    threshold_channel: torch.Tensor
    threshold_layer: torch.Tensor


def _row_local(tensors: list[torch.Tensor]) -> bool:
    """Whether ``tensors`` (a parameter, its gradient and state) are ``DTensor`` s sharded alike and only
    along rows (FSDP2's ``Shard(0)``, HSDP's ``(Replicate(), Shard(0))``): then each rank holds whole rows,
    the foreach path runs on the local shards (no DTensor dispatch per op) and only the projection's
    row statistics are reduced across ranks (:func:`_foreach_projections`)."""
    return sharded_alike(tensors) and all(pl.is_replicate() or (pl.is_shard() and pl.dim == 0)
                                          for pl in tensors[0].placements)


def _local_lists(lists: list[list[torch.Tensor]]) -> tuple[list[list[torch.Tensor]], list[torch.Tensor | None]]:
    """Parallel lists of parameters, gradients and state as their local shards when every index is
    :func:`_row_local` (a foreach op takes plain tensors or ``DTensor`` s, not both), and per index the
    ``DTensor`` parameter they are shards of; else the lists as they are and Nones."""
    n = len(lists[0])
    if not all(_row_local([lst[i] for lst in lists]) for i in range(n)):
        return lists, [None] * n
    return [[t.to_local() for t in lst] for lst in lists], list(lists[0])


def _foreach_projections(items: list[tuple], eps: torch.Tensor, delta: float,
                         likes: list[torch.Tensor | None]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(scale, project)`` of each tested tensor of a foreach path: ``items`` are ``(p, g, numer, denom)``
    for the update ``numer / denom`` (``denom`` None: ``numer``), the statistics over row blocks. With
    ``likes`` (:func:`_local_lists`) the tensors are local shards of whole rows: the whole-tensor reductions
    of all the tensors are all-reduced together, one all-reduce per kind (:func:`reduce_shards_many`)
    instead of five per tensor."""
    stats, maxes, sums = [], [], []
    for p, g, numer, denom in items:
        views = [_matrix_view(t) for t in (p, g, numer, denom) if t is not None]
        fn = projection_stats if denom is None else lambda w, gr, n, d: projection_stats(w, gr, n / d)
        st = blocked_projection_stats(fn, *views)
        cos = channel_cosines(st, eps)
        stats.append(st)
        maxes.append(cos.amax() if cos.numel() else torch.full((), -torch.inf, dtype=cos.dtype, device=cos.device))
        sums.append(tuple(rows.sum() for rows in st))
    if any(like is not None for like in likes):  # (plain tensors: the local sums are the totals)
        maxes = reduce_shards_many(maxes, likes, dist.ReduceOp.MAX)
        sums = [tuple(s.unbind()) for s in reduce_shards_many([torch.stack(s) for s in sums], likes,
                                                              dist.ReduceOp.SUM)]
    out = []
    for (p, *_), like, st, mx, sm in zip(items, likes, stats, maxes, sums):
        th_c, th_l = ZooOptimizer._scalars(p.device, *_thresholds(p if like is None else like, delta))
        out.append(projection_from_totals(st, mx, sm, eps, th_c, th_l))
    return out


def _adam_moments(grad, exp_avg, exp_avg_sq, hp: AdamPScalars) -> tuple[torch.Tensor, torch.Tensor]:
    """The new moments ``beta1 m + (1 - beta1) g`` and ``beta2 v + (1 - beta2) g^2`` (not written)."""
    return exp_avg * hp.beta1 + grad * hp.one_minus_beta1, exp_avg_sq * hp.beta2 + grad * grad * hp.one_minus_beta2


def _adam_direction(grad, exp_avg, exp_avg_sq, hp: AdamPScalars, nesterov: bool) -> torch.Tensor:
    """``m / (sqrt(v) / sqrt(1 - beta2^t) + eps)``, Nesterov: ``(beta1 m + (1 - beta1) g) / (...)``."""
    denom = exp_avg_sq.sqrt() / hp.bc2_sqrt + hp.eps
    if nesterov:
        return (exp_avg * hp.beta1 + grad * hp.one_minus_beta1) / denom
    return exp_avg / denom


def _adam_apply_(param, grad, exp_avg, exp_avg_sq, scale, project, hp: AdamPScalars, nesterov: bool = False):
    """The weight in place from the moments ``exp_avg``, ``exp_avg_sq`` (already updated):
    ``W <- W (1 - lr wd r) - step_size u``, with ``u`` projected by ``scale`` (and ``r`` from ``project``)
    when it is not None, else ``r = 1``."""
    update = _adam_direction(grad, exp_avg, exp_avg_sq, hp, nesterov)
    decay = 1 - hp.lr_wd
    if scale is not None:
        update = apply_projection_(update, param, scale)
        decay = 1 - hp.lr_wd * _decay_factor(project, hp.wd_ratio)
    param.mul_(decay).sub_(update * hp.step_size)


def _adam_step_(param, grad, exp_avg, exp_avg_sq, hp: AdamPScalars, nesterov: bool, scale=None, project=None):
    """Moments and weight in place (:func:`_adam_apply_` of the new moments)."""
    m, v = _adam_moments(grad, exp_avg, exp_avg_sq, hp)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    _adam_apply_(param, grad, m, v, scale, project, hp, nesterov)


def _adam_moments_(grad, exp_avg, exp_avg_sq, hp: AdamPScalars) -> None:
    """:func:`_adam_moments` written in place, in the same order of operations (the same numbers), with
    one temporary the size of ``grad`` at a time (the eager path)."""
    exp_avg.mul_(hp.beta1).add_(grad * hp.one_minus_beta1)
    exp_avg_sq.mul_(hp.beta2).add_(torch.mul(grad, grad).mul_(hp.one_minus_beta2))


def _adamp_stats(param, grad, exp_avg, exp_avg_sq, hp: AdamPScalars, nesterov: bool = False):
    """:func:`projection_stats` of the update of the new moments (``(C, D)`` views), read only."""
    update = _adam_direction(grad, *_adam_moments(grad, exp_avg, exp_avg_sq, hp), hp, nesterov)
    return projection_stats(param, grad, update)


def _adamp_pass1(param, grad, exp_avg, exp_avg_sq, hp: AdamPScalars, nesterov: bool = False):
    """Pass 1 of a projected tensor (``(C, D)`` views), read only: returns ``(scale, project)``."""
    return _scale_of(_adamp_stats(param, grad, exp_avg, exp_avg_sq, hp, nesterov), hp)


def _adamp_pass2(param, grad, exp_avg, exp_avg_sq, scale, project, hp: AdamPScalars, nesterov: bool = False):
    """Pass 2: the projected step, in place."""
    _adam_step_(param, grad, exp_avg, exp_avg_sq, hp, nesterov, scale, project)


def _adam_vector(param, grad, exp_avg, exp_avg_sq, hp: AdamPScalars, nesterov: bool = False):
    """A tensor that is not tested (1-D): Adam with decoupled weight decay, one pass."""
    _adam_step_(param, grad, exp_avg, exp_avg_sq, hp, nesterov)


def _adamp_stats_(param, grad, exp_avg, exp_avg_sq, hp: AdamPScalars, nesterov: bool = False):
    """Eager pass 1 (``(C, D)`` row blocks): the moments written in place, then :func:`projection_stats` of
    their update. Eager, each elementary op is a pass over memory, so the moments are computed once and
    stored, and pass 2 (:func:`_adam_apply_`) reads them; compiled, a pass is one loop nest and recomputing
    them in pass 2 (:func:`_adamp_pass2`) is cheaper than writing them in pass 1."""
    _adam_moments_(grad, exp_avg, exp_avg_sq, hp)
    return projection_stats(param, grad, _adam_direction(grad, exp_avg, exp_avg_sq, hp, nesterov))


_ADAMP_KERNELS = {"pass1": _adamp_pass1, "pass2": _adamp_pass2, "vector": _adam_vector}
_ADAMP = _eager_runners({"vector": _adam_vector, "pass2": _adam_apply_}, _adamp_stats_)
_FUSED_ADAMP = {name: fused_kernel(fn) for name, fn in _ADAMP_KERNELS.items()}


def _multi_tensor_adamp(params, grads, exp_avgs, exp_avg_sqs, bc2_sqrts, step_sizes, *, beta1, beta2, eps,
                        lr_wd, wd_ratio, delta, nesterov):
    """AdamP with ``torch._foreach_*`` ops, without materializing the update: tensors that are not
    projected get ``W <- W - step_size m / denom`` in one ``addcdiv``; projected ones are updated
    over row blocks, in the official order (``u - w scale`` first, then ``W (1 - lr wd r) - step u``)."""
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs], with_indices=True)
    for (device, _), (tensors, idx) in grouped.items():
        (ps, gs, ms, vs), likes = _local_lists(tensors)
        device = ps[0].device if device is None else device  # (None, None) under torch.compile
        steps = [step_sizes[i] for i in idx]
        foreach_adam_moments_(ms, vs, gs, beta1, beta2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, [bc2_sqrts[i] for i in idx])
        torch._foreach_add_(denom, eps)
        if nesterov:
            numer = list(torch._foreach_mul(ms, beta1))
            torch._foreach_add_(numer, gs, alpha=1 - beta1)
        else:
            numer = ms
        eps_t, ratio_t = ZooOptimizer._scalars(device, eps, wd_ratio)
        tested = [k for k, p in enumerate(ps) if _projects(p)]
        projections = dict(zip(tested, _foreach_projections([(ps[k], gs[k], numer[k], denom[k]) for k in tested],
                                                            eps_t, delta, [likes[k] for k in tested])))
        rest = []  # tensors left to the foreach update
        for k, p in enumerate(ps):
            decay = 1 - lr_wd
            if k in projections:
                scale, project = projections[k]
                decay = 1 - lr_wd * _decay_factor(project, ratio_t)
                if not _skips(project):
                    w, nv, dv = (_matrix_view(t) for t in (p, numer[k], denom[k]))
                    for rows in row_blocks(w):
                        update = apply_projection_(nv[rows] / dv[rows], w[rows], scale[rows])
                        w[rows].mul_(decay).add_(update, alpha=-steps[k])
                    continue
            if lr_wd:
                p.mul_(decay)
            rest.append(k)
        if rest:
            torch._foreach_addcdiv_([ps[k] for k in rest], [numer[k] for k in rest], [denom[k] for k in rest],
                                    [-steps[k] for k in rest])


# --------------------------------------------------------------------------------------------
# SGDP kernels, in the same two passes (3 + 5 words per element of a projected tensor)
# --------------------------------------------------------------------------------------------


class SGDPScalars(NamedTuple):
    """SGDP's per-tensor hyperparameters as 0-d float32 tensors."""

    momentum: torch.Tensor
    one_minus_dampening: torch.Tensor
    lr: torch.Tensor
    wd_scaled: torch.Tensor  # lr * weight_decay / (1 - momentum)
    wd_ratio: torch.Tensor
    eps: torch.Tensor
    threshold_channel: torch.Tensor
    threshold_layer: torch.Tensor


def _sgdp_momentum(grad, buf, hp: SGDPScalars) -> torch.Tensor:
    """The new buffer ``mu b + (1 - tau) g`` (not written)."""
    return buf * hp.momentum + grad * hp.one_minus_dampening


def _sgdp_direction(grad, buf, hp: SGDPScalars, nesterov: bool) -> torch.Tensor:
    """``g + mu b`` (Nesterov) or the buffer itself: then projecting it in place projects the buffer,
    which is stored, as in the official code."""
    return grad + buf * hp.momentum if nesterov else buf


def _sgd_step_(param, grad, buf, hp: SGDPScalars, nesterov: bool, scale=None, project=None):
    """Buffer and weight in place: ``W <- W (1 - wd_scaled r) - lr u``, ``u`` projected by ``scale``
    (and ``r`` from ``project``) when given, else ``r = 1``."""
    b = _sgdp_momentum(grad, buf, hp)
    update = _sgdp_direction(grad, b, hp, nesterov)
    decay = 1 - hp.wd_scaled
    if scale is not None:
        update = apply_projection_(update, param, scale)
        decay = 1 - hp.wd_scaled * _decay_factor(project, hp.wd_ratio)
    buf.copy_(b)
    param.mul_(decay).sub_(update * hp.lr)


def _sgdp_stats(param, grad, buf, hp: SGDPScalars, nesterov: bool = False):
    """:func:`projection_stats` of the update of the new buffer (``(C, D)`` views), read only."""
    update = _sgdp_direction(grad, _sgdp_momentum(grad, buf, hp), hp, nesterov)
    return projection_stats(param, grad, update)


def _sgdp_pass1(param, grad, buf, hp: SGDPScalars, nesterov: bool = False):
    """Pass 1 of a projected tensor, read only: returns ``(scale, project)``."""
    return _scale_of(_sgdp_stats(param, grad, buf, hp, nesterov), hp)


def _sgdp_pass2(param, grad, buf, scale, project, hp: SGDPScalars, nesterov: bool = False):
    """Pass 2: the projected step, in place."""
    _sgd_step_(param, grad, buf, hp, nesterov, scale, project)


def _sgd_vector(param, grad, buf, hp: SGDPScalars, nesterov: bool = False):
    """A tensor that is not tested (1-D): SGD with momentum and SGDP's weight decay, one pass."""
    _sgd_step_(param, grad, buf, hp, nesterov)


_SGDP_KERNELS = {"pass1": _sgdp_pass1, "pass2": _sgdp_pass2, "vector": _sgd_vector}
_SGDP = _eager_runners(_SGDP_KERNELS, _sgdp_stats)
_FUSED_SGDP = {name: fused_kernel(fn) for name, fn in _SGDP_KERNELS.items()}


def _multi_tensor_sgdp(params, grads, bufs, *, lr, momentum, dampening, wd_scaled, wd_ratio, eps, delta,
                       nesterov):
    """SGDP with ``torch._foreach_*`` ops; the projection's statistics per tensor over row blocks."""
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, bufs])
    for (device, _), (tensors, _) in grouped.items():
        (ps, gs, bs), likes = _local_lists(tensors)
        device = ps[0].device if device is None else device  # (None, None) under torch.compile
        torch._foreach_mul_(bs, momentum)
        torch._foreach_add_(bs, gs, alpha=1 - dampening)
        updates = list(torch._foreach_add(gs, bs, alpha=momentum)) if nesterov else bs
        eps_t, ratio_t = ZooOptimizer._scalars(device, eps, wd_ratio)
        tested = [k for k, p in enumerate(ps) if _projects(p)]
        projections = dict(zip(tested, _foreach_projections([(ps[k], gs[k], updates[k], None) for k in tested],
                                                            eps_t, delta, [likes[k] for k in tested])))
        for k, p in enumerate(ps):
            decay = 1 - wd_scaled
            if k in projections:
                scale, project = projections[k]
                if not _skips(project):
                    apply_projection_(_matrix_view(updates[k]), _matrix_view(p), scale)
                decay = 1 - wd_scaled * _decay_factor(project, ratio_t)
            if wd_scaled:
                p.mul_(decay)
        torch._foreach_add_(ps, updates, alpha=-lr)


# --------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------


class _ProjectionOptimizer(ZooOptimizer):
    """What AdamP and SGDP share: validation of the projection's hyperparameters and path choice."""

    def __init__(self, params, defaults: dict):
        check_lr(defaults["lr"])
        check_range("eps", defaults["eps"], 0.0, low_open=True)
        check_range("weight_decay", defaults["weight_decay"], 0.0)
        check_range("delta", defaults["delta"], 0.0)
        check_range("wd_ratio", defaults["wd_ratio"], 0.0, 1.0)
        check_paths(defaults["foreach"], defaults["fused"])
        super().__init__(params, defaults)

    @staticmethod
    def _step_tensors(kernels: dict, items: list[tuple[tuple[torch.Tensor, ...], tuple]], nesterov: bool) -> None:
        """Step ``(tensors, hyperparameters)`` items with ``kernels`` (eager or compiled runners): the
        one-pass ``vector`` kernel for 1-D tensors, else the ``(C, D)`` views through ``pass1``
        (statistics) and ``pass2`` (update)."""
        vectors, matrices = [], []
        for tensors, hp in items:
            if _projects(tensors[0]):
                matrices.append((tuple(_matrix_view(t) for t in tensors), hp))
            else:
                vectors.append((*(t.view(-1) for t in tensors), hp))
        kernels["vector"](vectors, nesterov=nesterov)
        stats = kernels["pass1"]([(*views, hp) for views, hp in matrices], nesterov=nesterov)
        kernels["pass2"]([(*views, scale, project, hp) for (views, hp), (scale, project) in zip(matrices, stats)],
                         nesterov=nesterov)

    def _run_paths(self, path: str, fused_kernels: dict, eager_kernels: dict, items: list, nesterov: bool) -> None:
        """Items whose tensors the compiled kernels take go to ``fused_kernels`` (on the fused path), the
        others to ``eager_kernels`` (with a contiguous gradient, for the views)."""
        fused, eager = [], []
        for (p, g, *state), hp in items:
            if path == "fused" and _fusable(p, g, *state):
                fused.append(((p, g, *state), hp))
            else:
                eager.append(((p, g.contiguous(), *state), hp))
        self._step_tensors(fused_kernels, fused, nesterov)
        self._step_tensors(eager_kernels, eager, nesterov)


class AdamP(_ProjectionOptimizer):
    r"""AdamP: Adam whose update is projected off scale-invariant weights (arXiv 2006.08217).

    For each parameter ``W`` with gradient ``g`` (clovaai/AdamP ``adamp.py``, commit 7f6f0383ff6a):

    .. math::
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        u &= \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}
            \quad \Big(\text{Nesterov: } u = \frac{\beta_1 m + (1-\beta_1) g}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}\Big) \\
        u, r &= \Pi(W, g, u) \quad (\text{see } \texttt{projection\_scale};
            r = \texttt{wd\_ratio} \text{ if projected, else } 1) \\
        W &\leftarrow W (1 - \eta \lambda r) - \frac{\eta}{1-\beta_1^t} u

    The projection removes from each row of ``u`` (or from the whole tensor) its component along the
    weight when the gradient is nearly orthogonal to the weight (cosine below ``delta / sqrt(dim)``),
    the signature of a scale-invariant weight (one followed by a normalization): there, the radial
    part of the update only grows the norm and shrinks the effective step. Only tensors with 2 or more
    dimensions are tested; 1-D ones (biases, gains) get plain Adam.

    Args:
        params: parameters or groups (``optimzoo.create_optimizer(model, "adamp")`` makes
            decay/no-decay groups).
        lr: learning rate ``eta`` (default 1e-3).
        betas: ``(beta1, beta2)`` of the moment EMAs, each in [0, 1) (default (0.9, 0.999)).
        eps: added to the bias-corrected ``sqrt(v)`` and to the norms of the projection (default 1e-8).
        weight_decay: decoupled weight decay ``lambda``, ``W <- W (1 - lr wd ratio)`` (default 0; the
            README's example uses 1e-2).
        delta: threshold of the cosine test, ``cos < delta / sqrt(dim)`` (default 0.1).
        wd_ratio: weight-decay multiplier for projected tensors, in [0, 1] (default 0.1).
        nesterov: use the Nesterov form of the update (default False).
        foreach: use ``torch._foreach_*`` for the element-wise parts (default None: yes for plain tensors).
        fused: use ``torch.compile``-generated kernels per tensor (two passes over memory for a tested
            tensor, one for a 1-D one; compiled on the first step, seconds). Default None = off.

    State: ``step`` (0-d tensor), ``exp_avg``, ``exp_avg_sq``: 8 bytes per fp32 parameter.

    Differences from the official code, deliberate: the cosine is ``|x.y| / (||x|| + eps) / (||y|| + eps)``
    (torch-optimizer's form; the official code calls ``F.cosine_similarity``, whose eps handling changed
    across PyTorch versions: the two agree except for near-zero rows); the projection subtracts
    ``w (w.u) / (||w|| + eps)^2``, the official ``w^ (w^.u)`` with the two divisions merged; no host
    synchronization (both tests are evaluated on the device and selected with ``torch.where``; only
    the CPU ``foreach`` path reads the flag, to skip the projection's pass where it does nothing);
    ``p.grad`` is read only.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, delta: float = 0.1, wd_ratio: float = 0.1, nesterov: bool = False,
                 *, foreach: bool | None = None, fused: bool | None = None):
        check_betas(betas)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, delta=delta,
                        wd_ratio=wd_ratio, nesterov=bool(nesterov), foreach=foreach, fused=fused)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = self._closure_loss(closure)
        for group in self.param_groups:
            pairs = self._grads(group)
            if not pairs:
                continue
            beta1, beta2 = group["betas"]
            lr, eps = float(group["lr"]), group["eps"]
            lr_wd = lr * group["weight_decay"]
            params, grads, ms, vs, bc2_sqrts, step_sizes = [], [], [], [], [], []
            for p, g in pairs:
                state = self.state[p]
                m, v = self._zeros_state(state, p, "exp_avg", "exp_avg_sq")
                t = float(self._step_counter(state).add_(1))
                params.append(p)
                grads.append(g)
                ms.append(m)
                vs.append(v)
                bc2_sqrts.append(math.sqrt(1 - beta2**t))
                step_sizes.append(lr / (1 - beta1**t))
            path = self._path(group, params)
            if path == "foreach":
                _multi_tensor_adamp(params, grads, ms, vs, bc2_sqrts, step_sizes, beta1=beta1, beta2=beta2, eps=eps,
                                    lr_wd=lr_wd, wd_ratio=group["wd_ratio"], delta=group["delta"],
                                    nesterov=group["nesterov"])
                continue
            items = []
            for p, g, m, v, bc2, ss in zip(params, grads, ms, vs, bc2_sqrts, step_sizes):
                thresholds = _thresholds(p, group["delta"]) if _projects(p) else (0.0, 0.0)
                hp = AdamPScalars(*self._scalars(p.device, beta1, 1 - beta1, beta2, 1 - beta2, bc2, ss, eps, lr_wd,
                                                 group["wd_ratio"], *thresholds))
                items.append(((p, g, m, v), hp))
            self._run_paths(path, _FUSED_ADAMP, _ADAMP, items, group["nesterov"])
        return loss


class SGDP(_ProjectionOptimizer):
    r"""SGDP: SGD with momentum whose update is projected off scale-invariant weights (arXiv 2006.08217).

    For each parameter ``W`` with gradient ``g`` (clovaai/AdamP ``sgdp.py``, commit 7f6f0383ff6a):

    .. math::
        b &\leftarrow \mu b + (1 - \tau) g \\
        u &= g + \mu b \ (\text{Nesterov}) \quad\text{or}\quad u = b \\
        u, r &= \Pi(W, g, u) \quad (\text{as AdamP}) \\
        W &\leftarrow W \Big(1 - \frac{\eta \lambda r}{1 - \mu}\Big) - \eta u

    Note the weight decay's ``1/(1 - momentum)`` (official code), and that without Nesterov the update
    *is* the momentum buffer: as in the official code its projection is stored back into the buffer.

    Args:
        params: parameters or groups.
        lr: learning rate ``eta`` (default 1e-3; the official code requires it, the README's example
            uses 0.1 with ``momentum=0.9, nesterov=True, weight_decay=1e-5``).
        momentum: ``mu``, in [0, 1) (default 0; the weight decay divides by ``1 - mu``).
        dampening: ``tau``, in [0, 1] (default 0).
        weight_decay: ``lambda``, decoupled as above (default 0).
        nesterov: Nesterov momentum; needs ``momentum > 0`` and ``dampening = 0`` (default False).
        eps, delta, wd_ratio: as :class:`AdamP` (defaults 1e-8, 0.1, 0.1).
        foreach, fused: as :class:`AdamP`.

    State: ``momentum_buffer`` (allocated even with ``momentum=0``, as the official code): 4 bytes per
    fp32 parameter. ``p.grad`` is read only.
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, eps: float = 1e-8, delta: float = 0.1,
                 wd_ratio: float = 0.1, *, foreach: bool | None = None, fused: bool | None = None):
        check_range("momentum", momentum, 0.0, 1.0, high_open=True)
        check_range("dampening", dampening, 0.0, 1.0)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Invalid nesterov: Nesterov momentum requires momentum > 0 and dampening = 0")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=bool(nesterov), eps=eps, delta=delta, wd_ratio=wd_ratio, foreach=foreach,
                        fused=fused)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = self._closure_loss(closure)
        for group in self.param_groups:
            pairs = self._grads(group)
            if not pairs:
                continue
            lr, momentum, eps = float(group["lr"]), group["momentum"], group["eps"]
            wd_scaled = lr * group["weight_decay"] / (1 - momentum)
            params, grads, bufs = [], [], []
            for p, g in pairs:
                params.append(p)
                grads.append(g)
                bufs.extend(self._zeros_state(self.state[p], p, "momentum_buffer"))
            path = self._path(group, params)
            if path == "foreach":
                _multi_tensor_sgdp(params, grads, bufs, lr=lr, momentum=momentum, dampening=group["dampening"],
                                   wd_scaled=wd_scaled, wd_ratio=group["wd_ratio"], eps=eps, delta=group["delta"],
                                   nesterov=group["nesterov"])
                continue
            items = []
            for p, g, b in zip(params, grads, bufs):
                thresholds = _thresholds(p, group["delta"]) if _projects(p) else (0.0, 0.0)
                hp = SGDPScalars(*self._scalars(p.device, momentum, 1 - group["dampening"], lr, wd_scaled,
                                                group["wd_ratio"], eps, *thresholds))
                items.append(((p, g, b), hp))
            self._run_paths(path, _FUSED_SGDP, _SGDP, items, group["nesterov"])
        return loss
