"""AdamP and SGDP: Adam and SGD that project updates off scale-invariant weights.

Heo, Chun, Oh, Han, Yun, Kim, Uh, Ha, "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
Scale-invariant Weights", ICLR 2021, arXiv 2006.08217. Official code: clovaai/AdamP
``adamp/adamp.py`` and ``adamp/sgdp.py`` at commit 7f6f0383ff6a (pip ``adamp`` 0.3.0); torch-optimizer's
``AdamP``/``SGDP`` are ports of it and are this module's test oracles.

Layout (CONTRIBUTING.md): ``_single_tensor_*`` is the update of one tensor (0-d tensor
hyperparameters, no data-dependent Python control flow): the eager single-tensor path and, compiled by
:func:`~optimzoo.optim._base.fused_kernel`, the fused path. ``_multi_tensor_*`` is the same math with
``torch._foreach_*`` ops. Both call :func:`project_scale_invariant`, the one implementation of the
projection.
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

from ..distributed.reduce import global_amax, global_sum
from ._base import ZooOptimizer, check_betas, check_lr, check_paths, check_range, foreach_adam_moments_, fused_kernel

__all__ = ["SGDP", "AdamP", "project_scale_invariant"]


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


def project_scale_invariant(
    param: torch.Tensor,
    grad: torch.Tensor,
    update: torch.Tensor,
    eps: torch.Tensor,
    wd_ratio: torch.Tensor,
    threshold_channel: torch.Tensor,
    threshold_layer: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""AdamP's projection of ``update`` for one weight viewed as ``(C, D)`` (rows = output channels).

    The official two tests, in order, on the *raw gradient* ``g`` and the weight ``w``
    (``cos(x, y) = |x.y| / (||x|| + eps) / (||y|| + eps)``):

    1. channel view: if ``max_i cos(g_i, w_i) < delta / sqrt(D)``, every row is projected,
       ``u_i <- u_i - (w^_i . u_i) w^_i`` with ``w^_i = w_i / (||w_i|| + eps)``;
    2. otherwise layer view: if ``cos(g, w) < delta / sqrt(C D)`` the whole tensor is projected the same way;
    3. otherwise nothing changes.

    A projected tensor's weight decay is multiplied by ``wd_ratio``. Both branches are computed from
    per-row statistics and selected with ``torch.where`` (no host synchronization, compilable); the
    projection keeps the official order of operations, ``u - w^ (w^.u)``.

    Returns ``(projected update, weight-decay factor)`` (the factor a 0-d tensor: ``wd_ratio`` or 1).
    """
    dot_gw = row_sums(grad * param)
    sq_g = row_sums(grad * grad)
    sq_w = row_sums(param * param)
    norm_w = sq_w.sqrt()
    cos_channel = dot_gw.abs() / (sq_g.sqrt() + eps) / (norm_w + eps)
    channel = total_max(cos_channel) < threshold_channel
    layer_norm_w = total_sum(sq_w).sqrt()
    cos_layer = total_sum(dot_gw).abs() / (total_sum(sq_g).sqrt() + eps) / (layer_norm_w + eps)
    project = torch.logical_or(channel, cos_layer < threshold_layer)
    # the official order of operations: w^ = w / (||w|| + eps), then u - w^ (w^ . u)
    w_hat = param / torch.where(channel, norm_w, layer_norm_w).add(eps).unsqueeze(1)
    coef = row_sums(w_hat * update)
    coef = torch.where(channel, coef, total_sum(coef))
    projected = torch.where(project, update - w_hat * coef.unsqueeze(1), update)
    wd = torch.where(project, wd_ratio, torch.ones_like(wd_ratio))
    return projected, wd


def _matrix_view(t: torch.Tensor) -> torch.Tensor:
    """The channel view ``(size(0), -1)`` of a weight (a view, as the tensors are contiguous)."""
    return t.view(t.size(0), -1)


def _thresholds(p: torch.Tensor, delta: float) -> tuple[float, float]:
    rows = p.size(0)
    cols = p.numel() // rows
    return delta / math.sqrt(cols), delta / math.sqrt(rows * cols)


def _projects(p: torch.Tensor) -> bool:
    """Only tensors with more than one dimension are tested for scale invariance (official code)."""
    return p.dim() > 1


