r"""Gradient whitening ``(G G^T)^{-1/2} G`` (SWAN's GradWhitening): by Newton-Schulz, coupled or not, or exactly.

For a full-rank ``G`` with ``m <= n`` (the short side; tall matrices are transposed, whitened and
transposed back) ``(G G^T)^{-1/2} G = U V^T``, the polar factor of the reduced SVD ``G = U S V^T``.

SWAN (Ma et al., arXiv 2412.13148; our notes, ALGORITHMS.md section 3) computes it with the coupled
Newton-Schulz iteration for the inverse square root of ``A = X X^T``, ``X = G / (||G||_F + eps)``:

.. code-block:: text

    Y_0 = X X^T,  Z_0 = I
    T_k = 3 I - Z_{k-1} Y_{k-1};   Y_k = beta Y_{k-1} T_k;   Z_k = beta T_k Z_{k-1}
    return Z_K X

All these matrices are functions of ``A``, so in exact arithmetic ``Z_k X = X_k`` with
``X_k = beta (3 X_{k-1} - X_{k-1} X_{k-1}^T X_{k-1})``: the cubic Newton-Schulz polar iteration, and on
every singular value ``sigma`` of ``X`` the output singular value follows ``u_k = beta u_{k-1} (3 - u_{k-1}^2)``,
``u_0 = sigma``. With ``beta = 1/2`` this converges quadratically to 1 for ``0 < sigma < sqrt(3)`` (exact
whitening in the limit; a small ``sigma`` needs about ``log(1/sigma) / log(1.5)`` steps to get there);
with ``beta = 0.8, K = 10`` (the 3rd-party "standard" setting) it does not converge but maps
``[1e-3, 1]`` into roughly ``[0.56, 1.6]``, a Muon-like approximate orthogonalization. Zero singular
values stay zero.

Two implementations of the same map:

* ``"newton_schulz"`` (default) iterates on ``X`` itself: it is the project's one Newton-Schulz,
  :func:`optimzoo.ops.orthogonalize.newton_schulz`, with the cubic coefficients
  ``(a, b, c) = (3 beta, -beta, 0)``, in float32. Numerically stable: rounding errors only move
  singular values, which the scalar map then treats as any other.
* ``"coupled"`` is the literal ``Y, Z`` recursion above. When the iteration does not converge
  (``beta = 0.8``) it is numerically unstable in float32: rounding breaks ``Y = A Z`` and the
  commutator error grows about 4-8x per step (measured on a 40 x 24 GradNorm'd gradient: 5e-3 after 10
  steps, non-finite after 15; on 512 x 512 with many small singular values its error against a float64
  reference is 1.9e-3 at ``K = 10`` where the uncoupled form's is 1.2e-5). Kept for comparison.

Both are batched over leading dimensions and always run in float32 (the paper: "for the
GradWhitening step ... we use FP32"). Cost per step for ``m <= n``: ``2 m^2 n + m^3`` flops-pairs for
``"newton_schulz"`` (the shared kernel also forms ``A^2``, unused with ``c = 0``), ``3 m^3`` (+ ``2 m^2 n`` once)
for ``"coupled"``.
"""

from __future__ import annotations

import torch

from .orthogonalize import newton_schulz

__all__ = ["WHITENING_METHODS", "whiten", "whiten_coupled", "whiten_exact", "whiten_newton_schulz"]

WHITENING_METHODS = ("newton_schulz", "coupled", "exact")


def whiten_newton_schulz(G: torch.Tensor, steps: int = 10, beta: float = 0.8, eps: float = 1e-8) -> torch.Tensor:
    """Approximate ``(G G^T)^{-1/2} G`` of ``G`` (or of each matrix of a stack) by cubic Newton-Schulz.

    ``X <- beta (3 X - X X^T X)`` from ``X = G / (||G||_F + eps)``, ``steps`` times, on the wide
    orientation: :func:`optimzoo.ops.orthogonalize.newton_schulz` with coefficients ``(3 beta, -beta, 0)``
    in float32. Equal in exact arithmetic to the coupled iteration (:func:`whiten_coupled`), and stable.

    Args:
        G: ``(m, n)`` or ``(..., m, n)``.
        steps: iterations ``K`` (>= 0; 0 returns ``G / (||G||_F + eps)``).
        beta: the step factor (1/2: convergent Newton-Schulz; 0.8: SWAN's 3rd-party default).
        eps: added to the Frobenius norm (a zero matrix maps to zero).

    Returns:
        A float32 tensor of ``G``'s shape.
    """
    if G.dim() < 2:
        raise ValueError(f"whiten needs a matrix or a stack of matrices, got shape {tuple(G.shape)}")
    if steps < 0:
        raise ValueError(f"Invalid steps: {steps!r} (steps must be >= 0)")
    return newton_schulz(G, steps, (3.0 * beta, -beta, 0.0), eps=eps, dtype=torch.float32)


