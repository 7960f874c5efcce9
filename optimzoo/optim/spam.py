"""SPAM and Stable-SPAM: Adam variants that survive gradient spikes.

* SPAM: Huang, Zhu, Jin, Liu, Wang, Liu, "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
  Training", ICLR 2025, arXiv 2501.06842. Official code: TianjinYellow/SPAM-Optimizer
  ``galore_torch/SPAM.py`` (class ``AdamW``, exported as ``SPAM``) at commit e8185fbe695f.
* Stable-SPAM: Huang, Zhu, Jin, Wang, Liu, "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit
  Adam", arXiv 2502.17055. Official code: TianjinYellow/StableSPAM ``galore_torch/stablespam.py`` at
  commit 6a66da1ea700.

There is no faithful peer package (pytorch-optimizer's versions clip a copy of the gradient); the tests
compare against transliterations of the official code. Layout (CONTRIBUTING.md): ``_single_tensor_*``
(0-d tensor hyperparameters, no data-dependent Python control flow) is, compiled, the fused path and,
run over cache-sized pieces, the eager single-tensor path (Stable-SPAM's: :func:`_piecewise_stable_spam`,
also its foreach path: each tensor's update waits on two reductions of its own gradient, so there is
nothing for ``torch._foreach_*`` to batch); ``_multi_tensor_spam`` uses ``torch._foreach_*``.
Decisions that depend only on the step count (resets, clipping gates) are taken on the host and passed
to the kernels as static flags.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from ..ops.kappa import tensor_abs_max, tensor_l2_norm, tensor_sum
from ..ops.reduce import local_tensor, reduce_shards_many
from ._base import (
    ZooOptimizer,
    check_betas,
    check_int,
    check_lr,
    check_paths,
    check_range,
    chunk_views,
    foreach_adam_moments_,
    foreach_chunks,
    fused_kernel,
    piecewise,
)

__all__ = ["SPAM", "StableSPAM"]


def count_true(mask: torch.Tensor) -> torch.Tensor:
    """Number of true entries in the whole tensor (a 0-d float32 tensor, for the clip counters)."""
    return tensor_sum(mask, torch.float32)


# --------------------------------------------------------------------------------------------
# SPAM
# --------------------------------------------------------------------------------------------


def spam_warmup_scale(current_step: int, warmup_steps: int) -> float:
    """SPAM's update scale after a momentum reset: ``1 - CosineDecay(0.99, warmup_steps)(s)``.

    ``CosineDecay(d, T)(s) = 0`` for ``s >= T``, else ``d (1 + cos(pi s / (T + 1))) / 2`` (the closed form of
    ``CosineAnnealingLR(T_max=T+1)`` that the official code steps): 0.01 at the reset step, back to 1
    after ``warmup_steps`` steps.
    """
    if current_step >= warmup_steps:
        return 1.0
    return 1.0 - 0.99 * (1 + math.cos(math.pi * current_step / (warmup_steps + 1))) / 2


def _single_tensor_spam(param, grad, exp_avg, exp_avg_sq, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                        step_size, neg_lr_wd, threshold, reset: bool = False, clip: bool = False):
    """One SPAM step of one tensor; returns the number of clipped entries (0-d float32)."""
    if reset:
        exp_avg.zero_()
        exp_avg_sq.zero_()
    if clip:
        limit = exp_avg_sq * threshold
        mask = grad * grad > limit
        grad = torch.where(mask, grad.sign() * limit.sqrt(), grad)
        clipped = count_true(mask)
    else:
        clipped = torch.zeros((), dtype=torch.float32, device=param.device)
    exp_avg.mul_(beta1).add_(grad * one_minus_beta1)
    exp_avg_sq.mul_(beta2).add_(grad * grad * one_minus_beta2)
    param.sub_(exp_avg / (exp_avg_sq.sqrt() + eps) * step_size)
    param.add_(param * neg_lr_wd)  # the official form of W <- W (1 - lr wd), same rounding
    return clipped


_fused_spam = fused_kernel(_single_tensor_spam, eager=piecewise(_single_tensor_spam))


def _multi_tensor_spam(params, grads, exp_avgs, exp_avg_sqs, step_sizes, *, beta1, beta2, eps, neg_lr_wd, threshold,
                       reset, clip) -> list[torch.Tensor]:
    """SPAM with ``torch._foreach_*`` ops, tensors grouped by device and dtype and run in cache-sized chunks
    (:func:`~optimzoo.optim._base.foreach_chunks`: the update is element-wise, the clip counts add up over
    pieces); the spike clipping per piece. Returns the clip count of each tensor (of the whole tensor on
    ``DTensor`` s: the local counts are all-reduced, one all-reduce per group of tensors sharded alike)."""
    counts: list[torch.Tensor | None] = [None] * len(params)
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs],
                                                           with_indices=True)
    for tensors, idx in grouped.values():
        for (ps, gs, ms, vs), sources in foreach_chunks(tensors):
            if reset:
                torch._foreach_zero_(ms)
                torch._foreach_zero_(vs)
            if clip:
                limits = torch._foreach_mul(vs, threshold)
                masks = [g * g > lim for g, lim in zip(gs, limits)]
                gs = [torch.where(m, g.sign() * lim.sqrt(), g) for m, g, lim in zip(masks, gs, limits)]
                for j, mask in zip(sources, masks):
                    k = idx[j]
                    counts[k] = count_true(mask) if counts[k] is None else counts[k] + count_true(mask)
            foreach_adam_moments_(ms, vs, gs, beta1, beta2)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_add_(denom, eps)
            update = torch._foreach_div(ms, denom)
            torch._foreach_mul_(update, [step_sizes[idx[j]] for j in sources])
            torch._foreach_sub_(ps, update)
            if neg_lr_wd != 0.0:
                torch._foreach_add_(ps, torch._foreach_mul(ps, neg_lr_wd))
    if not clip:
        return []
    return reduce_shards_many(counts, grads, dist.ReduceOp.SUM)


# --------------------------------------------------------------------------------------------
# Stable-SPAM
# --------------------------------------------------------------------------------------------


def _adaclip(grad, gmax, threshold):
    """AdaClip's mask and clipped gradient: entries above ``threshold`` scaled by ``threshold / gmax``."""
    mask = grad.abs() > threshold
    return mask, torch.where(mask, grad / gmax * threshold, grad)


