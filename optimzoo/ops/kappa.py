"""Lion-K's gradient maps ``kappa = grad K``: pure functions of one tensor (the interpolated momentum).

Lion-K (Chen, Liu, Liang, Liu, "Lion Secretly Solves Constrained Optimization: As Lyapunov Predicts",
ICLR 2024, arXiv 2310.05898) replaces Lion's ``sign`` by the gradient of a convex function ``K``.
For a norm ``K`` the dynamics solve ``min f(x) s.t. ||x||_dual <= 1/lambda`` (Lion: the box
``||x||_inf <= 1/lambda``). There is no official code; the maps below are standard convex analysis
for the ``K`` of the paper's Table 2 (see ALGORITHMS.md section 8b), and the nuclear map follows
Qiang Liu's note "Muon is a Nuclear Lion King" (``grad ||X||_* = U V^T``, the polar factor).

=================  ======================================  ==================================================
name               ``K(x)``                                ``kappa(x) = grad K(x)``
=================  ======================================  ==================================================
``sign``           ``||x||_1``                             ``sign(x)`` (Lion)
``l2``             ``||x||_2``                             ``x / ||x||_2``
``lp``             ``||x||_p``, ``p in [1, inf)``          ``sign(x) |x|^(p-1) / ||x||_p^(p-1)``
``huber``          ``sum Huber_a(x_i)``                    ``clip(x, -a, a) / a``
``tanh``           ``sum (1/a) log cosh(a x_i)``           ``tanh(a x)``
``relativistic``   ``sum sqrt(x_i^2 + a^2)``               ``x / sqrt(x^2 + a^2)``
``nuclear``        ``||X||_*`` (``X`` = ``x`` as a matrix)  ``U V^T`` (Newton-Schulz), ``sign`` for 1-D ``x``
=================  ======================================  ==================================================

``Huber_a(t) = t^2 / (2a)`` for ``|t| <= a`` and ``|t| - a/2`` otherwise. Every ``K`` is even, so every
``kappa`` is odd (``kappa(-x) = -kappa(x)``): this is what lets the optimizer use Lion's sign convention
(momentum of ``+g``, step ``-lr kappa(.)``) for the paper's negative-gradient momentum.

Norms are over the *whole* tensor (one parameter tensor is one ``x``). All whole-tensor reductions
go through :func:`tensor_sum` and :func:`tensor_abs_max`, which are exact on row-sharded (FSDP2)
``DTensor`` s too (local reduction plus an all-reduce, :mod:`optimzoo.ops.reduce`); every map
but ``nuclear`` (which needs the whole matrix) therefore runs on shards as they are.

Zero inputs map to zero (``0/0 -> 0``, never NaN). Non-finite inputs are never masked: an element
that is NaN or infinite gives NaN (``sign``, ``huber``, ``tanh``, ``relativistic``: that element; the
norms ``l2``, ``lp`` and ``nuclear``: the whole tensor, or matrix of a stack), where ``torch.sign``,
``clamp`` and ``tanh`` alone would give 0 or +-1 and an optimizer would go on stepping silently.
The element-wise maps add ``0 * x`` for this (``+-0`` for a finite ``x``, NaN otherwise): the finite
results are bitwise those of the plain formulas. Scalars ``p`` and ``a`` may be Python floats or 0-d
tensors (the fused optimizer kernel passes tensors, so one compiled kernel serves every value). The
functions keep the input's dtype; the optimizer calls them on float32 values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .reduce import global_amax, global_sum
from .orthogonalize import newton_schulz

__all__ = [
    "KAPPAS",
    "kappa_grad",
    "kappa_grad_foreach",
    "kappa_huber",
    "kappa_l2",
    "kappa_lp",
    "kappa_nuclear",
    "kappa_nuclear_stack",
    "kappa_relativistic",
    "kappa_sign",
    "kappa_tanh",
    "tensor_abs_max",
    "tensor_l2_norm",
    "tensor_lp_norm",
    "tensor_sum",
]

Scalar = float | torch.Tensor


# --------------------------------------------------------------------------------------------
# Whole-tensor reductions, shared by every optimizer that needs one (Lion-K, SPAM, Stable-SPAM).
# Under FSDP a parameter is sharded: these all-reduce across the shards (SUM, MAX).
# --------------------------------------------------------------------------------------------


def tensor_sum(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sum of all elements of ``x`` (0-d), accumulated in ``dtype`` if given."""
    return global_sum(x, dtype)


def tensor_abs_max(x: torch.Tensor) -> torch.Tensor:
    """``max_i |x_i|`` over the whole tensor (0-d); ``x`` must not be empty (a shard may be)."""
    return global_amax(x.abs())


def tensor_l2_norm(x: torch.Tensor) -> torch.Tensor:
    """``||x||_2`` over the whole tensor (0-d), from :func:`tensor_sum`."""
    return tensor_sum(x * x).sqrt()


def tensor_lp_norm(x: torch.Tensor, p: Scalar) -> torch.Tensor:
    """``||x||_p = (sum |x_i|^p)^(1/p)`` over the whole tensor (0-d), from :func:`tensor_sum`."""
    return tensor_sum(x.abs().pow(p)).pow(1.0 / p)


