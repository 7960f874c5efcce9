"""``ZooTrainer``: a ``transformers.Trainer`` that builds zoo optimizers by name and logs their metrics.

* ``create_optimizer`` builds the optimizer named by ``ZooTrainingArguments.optim`` with
  :func:`optimzoo.create_optimizer` on the model's *named* parameters, so routing (matrix/vector,
  decay/no-decay) is right; it works on the plain, DDP-wrapped or FSDP2-sharded model (DTensor
  parameters), and ``resume_from_checkpoint`` restores its ``state_dict`` like any optimizer's. The
  routing plan is printed at the start, written to ``<output_dir>/optimizer_config.json`` and added to
  the wandb run config.
* ``log`` adds optimizer metrics to every training log record *before* the callbacks see it, which is
  how they reach wandb (``WandbCallback`` runs before user callbacks, so a user ``on_log`` is too late):
  ``optim/lr/<group>`` for every param group (the lr of the logged step, like transformers'
  ``learning_rate``), ``optim/update_rms/<group>`` (RMS of the parameter change of
  the step just taken), ``optim/step_ms`` (optimizer step wall time), ``optim/state_MB`` (this rank's
  optimizer state) and the optimizer's own ``metrics()`` as ``optim/<name>`` (SPAM's ``clip_fraction``,
  NorMuon's ``row_scale_spread``, ...); every record (train and eval) also gets ``elapsed_s``, the wall time
  since ``train()`` started.

Cost: update RMS and step time are measured only on steps that are logged: one copy of the parameters
before the step and one reduction per tensor after it (plus a device synchronization around the step
on accelerators); the other steps run untouched.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable

import torch
from transformers import Trainer, TrainerCallback

from ..optim._base import state_bytes
from ..registry import create_optimizer

__all__ = ["OptimizerMetrics", "ZooTrainer"]

logger = logging.getLogger(__name__)


def _group_names(optimizer: torch.optim.Optimizer) -> list[str]:
    return [str(g.get("group_name", i)) for i, g in enumerate(optimizer.param_groups)]


def _scalar(x: torch.Tensor) -> float:
    """A 0-d tensor as a float; a DTensor is reduced over its mesh first (all ranks must call this)."""
    if hasattr(x, "full_tensor"):
        x = x.full_tensor()
    return float(x)


def _synchronize(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.device.type != "cpu":
                torch.accelerator.synchronize(p.device)
            return


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
            sq = sum((p.detach() - b).float().square().sum() for p, b in zip(group["params"], before))
            numel = sum(p.numel() for p in group["params"])
            if numel:
                out[f"optim/update_rms/{name}"] = math.sqrt(_scalar(sq) / numel)
        self._before = None
        self.last = out


class _RunConfigCallback(TrainerCallback):
    """Adds ``trainer.run_config`` (the optimizer's hyperparameters and routing, plus whatever a recipe
    put there) to the wandb run config, after ``WandbCallback`` has created the run."""

    def __init__(self, trainer: ZooTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if not (self.trainer.run_config and state.is_world_process_zero):
            return
        try:
            import wandb
        except ImportError:
            return
        if wandb.run is not None:
            wandb.run.config.update(self.trainer.run_config, allow_val_change=True)


class ZooTrainer(Trainer):
    """A ``Trainer`` for :class:`~optimzoo.hf.ZooTrainingArguments` (see the module docstring).

    With plain ``TrainingArguments`` or a transformers optimizer name it behaves like ``Trainer`` and still
    logs the generic optimizer metrics.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        #: extra entries for the wandb run config; ``create_optimizer`` adds ``"optimizer"``
        self.run_config: dict = {}
        self._optimizer_metrics: OptimizerMetrics | None = None
        self._train_start: float | None = None
        self.add_callback(_RunConfigCallback(self))

    # ------------------------------------------------------------------ optimizer

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        zoo_name = getattr(self.args, "zoo_optim", None)
        if self.optimizer is None and zoo_name is not None:
            opt_model = self.model if model is None else model
            hparams = self.args.zoo_hparams()
            self.optimizer = create_optimizer(opt_model, zoo_name, routing=self.args.zoo_routing_options(),
                                              **hparams)
            self._record_config(zoo_name, hparams)
        else:
            super().create_optimizer(model)
        self._attach_metrics()
        return self.optimizer

    def _record_config(self, name: str, hparams: dict) -> None:
        plan = self.optimizer.routing_plan
        config = {
            "name": name,
            "class": f"{type(self.optimizer).__module__}.{type(self.optimizer).__qualname__}",
            "hparams": {k: list(v) if isinstance(v, tuple) else v for k, v in hparams.items()},
            "groups": [{k: v for k, v in g.items() if k not in ("params", "param_names")}
                       for g in self.optimizer.param_groups],
            "routing": plan.to_dict()["groups"] if plan is not None else None,
        }
        self.run_config["optimizer"] = config
        if self.is_world_process_zero():
            print(f"optimzoo: {name} ({config['class']}); parameter routing:\n{plan}", flush=True)
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, "optimizer_config.json"), "w") as f:
                json.dump({**config, "routing": plan.to_dict() if plan is not None else None}, f,
                          indent=1, default=str)

    def _attach_metrics(self) -> None:
        inner = self.optimizer
        if self._optimizer_metrics is not None and self._optimizer_metrics.optimizer is inner:
            return
        if self._optimizer_metrics is not None:
            self._optimizer_metrics.remove()
        self._optimizer_metrics = OptimizerMetrics(inner, self._logging_step_next)

    def _logging_step_next(self) -> bool:
        """Whether the optimizer step about to run completes a step that will be logged."""
        args, step = self.args, self.state.global_step + 1
        if step == 1 and args.logging_first_step:
            return True
        return args.logging_strategy == "steps" and self.state.logging_steps > 0 and \
            step % self.state.logging_steps == 0

    # ------------------------------------------------------------------ logging

    def optimizer_metrics(self) -> dict[str, float]:
        """The optimizer entries of a training log record (see the module docstring)."""
        opt = self.optimizer
        if opt is None:
            return {}
        inner = getattr(opt, "optimizer", opt)  # accelerate's wrapper
        out = {f"optim/lr/{n}": float(g["lr"]) for n, g in zip(_group_names(inner), inner.param_groups)}
        if self._optimizer_metrics is not None:
            out.update(self._optimizer_metrics.last)
        out["optim/state_MB"] = state_bytes(inner) / 2**20
        metrics = getattr(inner, "metrics", None)
        if callable(metrics):
            out.update({f"optim/{k}": float(v) for k, v in metrics().items()})
        return out

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self.optimizer_metrics())
        if self._train_start is not None:
            logs["elapsed_s"] = time.time() - self._train_start  # wall time of this session, for loss-vs-time plots
        super().log(logs, start_time)

    def train(self, *args, **kwargs):
        self._train_start = time.time()
        return super().train(*args, **kwargs)