def whiten_coupled(G: torch.Tensor, steps: int = 10, beta: float = 0.8, eps: float = 1e-8) -> torch.Tensor:
    """Approximate ``(G G^T)^{-1/2} G`` by the literal coupled ``Y, Z`` Newton-Schulz iteration (see the module
    docstring; unstable in float32 for ``beta`` far from 1/2 and many steps).

    Args:
        G: ``(m, n)`` or ``(..., m, n)``.
        steps: iterations ``K`` (>= 0; 0 returns ``G / (||G||_F + eps)``).
        beta: the step factor (1/2: convergent Newton-Schulz; 0.8: SWAN's 3rd-party default).
        eps: added to the Frobenius norm (a zero matrix maps to zero).

    Returns:
        A float32 tensor of ``G``'s shape.
    """
    if G.dim() < 2:
        raise ValueError(f"whiten needs a matrix or a stack of matrices, got shape {tuple(G.shape)}")
    if steps < 0:
        raise ValueError(f"Invalid steps: {steps!r} (steps must be >= 0)")
    shape = G.shape
    X = G.to(torch.float32)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X.reshape(-1, *X.shape[-2:])
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + eps)
    if steps:
        k = X.size(-2)
        eye3 = torch.eye(k, dtype=X.dtype, device=X.device).mul_(3.0).expand(X.size(0), k, k)
        Y = torch.bmm(X, X.mT)
        Z = None  # Z_0 = I: the first step needs no product with it
        for _ in range(steps):
            T = eye3 - Y if Z is None else torch.baddbmm(eye3, Z, Y, alpha=-1.0)
            Y = torch.bmm(Y, T).mul_(beta)
            Z = T.mul(beta) if Z is None else torch.bmm(T, Z).mul_(beta)
        X = torch.bmm(Z, X)
    if tall:
        X = X.mT
    return X.reshape(shape)


def whiten_exact(G: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """``(G G^T)^{+1/2} G = U 1[S > tol] V^T`` from the SVD ``G = U S V^T`` (batched, float32).

    The pseudo-inverse form: directions with singular value at most ``rtol * max(S)`` (default
    ``max(m, n) * float32 eps``, as ``torch.linalg.pinv``) map to zero, as they do under Newton-Schulz,
    so a rank-deficient ``G`` gets no update along its null space. This matters for SWAN: GradNorm
    centres every row, so for ``m >= n`` its output always has rank ``<= n - 1`` (the all-ones input
    direction is in the null space), besides dead neurons' zero rows. For full-rank ``G`` this is the
    polar factor :func:`optimzoo.ops.orthogonalize.polar_factor`. For tests and small matrices.
    """
    if G.dim() < 2:
        raise ValueError(f"whiten needs a matrix or a stack of matrices, got shape {tuple(G.shape)}")
    U, S, Vh = torch.linalg.svd(G.to(torch.float32), full_matrices=False)
    if rtol is None:
        rtol = max(G.shape[-2:]) * torch.finfo(torch.float32).eps
    keep = S > rtol * S.amax(dim=-1, keepdim=True)
    return (U * keep.unsqueeze(-2).to(U.dtype)) @ Vh


def whiten(
    G: torch.Tensor,
    method: str = "newton_schulz",
    steps: int = 10,
    beta: float = 0.8,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``(G G^T)^{-1/2} G`` by ``method``: ``"newton_schulz"`` (:func:`whiten_newton_schulz`), ``"coupled"``
    (:func:`whiten_coupled`), both with ``steps``, ``beta``, ``eps``, or ``"exact"`` (:func:`whiten_exact`;
    the others are ignored). Float32 result."""
    if method == "newton_schulz":
        return whiten_newton_schulz(G, steps, beta, eps)
    if method == "coupled":
        return whiten_coupled(G, steps, beta, eps)
    if method == "exact":
        return whiten_exact(G)
    raise ValueError(f"Invalid method: {method!r} (method must be one of {', '.join(map(repr, WHITENING_METHODS))})")
