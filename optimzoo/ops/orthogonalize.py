"""Orthogonalization: the polar factor ``U V^T`` of a matrix, by Newton-Schulz or exactly.

One implementation for every caller: Muon, NorMuon, Hybrid-AuON, SWAN's whitening option and
Lion-K's ``nuclear`` kappa. Inputs may be a single matrix ``(m, n)`` or a stack ``(..., m, n)`` of
same-shape matrices; a stack is processed by one chain of batched matmuls rather than a Python loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["MUON_COEFFICIENTS", "NS_COEFFICIENTS", "NS_DTYPES", "POLAR_EXPRESS_COEFFICIENTS", "cpu_has_native_bf16",
           "newton_schulz", "newton_schulz_bytes", "ns_compute_dtype", "ns_schedule", "orthogonalize",
           "polar_factor"]

Triple = tuple[float, float, float]

#: Keller Jordan's quintic coefficients (a, b, c): p(x) = a x + b x^3 + c x^5, tuned so that 5 steps
#: push singular values in (0, 1] into roughly [0.7, 1.2] as fast as possible (KellerJordan/Muon).
MUON_COEFFICIENTS: Triple = (3.4445, -4.7750, 2.0315)

# "Polar Express" (Amsel, Persson, Musco, Gower, arXiv 2505.16932): one quintic per iteration, each the
# minimax-optimal one for the interval the previous ones leave, as used by the NorMuon records of
# KellerJordan/modded-nanogpt (``polar_express_coeffs`` in ``train_gpt.py`` at commit 93f0e6b9373b,
# "computed for num_iters=5, safety_factor=2e-2, cushion=2"). That code divides ``X`` by
# ``1.02 ||X||_F + 1e-6`` before the first iteration: the schedule diverges for a singular value
# above 1 (at 1.05 the fifth iterate is ~1e185), which bf16 rounding can produce for a nearly rank-one
# matrix. :func:`newton_schulz` divides by ``||X||_F + eps``, so the 1.02 is folded into the first
# triple here: ``p(x / s) = (a / s) x + (b / s^3) x^3 + (c / s^5) x^5`` with ``s = 1.02``.
_POLAR_EXPRESS_SOURCE: tuple[Triple, ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
_POLAR_EXPRESS_SAFETY = 1.02
_a, _b, _c = _POLAR_EXPRESS_SOURCE[0]
#: the Polar Express schedule: 5 triples, one per iteration (see above)
POLAR_EXPRESS_COEFFICIENTS: tuple[Triple, ...] = (
    (_a / _POLAR_EXPRESS_SAFETY, _b / _POLAR_EXPRESS_SAFETY**3, _c / _POLAR_EXPRESS_SAFETY**5),
    *_POLAR_EXPRESS_SOURCE[1:],
)
del _a, _b, _c

#: ``ns_coefficients`` by name: Muon's fixed quintic (the default) and the Polar Express schedule
NS_COEFFICIENTS: dict[str, Triple | tuple[Triple, ...]] = {
    "muon": MUON_COEFFICIENTS,
    "polar_express": POLAR_EXPRESS_COEFFICIENTS,
}

#: the ``ns_dtype`` choices of the optimizers that run Newton-Schulz-type iterations
NS_DTYPES = ("auto", "bfloat16", "float32")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware: AVX512-BF16 or AMX tiles (oneDNN then
    runs bf16 matmuls natively; elsewhere they are emulated through float32 conversions)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def ns_compute_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The compute dtype of Newton-Schulz-type iterations for a ``ns_dtype`` choice.

    ``"auto"`` is bf16 on accelerators (as Muon: the iteration is robust to bf16 and tensor cores make
    it fast) and, on a CPU, bf16 where the CPU multiplies bf16 natively (AVX512-BF16 or AMX,
    :func:`cpu_has_native_bf16`) and float32 elsewhere, where bf16 matmuls are emulated: on a 2-core
    AVX2 EPYC a 512x1376 @ 1376x512 matmul took 846 ms in bf16 and 7.6 ms in float32; on a 2-core
    AVX512-BF16 EPYC (Zen 4) 5 iterations over 8 matrices of 512x1376 took 0.79 s in bf16 and 2.15 s
    in float32. ``"bfloat16"`` and ``"float32"`` are used as given.
    """
    if choice == "auto":
        if torch.device(device).type != "cpu":
            return torch.bfloat16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[choice]


def _is_triple(x) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, str) and len(x) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in x)


