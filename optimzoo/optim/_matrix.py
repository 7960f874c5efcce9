"""The shared base of matrix optimizers (Muon, NorMuon, SWAN, SinkGD, AuON, Hybrid-AuON).

One ``torch.optim.Optimizer`` holds two kinds of parameter group, told apart by the group's ``role``:

* ``role="matrix"``: hidden 2-D weights (conv filters are flattened to ``(out, -1)``). Their update is
  a function of the *whole* matrix (orthogonalization, row/column normalization), computed in
  three stages that subclasses fill in:

  1. :meth:`MatrixOptimizer._precondition` - element-wise and local (momentum): gradients -> ``U``;
  2. :meth:`MatrixOptimizer._transform` - on full matrices, batched over a stack of same-shape
     matrices: ``U`` (B, m, n) -> ``O`` (B, m, n), with optional per-row state (B, m, k);
  3. the step ``W <- W (1 - lr wd) - lr * s(m, n) * O`` with the scale :meth:`_lr_scale`.

  Stage 2 is the only one that needs whole matrices; when parameters are FSDP2 ``DTensor`` shards,
  it is delegated to :mod:`optimzoo.distributed`, which assembles each matrix on one owner rank.

* ``role="vector"``: embeddings, the LM head, norm gains, biases. They get an AdamW step
  (torch.optim's own kernel) with their own ``lr`` (default ``adamw_lr``), ``adamw_betas``,
  ``adamw_eps`` and ``weight_decay`` (default ``adamw_weight_decay``).

``optimzoo.create_optimizer(model, name)`` routes parameters into such groups. Groups passed by hand
without a ``role`` are split by dimension (``ndim >= 2`` -> matrix, else vector); embeddings and
heads are 2-D, so route them explicitly (``role="vector"``) or use ``create_optimizer``.

LR schedulers scale both kinds of group (each group's ``lr`` is scheduled). No state is created
before the first step, so the optimizer can be built before the model is sharded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.optim.adamw import adamw as _adamw_kernel

from ._base import ZooOptimizer, check_betas, check_choice, check_lr, check_range

__all__ = ["MatrixOptimizer", "adjusted_lr_scale", "matrix_shape", "ns_compute_dtype"]

ROLES = ("matrix", "vector")
ADJUST_LR = ("keller", "match_adamw", None)
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


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The ``(rows, cols)`` a weight is treated as: ``(size(0), numel / size(0))``."""
    rows = shape[0]
    cols = 1
    for s in shape[1:]:
        cols *= s
    return rows, cols


