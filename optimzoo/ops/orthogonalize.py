"""Orthogonalization: the polar factor ``U V^T`` of a matrix, by Newton-Schulz or exactly.

One implementation for every caller: Muon, NorMuon, Hybrid-AuON, SWAN's whitening option and
Lion-K's ``nuclear`` kappa. Inputs may be a single matrix ``(m, n)`` or a stack ``(..., m, n)`` of
same-shape matrices; a stack is processed by one chain of batched matmuls rather than a Python loop.
"""

from __future__ import annotations

import torch

__all__ = ["MUON_COEFFICIENTS", "NS_DTYPES", "newton_schulz", "ns_compute_dtype", "orthogonalize", "polar_factor"]

#: Keller Jordan's quintic coefficients (a, b, c): p(x) = a x + b x^3 + c x^5, tuned so that 5 steps
#: push singular values in (0, 1] into roughly [0.7, 1.2] as fast as possible (KellerJordan/Muon).
MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


#: the ``ns_dtype`` choices of the optimizers that run Newton-Schulz-type iterations
NS_DTYPES = ("auto", "bfloat16", "float32")


def ns_compute_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The compute dtype of Newton-Schulz-type iterations for a ``ns_dtype`` choice.

    ``"auto"`` is bf16 on accelerators (as Muon: the iteration is robust to bf16 and tensor cores make
    it fast) and float32 on CPUs, where bf16 matmuls are emulated unless the CPU has native bf16
    (AVX512-BF16/AMX): on the 2-core AVX2 machine this project is tested on, a 512x1376 @ 1376x512
    matmul takes 846 ms in bf16 and 7.6 ms in float32.
    """
    if choice == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[choice]


def newton_schulz(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] | list[tuple[float, float, float]] = MUON_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype | None = torch.bfloat16,
) -> torch.Tensor:
    """Approximate polar factor of ``G`` (or of each matrix of a stack) by quintic Newton-Schulz.

    Follows ``zeropower_via_newtonschulz5`` of KellerJordan/Muon: cast to ``dtype``, work on the wide
    orientation (transpose when rows > cols, so the Gram matrix is the small one), normalize by the
    Frobenius norm (+``eps``) so the spectral norm is at most 1, then ``steps`` times
    ``A = X X^T; B = b A + c A A; X = a X + B X``. With the default coefficients the output's singular
    values lie roughly in [0.5, 1.5] rather than exactly at 1, which Muon tolerates.

    Args:
        G: ``(m, n)`` or ``(..., m, n)``.
        steps: iterations (>= 0).
        coefficients: one ``(a, b, c)`` for every step, or a list with one triple per step.
        eps: added to the Frobenius norm (a zero matrix maps to zero).
        dtype: compute dtype (bf16 by default, as Muon; ``None`` keeps ``G``'s dtype).

    Returns:
        A tensor of ``G``'s shape in the compute dtype.
    """
    if G.dim() < 2:
        raise ValueError(f"newton_schulz needs a matrix or a stack of matrices, got shape {tuple(G.shape)}")
    if isinstance(coefficients, tuple) and len(coefficients) == 3 and not isinstance(coefficients[0], (tuple, list)):
        schedule = [coefficients] * steps
    else:
        schedule = list(coefficients)
        if len(schedule) != steps:
            raise ValueError(f"got {len(schedule)} coefficient triples for {steps} steps")
    X = G.to(dtype) if dtype is not None else G
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + eps)
    batched = X.dim() > 2
    if batched:
        lead = X.shape[:-2]
        X = X.reshape(-1, *X.shape[-2:])
    for a, b, c in schedule:
        A = X @ X.mT
        if c == 0:  # a cubic step (e.g. SWAN's whitening): no A @ A
            B = A.mul_(b)
        elif batched:
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        else:
            B = torch.addmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0) if batched else torch.addmm(X, B, X, beta=a, alpha=1.0)
    if batched:
        X = X.reshape(*lead, *X.shape[-2:])
    if tall:
        X = X.mT
    return X


def polar_factor(G: torch.Tensor) -> torch.Tensor:
    """Exact polar factor ``U V^T`` from the reduced SVD ``G = U S V^T`` (batched), in float32.

    For tests and small matrices; for rank-deficient inputs the factor on the null space is
    arbitrary (whatever the SVD returns).
    """
    U, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)
    return U @ Vh


def orthogonalize(
    G: torch.Tensor,
    method: str = "newton_schulz",
    steps: int = 5,
    coefficients: tuple[float, float, float] | list[tuple[float, float, float]] = MUON_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype | None = torch.bfloat16,
) -> torch.Tensor:
    """Polar factor of ``G`` by ``method``: ``"newton_schulz"`` (see :func:`newton_schulz`) or ``"svd"``."""
    if method == "newton_schulz":
        return newton_schulz(G, steps, coefficients, eps, dtype)
    if method == "svd":
        return polar_factor(G)
    raise ValueError(f"Invalid method: {method!r} (method must be 'newton_schulz' or 'svd')")
