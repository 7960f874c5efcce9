"""Muon (MomentUm Orthogonalized by Newton-Schulz) and NorMuon (Muon with neuron-wise normalization).

* Muon: Keller Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024, blog post,
  https://kellerjordan.github.io/posts/muon/); official code KellerJordan/Muon ``muon.py`` at commit
  857d1adc159e (pip ``muon`` 0.1.0).
* NorMuon: Zichong Li et al., "NorMuon: Making Muon more efficient and scalable" (arXiv 2510.05491);
  official code zichongli5/NorMuon ``normuon.py`` at commit d45c9a4280d7 (``SingleDeviceNorMuon``).
"""

from __future__ import annotations

import math

import torch

from ..ops.orthogonalize import newton_schulz, newton_schulz_bytes, ns_compute_dtype, ns_schedule
from ._base import check_int, check_range
from ._matrix import MatrixOptimizer

__all__ = ["Muon", "NorMuon", "check_ns", "nesterov_momentum", "normuon_normalize", "orthogonalize_group"]


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


def check_ns(ns_steps: int | None, ns_coefficients, default_steps: int = 5) -> int:
    """Validate ``ns_steps`` (an integer >= 1, or None) and ``ns_coefficients`` together (see
    :func:`optimzoo.ops.orthogonalize.ns_schedule`; ``ValueError`` naming the bad one) and return the
    number of iterations (``None``: ``default_steps`` for one triple, a schedule's length)."""
    if ns_steps is not None:
        check_int("ns_steps", ns_steps, 1)
    return len(ns_schedule(ns_coefficients, ns_steps, default_steps))


def orthogonalize_group(group: dict, U: torch.Tensor) -> torch.Tensor:
    """Newton-Schulz of the stack ``U`` with the group's ``ns_steps``, ``ns_coefficients`` and ``ns_dtype``
    (groups saved before ``ns_coefficients`` existed ran Muon's coefficients, the default)."""
    return newton_schulz(U, group["ns_steps"], group.get("ns_coefficients", "muon"),
                         dtype=ns_compute_dtype(group["ns_dtype"], U.device))