def _adagn_scale(norm, m_norm, v_norm, gamma1, one_minus_gamma1, bc_gamma1, gamma2, one_minus_gamma2, bc_gamma2,
                 eps):
    """AdaGN: update the norm statistics in place; the target norm ``c = m^_norm / (sqrt(v^_norm) + eps)``."""
    m_norm.copy_(m_norm * gamma1 + norm * one_minus_gamma1)
    v_norm.copy_(v_norm * gamma2 + norm * norm * one_minus_gamma2)
    return (m_norm / bc_gamma1) / ((v_norm / bc_gamma2).sqrt() + eps)


def _adam_update_(param, g, exp_avg, exp_avg_sq, beta1, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps,
                  step_size, zero_before: bool, zero_after: bool) -> None:
    """Stable-SPAM's Adam step in place (moments zeroed before or after it on a reset step)."""
    if zero_before:
        exp_avg.zero_()
        exp_avg_sq.zero_()
    exp_avg.mul_(beta1).add_(g * one_minus_beta1)
    exp_avg_sq.mul_(beta2).add_(g * g * one_minus_beta2)
    param.sub_(exp_avg / (exp_avg_sq.sqrt() / bc2_sqrt + eps) * step_size)
    if zero_after:
        exp_avg.zero_()
        exp_avg_sq.zero_()


def _single_tensor_stable_spam(param, grad, exp_avg, exp_avg_sq, m_norm, v_norm, m_max, decay, theta,
                               one_minus_theta, bc_theta, gamma1, one_minus_gamma1, bc_gamma1, gamma2,
                               one_minus_gamma2, bc_gamma2, eps, beta1, one_minus_beta1, beta2, one_minus_beta2,
                               bc2_sqrt, step_size, zero_before: bool = False, zero_after: bool = False):
    """One Stable-SPAM step of one tensor (AdaClip, AdaGN, Adam); returns (clipped count, AdaGN scale).

    ``m_norm``, ``v_norm``, ``m_max`` are the tensor's 0-d float32 statistics, updated in place.
    ``zero_before`` zeroes the moments before the Adam step (clean reset); ``zero_after`` after it
    (the official reset: this step's update still uses the old moments).
    """
    param.mul_(decay)
    # AdaClip: spiked entries scaled by m^_max / max|g| (the largest lands on the threshold)
    gmax = tensor_abs_max(grad).float()
    m_max.copy_(m_max * theta + gmax * one_minus_theta)
    threshold = m_max / bc_theta
    mask, clipped_grad = _adaclip(grad, gmax, threshold)
    # AdaGN: the gradient rescaled to norm c = m^_norm / (sqrt(v^_norm) + eps)
    norm = tensor_l2_norm(clipped_grad.float())
    c = _adagn_scale(norm, m_norm, v_norm, gamma1, one_minus_gamma1, bc_gamma1, gamma2, one_minus_gamma2,
                     bc_gamma2, eps)
    g = torch.where(norm > 0, clipped_grad / norm * c, clipped_grad)
    _adam_update_(param, g, exp_avg, exp_avg_sq, beta1, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps,
                  step_size, zero_before, zero_after)
    return count_true(mask), c


