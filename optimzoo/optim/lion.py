"""Lion (EvoLved Sign Momentum) and Lion-K (Lion with a general convex ``K``).

* Lion: Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023, arXiv 2302.06675.
  Official code: google/automl ``lion/lion_pytorch.py`` (read at commit 6a54c8741e7c; last change to
  the code b21d6ced, 2023-11-02). We follow it exactly.
* Lion-K: Chen, Liu, Liang, Liu, "Lion Secretly Solves Constrained Optimization: As Lyapunov
  Predicts", ICLR 2024, arXiv 2310.05898. No official code: the update form is the paper's, the
  ``grad K`` maps are standard convex analysis (:mod:`optimzoo.ops.kappa`), the nuclear one follows
  Qiang Liu's note "Muon is a Nuclear Lion King".

Layout (CONTRIBUTING.md): :func:`_single_tensor_lion` is the update of one tensor with 0-d tensor
hyperparameters and no data-dependent Python control flow; it is the eager single-tensor path and,
compiled by :func:`~optimzoo.optim._base.fused_kernel`, the fused path. :func:`_multi_tensor_lion` is
the same math with ``torch._foreach_*`` ops. :func:`lion` dispatches between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from ..ops.kappa import KAPPAS, kappa_grad, kappa_grad_foreach
from ..ops.orthogonalize import NS_DTYPES, ns_compute_dtype
from ..ops.reduce import is_sharded
from ._base import (
    ZooOptimizer,
    check_betas,
    check_choice,
    check_int,
    check_lr,
    check_paths,
    check_range,
    foreach_chunks,
    fused_kernel,
    piecewise,
)

__all__ = ["Lion", "LionK", "lion"]

#: dtypes whose update is computed in float32 and rounded once when written back
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _compute(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its compute dtype: float32 for 16-bit floats, unchanged (no copy) otherwise."""
    return t.float() if t.dtype in _LOW_PRECISION else t


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


def _kappa(kappa: str, c: torch.Tensor, **kwargs) -> torch.Tensor:
    """``kappa_grad(kappa, c)``. On a row-sharded ``DTensor`` every map runs on the shards (the norms'
    reductions are all-reduced in :mod:`optimzoo.ops.kappa`) except ``nuclear``, whose polar factor
    needs the whole matrix: it is gathered, evaluated, and each rank keeps its shard."""
    if kappa == "nuclear" and is_sharded(c):
        from torch.distributed.tensor import distribute_tensor

        full = kappa_grad(kappa, c.full_tensor(), **kwargs)
        return distribute_tensor(full, c.device_mesh, c.placements, src_data_rank=None)
    return kappa_grad(kappa, c, **kwargs)


def _single_tensor_lion(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    lr: torch.Tensor,
    decay: torch.Tensor,
    beta1: torch.Tensor,
    one_minus_beta1: torch.Tensor,
    beta2: torch.Tensor,
    one_minus_beta2: torch.Tensor,
    p: torch.Tensor,
    a: torch.Tensor,
    kappa: str = "sign",
    ns_steps: int = 5,
    ns_dtype: torch.dtype | None = None,
) -> None:
    """One Lion(-K) step of one tensor, in place on ``param`` and ``exp_avg`` (``grad`` is read only).

    Scalars are 0-d float32 tensors; ``decay = 1 - lr wd`` and ``1 - beta`` are computed by the caller
    in double precision, exactly as google/automl's Python floats, so that the float32 arithmetic is
    the reference's: ``c = m b1 + (1-b1) g`` (one fused multiply-add, as ``add(alpha=)``),
    ``W <- W decay - lr kappa(c)``, ``m <- m b2 + (1-b2) g``. 16-bit tensors are computed in float32
    and rounded once when written back.
    """
    g = _compute(grad)
    m = _compute(exp_avg)
    c = torch.addcmul(m * beta1, g, one_minus_beta1)
    update = _kappa(kappa, c, p=p, a=a, ns_steps=ns_steps, ns_dtype=ns_dtype)
    param.copy_(torch.addcmul(_compute(param) * decay, update, -lr))
    exp_avg.copy_(torch.addcmul(m * beta2, g, one_minus_beta2))


#: the maps of one entry each: the single-tensor path runs them over cache-sized pieces
_ELEMENTWISE = ("sign", "tanh", "huber", "relativistic")
_piecewise_lion = piecewise(_single_tensor_lion)