def shape_buckets(params: Sequence[torch.Tensor], updates: Sequence[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices of the matrices that can be stacked and transformed together, keyed by
    ``(global shape, update dtype, update device)`` in first-seen order (the same on every rank)."""
    buckets: dict[tuple, list[int]] = {}
    for i, (p, u) in enumerate(zip(params, updates)):
        buckets.setdefault((tuple(p.shape), u.dtype, u.device), []).append(i)
    return buckets


def adjusted_lr_scale(adjust_lr: str | None, rows: int, cols: int) -> float:
    """The factor multiplying ``lr`` for a ``rows x cols`` matrix update.

    * ``"keller"``: ``sqrt(max(1, rows/cols))`` (KellerJordan/Muon; makes tall matrices' updates
      comparable; Muon-units lr ~ 0.02);
    * ``"match_adamw"``: ``0.2 * sqrt(max(rows, cols))`` (Moonshot's rule: an orthogonal update then has
      RMS ~ 0.2, like AdamW's, so AdamW's lr and weight decay can be reused);
    * ``None``: 1.
    """
    if adjust_lr == "keller":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr == "match_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


class MatrixOptimizer(ZooOptimizer):
    """Base class; see the module docstring. Subclasses implement ``_precondition`` and ``_transform``.

    Args (shared by every matrix optimizer, keyword-only in subclasses):
        adamw_lr: learning rate of vector groups (default 3e-4, KellerJordan/Muon's recommendation).
        adamw_betas: AdamW ``(beta1, beta2)`` for vector groups (default (0.9, 0.95)).
        adamw_eps: AdamW epsilon for vector groups (default 1e-10, as Muon's auxiliary Adam).
        adamw_weight_decay: decoupled weight decay of vector groups (default 0).
        foreach: use ``torch._foreach_*`` for the element-wise stages (None: when all tensors are
            plain tensors).
    """

    #: names of per-row state tensors (shape ``(rows, k)``) that ``_transform`` reads and updates
    row_state: tuple[str, ...] = ()

    def __init__(
        self,
        params,
        defaults: dict,
        *,
        adamw_lr: float,
        adamw_betas: tuple[float, float],
        adamw_eps: float,
        adamw_weight_decay: float,
        foreach: bool | None,
    ):
        check_lr(defaults["lr"])
        check_range("weight_decay", defaults["weight_decay"], 0.0)
        check_lr(adamw_lr, "adamw_lr")
        check_betas(adamw_betas, "adamw_betas")
        check_range("adamw_eps", adamw_eps, 0.0, low_open=True)
        check_range("adamw_weight_decay", adamw_weight_decay, 0.0)
        if "adjust_lr" in defaults:
            check_choice("adjust_lr", defaults["adjust_lr"], ADJUST_LR)
        if "ns_dtype" in defaults:
            check_choice("ns_dtype", defaults["ns_dtype"], NS_DTYPES)
        self._vector_defaults = {"lr": adamw_lr, "weight_decay": adamw_weight_decay}
        defaults = {**defaults, "adamw_betas": tuple(adamw_betas), "adamw_eps": adamw_eps, "foreach": foreach}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups

    def add_param_group(self, param_group: dict) -> None:
        """Add a group with ``role`` ``"matrix"`` or ``"vector"``; without a role it is split by ndim."""
        role = param_group.get("role")
        if role is None:
            params = param_group["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            tensor = lambda x: x[1] if isinstance(x, tuple) else x  # noqa: E731
            for r in ROLES:
                members = [x for x in params if (tensor(x).dim() >= 2) == (r == "matrix")]
                if members:
                    self.add_param_group({**param_group, "params": members, "role": r})
            return
        check_choice("role", role, ROLES)
        if role == "vector":
            for k, v in self._vector_defaults.items():
                param_group.setdefault(k, v)
        for k in ("lr", "weight_decay"):
            if k in param_group:
                check_lr(param_group[k], k)
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = self._closure_loss(closure)
        for group in self.param_groups:
            pairs = self._grads(group)
            if not pairs:
                continue
            if group["role"] == "vector":
                self._adamw_step(group, pairs)
            else:
                self._matrix_step(group, pairs)
        return loss

    def _adamw_step(self, group: dict, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p, g in pairs:
            state = self.state[p]
            m, v = self._zeros_state(state, p, "exp_avg", "exp_avg_sq")
            params.append(p)
            grads.append(g)
            exp_avgs.append(m)
            exp_avg_sqs.append(v)
            steps.append(self._step_counter(state))
        beta1, beta2 = group["adamw_betas"]
        _adamw_kernel(
            params, grads, exp_avgs, exp_avg_sqs, [], steps,
            foreach=self._use_foreach(group["foreach"], params), amsgrad=False,
            beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
            eps=group["adamw_eps"], maximize=False,
        )

    def _matrix_step(self, group: dict, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        params = [p for p, _ in pairs]
        grads = [g for _, g in pairs]
        states = [self.state[p] for p in params]
        for p, st in zip(params, states):
            if not st:
                self._init_state(group, p, st)
                for key in self.row_state:
                    st[key] = self._new_row_state(p, self._row_state_width(key))
        updates = self._precondition(group, params, grads, states)
        outs = self._transform_all(group, params, updates, states)
        self._apply(group, params, outs)

    def _transform_all(self, group, params, updates, states) -> list[torch.Tensor]:
        """Stage 2 for every matrix of the group: same-shape matrices are stacked and transformed once
        (``DTensor`` shards: once in the whole job, on an owner rank, see :mod:`optimzoo.distributed`)."""
        if any(hasattr(p, "device_mesh") for p in params):
            from ..distributed import transform_sharded

            return transform_sharded(self, group, params, updates, states)
        return self._transform_local(group, params, updates, states)

    def _transform_local(self, group, params, updates, states) -> list[torch.Tensor]:
        """Stage 2 on whole (unsharded) matrices, batched by shape; row state is updated in ``states``."""
        outs: list[torch.Tensor | None] = [None] * len(params)
        for (shape, _, _), idx in shape_buckets(params, updates).items():
            m, n = matrix_shape(shape)
            U = torch.stack([updates[i].reshape(m, n) for i in idx])
            rows = {k: torch.stack([states[i][k] for i in idx]) for k in self.row_state}
            O = self._transform(group, U, rows)
            for j, i in enumerate(idx):
                outs[i] = O[j].reshape(shape)
                for k in self.row_state:
                    states[i][k].copy_(rows[k][j])
        return outs  # type: ignore[return-value]

    def _apply(self, group: dict, params: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        """``W <- W (1 - lr wd) - lr s(m, n) O`` (decoupled weight decay first, as Muon)."""
        lr, wd = float(group["lr"]), group["weight_decay"]
        for p, o in zip(params, outs):
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(o.to(p.dtype), alpha=-lr * self._lr_scale(group, *matrix_shape(p.shape)))

    # ------------------------------------------------------------------ subclass hooks

    def _init_state(self, group: dict, p: torch.Tensor, state: dict) -> None:
        """Create the per-parameter state of a matrix parameter (row state is created by the base)."""

    def _row_state_width(self, key: str) -> int:
        return 1

    @staticmethod
    def _new_row_state(p: torch.Tensor, width: int) -> torch.Tensor:
        """A zero float32 ``(rows, width)`` tensor for per-row statistics of ``p``.

        For a ``DTensor`` parameter it is a ``DTensor`` on the same mesh and row placement, so
        distributed checkpoints reshard it with the parameter.
        """
        if hasattr(p, "device_mesh"):
            from ..distributed import row_state_like

            return row_state_like(p, width)
        return torch.zeros(p.shape[0], width, dtype=torch.float32, device=p.device)

    def _precondition(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor],
                      states: list[dict]) -> list[torch.Tensor]:
        """Stage 1 (element-wise, shard-local): the tensors to transform; default the raw gradients."""
        return grads

    def _transform(self, group: dict, U: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """Stage 2 on a stack ``U`` of full ``(B, m, n)`` matrices; update ``rows`` tensors in place."""
        raise NotImplementedError

    def _lr_scale(self, group: dict, rows: int, cols: int) -> float:
        """Stage 3's shape-dependent lr factor (see :func:`adjusted_lr_scale`)."""
        return adjusted_lr_scale(group.get("adjust_lr"), rows, cols)