def _piecewise_stable_spam(items, zero_before: bool = False, zero_after: bool = False) -> list[tuple]:
    """:func:`_single_tensor_stable_spam` for a list of ``(tensors, scalars)`` items, the eager path: three
    passes over cache-sized pieces (:func:`chunk_views`) of each tensor: ``max |g|``; the clipped
    gradient's norm and clip count; the update, with the clipped gradient recomputed piece by piece
    rather than kept. Temporaries are piece-sized, not tensor-sized. The same arithmetic element by
    element; the norm is summed piece by piece (float32 rounding of the order only). On ``DTensor`` s
    the pieces are of the local shards and the reductions are all-reduced over the shards, one
    all-reduce per reduction for all the items sharded alike (:func:`reduce_shards_many`).
    Returns ``(clipped count, AdaGN scale)`` per item."""
    pieces = [chunk_views([local_tensor(t) for t in tensors]) for tensors, _ in items]
    grads = [tensors[1] for tensors, _ in items]
    device = items[0][1][0].device
    zero = torch.zeros((), dtype=torch.float32, device=device)
    local_max = [torch.stack([torch.linalg.vector_norm(g, math.inf).float() if g.numel() else zero
                              for _, g, _, _ in ps]).amax() for ps in pieces]  # |g| >= 0: an empty shard adds 0
    gmaxes = reduce_shards_many(local_max, grads, dist.ReduceOp.MAX)
    thresholds, sums = [], []
    for (_, scalars), ps, gmax in zip(items, pieces, gmaxes):
        m_max, theta, one_minus_theta, bc_theta = scalars[2], *scalars[4:7]
        m_max.copy_(m_max * theta + gmax * one_minus_theta)
        threshold = m_max / bc_theta
        sumsq, clipped = zero.clone(), zero.clone()
        for _, g, _, _ in ps:
            mask, c = _adaclip(g, gmax, threshold)
            c = c.float()
            sumsq += (c * c).sum()
            clipped += mask.sum(dtype=torch.float32)
        thresholds.append(threshold)
        sums.append(torch.stack([sumsq, clipped]))
    sums = reduce_shards_many(sums, grads, dist.ReduceOp.SUM)
    out = []
    for (_, scalars), ps, gmax, threshold, (sumsq, clipped) in zip(items, pieces, gmaxes, thresholds, sums):
        (m_norm, v_norm, _, decay, _, _, _, gamma1, one_minus_gamma1, bc_gamma1, gamma2, one_minus_gamma2,
         bc_gamma2, eps, beta1, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, step_size) = scalars
        norm = sumsq.sqrt()
        c = _adagn_scale(norm, m_norm, v_norm, gamma1, one_minus_gamma1, bc_gamma1, gamma2, one_minus_gamma2,
                         bc_gamma2, eps)
        for p, g, m, v in ps:
            _, g = _adaclip(g, gmax, threshold)
            g = torch.where(norm > 0, g / norm * c, g)
            p.mul_(decay)
            _adam_update_(p, g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, step_size,
                          zero_before, zero_after)
        out.append((clipped, c))
    return out


_fused_stable_spam = fused_kernel(
    _single_tensor_stable_spam,
    eager=lambda tensors, scalars, **flags: _piecewise_stable_spam([(tensors, scalars)], **flags)[0])


# --------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------


