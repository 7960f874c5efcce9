"""Tolerances that follow from float32 arithmetic, not from the figure one machine printed.

Two correct float32 implementations of the same formula differ by rounding: in the order of a
reduction, in whether a multiply-add is contracted into an FMA, in the SIMD width of a kernel
(``ATEN_CPU_CAPABILITY`` default / avx2 / avx512 give different kernels, and CPUs differ). The bounds
here are stated in ulps: ``ulp(x) <= EPS32 * |x|`` with ``EPS32 = 2**-23``. See CONTRIBUTING.md
("How tolerances are chosen").

* :func:`drift_bound` - two optimizers run side by side from the same start for ``steps`` steps:
  per step each one rounds the stored weight once (half an ulp of ``|w|``) and adds an update whose
  own rounding error is a few ulps of ``|update|``; momentum carries those errors into later steps.
  ``ulps`` ulps of the largest magnitude involved, per step, covers both.
* :func:`weight_ulps` - for a check of ``w_new - w0`` against a closed-form delta: storing ``w_new``
  rounds it by half an ulp of ``|w|``, which the delta inherits.
* :func:`bf16_bound` - updates through bf16 matmuls: a few bf16 ulps of the distance moved.
* :func:`ns_amplification` - Newton-Schulz's iterations amplify a rounding error by their slope.

Set ``OPTIMZOO_TOL_LOG=<file>`` to append, for every check made through :func:`check` and
:func:`assert_close`, the test id and the fraction of its bound that was used (how close each test
runs to its tolerance on this machine and kernel).
"""

from __future__ import annotations

import os

import torch

EPS32 = torch.finfo(torch.float32).eps  # 2**-23 = 1.19e-7
EPS_BF16 = torch.finfo(torch.bfloat16).eps  # 2**-7: bf16 keeps 8 significant bits


def magnitude(*tensors) -> float:
    """The largest ``|x|`` over tensors (or iterables of tensors)."""
    flat: list[torch.Tensor] = []
    for t in tensors:
        flat.extend([t] if isinstance(t, torch.Tensor) else list(t))
    return max(float(t.detach().abs().max()) for t in flat if t.numel())


def drift_bound(tensors, steps: int, ulps: float = 4.0) -> float:
    """The largest ``|a - b|`` allowed between two runs of one update rule after ``steps`` steps:
    ``ulps`` ulps (of the tensors' dtype) of the largest magnitude in ``tensors`` (weights, or updates
    when those are larger) per step. 4 ulps: one rounding of the weight by each run (2 x 0.5) plus the
    update's own rounding."""
    flat = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    eps = max(torch.finfo(t.dtype).eps for t in flat)
    return ulps * eps * magnitude(flat) * steps


def bf16_bound(moved: float, ulps: float = 4.0) -> float:
    """Two runs whose update goes through bf16 matmuls (Newton-Schulz in bf16) in a different order or
    kernel: each step's update may differ by a few bf16 ulps of itself, so after any number of steps the
    weights differ by at most ``ulps`` bf16 ulps of the distance they moved (``moved`` = max |end - start|)."""
    return ulps * EPS_BF16 * moved


def weight_ulps(w, ulps: float = 2.0) -> float:
    """Absolute tolerance of ``w_new - w0`` against an exact delta: ``ulps`` ulps of ``max |w|``."""
    return ulps * EPS32 * magnitude(w)


def ns_amplification(steps: int = 5, a: float = 3.4445) -> float:
    """How much ``steps`` quintic Newton-Schulz iterations can amplify a rounding error, to first order:
    the quintic's slope is largest at 0, where it is ``a``, so an error made before iteration ``j``
    grows at most ``a ** (steps - j)``; summed over the iterations (and the input's own rounding)."""
    return sum(a**j for j in range(steps + 1))


def _log(fraction: float) -> None:
    path = os.environ.get("OPTIMZOO_TOL_LOG")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
        with open(path, "a") as f:
            f.write(f"{fraction:.4f}\t{test}\n")


def check(diff: float, bound: float, what: str = "max |difference|") -> None:
    """``assert diff <= bound`` with both figures in the message."""
    _log(diff / bound if bound else (0.0 if diff == 0 else float("inf")))
    assert diff <= bound, f"{what} = {diff:.3g} > bound {bound:.3g}"


#: torch.testing.assert_close's defaults per dtype (rtol, atol)
_DEFAULTS = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5), torch.float32: (1.3e-6, 1e-5),
             torch.float64: (1e-7, 1e-7)}


def assert_close(actual, expected, *, rtol: float | None = None, atol: float | None = None, **kw) -> None:
    """``torch.testing.assert_close`` that also logs the fraction of the tolerance used."""
    if rtol is None and atol is None and isinstance(actual, torch.Tensor):
        rtol, atol = _DEFAULTS.get(actual.dtype, (0.0, 0.0))
    if os.environ.get("OPTIMZOO_TOL_LOG") and isinstance(actual, torch.Tensor) and actual.numel():
        a = actual.detach().double()
        e = torch.as_tensor(expected).detach().double().to(a.device)
        allowed = atol + rtol * e.abs()
        err = (a - e).abs()
        both_nan = a.isnan() & e.isnan()
        frac = torch.where(both_nan, 0.0, torch.where(allowed > 0, err / allowed, torch.where(err > 0, float("inf"), 0.0)))
        _log(float(frac.max()))
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, **kw)