def _whole_lion(tensors, scalars, **static) -> None:
    _single_tensor_lion(*tensors, *scalars, **static)


# The fused kernels: ``_single_tensor_lion`` compiled, one per map. torch.compile keeps at most
# ``recompile_limit`` (8) graphs per code object and, with ``fullgraph=True``, fails hard past it;
# giving each map its own (one-line) code object gives each its own budget for dtypes and devices.
def _fused_sign(param, grad, exp_avg, *scalars):
    _single_tensor_lion(param, grad, exp_avg, *scalars, kappa="sign")


def _fused_l2(param, grad, exp_avg, *scalars):
    _single_tensor_lion(param, grad, exp_avg, *scalars, kappa="l2")


def _fused_lp(param, grad, exp_avg, *scalars):
    _single_tensor_lion(param, grad, exp_avg, *scalars, kappa="lp")


def _fused_huber(param, grad, exp_avg, *scalars):
    _single_tensor_lion(param, grad, exp_avg, *scalars, kappa="huber")


def _fused_tanh(param, grad, exp_avg, *scalars):
    _single_tensor_lion(param, grad, exp_avg, *scalars, kappa="tanh")


def _fused_relativistic(param, grad, exp_avg, *scalars):
    _single_tensor_lion(param, grad, exp_avg, *scalars, kappa="relativistic")


_FUSED = {fn.__name__[len("_fused_"):]: fused_kernel(fn)
          for fn in (_fused_sign, _fused_l2, _fused_lp, _fused_huber, _fused_tanh, _fused_relativistic)}


def _multi_tensor_lion(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    kappa: str,
    p: float,
    a: float,
    ns_steps: int,
    ns_dtype: str = "auto",
) -> None:
    """The same update with ``torch._foreach_*`` ops, tensors grouped by device and dtype; for the
    element-wise maps (``sign``, ``tanh``) run in cache-sized chunks
    (:func:`~optimzoo.optim._base.foreach_chunks`)."""
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs])
    for (device, _), (tensors, _) in grouped.items():
        # under torch.compile the grouping is left to Inductor and the key is (None, None): take the
        # device from the tensors, as torch.optim's foreach kernels do
        device = tensors[0][0].device if device is None else device
        chunks = foreach_chunks(tensors) if kappa in ("sign", "tanh") else [(tensors, None)]
        for (dev_params, dev_grads, dev_avgs), _ in chunks:
            _foreach_lion_(dev_params, dev_grads, dev_avgs, device, lr=lr, beta1=beta1, beta2=beta2,
                           weight_decay=weight_decay, kappa=kappa, p=p, a=a, ns_steps=ns_steps, ns_dtype=ns_dtype)


def _foreach_lion_(dev_params, dev_grads, dev_avgs, device, *, lr, beta1, beta2, weight_decay, kappa, p, a,
                   ns_steps, ns_dtype) -> None:
    """The foreach update of tensors on one device with one dtype."""
    decay = 1.0 - lr * weight_decay
    low = [t.dtype in _LOW_PRECISION for t in dev_params]
    w = [_compute(t) for t in dev_params]
    g = [_compute(t) for t in dev_grads]
    m = [_compute(t) for t in dev_avgs]
    c = list(torch._foreach_mul(m, beta1))
    torch._foreach_add_(c, g, alpha=1.0 - beta1)
    # p and a as the single-tensor path gets them (float32 0-d tensors), so the maps agree bitwise
    p_t, a_t = ZooOptimizer._scalars(device, p, a) if kappa in ("lp", "huber", "tanh", "relativistic") else (p, a)
    if kappa == "sign":
        # kappa_sign(c) is sign(c) + 0 c (NaN where c is not finite). Here the 0 c goes into the weight
        # first (w + 0 c = w for a finite c; NaN otherwise), so the sign can overwrite c in place: one
        # in-place pass instead of kappa_grad_foreach's out-of-place sign and add, same numbers.
        torch._foreach_add_(w, c, alpha=0.0)
        torch._foreach_sign_(c)
        update = c
    else:
        update = kappa_grad_foreach(kappa, c, p=p_t, a=a_t, ns_steps=ns_steps,
                                    ns_dtype=ns_compute_dtype(ns_dtype, device))
    if decay != 1.0:
        torch._foreach_mul_(w, decay)
    torch._foreach_add_(w, update, alpha=-lr)
    torch._foreach_mul_(m, beta2)
    torch._foreach_add_(m, g, alpha=1.0 - beta2)
    if any(low):
        idx = [i for i, x in enumerate(low) if x]
        torch._foreach_copy_([dev_params[i] for i in idx], [w[i] for i in idx])
        torch._foreach_copy_([dev_avgs[i] for i in idx], [m[i] for i in idx])