def _fusable(*tensors: torch.Tensor) -> bool:
    """Whether the compiled kernel takes these tensors: contiguous and without size-1 dimensions in the
    ``(C, D)`` view (torch.compile specializes sizes 0 and 1, which would cost graphs of their own)."""
    t = tensors[0]
    if t.numel() <= 1 or not all(x.is_contiguous() for x in tensors):
        return False
    return not _projects(t) or (t.size(0) > 1 and t.numel() // t.size(0) > 1)


# --------------------------------------------------------------------------------------------
# AdamP kernels
# --------------------------------------------------------------------------------------------


def _single_tensor_adamp(param, grad, exp_avg, exp_avg_sq, beta1, one_minus_beta1, beta2, one_minus_beta2,
                         bc2_sqrt, step_size, eps, lr_wd, wd_ratio, threshold_channel, threshold_layer,
                         nesterov: bool = False, project: bool = True):
    """One AdamP step of one tensor (``(C, D)`` view when ``project``), in place on param and moments."""
    exp_avg.mul_(beta1).add_(grad * one_minus_beta1)
    exp_avg_sq.mul_(beta2).add_(grad * grad * one_minus_beta2)
    denom = exp_avg_sq.sqrt() / bc2_sqrt + eps
    if nesterov:
        update = (exp_avg * beta1 + grad * one_minus_beta1) / denom
    else:
        update = exp_avg / denom
    if project:
        update, wd = project_scale_invariant(param, grad, update, eps, wd_ratio, threshold_channel, threshold_layer)
        param.mul_(1 - lr_wd * wd)
    else:
        param.mul_(1 - lr_wd)
    param.sub_(update * step_size)


def _fused_adamp_matrix(*args, nesterov: bool = False):
    _single_tensor_adamp(*args, nesterov=nesterov, project=True)


def _fused_adamp_vector(*args, nesterov: bool = False):
    _single_tensor_adamp(*args, nesterov=nesterov, project=False)


_FUSED_ADAMP = {True: fused_kernel(_fused_adamp_matrix), False: fused_kernel(_fused_adamp_vector)}


def _multi_tensor_adamp(params, grads, exp_avgs, exp_avg_sqs, bc2_sqrts, step_sizes, *, beta1, beta2, eps,
                        lr_wd, wd_ratio, delta, nesterov):
    """AdamP with ``torch._foreach_*`` for the moments and the update; the projection per tensor."""
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs], with_indices=True)
    for (device, _), ((ps, gs, ms, vs), idx) in grouped.items():
        bc2 = [bc2_sqrts[i] for i in idx]
        steps = [step_sizes[i] for i in idx]
        foreach_adam_moments_(ms, vs, gs, beta1, beta2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, bc2)
        torch._foreach_add_(denom, eps)
        if nesterov:
            updates = list(torch._foreach_mul(ms, beta1))
            torch._foreach_add_(updates, torch._foreach_mul(gs, 1 - beta1))
            torch._foreach_div_(updates, denom)
        else:
            updates = list(torch._foreach_div(ms, denom))
        eps_t, ratio_t = ZooOptimizer._scalars(device, eps, wd_ratio)
        for k, (p, g) in enumerate(zip(ps, gs)):
            if _projects(p):
                th_c, th_l = ZooOptimizer._scalars(device, *_thresholds(p, delta))
                u, wd = project_scale_invariant(_matrix_view(p), _matrix_view(g), _matrix_view(updates[k]),
                                                eps_t, ratio_t, th_c, th_l)
                updates[k] = u.view_as(p)
                p.mul_(1 - lr_wd * wd)
            elif lr_wd:
                p.mul_(1 - lr_wd)
        torch._foreach_mul_(updates, steps)
        torch._foreach_sub_(ps, updates)


# --------------------------------------------------------------------------------------------
# SGDP kernels
# --------------------------------------------------------------------------------------------


def _single_tensor_sgdp(param, grad, buf, momentum, one_minus_dampening, lr, wd_scaled, wd_ratio, eps,
                        threshold_channel, threshold_layer, nesterov: bool = False, project: bool = True):
    """One SGDP step of one tensor. As the official code, the non-Nesterov update *is* the momentum
    buffer, so its projection is written back into the buffer."""
    buf.mul_(momentum).add_(grad * one_minus_dampening)
    update = grad + buf * momentum if nesterov else buf
    if project:
        projected, wd = project_scale_invariant(param, grad, update, eps, wd_ratio, threshold_channel,
                                                threshold_layer)
        if not nesterov:
            buf.copy_(projected)
        param.mul_(1 - wd_scaled * wd)
        update = projected
    else:
        param.mul_(1 - wd_scaled)
    param.sub_(update * lr)


def _fused_sgdp_matrix(*args, nesterov: bool = False):
    _single_tensor_sgdp(*args, nesterov=nesterov, project=True)


