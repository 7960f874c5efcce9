"""AuON and Hybrid-AuON: normalized Nesterov momentum with a cosh-RMS brake (and one Newton-Schulz step).

Dipan Maity, "AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates" (arXiv 2509.24320;
v1 "AuON: A Survey For Linear-time Orthogonal Optimizer"). Official code ryyzn9/AuON: the original
training script ``Auon_Adam_train.py`` (commit c87b86256c74) and the later package ``auon/optimizer.py``
(HEAD bba2e8220082), which does *not* implement the paper's update (ALGORITHMS.md section 6). The
default here is the paper / original script; ``variant="packaged"`` reproduces the package.
"""

from __future__ import annotations

import torch

from ..ops.normalize import cosh_rms_brake, frobenius_normalize
from ..ops.orthogonalize import newton_schulz_bytes
from ._base import check_choice, check_range
from ._matrix import MatrixOptimizer, adjusted_lr_scale
from .muon import check_ns, nesterov_momentum, orthogonalize_group

__all__ = ["AuON", "HybridAuON"]

VARIANTS = ("paper", "packaged")


class AuON(MatrixOptimizer):
    r"""AuON for hidden matrices, AdamW for the other parameters, in one optimizer.

    For each hidden weight ``W`` (``m x n``; conv filters flattened to ``(out, -1)``) with gradient ``g``,
    ``variant="paper"`` (default; the paper's equations and the original training script):

    .. math::
        M &\leftarrow \beta M + (1-\beta) g, \quad U = (1-\beta) g + \beta M
              \ (\text{Nesterov; } U = M \text{ otherwise}) \\
        X &= U / (\|U\|_F + 10^{-7}) \\
        r &= \sqrt{\mathrm{mean}(\cosh(X)^2)} \quad (\text{over all } mn \text{ entries}) \\
        W &\leftarrow W (1 - \eta\lambda) - \eta \sqrt{\max(1, m/n)}\; X / (r + 10^{-8})

    (:func:`optimzoo.ops.normalize.cosh_rms_brake`). The update is scale-invariant with Frobenius norm
    about 1: since ``X`` has unit norm, ``r ~ sqrt(1 + 1/mn)`` unless a few entries carry O(1) of the
    mass, so AuON is close to Frobenius-normalized Nesterov SGD; the brake shrinks spiky updates.

    ``variant="packaged"`` (``auon/optimizer.py`` of the package):
    ``r = sqrt(mean(cosh(gamma U / (||U||_F + 1e-7))^2))`` and ``W <- W (1 - lr wd) - lr U / (r + 1e-8)``:
    the *unnormalized* momentum is applied (not scale-invariant) and there is no shape factor.

    Args:
        params: parameters or groups; use ``optimzoo.create_optimizer(model, "auon")`` for routing.
        lr: learning rate of matrix groups (default 0.24: the original script's ``auon_lr`` and the
            package's class default; the paper's LM run used 0.055, the package's training config 0.08).
        momentum: ``beta`` of the momentum EMA, in [0, 1) (default 0.95).
        weight_decay: decoupled weight decay of matrix groups, ``W <- W (1 - lr wd)`` first (default 0;
            the paper's AuON has none, the package applies it this way).
        nesterov: Nesterov form ``U = lerp(g, M, beta)`` (default True; the package always uses it).
        variant: ``"paper"`` (default) or ``"packaged"``.
        gamma: the brake's temperature in the packaged variant, > 0 (default 1.5, package); unused by
            ``"paper"``.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay, foreach, batch_budget: see
            :class:`MatrixOptimizer` (the original script gives the other parameters AdamW with
            ``lr = 0.1 x auon lr``; the package's config Adam with lr 0.008, betas (0.8, 0.95)).

    Differences from the official code, all deliberate: the brake is computed in float32 (the original
    script casts the momentum to bf16 first); ``p.grad`` is not modified (both official versions
    overwrite it with the Nesterov mix); parameters without a gradient are skipped.
    """

    def __init__(
        self,
        params,
        lr: float = 0.24,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        nesterov: bool = True,
        variant: str = "paper",
        gamma: float = 1.5,
        *,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-10,
        adamw_weight_decay: float | None = None,
        foreach: bool | None = None,
        batch_budget: float | None = None,
    ):
        super().__init__(params, self._defaults(lr, momentum, weight_decay, nesterov, variant, gamma),
                         adamw_lr=adamw_lr, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
                         adamw_weight_decay=adamw_weight_decay, foreach=foreach, batch_budget=batch_budget)

    @staticmethod
    def _defaults(lr, momentum, weight_decay, nesterov, variant, gamma, **extra) -> dict:
        check_range("momentum", momentum, 0.0, 1.0, high_open=True)
        check_choice("variant", variant, VARIANTS)
        check_range("gamma", gamma, 0.0, low_open=True)
        return dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=bool(nesterov),
                    variant=variant, gamma=gamma, **extra)

    def _init_state(self, group, p, state):
        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _precondition(self, group, params, grads, states):
        bufs = [st["momentum_buffer"] for st in states]
        return nesterov_momentum(grads, bufs, group["momentum"], group["nesterov"],
                                 self._use_foreach(group["foreach"], params))

    def _transform(self, group, U, rows):
        if group["variant"] == "packaged":
            return cosh_rms_brake(U, group["gamma"], normalize=True)
        return cosh_rms_brake(frobenius_normalize(U, 1e-7))

    def _lr_scale(self, group, rows, cols):
        return adjusted_lr_scale("keller" if group["variant"] == "paper" else None, rows, cols)