def lion(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    kappa: str = "sign",
    p: float = 1.5,
    a: float = 1.0,
    ns_steps: int = 5,
    ns_dtype: str = "auto",
    foreach: bool = False,
    fused: bool = False,
) -> None:
    """Functional Lion(-K): update ``params`` and ``exp_avgs`` in place (see :class:`LionK`).

    ``fused`` (``torch.compile``-generated kernel, one per tensor) takes precedence over ``foreach``,
    except for ``kappa="nuclear"``, whose Newton-Schulz matmuls are not fused: that map runs the
    foreach (same-shape matrices orthogonalized together) or single-tensor path instead; on sharded
    (``DTensor``) parameters the single-tensor path, which gathers each matrix whole.
    """
    keep = [i for i, t in enumerate(params) if t.numel() > 0]  # nothing to do for empty tensors
    params, grads, exp_avgs = ([x[i] for i in keep] for x in (params, grads, exp_avgs))
    if not params:
        return
    if fused and kappa != "nuclear":
        _fused_path(params, grads, exp_avgs, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                    kappa=kappa, p=p, a=a)
    elif foreach and not (kappa == "nuclear" and any(is_sharded(t) for t in params)):
        _multi_tensor_lion(params, grads, exp_avgs, lr=lr, beta1=beta1, beta2=beta2,
                           weight_decay=weight_decay, kappa=kappa, p=p, a=a, ns_steps=ns_steps, ns_dtype=ns_dtype)
    else:
        scalars: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        for param, grad, exp_avg in zip(params, grads, exp_avgs):
            if param.device not in scalars:
                scalars[param.device] = _kernel_scalars(param.device, lr, beta1, beta2, weight_decay, p, a)
            run = _piecewise_lion if kappa in _ELEMENTWISE else _whole_lion
            run((param, grad, exp_avg), scalars[param.device], kappa=kappa, ns_steps=ns_steps,
                ns_dtype=ns_compute_dtype(ns_dtype, param.device))


def _kernel_scalars(device, lr, beta1, beta2, weight_decay, p, a) -> tuple[torch.Tensor, ...]:
    """The kernel's scalar arguments; derived values computed in double precision, as the reference."""
    return ZooOptimizer._scalars(device, lr, 1.0 - lr * weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2, p, a)


def _fused_path(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, kappa, p, a) -> None:
    # Every non-nuclear map is shape-agnostic (element-wise or over the whole tensor), so the compiled
    # kernel takes flat views: one graph per dtype and group length serves every parameter shape.
    scalars: dict[torch.device, tuple[torch.Tensor, ...]] = {}
    items = []
    for param, grad, exp_avg in zip(params, grads, exp_avgs):
        if param.device not in scalars:
            scalars[param.device] = _kernel_scalars(param.device, lr, beta1, beta2, weight_decay, p, a)
        items.append(((param, grad, exp_avg), scalars[param.device]))
    ZooOptimizer._run_kernel(_FUSED[kappa], items, fused=True)


# --------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------


