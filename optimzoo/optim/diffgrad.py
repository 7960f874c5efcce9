"""diffGrad: Adam with a friction coefficient from the change of the gradient.

Dubey, Chakraborty, Roy, Mukherjee, Singh, Chaudhuri, "diffGrad: An Optimization Method for
Convolutional Neural Networks", IEEE TNNLS 2020, arXiv 1909.11015. Official code:
shivram1987/diffGrad ``diffGrad_v2.py`` (the fixed version its README recommends) at commit
73233ba47087, numerically identical to torch-optimizer's ``DiffGrad`` (jettify/pytorch-optimizer
``torch_optimizer/diffgrad.py`` at 19c3e41952b9), this module's test oracle.

Layout (CONTRIBUTING.md): :func:`_single_tensor_diffgrad` (0-d tensor hyperparameters, no
data-dependent control flow) is, compiled, the fused path and, run over cache-sized pieces, the eager
single-tensor path;
:func:`_multi_tensor_diffgrad` the ``torch._foreach_*`` path.
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

from ._base import (
    ZooOptimizer,
    check_betas,
    check_lr,
    check_paths,
    check_range,
    foreach_adam_moments_,
    foreach_chunks,
    fused_kernel,
    piecewise,
)

__all__ = ["DiffGrad"]


def _single_tensor_diffgrad(param, grad, exp_avg, exp_avg_sq, previous_grad, beta1, one_minus_beta1, beta2,
                            one_minus_beta2, eps, step_size, weight_decay, decay: bool = False):
    """One diffGrad step of one tensor, in place on ``param`` and the state (``grad`` is read only)."""
    if decay:
        grad = grad + param * weight_decay  # L2, coupled into the gradient (on a copy: p.grad is untouched)
    exp_avg.mul_(beta1).add_(grad * one_minus_beta1)
    exp_avg_sq.mul_(beta2).add_(grad * grad * one_minus_beta2)
    denom = exp_avg_sq.sqrt() + eps
    friction = 1.0 / (1.0 + torch.exp(-(previous_grad - grad).abs()))
    previous_grad.copy_(grad)
    param.sub_(exp_avg * friction / denom * step_size)


_fused_diffgrad = fused_kernel(_single_tensor_diffgrad, eager=piecewise(_single_tensor_diffgrad))


def _multi_tensor_diffgrad(params, grads, exp_avgs, exp_avg_sqs, previous_grads, step_sizes, *, beta1, beta2, eps,
                           weight_decay):
    """The same update with ``torch._foreach_*`` ops, tensors grouped by device and dtype and run in
    cache-sized chunks (:func:`~optimzoo.optim._base.foreach_chunks`)."""
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_sqs, previous_grads], with_indices=True)
    for tensors, idx in grouped.values():
        for (ps, gs, ms, vs, prevs), sources in foreach_chunks(tensors):
            if weight_decay:
                gs = torch._foreach_add(gs, ps, alpha=weight_decay)
            foreach_adam_moments_(ms, vs, gs, beta1, beta2)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_add_(denom, eps)
            friction = torch._foreach_sub(prevs, gs)
            torch._foreach_abs_(friction)
            torch._foreach_sigmoid_(friction)  # 1 / (1 + exp(-|g_prev - g|))
            torch._foreach_copy_(prevs, gs)  # (pieces of local shards: plain tensors)
            torch._foreach_mul_(friction, ms)
            torch._foreach_addcdiv_(ps, friction, denom, [-step_sizes[idx[j]] for j in sources])


class DiffGrad(ZooOptimizer):
    r"""diffGrad (arXiv 1909.11015): Adam whose momentum is damped where the gradient changes little.

    For each parameter ``W`` with gradient ``g`` (diffGrad_v2 = torch-optimizer ``DiffGrad``):

    .. math::
        g &\leftarrow g + \lambda W \quad (\text{L2 weight decay, coupled}) \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        \xi &= \mathrm{sigmoid}(|g_{prev} - g|) \in [0.5, 1), \qquad g_{prev} \leftarrow g \\
        W &\leftarrow W - \eta \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t} \frac{\xi \odot m}{\sqrt{v} + \epsilon}

    (``eps`` is added to the un-corrected ``sqrt(v)``, as the official code: the paper's
    ``eps_paper = eps / sqrt(1 - beta2^t)``). At the first step ``g_prev = 0``.

    Args:
        params: parameters or groups.
        lr: learning rate ``eta`` (default 1e-3).
        betas: ``(beta1, beta2)``, each in [0, 1) (default (0.9, 0.999)).
        eps: added to ``sqrt(v)`` (default 1e-8).
        weight_decay: L2 coefficient ``lambda`` added to the gradient (default 0).
        foreach: use ``torch._foreach_*`` (default None: yes for plain tensors).
        fused: use a ``torch.compile``-generated kernel per tensor (default None = off).

    State: ``step`` (0-d), ``exp_avg``, ``exp_avg_sq``, ``previous_grad`` (the L2-augmented gradient,
    as diffGrad_v2): 12 bytes per fp32 parameter.

    Difference from the official code, deliberate: ``p.grad`` is not modified (the official code adds
    the weight decay to it in place, which grad clipping or logging after ``step()`` would see).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, foreach: bool | None = None, fused: bool | None = None):
        check_lr(lr)
        check_betas(betas)
        check_range("eps", eps, 0.0, low_open=True)
        check_range("weight_decay", weight_decay, 0.0)
        check_paths(foreach, fused)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, foreach=foreach, fused=fused)
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
            lr, eps, wd = float(group["lr"]), group["eps"], group["weight_decay"]
            params, grads, ms, vs, prevs, step_sizes = [], [], [], [], [], []
            for p, g in pairs:
                state = self.state[p]
                m, v, prev = self._zeros_state(state, p, "exp_avg", "exp_avg_sq", "previous_grad")
                t = float(self._step_counter(state).add_(1))
                params.append(p)
                grads.append(g)
                ms.append(m)
                vs.append(v)
                prevs.append(prev)
                step_sizes.append(lr * math.sqrt(1 - beta2**t) / (1 - beta1**t))
            path = self._path(group, params)
            if path == "foreach":
                _multi_tensor_diffgrad(params, grads, ms, vs, prevs, step_sizes, beta1=beta1, beta2=beta2, eps=eps,
                                       weight_decay=wd)
                continue
            items = [((p, g, m, v, prev), self._scalars(p.device, beta1, 1 - beta1, beta2, 1 - beta2, eps, ss, wd))
                     for p, g, m, v, prev, ss in zip(params, grads, ms, vs, prevs, step_sizes)]
            self._run_kernel(_fused_diffgrad, items, path == "fused", decay=bool(wd))
        return loss