class _SpikeAware(ZooOptimizer):
    """What SPAM and Stable-SPAM share: validation, path choice and the spike counters of ``metrics()``."""

    def __init__(self, params, defaults: dict):
        check_lr(defaults["lr"])
        check_betas(defaults["betas"])
        check_range("eps", defaults["eps"], 0.0, low_open=True)
        check_range("weight_decay", defaults["weight_decay"], 0.0)
        check_paths(defaults["foreach"], defaults["fused"])
        self._reset_counters()
        super().__init__(params, defaults)

    def _reset_counters(self) -> None:
        # running totals since the last metrics(); tensor totals stay on the device (no sync in step())
        self._clipped: torch.Tensor | None = None
        self._entries = 0
        self._resets = 0
        self._scale_sum: torch.Tensor | None = None
        self._scale_count = 0

    def metrics(self) -> dict[str, float]:
        """Spike counters since the last call (then reset): ``clip_fraction`` (clipped gradient entries /
        entries seen), ``resets`` (momentum resets), and for Stable-SPAM ``adagn_scale`` (mean AdaGN norm
        ``c``, about 1 when gradient norms are steady, below 1 after spikes)."""
        out = super().metrics()
        if self._entries:
            clipped = 0.0 if self._clipped is None else float(self._clipped)
            out["clip_fraction"] = clipped / self._entries
        out["resets"] = float(self._resets)
        if self._scale_count:
            out["adagn_scale"] = float(self._scale_sum) / self._scale_count
        self._reset_counters()
        return out

    @staticmethod
    def _accumulate(total: torch.Tensor | None, values: list[torch.Tensor]) -> torch.Tensor:
        s = torch.stack([v.to(values[0].device) for v in values]).sum()
        return s if total is None else total + s.to(total.device)

    # The counters are host-side bookkeeping, run eagerly under torch.compile (a graph break): dynamo
    # (torch 2.13) silently drops attribute writes on optimizer objects made in a compiled frame.
    @torch.compiler.disable
    def _count(self, entries: int, clipped: list[torch.Tensor] = (), scales: list[torch.Tensor] = ()) -> None:
        """Add one step's counts: ``entries`` gradient entries seen, per-tensor clip counts and AdaGN scales."""
        self._entries += entries
        if clipped:
            self._clipped = self._accumulate(self._clipped, clipped)
        if scales:
            self._scale_sum = self._accumulate(self._scale_sum, scales)
            self._scale_count += len(scales)

    @torch.compiler.disable
    def _count_reset(self, reset: bool) -> None:
        """Add one step's momentum reset (if any) to ``resets`` (eager, as :meth:`_count`)."""
        self._resets += int(reset)


