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
  ``adamw_eps`` and ``weight_decay`` (default ``adamw_weight_decay``, which defaults to the
  optimizer's ``weight_decay``: the same decay reaches every decayed group, as with AdamW; groups routed
  as no-decay keep 0).

``optimzoo.create_optimizer(model, name)`` routes parameters into such groups. Groups passed by hand
without a ``role`` are routed by their names when they hold ``(name, tensor)`` pairs
(``model.named_parameters()``: :func:`optimzoo.plan_parameters` on the names), and by dimension
(``ndim >= 2`` -> matrix, else vector) when they hold bare tensors (``model.parameters()``). Bare
tensors cannot tell an embedding or an LM head from a hidden weight, so that case warns once
(``UserWarning``, naming the count of 2-D tensors that take the matrix update) and the optimizer's
``routing_plan`` says the same. Either way ``routing_plan`` lists where each tensor went.

LR schedulers scale both kinds of group (each group's ``lr`` is scheduled). No state is created
before the first step, so the optimizer can be built before the model is sharded.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import warnings

import torch
from torch.optim.adamw import adamw as _adamw_kernel

from ..ops.matrix import matrix_shape, shape_buckets
from ..ops.orthogonalize import NS_DTYPES
from ..param_groups import RoutingPlan, plan_parameters, unnamed_plan, unnamed_warning
from ._base import ZooOptimizer, check_betas, check_choice, check_lr, check_range

__all__ = ["MatrixOptimizer", "adjusted_lr_scale"]

ROLES = ("matrix", "vector")
ADJUST_LR = ("keller", "match_adamw", None)


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
        adamw_weight_decay: decoupled weight decay of vector groups (default None: the optimizer's
            ``weight_decay``, so a comparison with AdamW at the same arguments decays the same
            tensors; pass 0.0 to keep embeddings and the head undecayed, as Muon's examples do).
        foreach: use ``torch._foreach_*`` for the element-wise stages (None: when all tensors are
            plain tensors).
    """

    #: names of per-row state tensors (shape ``(rows, k)``) that ``_transform`` reads and updates
    row_state: tuple[str, ...] = ()
    #: where the tensors of groups given without a ``role`` went (``create_optimizer`` sets the model's plan)
    routing_plan: RoutingPlan | None = None

    def __init__(
        self,
        params,
        defaults: dict,
        *,
        adamw_lr: float,
        adamw_betas: tuple[float, float],
        adamw_eps: float,
        adamw_weight_decay: float | None,
        foreach: bool | None,
    ):
        check_lr(defaults["lr"])
        check_range("weight_decay", defaults["weight_decay"], 0.0)
        check_lr(adamw_lr, "adamw_lr")
        check_betas(adamw_betas, "adamw_betas")
        check_range("adamw_eps", adamw_eps, 0.0, low_open=True)
        if adamw_weight_decay is None:
            adamw_weight_decay = defaults["weight_decay"]
        check_range("adamw_weight_decay", adamw_weight_decay, 0.0)
        if "adjust_lr" in defaults:
            check_choice("adjust_lr", defaults["adjust_lr"], ADJUST_LR)
        if "ns_dtype" in defaults:
            check_choice("ns_dtype", defaults["ns_dtype"], NS_DTYPES)
        self._vector_defaults = {"lr": adamw_lr, "weight_decay": adamw_weight_decay}
        defaults = {**defaults, "adamw_betas": tuple(adamw_betas), "adamw_eps": adamw_eps, "foreach": foreach}
        self._defer_warning = True  # groups of the constructor warn once, together
        super().__init__(params, defaults)
        self._defer_warning = False
        self._warn_unrouted()

    # ------------------------------------------------------------------ groups

    def add_param_group(self, param_group: dict) -> None:
        """Add a group with ``role`` ``"matrix"`` or ``"vector"``. Without a role the group is split:
        ``(name, tensor)`` pairs by :func:`optimzoo.plan_parameters` on their names, bare tensors by
        dimension, with a warning (see the module docstring)."""
        role = param_group.get("role")
        if role is None:
            params = param_group["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            named = all(isinstance(x, tuple) for x in params)
            tensors = [x[1] if isinstance(x, tuple) else x for x in params]
            if named:  # roles from the names; weight decay stays the group's, as torch.optim does
                plan = plan_parameters(params, include_frozen=True)
                plan = RoutingPlan([dataclasses.replace(i, decay=True, decay_reason="the group's weight_decay")
                                    for i in plan.infos], plan.params, "matrix")
            else:
                done = self.routing_plan.infos if self.routing_plan is not None else []
                plan = unnamed_plan(tensors, first_index=len(done))
            self._record_routing(plan)
            roles = {id(p): info.role for info, p in zip(plan.infos, plan.params)}
            for r in ROLES:
                members = [x for x, t in zip(params, tensors) if roles[id(t)] == r]
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

    def _record_routing(self, plan: RoutingPlan) -> None:
        """Add ``plan`` (groups routed without a given role) to ``routing_plan``; warn unless deferred."""
        before = self.routing_plan
        infos = (before.infos if before is not None else []) + plan.infos
        params = (before.params if before is not None else []) + plan.params
        self.routing_plan = RoutingPlan(infos, params, "matrix", unnamed_warning(infos))
        if plan.warning and not self._defer_warning:
            self._warn_unrouted()

    def _warn_unrouted(self) -> None:
        plan = self.routing_plan
        if plan is not None and plan.warning:
            # point at the user's line: the first frame outside optimzoo and torch.optim
            inside = (os.path.dirname(os.path.dirname(__file__)), os.path.dirname(torch.optim.__file__))
            frame, level = sys._getframe(0), 1
            while frame.f_back is not None and frame.f_code.co_filename.startswith(inside):
                frame, level = frame.f_back, level + 1
            warnings.warn(f"{type(self).__name__}: {plan.warning}", UserWarning, stacklevel=level)

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
            step = self._step_counter(state)
            if torch.compiler.is_compiling() and step.device != p.device:
                # the capturable kernel computes on the counters: keep them on the parameter's device,
                # as torch.optim's compiled step does (dynamo's OptimizerVariable.move_step_if_cpu)
                step = state["step"] = step.to(p.device)
            steps.append(step)
        beta1, beta2 = group["adamw_betas"]
        # Under torch.compile, torch.optim.AdamW's step runs with ``capturable=True`` (dynamo sets it in
        # the traced param groups, note [torch.compile x capturable]): the bias corrections are then
        # tensor ops on the step counters. The non-capturable foreach kernel would stack them into a
        # tensor of step sizes, which its ``_foreach_addcdiv_`` refuses while tracing ("Expected scalars
        # to be on CPU, got meta"). Eager keeps the non-capturable kernel (Python-float bias corrections).
        _adamw_kernel(
            params, grads, exp_avgs, exp_avg_sqs, [], steps,
            foreach=self._use_foreach(group["foreach"], params), amsgrad=False,
            capturable=torch.compiler.is_compiling(),
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
