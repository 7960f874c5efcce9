"""What the optimzoo Trainer integration adds to a training run, for ``ZooTrainer`` and the stock ``Trainer`` alike.

One implementation, two ways in:

* :class:`~optimzoo.hf.ZooTrainer` uses it internally (its ``log`` override adds the metrics to each record
  *before* any callback runs, so every reporter sees them in the same record);
* any other ``Trainer`` (the stock one, TRL's ``SFTTrainer``, your subclass) gets it from
  :class:`OptimizerMetricsCallback`.

What it does:

* **Optimizer metrics** (:func:`optimizer_metrics`): ``optim/lr/<group>`` per param group, ``optim/update_rms/<group>``
  (RMS of the parameter change of the logged step), ``optim/step_ms`` (optimizer step wall time),
  ``optim/state_MB`` (this rank's optimizer state), ``optim/skipped_steps`` (optimizer steps skipped for a
  non-finite gradient norm since training started) and the optimizer's own ``metrics()`` as ``optim/<name>``
  (``nonfinite_grads``, SPAM's ``clip_fraction``, NorMuon's ``row_scale_spread``, ...). Update RMS and step time
  are measured only on the steps that will be logged (:class:`OptimizerMetrics`).
* **Non-finite steps** (:class:`NonFiniteGuard`): an optimizer step whose gradient norm is NaN/Inf is skipped, as
  AMP's ``GradScaler`` skips overflowing steps: weights, optimizer state and lr schedule are left as they were,
  and training goes on with the next batch. After ``max_nonfinite_skips`` skipped steps in a row, the next
  non-finite one raises a ``RuntimeError`` naming the steps and the flag; nothing is saved after it, so the
  last checkpoint on disk is one written before the failure (and skipped steps never changed the weights).
* **The run config** (:func:`run_config`): flat, canonical keys for grouping and filtering runs in a
  dashboard (``optimizer``, ``optimizer_kind``, ``lr``, ``vector_lr``, ``weight_decay``, ``seed``, ``model``,
  ``params``, ``tokens_per_step``, ``world_size``, ``parallelism``), the optimizer's full description under
  ``optimizer_config``, and the wandb project the run really goes to as ``project``. Written to the wandb run
  config and ``<output_dir>/optimizer_config.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import types
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback

from ..ops.reduce import local_tensor
from ..optim._base import state_bytes
from ..registry import get_spec, registered_name

__all__ = ["NonFiniteGuard", "OptimizerMetrics", "OptimizerMetricsCallback", "describe_optimizer",
           "optimizer_metrics", "run_config", "unwrap_optimizer"]

logger = logging.getLogger(__name__)

_UNSET: Any = object()
_GUARD_ATTR = "_optimzoo_nonfinite_guard"


# ------------------------------------------------------------------------------------------------ helpers


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` (and any wrapper that keeps it as ``.optimizer``)."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel``/``DataParallel`` (FSDP2 keeps the module itself)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _group_names(optimizer: torch.optim.Optimizer) -> list[str]:
    return [str(g.get("group_name", i)) for i, g in enumerate(optimizer.param_groups)]


def _scalar(x: torch.Tensor | float) -> float:
    """A number; a DTensor is reduced over its mesh first (every rank must call this)."""
    if hasattr(x, "full_tensor"):
        x = x.full_tensor()
    return float(x)


def _synchronize(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.device.type != "cpu":
                torch.accelerator.synchronize(p.device)
            return


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def logging_step_next(args, state) -> bool:
    """Whether the optimizer step about to run completes a step the Trainer will log."""
    step = state.global_step + 1
    if step == 1 and args.logging_first_step:
        return True
    return args.logging_strategy == "steps" and state.logging_steps > 0 and step % state.logging_steps == 0


# ------------------------------------------------------------------------------------------------ metrics


class OptimizerMetrics:
    """Optimizer step time and per-group update RMS, measured on the steps where ``due()`` is true.

    Installed as step pre/post hooks on the optimizer, so it works whatever wraps the optimizer
    (accelerate's ``AcceleratedOptimizer`` calls the inner ``step``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, due: Callable[[], bool]):
        self.optimizer = optimizer
        self.due = due
        self.last: dict[str, float] = {}
        self._before: list[list[torch.Tensor]] | None = None
        self._t0 = 0.0
        self._handles = [optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def clear(self) -> None:
        """Forget the last measurement (a skipped step has none)."""
        self.last = {}

    def _pre(self, optimizer, args, kwargs) -> None:
        if not self.due():
            return
        self._before = [[p.detach().clone() for p in g["params"]] for g in optimizer.param_groups]
        _synchronize(optimizer)
        self._t0 = time.perf_counter()

    def _post(self, optimizer, args, kwargs) -> None:
        if self._before is None:
            return
        _synchronize(optimizer)
        out = {"optim/step_ms": 1000.0 * (time.perf_counter() - self._t0)}
        for name, group, before in zip(_group_names(optimizer), optimizer.param_groups, self._before):
            out[f"optim/lr/{name}"] = float(group["lr"])  # the lr this step used, before the scheduler moves it
            numel = sum(p.numel() for p in group["params"])
            if not numel:
                continue
            sq = 0.0
            for p, b in zip(group["params"], before):
                b.sub_(p.detach())  # the copy becomes minus the update, in place: no tensor-sized temporaries
                if hasattr(b, "device_mesh"):  # a DTensor: a partial sum, reduced once, in _scalar
                    sq = sq + b.float().square().sum()
                else:
                    sq = sq + torch.linalg.vector_norm(b, dtype=torch.float32).square()
            out[f"optim/update_rms/{name}"] = math.sqrt(_scalar(sq) / numel)
        self._before = None
        self.last = out


def optimizer_metrics(optimizer: torch.optim.Optimizer | None, measured: OptimizerMetrics | None = None,
                      guard: NonFiniteGuard | None = None) -> dict[str, float]:
    """The optimizer entries of a training log record (see the module docstring). Call it on every rank."""
    if optimizer is None:
        return {}
    inner = unwrap_optimizer(optimizer)
    out = {f"optim/lr/{n}": float(g["lr"]) for n, g in zip(_group_names(inner), inner.param_groups)}
    if measured is not None:
        out.update(measured.last)
    out["optim/state_MB"] = state_bytes(inner) / 2**20
    if guard is not None and guard.active:
        out["optim/skipped_steps"] = float(guard.skipped)
    metrics = getattr(inner, "metrics", None)
    if callable(metrics):
        out.update({f"optim/{k}": float(v) for k, v in metrics().items()})
    return out


# ------------------------------------------------------------------------------------------------ non-finite steps


class NonFiniteGuard:
    """Skips an optimizer step whose gradient norm is NaN or Inf, as AMP's ``GradScaler`` does for overflows.

    :meth:`install` replaces the optimizer's ``step`` by a bound method that checks the gradient norm first and
    returns without stepping when it is non-finite: the parameters, the optimizer state and its step counters are
    untouched (the optimizer's step hooks, such as :class:`OptimizerMetrics`, do not run either). This is the
    mechanism accelerate itself uses around ``GradScaler``. The norm is the one the Trainer computed for this step
    when it is handed over (:meth:`observe_grad_norm`, done by ``ZooTrainer``); otherwise the guard computes it
    from the gradients (one ``foreach`` norm over the local gradients, plus one scalar all-reduce in a distributed
    job so that every rank skips together: under FSDP2 a NaN may sit in one rank's shard only).

    When it knows accelerate's wrapper (:meth:`link`), a skipped step is reported as ``step_was_skipped``, so the
    Trainer does not advance the lr scheduler either (as for a ``GradScaler`` overflow).

    ``max_skips``: skipped steps allowed in a row; the next non-finite one raises ``RuntimeError`` (also without
    stepping). 0 stops at the first non-finite step, -1 never stops. Each skip is logged as a warning.
    """

    def __init__(self, max_skips: int = 5, source: str = "NonFiniteGuard(max_skips=...)"):
        self.max_skips = int(max_skips)
        self.source = source  # where max_nonfinite_skips is set, named in the error
        self.skipped = 0  # skipped steps since training started
        self.consecutive = 0
        self.active = True
        self.optimizer: torch.optim.Optimizer | None = None
        self.outer: torch.optim.Optimizer | None = None
        self.step_number: Callable[[], int] | None = None  # the Trainer step the optimizer step completes
        self.on_skip: list[Callable[[], None]] = []
        self._pending_norm: Any = None
        self._calls = 0
        self._first_bad = 0

    @staticmethod
    def of(optimizer: torch.optim.Optimizer) -> NonFiniteGuard | None:
        """The guard installed on ``optimizer`` (or on the optimizer it wraps), if any."""
        return unwrap_optimizer(optimizer).__dict__.get(_GUARD_ATTR)

    def install(self, optimizer: torch.optim.Optimizer) -> NonFiniteGuard:
        """Guard ``optimizer.step`` (the inner optimizer of a wrapper). Returns the guard in place, which is an
        earlier one if the optimizer already has one."""
        optimizer = unwrap_optimizer(optimizer)
        existing = optimizer.__dict__.get(_GUARD_ATTR)
        if existing is not None:
            return existing
        original = optimizer.step  # the class's hooked step, or the lr scheduler's wrapper around it
        guard = self

        def step(opt, *args, **kwargs):
            return guard._step(original, args, kwargs)

        # a bound method, as torch's lr schedulers and accelerate expect of ``optimizer.step``
        optimizer.step = types.MethodType(step, optimizer)
        setattr(optimizer, _GUARD_ATTR, self)
        if hasattr(optimizer, "count_nonfinite"):
            # non-finite steps never reach the optimizer now: its own count would read every gradient for 0
            optimizer.count_nonfinite = False
        self.optimizer = optimizer
        return self

    def link(self, outer: torch.optim.Optimizer | None, step_number: Callable[[], int] | None) -> None:
        """Tell the guard accelerate's wrapper (to report skipped steps) and how to number steps in messages.
        With an fp16 ``GradScaler`` the scaler does the skipping (and its own scale search); the guard stands down."""
        self.outer = outer if outer is not None and outer is not self.optimizer else None
        self.step_number = step_number
        if getattr(outer, "scaler", None) is not None:
            self.active = False
            logger.info("optimzoo: fp16 GradScaler in use; it skips non-finite steps itself")

    def observe_grad_norm(self, norm: Any) -> None:
        """The gradient norm the Trainer computed for the step about to run (saves computing it again)."""
        self._pending_norm = norm

    def _report_skipped(self, skipped: bool) -> None:
        outer = self.outer
        if outer is not None and hasattr(outer, "_is_overflow") and getattr(outer, "scaler", None) is None:
            outer._is_overflow = skipped  # accelerate's ``step_was_skipped``: the Trainer then holds the scheduler

    def _nonfinite(self) -> tuple[bool, float]:
        norm, self._pending_norm = self._pending_norm, None
        if norm is not None:
            value = _scalar(norm)
            return not math.isfinite(value), value
        grads = [local_tensor(p.grad) for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else next(
            (p.device for g in self.optimizer.param_groups for p in g["params"]), torch.device("cpu"))
        if grads:
            total = torch.nn.utils.get_total_norm(grads, 2.0).float()
        else:
            total = torch.zeros((), device=device)
        flag = (~torch.isfinite(total)).float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # skip on every rank, or on none
        return bool(flag), float(total)

    def _step(self, original, args, kwargs):
        self._calls += 1
        closure = args[0] if args else kwargs.get("closure")
        if not self.active or closure is not None:
            self._pending_norm = None
            return original(*args, **kwargs)
        bad, norm = self._nonfinite()
        if not bad:
            self.consecutive = 0
            self._report_skipped(False)
            return original(*args, **kwargs)
        step = self.step_number() if self.step_number is not None else self._calls
        self.consecutive += 1
        self.skipped += 1
        if self.consecutive == 1:
            self._first_bad = step
        self._report_skipped(True)
        for hook in self.on_skip:
            hook()
        if 0 <= self.max_skips < self.consecutive:
            steps = f"step {step}" if self.consecutive == 1 else f"steps {self._first_bad}-{step}"
            raise RuntimeError(
                f"optimzoo: {self.consecutive} optimizer step(s) in a row had a non-finite gradient norm ({steps}, "
                f"last norm {norm}); max_nonfinite_skips={self.max_skips} (set by {self.source}) allows "
                f"{self.max_skips} skipped step(s) in a row, so training stops at step {step}. No optimizer step "
                f"was applied after step {self._first_bad - 1}: the weights and optimizer state are those after "
                f"it, and nothing was saved after this failure (the last checkpoint on disk is intact). Lower the "
                f"learning rate, look at the data around step {self._first_bad}, or raise max_nonfinite_skips "
                f"(-1: never stop).")
        logger.warning(f"optimzoo: step {step}: gradient norm is {norm}; optimizer step skipped (weights, optimizer "
                       f"state and lr schedule untouched; {self.consecutive} in a row, max_nonfinite_skips="
                       f"{self.max_skips})")
        return None


# ------------------------------------------------------------------------------------------------ run config


def canonical_name(optimizer: torch.optim.Optimizer) -> str:
    """The registry's canonical name of the optimizer's class (``normuon``; torch's AdamW is ``adamw``),
    else the class name in lower case."""
    inner = unwrap_optimizer(optimizer)
    name = getattr(inner, "optimizer_name", None)
    if isinstance(name, str) and name:
        return name
    return registered_name(type(inner)) or type(inner).__name__.lower()


def describe_optimizer(optimizer: torch.optim.Optimizer, hparams: Mapping[str, Any] | None = None) -> dict:
    """The optimizer as a JSON-able dict: name, kind, class, full hyperparameters (the constructor's defaults
    updated with ``hparams``, or with what the optimizer recorded as ``zoo_hparams``), param groups, routing."""
    inner = unwrap_optimizer(optimizer)
    name = canonical_name(inner)
    given = dict(hparams if hparams is not None else getattr(inner, "zoo_hparams", None) or {})
    try:
        spec = get_spec(name)
    except (ValueError, TypeError):
        spec = None
    actual = dict(getattr(inner, "defaults", None) or {})  # torch.optim keeps the constructor's values here
    try:
        full = {**spec.defaults, **{k: v for k, v in actual.items() if k in spec.defaults}, **given} \
            if spec is not None else {**actual, **given}
    except Exception:  # a class whose signature cannot be read
        full = {**actual, **given}
    full.pop("params", None)
    plan = getattr(inner, "routing_plan", None)
    return {
        "name": name,
        "kind": spec.kind if spec is not None else None,
        "class": f"{type(inner).__module__}.{type(inner).__qualname__}",
        "hparams": _jsonable(full),
        "groups": [_jsonable({k: v for k, v in g.items() if k not in ("params", "param_names")})
                   for g in inner.param_groups],
        "routing": plan.to_dict()["groups"] if plan is not None else None,
    }


def _initial_lr(group: Mapping) -> float:
    return float(group.get("initial_lr", group["lr"]))


def _parallelism(args, model: nn.Module | None) -> str:
    params = list(model.parameters()) if model is not None else []
    if any(hasattr(p, "device_mesh") for p in params):
        return "fsdp2"
    if any(type(p).__name__ == "FlatParameter" for p in params):
        return "fsdp"
    if getattr(args, "deepspeed", None):
        return "deepspeed"
    return "ddp" if getattr(args, "world_size", 1) > 1 else "none"


def _model_name(model: nn.Module | None) -> str | None:
    if model is None:
        return None
    config = getattr(unwrap_model(model), "config", None)
    name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
    return str(name) if name else getattr(config, "model_type", None) or type(unwrap_model(model)).__name__


def run_config(args, model: nn.Module | None, optimizer: torch.optim.Optimizer,
               hparams: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The flat, canonical run-config keys (see the module docstring) plus ``optimizer_config`` (nested).

    ``lr`` is the initial lr of the main group (the matrix group of a matrix optimizer), ``vector_lr`` that of the
    parameters outside the matrix update (a matrix optimizer's AdamW groups; for an element-wise optimizer the
    same as ``lr``), ``weight_decay`` that of the decayed groups. ``tokens_per_step`` is filled in by the caller.
    """
    inner = unwrap_optimizer(optimizer)
    described = describe_optimizer(inner, hparams)
    groups = inner.param_groups
    matrix = [g for g in groups if g.get("role") == "matrix"]
    vector = [g for g in groups if g.get("role") == "vector"]
    main = matrix or [g for g in groups if g.get("weight_decay", 0)] or groups
    lr = _initial_lr(main[0]) if main else None
    unique = {id(p): p for p in model.parameters()} if model is not None else {}
    return {
        "optimizer": described["name"],
        "optimizer_kind": described["kind"],
        "lr": lr,
        "vector_lr": _initial_lr(vector[0]) if vector else (lr if not matrix else None),
        "weight_decay": max((float(g.get("weight_decay", 0.0)) for g in groups), default=0.0),
        "seed": getattr(args, "seed", None),
        "model": _model_name(model),
        "params": sum(p.numel() for p in unique.values()),
        "tokens_per_step": None,
        "world_size": getattr(args, "world_size", 1),
        "parallelism": _parallelism(args, model),
        "optimizer_config": described,
    }


def _wandb_run():
    try:
        from transformers.integrations import is_wandb_available

        if not is_wandb_available():
            return None
        import wandb
    except ImportError:
        return None
    return wandb.run


# ------------------------------------------------------------------------------------------------ the callback


class OptimizerMetricsCallback(TrainerCallback):
    """Optimizer metrics, non-finite step skipping and the canonical run config for any ``Trainer``.

    >>> trainer = Trainer(model, args, train_dataset=ds,
    ...                   optimizer_cls_and_kwargs=optimzoo.hf.trainer_optimizer("normuon", lr=0.02),
    ...                   callbacks=[optimzoo.hf.OptimizerMetricsCallback()])

    Args:
        max_nonfinite_skips: see :class:`NonFiniteGuard`; default: the value given to
            :func:`~optimzoo.hf.trainer_optimizer` when the optimizer came from it, else 5. ``None``: no skipping.
        run_config: entries for the run config that win over the computed ones (a recipe's ``model`` name,
            ``tokens_per_step``, ...); the dict is kept (``callback.run_config``) and completed at train begin.

    Where the metrics go: each training log record gets them in ``on_log``. Callbacks run in order, and
    ``WandbCallback`` (like every ``report_to`` integration) is placed before the ones passed as ``callbacks=``,
    so by then it has sent the record. This callback then sends the ``optim/*`` entries to the wandb run itself
    (same ``train/global_step``, so they plot on the same axis) and adds them to ``trainer.state.log_history``
    (``trainer_state.json``). Other reporters (TensorBoard, MLflow, ...) see them only when the callback runs
    first: ``OptimizerMetricsCallback().attach(trainer)`` puts it at the front, and every reporter then gets
    them in the same record, as with ``ZooTrainer``.
    """

    def __init__(self, max_nonfinite_skips: int | None = _UNSET, run_config: dict | None = None):
        self.max_nonfinite_skips = max_nonfinite_skips
        self.run_config: dict[str, Any] = run_config if run_config is not None else {}
        self.in_trainer = False  # ZooTrainer adds the metrics in its ``log``
        self.ahead_of_reporters = False
        self.skip_flag_name = "OptimizerMetricsCallback(max_nonfinite_skips=...)"
        self.measured: OptimizerMetrics | None = None
        self.guard: NonFiniteGuard | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._args = None
        self._state = None
        self._user_keys: set[str] | None = None  # keys the user set: computed values never replace them
        self._tokens_at_begin: int | None = None
        self._steps_this_session = 0

    # ---------------------------------------------------------------- setup

    def attach(self, trainer) -> OptimizerMetricsCallback:
        """Add this callback to ``trainer`` ahead of every other callback (see the class docstring)."""
        trainer.callback_handler.callbacks.insert(0, self)
        self.ahead_of_reporters = True
        return self

    def _due(self) -> bool:
        return self._state is not None and logging_step_next(self._args, self._state)

    def _step_number(self) -> int:
        return self._state.global_step + 1 if self._state is not None else 0

    def setup(self, args, state, model, optimizer) -> None:
        """Hook the optimizer (metrics and guard); build the run config. Runs at ``on_train_begin``."""
        self._args, self._state = args, state
        if optimizer is None:
            return
        inner = unwrap_optimizer(optimizer)
        if self.measured is None or self.measured.optimizer is not inner:
            if self.measured is not None:
                self.measured.remove()
            self.measured = OptimizerMetrics(inner, self._due)
        self._setup_guard(optimizer, inner, state)
        self._optimizer = optimizer
        if self._user_keys is None:
            self._user_keys = set(self.run_config)
        self._update_config(run_config(args, model, optimizer))
        self._tokens_at_begin = state.num_input_tokens_seen if args.include_num_input_tokens_seen not in (
            "no", False) else None
        self._steps_this_session = 0
        if state.is_world_process_zero:
            self._write_optimizer_config(args, inner)

    def _setup_guard(self, optimizer, inner, state) -> None:
        guard = NonFiniteGuard.of(inner)
        wanted = self.max_nonfinite_skips
        if wanted is None:
            if guard is not None:
                guard.active = False
            self.guard = None
            return
        if guard is None:
            guard = NonFiniteGuard(5 if wanted is _UNSET else wanted, self.skip_flag_name).install(inner)
        elif wanted is not _UNSET:
            guard.max_skips, guard.source = int(wanted), self.skip_flag_name
        guard.active = True
        guard.link(optimizer, self._step_number)
        if self.measured is not None and self.measured.clear not in guard.on_skip:
            guard.on_skip.append(self.measured.clear)
        # a resumed run goes on counting from the checkpoint's log history
        previous = [r["optim/skipped_steps"] for r in state.log_history if "optim/skipped_steps" in r]
        guard.skipped = max(guard.skipped, int(previous[-1])) if previous else guard.skipped
        self.guard = guard

    def _update_config(self, computed: Mapping[str, Any]) -> None:
        for key, value in computed.items():
            if key not in self._user_keys:
                self.run_config[key] = value

    def _write_optimizer_config(self, args, inner) -> None:
        config = self.run_config.get("optimizer_config") or describe_optimizer(inner)
        plan = getattr(inner, "routing_plan", None)
        print(f"optimzoo: {config['name']} ({config['class']}); parameter routing:\n{plan}", flush=True)
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "optimizer_config.json"), "w") as f:
            json.dump({**config, "routing": plan.to_dict() if plan is not None else None,
                       "run_config": {k: v for k, v in self.run_config.items() if k != "optimizer_config"}},
                      f, indent=1, default=str)

    def push_config(self, state) -> None:
        """Send the run config to the wandb run (process zero, when there is a run), with the real project."""
        run = _wandb_run() if state.is_world_process_zero else None
        if run is None or not self.run_config:
            return
        run.config.update({**self.run_config, "project": run.project}, allow_val_change=True)

    # ---------------------------------------------------------------- metrics

    def observe_grad_norm(self, norm) -> None:
        if self.guard is not None:
            self.guard.observe_grad_norm(norm)

    def metrics(self) -> dict[str, float]:
        """The ``optim/*`` entries for a training log record (call on every rank)."""
        return optimizer_metrics(self._optimizer, self.measured, self.guard)

    # ---------------------------------------------------------------- events

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.setup(args, state, model, optimizer)
        self.push_config(state)  # again at the first step, once every reporter has set up its run

    def on_step_begin(self, args, state, control, **kwargs):
        self._args, self._state = args, state

    def on_step_end(self, args, state, control, **kwargs):
        self._steps_this_session += 1
        if self._steps_this_session != 1:
            return
        if self._tokens_at_begin is not None and "tokens_per_step" not in (self._user_keys or ()):
            self.run_config["tokens_per_step"] = state.num_input_tokens_seen - self._tokens_at_begin
        self.push_config(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.in_trainer or not logs or "loss" not in logs or "optim/state_MB" in logs:
            return
        metrics = self.metrics()
        logs.update(metrics)
        record = state.log_history[-1] if state.log_history else None
        if record is not None and record.get("step") == state.global_step and "loss" in record:
            record.update(metrics)
        if self.ahead_of_reporters or not state.is_world_process_zero or "wandb" not in (args.report_to or []):
            return
        run = _wandb_run()
        if run is not None:  # WandbCallback has already sent this record
            run.log({**{f"train/{k}": v for k, v in metrics.items()}, "train/global_step": state.global_step})
