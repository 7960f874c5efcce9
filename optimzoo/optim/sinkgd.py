"""SinkGD: gradient multi-normalization by square-root Sinkhorn (stateless).

Meyer Scetbon, Chao Ma, Wenbo Gong, Edward Meeds, "Gradient Multi-Normalization for Efficient LLM
Training" (arXiv 2502.06742; NeurIPS 2025), Algorithms 3 (SR-Sinkhorn) and 4 (SinkGD). No official code
has been released; the operator follows the paper's notation as restated by third-party
implementations (ALGORITHMS.md section 4).
"""

from __future__ import annotations

from ..ops.normalize import sr_sinkhorn
from ._base import check_int, check_range
from ._matrix import MatrixOptimizer

__all__ = ["SinkGD"]


class SinkGD(MatrixOptimizer):
    r"""SinkGD for hidden matrices (no optimizer state), AdamW for the other parameters.

    For each hidden weight ``W`` (``m x n``; conv filters flattened to ``(out, -1)``) with gradient ``G``
    (the raw gradient of this step: no momentum, no second moment):

    .. math::
        X_0 &= G; \quad \text{for } l = 1..L: \quad
            X \leftarrow \sqrt{n}\, Q(X)^{-1} X, \quad X \leftarrow \sqrt{m}\, X R(X)^{-1} \\
        W &\leftarrow W (1 - \eta\lambda) - \eta\, X_L

    with ``Q(X)``, ``R(X)`` the diagonal matrices of row and column l2 norms (clamped at ``eps``), i.e.
    :func:`optimzoo.ops.normalize.sr_sinkhorn`: every column of the update has norm exactly
    ``sqrt(m)`` and every row approximately ``sqrt(n)`` (RMS about 1). Norms and the iteration run in
    float32. Same-shape matrices are processed as one batch. On FSDP2 row shards each rank normalizes
    its own rows and all-reduces the column norms (exact, and cheaper than the owner-based exchange). Matrix parameters keep no state at all;
    vector parameters (embeddings, LM head, gains, biases) take an AdamW step (see
    :class:`MatrixOptimizer`).

    Args:
        params: parameters or groups; use ``optimzoo.create_optimizer(model, "sinkgd")`` for routing.
        lr: learning rate of matrix groups (default 1e-3: the third-party "paper" configuration uses
            ``0.05 x`` a global (Adam) lr of 0.02 on the linear layers).
        iterations: Sinkhorn rounds ``L`` (default 5; the paper's ablation finds L=1 cheaper with a minor
            loss).
        eps: lower bound of the row and column norms (default 1e-8, third-party; the paper has none).
        weight_decay: decoupled weight decay of matrix groups (default 0; not part of the paper's
            algorithm).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay, foreach, batch_budget: see
            :class:`MatrixOptimizer`.
            (The paper's runs use Adam with the global lr, 0.02 in the third-party configuration.)
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        iterations: int = 5,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-10,
        adamw_weight_decay: float | None = None,
        foreach: bool | None = None,
        batch_budget: float | None = None,
    ):
        check_int("iterations", iterations, 1)
        check_range("eps", eps, 0.0, low_open=True)
        defaults = dict(lr=lr, iterations=iterations, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, adamw_lr=adamw_lr, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
                         adamw_weight_decay=adamw_weight_decay, foreach=foreach, batch_budget=batch_budget)

    def _transform(self, group, U, rows):
        return sr_sinkhorn(U, group["iterations"], group["eps"])

    def _transform_row_blocks(self, group, X, rows, col_sum):
        """Stage 2 on row shards (FSDP2): rows are whole on every rank, so each rank normalizes its own
        block and only the column sums of squares are all-reduced (``n`` values per matrix and
        iteration) instead of moving whole matrices to an owner."""
        return sr_sinkhorn(X, group["iterations"], group["eps"], rows=rows, col_sum=col_sum)