def _fused_sgdp_vector(*args, nesterov: bool = False):
    _single_tensor_sgdp(*args, nesterov=nesterov, project=False)


_FUSED_SGDP = {True: fused_kernel(_fused_sgdp_matrix), False: fused_kernel(_fused_sgdp_vector)}


def _multi_tensor_sgdp(params, grads, bufs, *, lr, momentum, dampening, wd_scaled, wd_ratio, eps, delta,
                       nesterov):
    """SGDP with ``torch._foreach_*`` for the momentum and the update; the projection per tensor."""
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, bufs])
    for (device, _), ((ps, gs, bs), _) in grouped.items():
        torch._foreach_mul_(bs, momentum)
        torch._foreach_add_(bs, torch._foreach_mul(gs, 1 - dampening))
        if nesterov:
            updates = list(torch._foreach_mul(bs, momentum))
            torch._foreach_add_(updates, gs)
        else:
            updates = list(bs)
        eps_t, ratio_t = ZooOptimizer._scalars(device, eps, wd_ratio)
        for k, (p, g) in enumerate(zip(ps, gs)):
            if _projects(p):
                th_c, th_l = ZooOptimizer._scalars(device, *_thresholds(p, delta))
                u, wd = project_scale_invariant(_matrix_view(p), _matrix_view(g), _matrix_view(updates[k]),
                                                eps_t, ratio_t, th_c, th_l)
                u = u.view_as(p)
                if not nesterov:
                    bs[k].copy_(u)
                    u = bs[k]
                updates[k] = u
                p.mul_(1 - wd_scaled * wd)
            elif wd_scaled:
                p.mul_(1 - wd_scaled)
        torch._foreach_sub_(ps, torch._foreach_mul(updates, lr))


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
    def _views(p: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The kernel's view of a tensor and its companions: ``(C, D)`` if projected, else flat."""
        view = _matrix_view if _projects(p) else (lambda t: t.view(-1))
        return tuple(view(t) for t in (p, *others))


class AdamP(_ProjectionOptimizer):
    r"""AdamP: Adam whose update is projected off scale-invariant weights (arXiv 2006.08217).

    For each parameter ``W`` with gradient ``g`` (clovaai/AdamP ``adamp.py``, commit 7f6f0383ff6a):

    .. math::
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        u &= \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}
            \quad \Big(\text{Nesterov: } u = \frac{\beta_1 m + (1-\beta_1) g}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}\Big) \\
        u, r &= \Pi(W, g, u) \quad (\text{see } \texttt{project\_scale\_invariant};
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
        fused: use a ``torch.compile``-generated kernel per tensor (moments, projection and update in
            few passes over memory; compiled on the first step, seconds). Default None = off.

    State: ``step`` (0-d tensor), ``exp_avg``, ``exp_avg_sq``: 8 bytes per fp32 parameter.

    Differences from the official code, deliberate: the cosine is ``|x.y| / (||x|| + eps) / (||y|| + eps)``
    (torch-optimizer's form; the official code calls ``F.cosine_similarity``, whose eps handling changed
    across PyTorch versions: the two agree except for near-zero rows); no host synchronization
    (both tests are evaluated on the device and selected with ``torch.where``); ``p.grad`` is read only.
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
            for p, g, m, v, bc2, ss in zip(params, grads, ms, vs, bc2_sqrts, step_sizes):
                project = _projects(p)
                scalars = self._scalars(p.device, beta1, 1 - beta1, beta2, 1 - beta2, bc2, ss, eps, lr_wd,
                                        group["wd_ratio"], *(_thresholds(p, group["delta"]) if project else (0, 0)))
                if path == "fused" and _fusable(p, g, m, v):
                    _FUSED_ADAMP[project](*self._views(p, g, m, v), *scalars, nesterov=group["nesterov"])
                else:
                    _single_tensor_adamp(*self._views(p, g.contiguous(), m, v), *scalars,
                                         nesterov=group["nesterov"], project=project)
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
            for p, g, b in zip(params, grads, bufs):
                project = _projects(p)
                scalars = self._scalars(p.device, momentum, 1 - group["dampening"], lr, wd_scaled, group["wd_ratio"],
                                        eps, *(_thresholds(p, group["delta"]) if project else (0, 0)))
                if path == "fused" and _fusable(p, g, b):
                    _FUSED_SGDP[project](*self._views(p, g, b), *scalars, nesterov=group["nesterov"])
                else:
                    _single_tensor_sgdp(*self._views(p, g.contiguous(), b), *scalars, nesterov=group["nesterov"],
                                        project=project)
        return loss
