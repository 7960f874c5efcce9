"""Muon: MomentUm Orthogonalized by Newton-Schulz.

Keller Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024, blog post,
https://kellerjordan.github.io/posts/muon/); official code KellerJordan/Muon ``muon.py`` at commit
857d1adc159e (pip ``muon`` 0.1.0).
"""

from __future__ import annotations

import torch

from ..ops.orthogonalize import newton_schulz
from ._base import check_int, check_range
from ._matrix import MatrixOptimizer, ns_compute_dtype

__all__ = ["Muon"]


def nesterov_momentum(grads: list[torch.Tensor], bufs: list[torch.Tensor], beta: float, nesterov: bool,
                      foreach: bool) -> list[torch.Tensor]:
    """Muon's momentum: ``M <- beta M + (1 - beta) g``; returns ``(1 - beta) g + beta M`` (Nesterov) or ``M``.

    The buffers are updated in place; the gradients are not modified.
    """
    if foreach:
        torch._foreach_lerp_(bufs, grads, 1 - beta)
        return list(torch._foreach_lerp(grads, bufs, beta)) if nesterov else bufs
    out = []
    for g, m in zip(grads, bufs):
        m.lerp_(g, 1 - beta)
        out.append(g.lerp(m, beta) if nesterov else m)
    return out


class Muon(MatrixOptimizer):
    r"""Muon for hidden matrices, AdamW for the other parameters, in one optimizer.

    For each hidden weight ``W`` (``m x n``; conv filters flattened to ``(out, -1)``) with gradient ``g``:

    .. math::
        M &\leftarrow \beta M + (1-\beta) g \\
        U &= (1-\beta) g + \beta M \quad (\text{Nesterov; } U = M \text{ otherwise}) \\
        O &= \mathrm{NS}_5(U) \approx \text{polar factor } U V^\top \text{ of } U \\
        W &\leftarrow W (1 - \eta\lambda) - \eta\, s(m, n)\, O

    with ``NS_5`` the quintic Newton-Schulz iteration (coefficients 3.4445, -4.7750, 2.0315) (bf16 on accelerators)
    (:func:`optimzoo.ops.orthogonalize.newton_schulz`) and ``s = sqrt(max(1, m/n))``. Same-shape
    matrices are orthogonalized together in one batched chain of matmuls. Vector parameters
    (embeddings, LM head, gains, biases) take an AdamW step; see :class:`MatrixOptimizer`.

    Args:
        params: parameters or groups; use ``optimzoo.create_optimizer(model, "muon")`` for routing.
        lr: learning rate of matrix groups, in Muon units (default 0.02, KellerJordan/Muon).
        momentum: ``beta`` of the momentum EMA, in [0, 1) (default 0.95).
        weight_decay: decoupled weight decay of matrix groups, ``W <- W (1 - lr wd)`` (default 0).
        nesterov: use the Nesterov form ``U = lerp(g, M, beta)`` (default True, as the official code).
        ns_steps: Newton-Schulz iterations (default 5).
        ns_dtype: compute dtype of Newton-Schulz: ``"auto"`` (default: bf16 on accelerators, as Muon;
            float32 on CPU, where bf16 matmuls are emulated and ~100x slower), ``"bfloat16"`` or ``"float32"``.
        adjust_lr: the shape-dependent lr factor ``s``: ``"keller"`` (default), ``"match_adamw"``
            (``0.2 sqrt(max(m, n))``, update RMS ~ 0.2 lr so AdamW's lr/wd transfer), or ``None``.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay, foreach: see :class:`MatrixOptimizer`.

    Differences from the official code, all deliberate: ``p.grad`` is not modified (the official
    Nesterov step overwrites it); parameters without a gradient are skipped (the official code
    substitutes zeros to keep its DDP collectives in step, which decays momentum and applies weight
    decay); for conv filters ``s`` uses the flattened matrix shape (the official code uses the
    kernel's last two dimensions, ``s = 1`` for square kernels).
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_dtype: str = "auto",
        adjust_lr: str | None = "keller",
        *,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-10,
        adamw_weight_decay: float = 0.0,
        foreach: bool | None = None,
    ):
        check_range("momentum", momentum, 0.0, 1.0, high_open=True)
        check_int("ns_steps", ns_steps, 1)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=bool(nesterov),
                        ns_steps=ns_steps, ns_dtype=ns_dtype, adjust_lr=adjust_lr)
        super().__init__(params, defaults, adamw_lr=adamw_lr, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
                         adamw_weight_decay=adamw_weight_decay, foreach=foreach)

    def _init_state(self, group, p, state):
        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _precondition(self, group, params, grads, states):
        bufs = [st["momentum_buffer"] for st in states]
        return nesterov_momentum(grads, bufs, group["momentum"], group["nesterov"],
                                 self._use_foreach(group["foreach"], params))

    def _transform(self, group, U, rows):
        return newton_schulz(U, group["ns_steps"], dtype=ns_compute_dtype(group["ns_dtype"], U.device))