def _nonzero(n: torch.Tensor) -> torch.Tensor:
    """``n`` clamped to the smallest normal number: a zero divisor then gives ``0 / tiny = 0``, not NaN.

    Only ever used where the numerator is zero whenever ``n`` is.
    """
    return n.clamp_min(torch.finfo(n.dtype).tiny)


def _scaled(x: torch.Tensor) -> torch.Tensor:
    """``x / max|x|`` (zero stays zero): the scale-invariant maps work on values in [-1, 1], so norms
    neither overflow nor underflow whatever the gradient's scale."""
    return x / _nonzero(tensor_abs_max(x))


# --------------------------------------------------------------------------------------------
# The maps
# --------------------------------------------------------------------------------------------


def _keep_nonfinite_(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y + 0 * x`` in place: ``y`` where ``x`` is finite (adding ``+-0`` changes no finite value), NaN
    where ``x`` is NaN or infinite. One fused pass; Inductor keeps it (``0 * x`` is not folded)."""
    return y.add_(x, alpha=0.0)


def kappa_sign(x: torch.Tensor) -> torch.Tensor:
    """``grad ||x||_1 = sign(x)`` (``sign(0) = 0``, as ``torch.sign``): Lion. NaN where ``x`` is NaN or
    infinite (``torch.sign`` alone maps NaN to 0, which would freeze the weight silently)."""
    return _keep_nonfinite_(torch.sign(x), x)


def kappa_l2(x: torch.Tensor) -> torch.Tensor:
    """``grad ||x||_2 = x / ||x||_2`` (normalized momentum); ``0 -> 0``."""
    if x.numel() == 0:
        return torch.zeros_like(x)
    y = _scaled(x)
    return y / _nonzero(tensor_l2_norm(y))


def kappa_lp(x: torch.Tensor, p: Scalar) -> torch.Tensor:
    """``grad ||x||_p = sign(x) |x|^(p-1) / ||x||_p^(p-1) = sign(x) (|x| / ||x||_p)^(p-1)``, ``p >= 1``.

    ``p = 1`` gives ``sign(x)`` (Lion), ``p = 2`` gives ``x / ||x||_2``; ``0 -> 0``. Computed on
    ``x / max|x|`` (the map is scale-invariant), so ``|x|^p`` cannot overflow for large ``p``.
    """
    if x.numel() == 0:
        return torch.zeros_like(x)
    y = _scaled(x)
    r = y.abs() / _nonzero(tensor_lp_norm(y, p))
    return torch.sign(y) * r.pow(p - 1)


def kappa_huber(x: torch.Tensor, a: Scalar) -> torch.Tensor:
    """``grad sum Huber_a(x_i) = clip(x, -a, a) / a`` (a "soft sign": linear inside ``[-a, a]``), ``a > 0``."""
    return _keep_nonfinite_(torch.clamp(x, -a, a) / a, x)


def kappa_tanh(x: torch.Tensor, a: Scalar) -> torch.Tensor:
    """``grad sum (1/a) log cosh(a x_i) = tanh(a x)`` (the paper's "entropy" K), ``a > 0``."""
    return _keep_nonfinite_(torch.tanh(x * a), x)


def kappa_relativistic(x: torch.Tensor, a: Scalar) -> torch.Tensor:
    """``grad sum sqrt(x_i^2 + a^2) = x / sqrt(x^2 + a^2)`` (relativistic kinetic energy), ``a > 0``.

    Computed as ``x / hypot(x, a)``, which neither overflows nor underflows.
    """
    if not isinstance(a, torch.Tensor):
        a = torch.tensor(a, dtype=x.dtype, device=x.device)
    return x / torch.hypot(x, a)


def kappa_nuclear(x: torch.Tensor, ns_steps: int = 5, ns_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``grad ||X||_* = U V^T``, the polar factor of ``X = x.reshape(x.size(0), -1)``, by Newton-Schulz.

    Tensors with ``ndim >= 2`` are viewed as the matrix ``(size(0), numel / size(0))`` (conv filters
    ``(out, in, kh, kw)`` -> ``(out, in*kh*kw)``), orthogonalized by
    :func:`optimzoo.ops.orthogonalize.newton_schulz` (Muon's quintic iteration, ``ns_steps`` steps,
    compute dtype ``ns_dtype``; ``None`` keeps ``x``'s dtype) and reshaped back. With Muon's
    coefficients the singular values of the result lie roughly in [0.7, 1.2], not exactly at 1.

    ``X`` is first divided by ``max|X|`` (the polar factor is scale-invariant), so Newton-Schulz's
    ``1e-7`` epsilon never shrinks a small momentum; a zero matrix maps to zero.

    **1-D (and 0-d) tensors fall back to** ``sign(x)``: as a ``1 x n`` matrix a vector's polar factor is
    ``x / ||x||_2``, a very different step size from ``U V^T`` of a hidden matrix, so vectors (gains,
    biases) get plain Lion, as Muon gives them AdamW.
    """
    if x.dim() < 2:
        return kappa_sign(x)
    if x.numel() == 0:
        return torch.zeros_like(x)
    X = _scaled(x.reshape(x.size(0), -1))
    return newton_schulz(X, ns_steps, dtype=ns_dtype).reshape(x.shape).to(x.dtype)


def kappa_nuclear_stack(X: torch.Tensor, ns_steps: int = 5, ns_dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`kappa_nuclear` of each matrix of a stack ``(B, m, n)``, by one batched Newton-Schulz chain.

    Each matrix is divided by its own ``max|X|``. Equal to ``kappa_nuclear`` matrix by matrix up to
    the rounding of batched vs single matmuls. Not for sharded tensors (it reduces per matrix itself).
    """
    if X.dim() != 3:
        raise ValueError(f"kappa_nuclear_stack needs a (B, m, n) stack, got shape {tuple(X.shape)}")
    if X.numel() == 0:
        return torch.zeros_like(X)
    s = X.abs().amax(dim=(-2, -1), keepdim=True)
    Y = X / s.clamp_min(torch.finfo(s.dtype).tiny)
    return newton_schulz(Y, ns_steps, dtype=ns_dtype).to(X.dtype)


#: name -> map. ``sign`` takes ``x``; ``lp`` takes ``(x, p)``; ``huber``, ``tanh``, ``relativistic``
#: take ``(x, a)``; ``nuclear`` takes ``(x, ns_steps, ns_dtype)``.
KAPPAS: dict[str, Callable[..., torch.Tensor]] = {
    "sign": kappa_sign,
    "l2": kappa_l2,
    "lp": kappa_lp,
    "huber": kappa_huber,
    "tanh": kappa_tanh,
    "relativistic": kappa_relativistic,
    "nuclear": kappa_nuclear,
}


def _unknown(name: str) -> ValueError:
    return ValueError(f"Invalid kappa: {name!r} (kappa must be one of {', '.join(map(repr, KAPPAS))})")


def kappa_grad(
    name: str,
    x: torch.Tensor,
    *,
    p: Scalar = 1.5,
    a: Scalar = 1.0,
    ns_steps: int = 5,
    ns_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``kappa(x)`` for the map called ``name`` (a key of :data:`KAPPAS`); the other arguments are
    passed to the maps that take them. Written as a plain ``if`` chain on the (constant) name so it
    compiles inside a ``torch.compile``-d kernel."""
    if name == "sign":
        return kappa_sign(x)
    if name == "l2":
        return kappa_l2(x)
    if name == "lp":
        return kappa_lp(x, p)
    if name == "huber":
        return kappa_huber(x, a)
    if name == "tanh":
        return kappa_tanh(x, a)
    if name == "relativistic":
        return kappa_relativistic(x, a)
    if name == "nuclear":
        return kappa_nuclear(x, ns_steps, ns_dtype)
    raise _unknown(name)


def kappa_grad_foreach(
    name: str,
    xs: Sequence[torch.Tensor],
    *,
    p: Scalar = 1.5,
    a: Scalar = 1.0,
    ns_steps: int = 5,
    ns_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """:func:`kappa_grad` of each tensor of ``xs``; the tensors of ``xs`` may be overwritten.

    ``sign`` and ``tanh`` use ``torch._foreach_*`` ops in place; ``nuclear`` orthogonalizes same-shape
    matrices together (:func:`kappa_nuclear_stack`); the other maps (whole-tensor norms, clamps with
    tensor bounds) run tensor by tensor. Results equal :func:`kappa_grad` tensor by tensor (bitwise,
    except ``nuclear``: batched matmuls round differently).
    """
    xs = list(xs)
    if name == "sign":
        out = list(torch._foreach_sign(xs))
        torch._foreach_add_(out, xs, alpha=0.0)  # NaN where x is not finite, as kappa_sign
        return out
    if name == "tanh":
        out = list(torch._foreach_mul(xs, a))
        torch._foreach_tanh_(out)
        torch._foreach_add_(out, xs, alpha=0.0)
        return out
    if name == "nuclear":
        out: list[torch.Tensor | None] = [None] * len(xs)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(xs):
            if x.dim() < 2 or x.numel() == 0:
                out[i] = kappa_nuclear(x)
            else:
                by_shape.setdefault(tuple(x.shape), []).append(i)
        for shape, idx in by_shape.items():
            if len(idx) == 1:
                out[idx[0]] = kappa_nuclear(xs[idx[0]], ns_steps, ns_dtype)
                continue
            stack = torch.stack([xs[i].reshape(shape[0], -1) for i in idx])
            for i, o in zip(idx, kappa_nuclear_stack(stack, ns_steps, ns_dtype).unbind(0)):
                out[i] = o.reshape(shape)
        return out  # type: ignore[return-value]
    if name not in KAPPAS:
        raise _unknown(name)
    return [kappa_grad(name, x, p=p, a=a, ns_steps=ns_steps, ns_dtype=ns_dtype) for x in xs]
