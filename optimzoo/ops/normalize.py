"""Row, column and Frobenius normalizations of matrices: SinkGD's SR-Sinkhorn, SWAN's GradNorm, AuON's brake.

Pure functions, no optimizer state. Each takes a matrix ``(m, n)`` or a stack ``(..., m, n)`` of
same-shape matrices and treats every matrix of the stack on its own (reductions run over the last
one or two dimensions only), so optimizers call them once per stack of same-shape weights.

Layout: PyTorch's ``(rows, cols) = (out_features, in_features)``. "Row-wise" reduces over the ``n``
columns (one statistic per output neuron), "column-wise" over the ``m`` rows.

Precision: statistics (norms, means, variances) are computed in float32 or better, and the result is
float32 for bf16/fp16/fp32 inputs (float64 stays float64); callers cast back to the parameter dtype.

Reductions that span rows (column norms, Frobenius norms, the brake's global mean) need the whole
matrix. The matrix optimizers call these functions from ``MatrixOptimizer._transform``, which always
receives full matrices (under FSDP2 each matrix is assembled on one owner rank first), so no
cross-rank reduction hook is needed here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = [
    "col_normalize",
    "cosh_rms",
    "cosh_rms_brake",
    "frobenius_normalize",
    "row_normalize",
    "row_standardize",
    "sr_sinkhorn",
]


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _check_matrix(name: str, X: torch.Tensor) -> None:
    if X.dim() < 2:
        raise ValueError(f"{name} needs a matrix or a stack of matrices, got shape {tuple(X.shape)}")


def row_normalize(X: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale every row to l2 norm ``sqrt(n)`` (row RMS 1): ``sqrt(n) * X_i / max(||X_i||, eps)``.

    A zero row stays zero. Returns a new float32 (or float64) tensor.
    """
    _check_matrix("row_normalize", X)
    X = X.to(_work_dtype(X))
    norms = torch.linalg.vector_norm(X, dim=-1, keepdim=True).clamp_min_(eps)
    return X * (math.sqrt(X.size(-1)) / norms)