def ns_schedule(coefficients: str | Sequence, steps: int | None = None, default_steps: int = 5) -> list[Triple]:
    """The ``(a, b, c)`` of every Newton-Schulz iteration, from ``ns_coefficients`` and ``ns_steps``.

    Args:
        coefficients: a name of :data:`NS_COEFFICIENTS` (``"muon"``, ``"polar_express"``), one
            ``(a, b, c)`` triple, or a non-empty sequence of triples (one per iteration).
        steps: iterations. For one triple: that many repetitions of it (``None``: ``default_steps``).
            For a sequence: its length sets the number of iterations, so ``steps`` must be ``None`` or
            equal to it (a schedule's polynomials are designed together; a prefix or a repetition of
            one is a different iteration, spelled out as a list).
        default_steps: the iterations of one triple when ``steps`` is ``None``.

    Raises:
        ValueError: naming the bad argument and what it accepts.
    """
    given = coefficients
    if isinstance(coefficients, str):
        if coefficients not in NS_COEFFICIENTS:
            raise ValueError(f"Invalid ns_coefficients: {given!r} (a name must be one of "
                             f"{', '.join(map(repr, NS_COEFFICIENTS))}, or pass (a, b, c) or a list of them)")
        coefficients = NS_COEFFICIENTS[coefficients]
    if _is_triple(coefficients):
        triples = None
    elif (isinstance(coefficients, Sequence) and not isinstance(coefficients, str) and len(coefficients) > 0
          and all(_is_triple(t) for t in coefficients)):
        triples = [tuple(float(v) for v in t) for t in coefficients]
    else:
        raise ValueError(f"Invalid ns_coefficients: {given!r} (expected a name "
                         f"({', '.join(map(repr, NS_COEFFICIENTS))}), one (a, b, c) triple of numbers, "
                         "or a non-empty list of such triples, one per iteration)")
    for t in [coefficients] if triples is None else triples:
        if not all(math.isfinite(v) for v in t):
            raise ValueError(f"Invalid ns_coefficients: {given!r} (every a, b, c must be finite)")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ValueError(f"Invalid ns_steps: {steps!r} (ns_steps must be an integer >= 0, or None)")
    if triples is None:
        return [tuple(float(v) for v in coefficients)] * (default_steps if steps is None else steps)
    if steps is not None and steps != len(triples):
        raise ValueError(f"ns_steps={steps} does not match ns_coefficients: a schedule of {len(triples)} "
                         f"triples runs {len(triples)} iterations (pass ns_steps=None or {len(triples)})")
    return triples


def newton_schulz_bytes(m: int, n: int, dtype: torch.dtype = torch.float32) -> int:
    """Peak working memory of :func:`newton_schulz` per ``m x n`` matrix, beyond its input.

    With ``s = min(m, n)``: the cast/normalized iterate and the next one (``2 m n``), and at the peak
    of an iteration the Gram matrix ``A``, ``B = b A + c A A`` and the next ``A`` (``3 s^2``), in ``dtype``.
    """
    s = min(m, n)
    return (2 * m * n + 3 * s * s) * dtype.itemsize


def newton_schulz(
    G: torch.Tensor,
    steps: int | None = None,
    coefficients: str | Triple | Sequence[Triple] = MUON_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype | None = torch.bfloat16,
) -> torch.Tensor:
    """Approximate polar factor of ``G`` (or of each matrix of a stack) by quintic Newton-Schulz.

    Follows ``zeropower_via_newtonschulz5`` of KellerJordan/Muon: cast to ``dtype``, work on the wide
    orientation (transpose when rows > cols, so the Gram matrix is the small one), normalize by the
    Frobenius norm (+``eps``) so the spectral norm is at most 1, then for each ``(a, b, c)`` of the
    schedule (:func:`ns_schedule`) ``A = X X^T; B = b A + c A A; X = a X + B X``. With the default
    coefficients the output's singular values lie roughly in [0.5, 1.5] rather than exactly at 1, which
    Muon tolerates; the ``"polar_express"`` schedule ends in about [0.85, 1.14] for singular values in
    [1e-3, 1] after normalization.

    Args:
        G: ``(m, n)`` or ``(..., m, n)``.
        steps: iterations (>= 0; ``None``: 5 for one triple, the schedule's length for a list).
        coefficients: a name (``"muon"``, ``"polar_express"``), one ``(a, b, c)`` for every step
            (default: :data:`MUON_COEFFICIENTS`), or a list with one triple per step.
        eps: added to the Frobenius norm (a zero matrix maps to zero).
        dtype: compute dtype (bf16 by default, as Muon; ``None`` keeps ``G``'s dtype).

    Returns:
        A tensor of ``G``'s shape in the compute dtype.
    """
    if G.dim() < 2:
        raise ValueError(f"newton_schulz needs a matrix or a stack of matrices, got shape {tuple(G.shape)}")
    schedule = ns_schedule(coefficients, steps)
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
    steps: int | None = None,
    coefficients: str | Triple | Sequence[Triple] = MUON_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype | None = torch.bfloat16,
) -> torch.Tensor:
    """Polar factor of ``G`` by ``method``: ``"newton_schulz"`` (see :func:`newton_schulz`) or ``"svd"``."""
    if method == "newton_schulz":
        return newton_schulz(G, steps, coefficients, eps, dtype)
    if method == "svd":
        return polar_factor(G)
    raise ValueError(f"Invalid method: {method!r} (method must be 'newton_schulz' or 'svd')")
