"""SWAN: SGD with Whitening And Normalization (stateless).

Chao Ma, Wenbo Gong, Meyer Scetbon, Edward Meeds, "SWAN: SGD with Normalization and Whitening Enables
Stateless LLM Training" (arXiv 2412.13148, ICML 2025). No official code has been released (the paper
points to github.com/microsoft/msr_optim, which is not public); the operators follow the paper as
restated by the same group and by third-party implementations (ALGORITHMS.md section 3).
"""

from __future__ import annotations

import math

import torch

from ..ops.normalize import row_standardize
from ..ops.orthogonalize import newton_schulz_bytes
from ..ops.whiten import WHITENING_METHODS, whiten
from ._base import check_choice, check_int, check_range
from ._matrix import MatrixOptimizer

__all__ = ["SWAN"]


class SWAN(MatrixOptimizer):
    r"""SWAN for hidden matrices (no optimizer state), AdamW for the other parameters.

    For each hidden weight ``W`` (``m x n``; conv filters flattened to ``(out, -1)``) with gradient ``G``
    (the raw gradient of this step: no momentum):

    .. math::
        \tilde G &= \mathrm{GradNorm}(G) = (G - \bar g 1^\top) \oslash ((s + \epsilon) 1^\top)
            \quad (\text{row mean } \bar g \text{ and population std } s \text{ over the } n \text{ inputs}) \\
        \Delta &= \mathrm{GradWhitening}(\tilde G) = (\tilde G \tilde G^\top)^{-1/2} \tilde G
            \quad (\text{short side; float32}) \\
        \Delta &\leftarrow \sqrt{mn}\, \Delta / (\|\Delta\|_F + \epsilon) \quad (\text{if rescale: update RMS } 1) \\
        W &\leftarrow W (1 - \eta\lambda) - \eta\, \Delta

    GradNorm is :func:`optimzoo.ops.normalize.row_standardize`; GradWhitening is
    :func:`optimzoo.ops.whiten.whiten`, in float32 as the paper: ``ns_steps`` steps of the paper's
    Newton-Schulz iteration with factor ``ns_beta``, which maps each singular value ``u`` of the
    normalized matrix to ``beta u (3 - u^2)``. ``whitening="newton_schulz"`` (default) runs it as the cubic
    iteration on ``X`` itself (the project's one Newton-Schulz kernel, coefficients ``(3 beta, -beta, 0)``);
    ``"coupled"`` runs the paper's literal coupled ``Y, Z`` form, equal in exact arithmetic but
    numerically unstable in float32 when the iteration does not converge (``beta = 0.8``: measured
    error growth of 4-8x per step, non-finite after ~15 steps on rank-deficient gradients; see
    :mod:`optimzoo.ops.whiten`); ``"exact"`` is the SVD (``U V^T`` with zero singular values kept at zero:
    GradNorm's output of a matrix with ``m >= n`` is always rank-deficient), for tests and small
    matrices. Same-shape matrices are processed as one batch. Matrix parameters keep no state at all;
    vector parameters (embeddings, LM head, gains, biases) take an AdamW step (see
    :class:`MatrixOptimizer`).

    Args:
        params: parameters or groups; use ``optimzoo.create_optimizer(model, "swan")`` for routing.
        lr: learning rate of matrix groups (default 1e-3: third-party ports use ``0.05 x`` the global
            (Adam) lr of the GaLore benchmark, 0.02; with ``rescale=True`` the update has RMS 1, like a
            sign or Adam update).
        weight_decay: decoupled weight decay of matrix groups (default 0; not part of the paper's
            algorithm, third-party ports use decoupled decay).
        whitening: ``"newton_schulz"`` (default), ``"coupled"`` or ``"exact"`` (see above).
        ns_steps: Newton-Schulz iterations ``k`` (default 10).
        ns_beta: Newton-Schulz step factor ``beta`` in (0, 1] (default 0.8). ``k = 10, beta = 0.8`` is the
            third-party "standard" setting (singular values of the output land in about [0.56, 1.6],
            Muon-like approximate whitening); ``beta = 0.5`` converges to exact whitening (about 6-10
            steps for well-conditioned gradients).
        rescale: scale the whitened update to RMS 1 (default True; two independent third-party
            implementations, one citing the paper). Without it the update has Frobenius norm about
            ``sqrt(min(m, n))`` (RMS about ``1 / sqrt(max(m, n))``).
        eps: GradNorm's ``epsilon`` (added to each row's std), also added to the Frobenius norms of the
            whitening and the rescale (default 1e-8, third-party).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay, foreach, batch_budget: see
            :class:`MatrixOptimizer`.
            (The papers' runs use Adam with the global lr, 0.01-0.02 in the GaLore benchmark, for these.)

    The paper's NSDS variant ("Newton-Schulz with diagonal substitution") is not implemented: its
    definition could not be verified and third-party versions disagree.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        whitening: str = "newton_schulz",
        ns_steps: int = 10,
        ns_beta: float = 0.8,
        rescale: bool = True,
        eps: float = 1e-8,
        *,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-10,
        adamw_weight_decay: float | None = None,
        foreach: bool | None = None,
        batch_budget: float | None = None,
    ):
        check_choice("whitening", whitening, WHITENING_METHODS)
        check_int("ns_steps", ns_steps, 1)
        check_range("ns_beta", ns_beta, 0.0, 1.0, low_open=True)
        check_range("eps", eps, 0.0, low_open=True)
        defaults = dict(lr=lr, weight_decay=weight_decay, whitening=whitening, ns_steps=ns_steps,
                        ns_beta=ns_beta, rescale=bool(rescale), eps=eps)
        super().__init__(params, defaults, adamw_lr=adamw_lr, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
                         adamw_weight_decay=adamw_weight_decay, foreach=foreach, batch_budget=batch_budget)

    def _transform_bytes(self, group, rows, cols):
        return newton_schulz_bytes(rows, cols)  # GradNorm's output is the whitening's (float32) input

    def _transform(self, group, U, rows):
        eps = group["eps"]
        O = whiten(row_standardize(U, eps), group["whitening"], group["ns_steps"], group["ns_beta"], eps)
        if group["rescale"]:
            target = math.sqrt(O.size(-2) * O.size(-1))
            O = O.mul_(torch.linalg.matrix_norm(O, keepdim=True).add_(eps).reciprocal_().mul_(target))
        return O