class SPAM(_SpikeAware):
    r"""SPAM (arXiv 2501.06842): Adam with periodic momentum reset and spike-aware clipping.

    With ``k`` the 1-based global step, for each parameter with gradient ``g`` (official ``SPAM.py``):

    1. momentum reset: if ``k % DeltaT == 0``: ``m <- 0``, ``v <- 0`` (the per-parameter step count ``t``
       is *not* reset, so the bias corrections stay near 1 afterwards);
    2. spike-aware clipping, when ``threshold > 0``, ``k >= grad_accu_steps`` and
       ``k % DeltaT >= grad_accu_steps``: entries with ``g^2 > threshold * v`` (``v`` before this step's
       update, not bias-corrected) become ``sign(g) sqrt(threshold * v)``;
    3. ``m <- beta1 m + (1-beta1) g``, ``v <- beta2 v + (1-beta2) g^2``, ``t <- t + 1``;
    4. ``W <- W - s_k lr sqrt(1-beta2^t)/(1-beta1^t) m / (sqrt(v) + eps)`` (without the bias-correction
       factor if ``correct_bias=False``), where ``s_k`` is 1 except after a reset: 0.01 at the reset step,
       back to 1 along a cosine over ``warmup_steps`` steps (:func:`spam_warmup_scale`);
    5. decoupled weight decay after the update, unscaled by ``s_k``: ``W <- W (1 - lr wd)``.

    Args:
        params: parameters or groups (the official scripts apply SPAM to every parameter).
        lr: learning rate (default 1e-3; the authors use 8e-4 at 130M, 4e-4 at 350M).
        betas: ``(beta1, beta2)``, each in [0, 1) (default (0.9, 0.999)).
        eps: added to ``sqrt(v)`` (default 1e-6, as the official code).
        weight_decay: decoupled weight decay (default 0).
        correct_bias: apply Adam's bias corrections (default True).
        warmup_steps: length of the update-scale warm-up after each reset, integer >= 0 (default 150, as
            the README; the official training script passes its LR warm-up, 1000).
        threshold: spike threshold ``theta`` on ``g^2 / v``, >= 0; 0 disables clipping (default 5000).
        DeltaT: momentum-reset interval in steps, integer >= 0; 0 never resets (default 500).
        grad_accu_steps: steps after a reset (and at the start) before clipping starts, integer >= 0
            (default 20).
        foreach, fused: as the other zoo optimizers (fused: a ``torch.compile`` kernel per tensor).

    State: ``step`` (0-d), ``exp_avg``, ``exp_avg_sq``: 8 bytes per fp32 parameter. The global step
    counters live in each param group (``spam_total_step``, ``spam_current_step``), so ``state_dict()``
    round-trips them. ``metrics()`` reports ``clip_fraction`` and ``resets``.

    Differences from the official code, deliberate: only the dense mode (``density=1``, what all the
    released scripts use; the random-mask sparse mode is not offered); ``p.grad`` is not modified (the
    official code clips it in place); ``DeltaT=0`` means "never reset" (the official code divides by it).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True, warmup_steps: int = 150,
                 threshold: float = 5000.0, DeltaT: int = 500, grad_accu_steps: int = 20, *,  # noqa: N803
                 foreach: bool | None = None, fused: bool | None = None):
        check_int("warmup_steps", warmup_steps, 0)
        check_range("threshold", threshold, 0.0)
        check_int("DeltaT", DeltaT, 0)
        check_int("grad_accu_steps", grad_accu_steps, 0)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=bool(correct_bias),
                        warmup_steps=warmup_steps, threshold=threshold, DeltaT=DeltaT,
                        grad_accu_steps=grad_accu_steps, foreach=foreach, fused=fused)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        param_group.setdefault("spam_total_step", 0)
        param_group.setdefault("spam_current_step", param_group.get("warmup_steps", self.defaults["warmup_steps"]) + 1)
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = self._closure_loss(closure)
        reset_now = False
        for group in self.param_groups:
            k = group["spam_total_step"] + 1
            delta_t, accu = group["DeltaT"], group["grad_accu_steps"]
            reset = delta_t > 0 and k % delta_t == 0
            reset_now |= reset
            clip = group["threshold"] > 0 and k >= accu and (delta_t == 0 or k % delta_t >= accu)
            scale = spam_warmup_scale(group["spam_current_step"], group["warmup_steps"])
            pairs = self._grads(group)
            if pairs:
                self._update(group, pairs, reset, clip, scale)
            # the official end-of-step bookkeeping
            group["spam_total_step"] = k
            group["spam_current_step"] += 1
            if delta_t > 0 and (k + 1) % delta_t == 0:
                group["spam_current_step"] = 0
        self._count_reset(reset_now)
        return loss

    def _update(self, group, pairs, reset: bool, clip: bool, scale: float) -> None:
        beta1, beta2 = group["betas"]
        lr, eps = float(group["lr"]), group["eps"]
        neg_lr_wd = -lr * group["weight_decay"]
        params, grads, ms, vs, step_sizes = [], [], [], [], []
        for p, g in pairs:
            state = self.state[p]
            m, v = self._zeros_state(state, p, "exp_avg", "exp_avg_sq")
            t = float(self._step_counter(state).add_(1))
            size = lr * (math.sqrt(1 - beta2**t) / (1 - beta1**t) if group["correct_bias"] else 1.0)
            params.append(p)
            grads.append(g)
            ms.append(m)
            vs.append(v)
            step_sizes.append(size * scale)
        path = self._path(group, params)
        if path == "foreach":
            counts = _multi_tensor_spam(params, grads, ms, vs, step_sizes, beta1=beta1, beta2=beta2, eps=eps,
                                        neg_lr_wd=neg_lr_wd, threshold=group["threshold"], reset=reset, clip=clip)
        else:
            items = [((p, g, m, v), self._scalars(p.device, beta1, 1 - beta1, beta2, 1 - beta2, eps, size, neg_lr_wd,
                                                  group["threshold"]))
                     for p, g, m, v, size in zip(params, grads, ms, vs, step_sizes)]
            counts = self._run_kernel(_fused_spam, items, path == "fused", reset=reset, clip=clip)
        self._count(sum(p.numel() for p in params), counts if clip else [])


class StableSPAM(_SpikeAware):
    r"""Stable-SPAM (arXiv 2502.17055): SPAM's momentum reset with adaptive spike clipping (AdaClip) and
    adaptive gradient-norm scaling (AdaGN).

    With ``T`` the global step and ``s_T`` the scale (``eta_min + (1 - eta_min)(1 + cos(pi T/(total_T+1)))/2``
    if ``total_T`` is set, else 1), for each parameter with gradient ``g`` and step count ``t``
    (official ``stablespam.py``):

    1. ``W <- W (1 - lr wd)`` (decoupled, first);
    2. AdaClip: ``m_max <- g3 m_max + (1-g3) max|g|``; entries with ``|g| > m_max / (1 - g3^t)`` are scaled
       by ``(m_max / (1 - g3^t)) / max|g|`` (the largest lands exactly on the threshold);
    3. AdaGN: with ``n = ||g||``: ``m_n <- g1 s_T m_n + (1 - g1 s_T) n``, ``v_n <- g2 v_n + (1-g2) n^2``,
       ``c = m_n/(1-(g1 s_T)^t) / (sqrt(v_n/(1-g2^t)) + eps)``; if ``n > 0``: ``g <- g / n * c``;
    4. Adam with ``beta1' = beta1 s_T``: ``m <- beta1' m + (1-beta1') g``, ``v <- beta2 v + (1-beta2) g^2``,
       ``W <- W - lr/(1-beta1'^t) m / (sqrt(v)/sqrt(1-beta2^t) + eps)``;
    5. every ``update_proj_gap`` steps (``T % gap == 0``) the moments are reset.

    **The official reset (default, ``reset_fix=False``), reproduced exactly:** on a reset step the state's
    moments are replaced by zeros and ``t`` is set to 1 *after* AdaClip/AdaGN, but this step's update still
    uses the old moments (updated in place, then discarded) with ``t = 1`` bias corrections, i.e. about
    0.3x a normal step; the zero moments are first used at the next step (``t = 2`` corrections with one
    sample). ``m_max``, ``m_n``, ``v_n`` are not reset, yet their bias corrections use the reset ``t``: the
    AdaClip threshold ``m_max / (1 - g3^t)`` is inflated (x~500 at t=2, x1.6 at t=1000 for g3=0.999), so
    clipping is much looser for a long time after each reset.

    **``reset_fix=True``:** the moments are zeroed *before* the reset step's Adam update, whose bias
    corrections then use ``t = 1`` (a clean first Adam step), and AdaClip/AdaGN keep their own step count
    ``norm_step``, never reset, so their bias corrections stay consistent with their un-reset statistics.

    Args:
        params: parameters or groups (the authors apply it to every trainable parameter).
        lr: learning rate (default 1e-3; the authors use 8e-4 at 130M BF16, 4e-4 at 350M 4-bit).
        betas: ``(beta1, beta2)``, each in [0, 1) (default (0.9, 0.999)).
        eps: Adam's and AdaGN's epsilon (default 1e-8).
        weight_decay: decoupled weight decay, applied first (default 0).
        gamma1: EMA coefficient of the gradient norm's mean (AdaGN), in [0, 1), or -1 for ``beta1``
            (default 0.7; README/130M script: 0.85).
        gamma2: EMA coefficient of the squared gradient norm (AdaGN), in [0, 1) (default 0.9; 130M BF16
            script: 0.99999).
        gamma3: EMA coefficient ``theta`` of the gradient's max (AdaClip), in [0, 1) (default 0.999).
        total_T: horizon of the ``s_T`` cosine (total update steps), integer >= 1, or None for ``s_T = 1``
            (default None; the authors' scripts use 20000).
        eta_min: floor of ``s_T``, in [0, 1] (default 0.5).
        update_proj_gap: momentum-reset interval in steps, integer >= 0; 0 never resets (default 1000).
        reset_fix: apply resets cleanly, see above (default False = official semantics).
        foreach, fused: as the other zoo optimizers.

    State: ``step`` (0-d), ``exp_avg``, ``exp_avg_sq``, and the 0-d ``m_norm``, ``v_norm``, ``m_max``
    (plus ``norm_step`` with ``reset_fix``): 8 bytes per fp32 parameter. The global step lives in each
    param group (``stable_spam_total_steps``). ``metrics()``: ``clip_fraction``, ``adagn_scale``, ``resets``.

    Differences from the official code, deliberate: ``p.grad`` is not modified (the official code clips it
    in place); ``amsgrad`` is not offered (the authors never use it).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, gamma1: float = 0.7, gamma2: float = 0.9, gamma3: float = 0.999,
                 total_T: int | None = None, eta_min: float = 0.5, update_proj_gap: int = 1000,  # noqa: N803
                 reset_fix: bool = False, *, foreach: bool | None = None, fused: bool | None = None):
        if gamma1 != -1:
            check_range("gamma1", gamma1, 0.0, 1.0, high_open=True)
        check_range("gamma2", gamma2, 0.0, 1.0, high_open=True)
        check_range("gamma3", gamma3, 0.0, 1.0, high_open=True)
        if total_T is not None:
            check_int("total_T", total_T, 1)
        check_range("eta_min", eta_min, 0.0, 1.0)
        check_int("update_proj_gap", update_proj_gap, 0)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        gamma1=betas[0] if gamma1 == -1 else gamma1, gamma2=gamma2, gamma3=gamma3, total_T=total_T,
                        eta_min=eta_min, update_proj_gap=update_proj_gap, reset_fix=bool(reset_fix),
                        foreach=foreach, fused=fused)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        param_group.setdefault("stable_spam_total_steps", 0)
        super().add_param_group(param_group)

    @staticmethod
    def scale(total_steps: int, total_T: int | None, eta_min: float) -> float:
        """``s_T``: the official ``CosineDecay(1.0, total_T, eta_min)`` (no clamp past ``total_T``)."""
        if total_T is None:
            return 1.0
        return eta_min + (1 - eta_min) * (1 + math.cos(math.pi * total_steps / (total_T + 1))) / 2

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = self._closure_loss(closure)
        reset_now = False
        for group in self.param_groups:
            group["stable_spam_total_steps"] += 1
            total = group["stable_spam_total_steps"]
            gap = group["update_proj_gap"]
            reset = gap > 0 and total % gap == 0
            reset_now |= reset
            pairs = self._grads(group)
            if pairs:
                self._update(group, pairs, reset, self.scale(total, group["total_T"], group["eta_min"]))
        self._count_reset(reset_now)
        return loss

    def _update(self, group, pairs, reset: bool, scale: float) -> None:
        beta1, beta2 = group["betas"]
        beta1 = beta1 * scale
        gamma1 = group["gamma1"] * scale
        theta, gamma2 = group["gamma3"], group["gamma2"]
        lr, eps, fix = float(group["lr"]), group["eps"], group["reset_fix"]
        path = self._path(group, [p for p, _ in pairs])
        flags = dict(zero_before=reset and fix, zero_after=reset and not fix)
        items, entries = [], 0
        for p, g in pairs:
            state = self.state[p]
            m, v = self._zeros_state(state, p, "exp_avg", "exp_avg_sq")
            if "m_norm" not in state:
                for k in ("m_norm", "v_norm", "m_max"):
                    state[k] = torch.zeros((), dtype=torch.float32, device=p.device)
                if fix:
                    state["norm_step"] = torch.tensor(0.0)
            step = self._step_counter(state)
            t_norm = float(step.add_(1))  # the official code's statistics use the (possibly reset) step
            if fix:
                t_norm = float(state["norm_step"].add_(1))
            if reset:
                step.fill_(1)
            t = float(step)
            scalars = self._scalars(
                p.device, 1 - lr * group["weight_decay"], theta, 1 - theta, 1 - theta**t_norm, gamma1, 1 - gamma1,
                1 - gamma1**t_norm, gamma2, 1 - gamma2, 1 - gamma2**t_norm, eps, beta1, 1 - beta1, beta2, 1 - beta2,
                math.sqrt(1 - beta2**t), lr / (1 - beta1**t))
            # the tensor's 0-d statistics travel with the scalars (they are not flattened)
            items.append(((p, g, m, v), (state["m_norm"], state["v_norm"], state["m_max"], *scalars)))
            entries += p.numel()
        if path == "fused":
            results = self._run_kernel(_fused_stable_spam, items, True, **flags)
        elif path == "foreach":
            results = _piecewise_stable_spam(items, **flags)  # the reductions of all tensors batched
        else:
            results = [r for item in items for r in _piecewise_stable_spam([item], **flags)]
        self._count(entries, [c for c, _ in results], [s for _, s in results])
