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

  On whole (unsharded) matrices the three stages run one *chunk* at a time: same-shape matrices, as
  many as fit in the memory budget ``batch_budget`` (default: 4x the float32 bytes of the largest
  parameter the optimizer holds, at least 256 MiB), so a step's temporaries are one chunk's (momentum
  mix, stack, Newton-Schulz iterates) rather than several copies of every matrix of the group. Each matrix's
  update is the same whatever the chunking (batched kernels compute each matrix on its own).

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
#: the default ``batch_budget`` is never below this (it binds only when every parameter is small):
#: splitting smaller batches saves little memory and costs speed. On a shared 2-core Zen 4, bf16
#: Newton-Schulz of 8 matrices of 1376 x 512 took 0.65 s as one batch and 1.2 s as 8 batches of one;
#: a NorMuon step over 16 of them 1.6 s as one chunk and 8.3 s as 16 chunks of one (one run each).
MIN_DEFAULT_BUDGET = 256 * 2**20
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
        batch_budget: bytes of temporaries one batched chunk of same-shape matrices may take, as
            estimated by :meth:`_chunk_bytes` (> 0; default None: 4x the float32 bytes of the largest
            parameter of all groups, at least :data:`MIN_DEFAULT_BUDGET` = 256 MiB; a chunk holds at
            least one matrix). A group may set its own.
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
        batch_budget: float | None = None,
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
        if batch_budget is not None:
            check_range("batch_budget", batch_budget, 0.0, low_open=True)
        self._vector_defaults = {"lr": adamw_lr, "weight_decay": adamw_weight_decay}
        defaults = {**defaults, "adamw_betas": tuple(adamw_betas), "adamw_eps": adamw_eps, "foreach": foreach,
                    "batch_budget": batch_budget}
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
        if any(hasattr(p, "device_mesh") for p in params):
            # DTensor shards: stage 2 once in the whole job, on an owner rank (see optimzoo.distributed)
            from ..distributed import transform_sharded

            updates = self._precondition(group, params, grads, states)
            self._apply(group, params, transform_sharded(self, group, params, updates, states))
            return
        for idx in self._chunks(group, params, grads):  # whole matrices: all three stages per chunk
            ps, sts = [params[i] for i in idx], [states[i] for i in idx]
            updates = self._precondition(group, ps, [grads[i] for i in idx], sts)
            self._apply(group, ps, self._transform_stack(group, ps, updates, sts))

    def _transform_local(self, group, params, updates, states) -> list[torch.Tensor]:
        """Stage 2 on whole (unsharded) matrices, batched by shape in budget-sized chunks; row state is
        updated in ``states``."""
        outs: list[torch.Tensor | None] = [None] * len(params)
        for idx in self._chunks(group, params, updates):
            chunk = self._transform_stack(group, [params[i] for i in idx], [updates[i] for i in idx],
                                          [states[i] for i in idx])
            for i, o in zip(idx, chunk):
                outs[i] = o
        return outs  # type: ignore[return-value]

    def _transform_stack(self, group, params, updates, states) -> list[torch.Tensor]:
        """Stage 2 on same-shape matrices, stacked into one ``(B, m, n)`` batch."""
        m, n = matrix_shape(params[0].shape)
        U = torch.stack([u.reshape(m, n) for u in updates])
        rows = {k: torch.stack([st[k] for st in states]) for k in self.row_state}
        O = self._transform(group, U, rows)
        for j, st in enumerate(states):
            for k in self.row_state:
                st[k].copy_(rows[k][j])
        return [O[j].reshape(p.shape) for j, p in enumerate(params)]

    def _chunks(self, group, params, tensors) -> list[list[int]]:
        """Indices of same-shape matrices (:func:`~optimzoo.ops.matrix.shape_buckets` of ``params`` and
        ``tensors``, the gradients or updates), each bucket split into the fewest equal chunks whose
        :meth:`_chunk_bytes` fit in the group's ``batch_budget`` (at least one matrix per chunk)."""
        budget = self._batch_budget(group)
        chunks = []
        for (shape, dtype, _), idx in shape_buckets(params, tensors).items():
            per = self._chunk_bytes(group, *matrix_shape(shape), dtype.itemsize)
            count = -(-len(idx) // max(1, int(budget // per)))  # ceil: the fewest chunks that fit
            size, extra = divmod(len(idx), count)  # as equal as possible: sizes differ by at most one
            bounds = [i * size + min(i, extra) for i in range(count + 1)]
            chunks += [idx[a:b] for a, b in zip(bounds, bounds[1:])]
        return chunks

    def _batch_budget(self, group: dict) -> float:
        """The group's ``batch_budget`` in bytes; by default 4x the float32 bytes of the optimizer's largest
        parameter (global shape), at least :data:`MIN_DEFAULT_BUDGET`. Also the owner ranks' budget on
        sharded matrices (:mod:`optimzoo.distributed.owner`)."""
        budget = group.get("batch_budget")
        if budget is None:
            largest = max(p.numel() for g in self.param_groups for p in g["params"])
            budget = max(4 * 4 * largest, MIN_DEFAULT_BUDGET)
        return budget

    def _chunk_bytes(self, group: dict, rows: int, cols: int, itemsize: int) -> int:
        """Estimated temporaries of the three stages per ``rows x cols`` matrix of a chunk: the
        preconditioned update and its stacked copy (``itemsize`` bytes an element) plus
        :meth:`_transform_bytes`."""
        return 2 * rows * cols * itemsize + self._transform_bytes(group, rows, cols)

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

    def _transform_bytes(self, group: dict, rows: int, cols: int) -> int:
        """Peak temporaries of :meth:`_transform` per ``rows x cols`` matrix, beyond its input stack
        (default: two float32 copies, the output and one intermediate)."""
        return 2 * rows * cols * 4

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