class Muon(MatrixOptimizer):
    r"""Muon for hidden matrices, AdamW for the other parameters, in one optimizer.

    For each hidden weight ``W`` (``m x n``; conv filters flattened to ``(out, -1)``) with gradient ``g``:

    .. math::
        M &\leftarrow \beta M + (1-\beta) g \\
        U &= (1-\beta) g + \beta M \quad (\text{Nesterov; } U = M \text{ otherwise}) \\
        O &= \mathrm{NS}_5(U) \approx \text{polar factor } U V^\top \text{ of } U \\
        W &\leftarrow W (1 - \eta\lambda) - \eta\, s(m, n)\, O

    with ``NS_5`` the quintic Newton-Schulz iteration (coefficients 3.4445, -4.7750, 2.0315; see ``ns_dtype``)
    (:func:`optimzoo.ops.orthogonalize.newton_schulz`) and ``s = sqrt(max(1, m/n))``. Same-shape
    matrices are orthogonalized together in one batched chain of matmuls. Vector parameters
    (embeddings, LM head, gains, biases) take an AdamW step; see :class:`MatrixOptimizer`.

    Args:
        params: parameters or groups; use ``optimzoo.create_optimizer(model, "muon")`` for routing.
        lr: learning rate of matrix groups, in Muon units (default 0.02, KellerJordan/Muon).
        momentum: ``beta`` of the momentum EMA, in [0, 1) (default 0.95).
        weight_decay: decoupled weight decay of matrix groups, ``W <- W (1 - lr wd)`` (default 0).
        nesterov: use the Nesterov form ``U = lerp(g, M, beta)`` (default True, as the official code).
        ns_steps: Newton-Schulz iterations (default None: 5 with one coefficient triple, the schedule's
            length with a list; a given value must match a list's length).
        ns_dtype: compute dtype of Newton-Schulz: ``"auto"`` (default: bf16 on accelerators, as Muon, and
            on CPUs that multiply bf16 natively (AVX512-BF16/AMX); float32 on other CPUs, where bf16 matmuls
            are emulated and ~100x slower), ``"bfloat16"`` or ``"float32"``
            (:func:`optimzoo.ops.orthogonalize.ns_compute_dtype`).
        adjust_lr: the shape-dependent lr factor ``s``: ``"keller"`` (default), ``"match_adamw"``
            (``0.2 sqrt(max(m, n))``, update RMS ~ 0.2 lr so AdamW's lr/wd transfer), or ``None``.
        ns_coefficients: the Newton-Schulz polynomial(s): ``"muon"`` (default: ``(3.4445, -4.7750, 2.0315)``
            every iteration), ``"polar_express"`` (5 per-iteration triples, Amsel et al. 2025, as
            modded-nanogpt's NorMuon records), one ``(a, b, c)`` triple, or a list of triples, one per
            iteration (:func:`optimzoo.ops.orthogonalize.ns_schedule`).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay, foreach, batch_budget: see
            :class:`MatrixOptimizer`.

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
        ns_steps: int | None = None,
        ns_dtype: str = "auto",
        adjust_lr: str | None = "keller",
        ns_coefficients: str | tuple | list = "muon",
        *,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-10,
        adamw_weight_decay: float | None = None,
        foreach: bool | None = None,
        batch_budget: float | None = None,
    ):
        check_range("momentum", momentum, 0.0, 1.0, high_open=True)
        ns_steps = check_ns(ns_steps, ns_coefficients)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=bool(nesterov),
                        ns_steps=ns_steps, ns_dtype=ns_dtype, adjust_lr=adjust_lr, ns_coefficients=ns_coefficients)
        super().__init__(params, defaults, adamw_lr=adamw_lr, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
                         adamw_weight_decay=adamw_weight_decay, foreach=foreach, batch_budget=batch_budget)

    def _init_state(self, group, p, state):
        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _precondition(self, group, params, grads, states):
        bufs = [st["momentum_buffer"] for st in states]
        return nesterov_momentum(grads, bufs, group["momentum"], group["nesterov"],
                                 self._use_foreach(group["foreach"], params))

    def _transform(self, group, U, rows):
        return orthogonalize_group(group, U)

    def _transform_bytes(self, group, rows, cols):
        # float32 upper bound; NorMuon's normalization reuses what the iteration freed (measured equal)
        return newton_schulz_bytes(rows, cols)


def normuon_normalize(O: torch.Tensor, V: torch.Tensor, beta2: float, eps: float = 1e-10,
                      target_rms: float | None = None) -> torch.Tensor:
    r"""NorMuon's neuron-wise normalization of orthogonalized updates ``O`` (``(m, n)`` or ``(B, m, n)``).

    In float32 whatever ``O``'s dtype (ALGORITHMS.md 5b, precision pitfalls):

    .. math::
        V &\leftarrow \beta_2 V + (1-\beta_2)\, \mathrm{mean}_{cols}(O \odot O)
              \quad (\text{in place, no bias correction}) \\
        \hat O &= O \odot \frac{1}{\sqrt V + \epsilon} \quad (\text{broadcast over columns}) \\
        \hat O &\leftarrow \hat O \cdot s, \quad s = \frac{\|O\|_F}{\|\hat O\|_F + \epsilon} \text{ (official code)}
              \ \text{ or }\ s = \frac{\rho \sqrt{mn}}{\|\hat O\|_F + \epsilon}
              \text{ (paper, } \rho = \text{target\_rms)}

    ``V`` is the float32 ``(m, 1)`` (or ``(B, m, 1)``) second moment, updated in place. Returns a new
    float32 tensor.
    """
    O = O.to(torch.float32)
    V.lerp_(O.square().mean(dim=-1, keepdim=True), 1 - beta2)
    out = O * V.sqrt().add_(eps).reciprocal_()
    new_norm = torch.linalg.matrix_norm(out, keepdim=True).add_(eps)
    if target_rms is None:
        scale = torch.linalg.matrix_norm(O, keepdim=True).div_(new_norm)
    else:
        scale = new_norm.reciprocal_().mul_(target_rms * math.sqrt(O.size(-2) * O.size(-1)))
    return out.mul_(scale)


class NorMuon(Muon):
    r"""NorMuon for hidden matrices, AdamW for the other parameters, in one optimizer.

    Muon's orthogonalized Nesterov momentum, then each row (output neuron) divided by the root of an
    EMA of its mean square, then the whole matrix rescaled. For each hidden weight ``W`` (``m x n``; conv
    filters flattened to ``(out, -1)``) with gradient ``g``:

    .. math::
        M &\leftarrow \beta M + (1-\beta) g, \quad U = (1-\beta) g + \beta M
              \ (\text{Nesterov; } U = M \text{ otherwise}) \\
        O &= \mathrm{NS}_5(U) \\
        v &\leftarrow \beta_2 v + (1-\beta_2)\, \mathrm{mean}_{cols}(O \odot O)
              \quad (v \in \mathbb R^m,\ \text{no bias correction}) \\
        \hat O &= O \oslash (\sqrt{v} + \epsilon) \\
        \hat O &\leftarrow \hat O\, \|O\|_F / (\|\hat O\|_F + \epsilon)
              \quad (\text{restore the pre-normalization norm}) \\
        W &\leftarrow W (1 - \eta\lambda) - \eta\, \sqrt{\max(1, m/n)}\, \hat O

    which is the official single-device code (``normuon_update`` + ``SingleDeviceNorMuon``, Muon units:
    lr ~ 0.02). Steps 3-5 run in float32 whatever the Newton-Schulz dtype (the official code runs them
    in the NS output's bf16; see ALGORITHMS.md 5b). Same-shape matrices are orthogonalized and
    normalized together (batched).

    With ``adjust_lr="match_adamw"`` the last two lines are the paper's Adam-matched form instead:
    ``W <- W (1 - lr wd) - lr * 0.2 sqrt(mn) * O_hat / ||O_hat||_F``: the update has RMS exactly
    ``0.2 lr``, so AdamW's lr and weight decay transfer (arXiv 2510.05491, Algorithm 1). ``None`` keeps the
    restored norm and applies no shape factor.

    Args:
        params: parameters or groups; use ``optimzoo.create_optimizer(model, "normuon")`` for routing.
        lr: learning rate of matrix groups (default 0.02, official code and README; Muon units with
            ``adjust_lr="keller"``, Adam units, e.g. 3e-4 to 1e-3, with ``"match_adamw"``).
        momentum: ``beta`` of the momentum EMA, in [0, 1) (default 0.95).
        beta2: EMA coefficient of the per-row second moment ``v``, in [0, 1) (default 0.95).
        weight_decay: decoupled weight decay of matrix groups, ``W <- W (1 - lr wd)`` (default 0; the
            README recommends 0.01).
        nesterov: Nesterov form ``U = lerp(g, M, beta)`` (default True, as the official code).
        ns_steps: Newton-Schulz iterations (default None: 5, or the length of a coefficient schedule).
        ns_dtype: Newton-Schulz compute dtype, ``"auto"`` (default: bf16 on accelerators as the official
            code and on CPUs with native bf16 matmuls, float32 on other CPUs), ``"bfloat16"`` or
            ``"float32"``. The normalization is float32 always.
        adjust_lr: ``"keller"`` (default: restore ``||O||_F``, lr factor ``sqrt(max(1, m/n))``, official
            code), ``"match_adamw"`` (paper: update RMS exactly ``0.2 lr``) or ``None``.
        eps: added to ``sqrt(v)`` and to the norm in the rescale (default 1e-10, official code).
        ns_coefficients: as :class:`Muon` (default ``"muon"``; ``"polar_express"`` is the schedule of
            modded-nanogpt's NorMuon records).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay, foreach, batch_budget: see
            :class:`MatrixOptimizer` (AdamW defaults as the official ``SingleDeviceNorMuonWithAuxAdam``:
            3e-4, (0.9, 0.95), 1e-10, 0).

    State per matrix: ``momentum_buffer`` (like ``W``) and ``second_momentum_buffer`` (float32,
    ``(m, 1)``): 4 + 4/cols bytes per parameter.

    ``metrics()`` returns ``row_scale_spread``: the ratio ``max_i / min_i`` of the row scales
    ``1 / (sqrt(v_i) + eps)`` of a matrix, averaged over the matrices updated since the last call
    (1 when all rows are alike; a row that never received gradient makes it huge).

    Differences from the official code, all deliberate: those of :class:`Muon` (``p.grad`` untouched,
    parameters without a gradient skipped entirely: no momentum decay, no weight decay, no ``v``
    update); normalization in float32; conv filters are normalized per output channel of the flattened
    ``(out, -1)`` matrix (the official code reshapes the NS output back to 4-D and keeps one ``v`` per
    ``(out, in, kh)`` triple).
    """

    row_state = ("second_momentum_buffer",)

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        beta2: float = 0.95,
        weight_decay: float = 0.0,
        nesterov: bool = True,
        ns_steps: int | None = None,
        ns_dtype: str = "auto",
        adjust_lr: str | None = "keller",
        eps: float = 1e-10,
        ns_coefficients: str | tuple | list = "muon",
        *,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-10,
        adamw_weight_decay: float | None = None,
        foreach: bool | None = None,
        batch_budget: float | None = None,
    ):
        check_range("momentum", momentum, 0.0, 1.0, high_open=True)
        check_range("beta2", beta2, 0.0, 1.0, high_open=True)
        ns_steps = check_ns(ns_steps, ns_coefficients)
        check_range("eps", eps, 0.0, low_open=True)
        defaults = dict(lr=lr, momentum=momentum, beta2=beta2, weight_decay=weight_decay, nesterov=bool(nesterov),
                        ns_steps=ns_steps, ns_dtype=ns_dtype, adjust_lr=adjust_lr, eps=eps,
                        ns_coefficients=ns_coefficients)
        MatrixOptimizer.__init__(self, params, defaults, adamw_lr=adamw_lr, adamw_betas=adamw_betas,
                                 adamw_eps=adamw_eps, adamw_weight_decay=adamw_weight_decay, foreach=foreach,
                                 batch_budget=batch_budget)

    def _transform(self, group, U, rows):
        O = orthogonalize_group(group, U)
        target = 0.2 if group["adjust_lr"] == "match_adamw" else None
        return normuon_normalize(O, rows["second_momentum_buffer"], group["beta2"], group["eps"], target)

    def _lr_scale(self, group, rows, cols):
        if group["adjust_lr"] == "match_adamw":
            return 1.0  # the 0.2 sqrt(mn) / ||O_hat||_F factor is applied in _transform
        return super()._lr_scale(group, rows, cols)

    # ------------------------------------------------------------------ metrics

    def _matrix_step(self, group, pairs):
        super()._matrix_step(group, pairs)
        V = [self.state[p]["second_momentum_buffer"] for p, _ in pairs]
        if any(hasattr(v, "device_mesh") for v in V):
            return  # sharded row state: the statistic would be shard-local; not reported
        self._record_row_spread(V, group["eps"])

    # Host-side bookkeeping, run eagerly under torch.compile (one graph break): dynamo (torch 2.13)
    # silently drops attribute writes on optimizer objects made in a compiled frame, so a traced
    # accumulation would lose the counts (and it cannot trace _foreach_max either).
    @torch.compiler.disable
    def _record_row_spread(self, V: list[torch.Tensor], eps: float) -> None:
        acc = self.__dict__.setdefault("_row_spread", {"sum": {}, "count": 0})
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for v in V:
            by_device.setdefault(v.device, []).append(v)
        for device, vs in by_device.items():
            hi = torch.stack(torch._foreach_max(vs))
            lo = torch.stack(torch._foreach_max(torch._foreach_neg(vs))).neg_()
            spread = (hi.sqrt_().add_(eps) / lo.clamp_min_(0).sqrt_().add_(eps)).sum()
            acc["sum"][device] = acc["sum"][device] + spread if device in acc["sum"] else spread
        acc["count"] += len(V)

    def metrics(self) -> dict[str, float]:
        """``row_scale_spread`` averaged over the matrices updated since the last call (then reset)."""
        out = super().metrics()
        acc = self.__dict__.pop("_row_spread", None)
        if acc and acc["count"]:
            out["row_scale_spread"] = sum(float(t) for t in acc["sum"].values()) / acc["count"]
        return out