class Lion(ZooOptimizer):
    r"""Lion: the sign of an interpolated momentum (Chen et al., 2023, arXiv 2302.06675).

    For each parameter ``W`` with gradient ``g`` and momentum ``m`` (google/automl
    ``lion/lion_pytorch.py``, commit 6a54c8741e7c):

    .. math::
        W &\leftarrow W (1 - \eta\lambda) \\
        c &= \beta_1 m + (1-\beta_1) g \\
        W &\leftarrow W - \eta\, \mathrm{sign}(c) \\
        m &\leftarrow \beta_2 m + (1-\beta_2) g

    (``sign(0) = 0``.) Non-finite gradients propagate into the weights, they are never masked: where
    ``c`` is NaN or infinite the update, and so the weight, is NaN (``torch.sign`` alone gives 0 for NaN,
    which would leave that weight frozen forever without a sign of trouble); finite values are
    unchanged, bit for bit. Every update element is ``+-lr`` (or 0), so Lion wants a learning rate 3-10x
    smaller than AdamW's and a weight decay 3-10x larger (same effective ``lr * wd``); the official
    README's examples: ``lr=1e-4, wd=10`` (ViT), ``lr=3e-5, wd=0.1`` (diffusion), ``lr=1e-4, wd=0.01``
    (7.5B LM), and ``betas=(0.95, 0.98)`` for stability.

    Args:
        params: parameters or parameter groups (use ``optimzoo.create_optimizer(model, "lion")`` for
            decay/no-decay groups).
        lr: learning rate ``eta``, the size of each element's step (default 1e-4).
        betas: ``(beta1, beta2)``, each in [0, 1): ``beta1`` interpolates momentum and gradient for
            the sign; ``beta2`` is the momentum's EMA coefficient (default (0.9, 0.99)).
        weight_decay: decoupled weight decay ``lambda``, ``W <- W (1 - lr wd)`` before the update
            (default 0).
        foreach: use the ``torch._foreach_*`` path (default ``None``: yes when every tensor is a plain
            tensor, CPU included, see :meth:`ZooOptimizer._use_foreach`).
        fused: use a ``torch.compile``-generated kernel per tensor (one pass over memory; compiled on
            the first step, seconds). Default ``None`` = off. Cannot be combined with ``foreach=True``.

    State: ``exp_avg`` (the momentum, the parameter's dtype and device): 4 bytes per fp32 parameter.
    There is no step counter (Lion has no bias correction).

    The three paths give the same numbers; 16-bit parameters are updated in float32 and rounded once
    (the reference rounds after the decay and again after the step). Differences from other code:
    lucidrains/lion-pytorch's ``decoupled_weight_decay=True`` divides ``wd`` by the *initial* lr
    (``W <- W (1 - lr wd / lr_0)``); like google/automl (and lion-pytorch's default) we do not.
    For a non-finite ``c`` both of them step by ``sign(c)`` (0 for NaN); we write NaN (above).
    ``p.grad`` is never modified.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, foreach=foreach, fused=fused)
        self._validate(defaults)
        defaults["betas"] = tuple(betas)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ hyperparameters

    def _validate(self, group: dict[str, Any]) -> None:
        """Check a group's hyperparameters (ValueError naming the field and the range)."""
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_choice("foreach", group["foreach"], (None, False, True))
        check_choice("fused", group["fused"], (None, False, True))
        check_paths(group["foreach"], group["fused"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its hyperparameter overrides are validated like the constructor's."""
        self._validate({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def _kappa(self, group: dict[str, Any]) -> dict[str, Any]:
        """The gradient map of ``group`` (Lion: ``sign``)."""
        return {"kappa": "sign"}

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = self._closure_loss(closure)
        for group in self.param_groups:
            pairs = self._grads(group)
            if not pairs:
                continue
            params, grads, exp_avgs = [], [], []
            for p, g in pairs:
                params.append(p)
                grads.append(g)
                exp_avgs.extend(self._zeros_state(self.state[p], p, "exp_avg"))
            beta1, beta2 = group["betas"]
            fused = bool(group["fused"])
            lion(
                params, grads, exp_avgs,
                lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2),
                weight_decay=float(group["weight_decay"]), **self._kappa(group),
                foreach=self._use_foreach(group["foreach"], params), fused=fused,
            )
        return loss


class LionK(Lion):
    r"""Lion-K: Lion with the sign replaced by ``grad K`` of a convex ``K`` (Chen, Liu, Liang, Liu,
    ICLR 2024, arXiv 2310.05898).

    .. math::
        c &= \beta_1 m + (1-\beta_1) g \\
        W &\leftarrow W - \eta\,(\nabla K(c) + \lambda W)
            \quad (\text{applied as } W \leftarrow W(1-\eta\lambda) - \eta\nabla K(c)) \\
        m &\leftarrow \beta_2 m + (1-\beta_2) g

    The paper keeps a *negative*-gradient momentum, ``m' = beta2 m' - (1-beta2) g`` and
    ``W <- W + eta (grad K(beta1 m' - (1-beta1) g) - lambda W)``; every ``K`` here is even, so
    ``grad K`` is odd and with ``m = -m'`` this is exactly the form above, Lion's sign convention.
    For a norm ``K`` the dynamics solve ``min f(W)`` subject to ``||W||_dual <= 1/lambda``.

    There is no official code. The update form is the paper's; the maps (``ALGORITHMS.md`` 8b,
    :mod:`optimzoo.ops.kappa`) are standard convex analysis for the paper's Table 2 ``K``; ``nuclear``
    follows Qiang Liu's note "Muon is a Nuclear Lion King" (Muon = Lion-K with the nuclear norm).
    ``kappa="sign"`` is Lion, bit for bit.

    Args:
        params, lr, betas, weight_decay, foreach: as :class:`Lion` (same defaults; weight decay is
            decoupled and applied first, as Lion's).
        kappa: the map ``grad K`` (default ``"sign"``), over each parameter tensor as a whole:

            * ``"sign"``: ``sign(c)`` (``K = ||.||_1``, Lion);
            * ``"l2"``: ``c / ||c||_2`` (``K = ||.||_2``, normalized momentum);
            * ``"lp"``: ``sign(c) |c|^(p-1) / ||c||_p^(p-1)`` (``K = ||.||_p``; the paper's Lion-lp);
            * ``"huber"``: ``clip(c, -a, a) / a`` (``K`` = sum of Huber functions);
            * ``"tanh"``: ``tanh(a c)`` (``K = sum (1/a) log cosh(a c_i)``);
            * ``"relativistic"``: ``c / sqrt(c^2 + a^2)`` (``K = sum sqrt(c_i^2 + a^2)``);
            * ``"nuclear"``: the polar factor ``U V^T`` of ``c`` viewed as ``(size(0), -1)``, by
              ``ns_steps`` Newton-Schulz steps in ``ns_dtype`` (``K`` = nuclear norm; Muon without its
              shape scale). **1-D tensors
              use** ``sign`` (plain Lion for gains and biases).

            Zero momentum gives a zero update (no NaN). Non-finite gradients propagate into the
            weights, they are never masked: a NaN or infinite ``c`` element gives a NaN update for
            that element (``sign``, ``huber``, ``tanh``, ``relativistic``) or for the whole tensor
            (``l2``, ``lp``, ``nuclear``), never a silent 0 or +-1.
        p: the ``p`` of ``"lp"``, in [1, inf) (default 1.5; ``p = 1`` is Lion, ``p = 2`` is ``"l2"``;
            the paper's experiments use ``p`` in [1, 2]).
        a: the scale ``a > 0`` of ``"huber"``, ``"tanh"`` and ``"relativistic"`` (default 1.0); those
            maps are not scale-invariant, so ``a`` should be set relative to the momentum's magnitude.
        ns_steps: Newton-Schulz iterations of ``"nuclear"`` (integer >= 1, default 5).
        ns_dtype: their compute dtype, as Muon's: ``"auto"`` (default: bf16 on accelerators and on CPUs
            that multiply bf16 natively, float32 on other CPUs, :func:`~optimzoo.ops.orthogonalize.ns_compute_dtype`),
            ``"bfloat16"`` or ``"float32"``.
        fused: as :class:`Lion`; with ``kappa="nuclear"`` it falls back to the foreach/single-tensor
            path (the step is dominated by Newton-Schulz matmuls, which fusing would not speed up).

    Groups may override ``kappa``, ``p``, ``a``, ``ns_steps`` and ``ns_dtype`` (e.g. ``"nuclear"`` for hidden
    matrices, ``"sign"`` for the rest). State: ``exp_avg`` only, as Lion.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        kappa: str = "sign",
        p: float = 1.5,
        a: float = 1.0,
        ns_steps: int = 5,
        ns_dtype: str = "auto",
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, kappa=kappa, p=p, a=a,
                        ns_steps=ns_steps, ns_dtype=ns_dtype, foreach=foreach, fused=fused)
        self._validate(defaults)
        defaults["betas"] = tuple(betas)
        ZooOptimizer.__init__(self, params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        super()._validate(group)
        check_choice("kappa", group["kappa"], KAPPAS)
        check_range("p", group["p"], 1.0)
        check_range("a", group["a"], 0.0, low_open=True)
        check_int("ns_steps", group["ns_steps"], 1)
        check_choice("ns_dtype", group["ns_dtype"], NS_DTYPES)

    def _kappa(self, group: dict[str, Any]) -> dict[str, Any]:
        return {"kappa": group["kappa"], "p": float(group["p"]), "a": float(group["a"]),
                "ns_steps": group["ns_steps"], "ns_dtype": group["ns_dtype"]}