class HybridAuON(AuON):
    r"""Hybrid-AuON: Newton-Schulz step(s) on the momentum, then AuON's cosh-RMS brake.

    ``variant="paper"`` (default; the paper's section 3.2, "only one iteration of Newton-Schulz"):

    .. math::
        M &\leftarrow \beta M + (1-\beta) g, \quad U = (1-\beta) g + \beta M \ (\text{Nesterov}) \\
        X &= \mathrm{NS}_k(U) \quad (X \leftarrow U / (\|U\|_F + 10^{-7}), \text{ then } k \text{ times }
              X \leftarrow aX + (bA + cA^2)X,\ A = XX^\top) \\
        W &\leftarrow W (1 - \eta\lambda) - \eta \sqrt{\max(1, m/n)}\; X / (\sqrt{\mathrm{mean}(\cosh(X)^2)} + 10^{-8})

    with Muon's coefficients and Newton-Schulz (:func:`optimzoo.ops.orthogonalize.newton_schulz`),
    ``k = ns_steps = 1``. The paper writes the hybrid's brake as ``mean(cosh(X)^2)`` without the square
    root (but with it for AuON); we use the square root, as the code does. The shape factor is AuON's.

    ``variant="packaged"`` (``HybridAuON`` of ``auon/optimizer.py``): ``X = NS_k(U)`` (the package's
    default is ``k = 5``: pass ``ns_steps=5``), ``r = sqrt(mean(cosh(gamma X / (||X||_F + 1e-7))^2))``,
    ``W <- W (1 - lr wd) - lr X / (r + 1e-8)``, no shape factor.

    Args:
        lr, momentum, weight_decay, nesterov, variant, gamma: as :class:`AuON` (lr default 0.24, the
            package's ``HybridAuON`` default).
        ns_steps: Newton-Schulz iterations (default None: 1 with one coefficient triple, the paper (the
            package uses 5); the schedule's length with a list).
        ns_dtype: Newton-Schulz compute dtype: ``"auto"`` (default: bf16 on accelerators and on CPUs with
            native bf16 matmuls, float32 on other CPUs), ``"bfloat16"`` or ``"float32"`` (the package
            iterates in the parameter dtype).
        ns_coefficients: the Newton-Schulz polynomial(s), as :class:`~optimzoo.optim.muon.Muon`
            (default ``"muon"``, the paper's; ``"polar_express"`` runs its 5 iterations).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay, foreach, batch_budget: see
            :class:`MatrixOptimizer`.
    """

    def __init__(
        self,
        params,
        lr: float = 0.24,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        nesterov: bool = True,
        variant: str = "paper",
        gamma: float = 1.5,
        ns_steps: int | None = None,
        ns_dtype: str = "auto",
        ns_coefficients: str | tuple | list = "muon",
        *,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-10,
        adamw_weight_decay: float | None = None,
        foreach: bool | None = None,
        batch_budget: float | None = None,
    ):
        ns_steps = check_ns(ns_steps, ns_coefficients, default_steps=1)
        defaults = self._defaults(lr, momentum, weight_decay, nesterov, variant, gamma,
                                  ns_steps=ns_steps, ns_dtype=ns_dtype, ns_coefficients=ns_coefficients)
        MatrixOptimizer.__init__(self, params, defaults, adamw_lr=adamw_lr, adamw_betas=adamw_betas,
                                 adamw_eps=adamw_eps, adamw_weight_decay=adamw_weight_decay, foreach=foreach,
                                 batch_budget=batch_budget)

    def _transform_bytes(self, group, rows, cols):
        return newton_schulz_bytes(rows, cols)  # the brake reuses what the iteration freed

    def _transform(self, group, U, rows):
        X = orthogonalize_group(group, U)
        if group["variant"] == "packaged":
            return cosh_rms_brake(X, group["gamma"], normalize=True)
        return cosh_rms_brake(X)