def col_normalize(X: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale every column to l2 norm ``sqrt(m)`` (column RMS 1): ``sqrt(m) * X_:j / max(||X_:j||, eps)``.

    A zero column stays zero. Returns a new float32 (or float64) tensor.
    """
    _check_matrix("col_normalize", X)
    X = X.to(_work_dtype(X))
    norms = torch.linalg.vector_norm(X, dim=-2, keepdim=True).clamp_min_(eps)
    return X * (math.sqrt(X.size(-2)) / norms)


def _col_norms(X: torch.Tensor, col_sum: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    if col_sum is None:
        return torch.linalg.vector_norm(X, dim=-2, keepdim=True)
    return col_sum(X.square().sum(dim=-2, keepdim=True)).sqrt_()


def sr_sinkhorn(X: torch.Tensor, iterations: int = 5, eps: float = 1e-8, *, rows: int | None = None,
                col_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    r"""Square-root Sinkhorn multi-normalization (SinkGD, Scetbon et al., arXiv 2502.06742, Alg. 3).

    ``iterations`` times: rows to l2 norm ``sqrt(n)``, then columns to l2 norm ``sqrt(m)``
    (:func:`row_normalize` then :func:`col_normalize`; norms clamped at ``eps`` so zero rows and
    columns stay zero). The order matters: after any number of iterations every non-zero column has
    norm exactly ``sqrt(m)`` (the last sub-step), and the row norms approach ``sqrt(n)`` as the
    iteration converges to the fixed point where both hold (``||X||_F = sqrt(mn)``, RMS 1).

    Args:
        X: ``(m, n)`` or ``(..., m, n)``.
        iterations: ``L`` (>= 0; 0 returns a float32 copy).
        eps: lower bound of every row and column norm.
        rows, col_sum: for ``X`` a block of whole rows of a larger matrix (an FSDP2 row shard): the full
            matrix's row count, and a function summing a ``(..., 1, n)`` tensor of per-block column sums
            of squares over all blocks (an all-reduce). Row normalization needs no communication.

    Returns:
        A new float32 (float64 for float64 input) tensor of ``X``'s shape.
    """
    _check_matrix("sr_sinkhorn", X)
    if iterations < 0:
        raise ValueError(f"Invalid iterations: {iterations!r} (iterations must be >= 0)")
    X = X.to(_work_dtype(X), copy=True)
    root_m, root_n = math.sqrt(X.size(-2) if rows is None else rows), math.sqrt(X.size(-1))
    for _ in range(iterations):
        X.mul_(torch.linalg.vector_norm(X, dim=-1, keepdim=True).clamp_min_(eps).reciprocal_().mul_(root_n))
        X.mul_(_col_norms(X, col_sum).clamp_min_(eps).reciprocal_().mul_(root_m))
    return X


def row_standardize(G: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    r"""SWAN's GradNorm: standardize every row over the input dimension.

    .. math:: \mathrm{GradNorm}(G)_{ij} = (G_{ij} - \bar g_i) / (s_i + \epsilon), \quad
              \bar g_i = \tfrac1n \textstyle\sum_j G_{ij},\ s_i = \sqrt{\tfrac1n \sum_j (G_{ij} - \bar g_i)^2}

    (population standard deviation). Without ``eps`` every row has mean 0 and norm ``sqrt(n)``, so
    ``||GradNorm(G)||_F = sqrt(mn)``; a constant row (zero variance) maps to zeros.

    Returns a new float32 (or float64) tensor.
    """
    _check_matrix("row_standardize", G)
    G = G.to(_work_dtype(G))
    var, mean = torch.var_mean(G, dim=-1, keepdim=True, correction=0)
    return (G - mean).div_(var.sqrt_().add_(eps))


def frobenius_normalize(X: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``X / (||X||_F + eps)`` for every matrix of a stack (a zero matrix stays zero); float32 result."""
    _check_matrix("frobenius_normalize", X)
    X = X.to(_work_dtype(X))
    return X / torch.linalg.matrix_norm(X, keepdim=True).add_(eps)


def cosh_rms(X: torch.Tensor) -> torch.Tensor:
    r"""``sqrt(mean(cosh(X)^2))`` over each matrix, shape ``(..., 1, 1)``, float32 (AuON's brake factor).

    ``cosh(x)^2 >= 1``, so the result is >= 1; for a Frobenius-normalized ``X`` with ``N`` spread-out
    entries it is ``~ sqrt(1 + 1/N)`` and grows only when a few entries carry O(1) of the mass.
    """
    _check_matrix("cosh_rms", X)
    X = X.to(_work_dtype(X))
    return torch.cosh(X).square_().mean(dim=(-2, -1), keepdim=True).sqrt_()


def cosh_rms_brake(
    X: torch.Tensor,
    gamma: float = 1.0,
    normalize: bool = False,
    norm_eps: float = 1e-7,
    eps: float = 1e-8,
) -> torch.Tensor:
    r"""AuON's cosh-RMS brake: ``X / (r + eps)`` with ``r = sqrt(mean(cosh(gamma * S)^2))``.

    ``S = X`` (``normalize=False``, the paper's form, where ``X`` is already Frobenius-normalized or a
    Newton-Schulz output), or ``S = X / (||X||_F + norm_eps)`` (``normalize=True``, the packaged form,
    where ``X`` is the raw momentum and keeps its scale). Per matrix of a stack.

    * AuON (paper): ``cosh_rms_brake(frobenius_normalize(U))``.
    * AuON (package ``ryyzn9/AuON`` ``auon/optimizer.py``): ``cosh_rms_brake(U, gamma=1.5, normalize=True)``.
    * Hybrid-AuON: the same with ``X = NS(U)``.

    Returns a new float32 (or float64) tensor.
    """
    _check_matrix("cosh_rms_brake", X)
    X = X.to(_work_dtype(X))
    S = frobenius_normalize(X, norm_eps) if normalize else X
    r = cosh_rms(S * gamma if gamma != 1.0 else S)
    return X / r.add_(eps)
