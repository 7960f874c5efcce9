"""``ZooTrainer`` (a ``transformers.Trainer`` that builds zoo optimizers by name) and :func:`trainer_optimizer`
(any zoo optimizer in the stock ``Trainer``, or any subclass, in one argument).

* ``ZooTrainer.create_optimizer`` builds the optimizer named by ``ZooTrainingArguments.optim`` with
  :func:`optimzoo.create_optimizer` on the model's *named* parameters, so routing (matrix/vector,
  decay/no-decay) is right; it works on the plain, DDP-wrapped or FSDP2-sharded model (DTensor
  parameters), and ``resume_from_checkpoint`` restores its ``state_dict`` like any optimizer's. The
  routing plan is printed at the start, written to ``<output_dir>/optimizer_config.json`` and added to
  the wandb run config with the canonical run keys (:func:`optimzoo.hf.callbacks.run_config`).
* ``ZooTrainer.log`` adds the optimizer metrics (:func:`optimzoo.hf.callbacks.optimizer_metrics`) to every
  training log record *before* the callbacks see it, which is how they reach wandb in the same record
  (``WandbCallback`` runs before user callbacks, so a user ``on_log`` is too late); every record (train and
  eval) also gets ``elapsed_s``, the wall time since ``train()`` started.
* A step whose gradient norm (the one the Trainer computes for clipping and logging) is NaN/Inf is skipped,
  weights, optimizer state and lr schedule untouched, and counted as ``optim/skipped_steps``; after
  ``ZooTrainingArguments.max_nonfinite_skips`` skips in a row the next one stops training with an error
  (:class:`optimzoo.hf.callbacks.NonFiniteGuard`).

The same logic serves the stock ``Trainer`` through :class:`optimzoo.hf.OptimizerMetricsCallback`.

Cost: update RMS and step time are measured only on steps that are logged: one copy of the parameters
before the step and one reduction per tensor after it (plus a device synchronization around the step
on accelerators); the other steps run untouched but for the non-finite check: one host read of the
gradient norm per step.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from transformers import Trainer

from ..registry import create_optimizer, get_spec
from .callbacks import NonFiniteGuard, OptimizerMetrics, OptimizerMetricsCallback, unwrap_model

__all__ = ["OptimizerMetrics", "ZooOptimizerFactory", "ZooTrainer", "trainer_optimizer"]


# ------------------------------------------------------------------------------------------------ the factory


class ZooOptimizerFactory:
    """The factory half of ``Trainer(optimizer_cls_and_kwargs=(factory, hparams))``.

    transformers treats a first element that is not an ``Optimizer`` subclass as a factory and calls
    ``factory()(model, **hparams)`` with the model it prepared (plain, or FSDP2-sharded). Calling this object
    returns :meth:`build`, which routes the model's named parameters with :func:`optimzoo.create_optimizer`.
    """

    def __init__(self, name: str, routing: Mapping[str, Any] | None = None, max_nonfinite_skips: int | None = 5):
        self.name = get_spec(name).name  # unknown names fail here, with "did you mean"
        self.routing = dict(routing) if routing else None
        self.max_nonfinite_skips = max_nonfinite_skips

    def __call__(self):
        return self.build

    def build(self, model: torch.nn.Module, **hparams: Any) -> torch.optim.Optimizer:
        optimizer = create_optimizer(unwrap_model(model), self.name, routing=self.routing, **hparams)
        optimizer.zoo_hparams = dict(hparams)
        if self.max_nonfinite_skips is not None:
            flag = "trainer_optimizer(..., max_nonfinite_skips=...)"
            NonFiniteGuard(self.max_nonfinite_skips, flag).install(optimizer)
        return optimizer

    def __repr__(self) -> str:
        return f"ZooOptimizerFactory({self.name!r}, routing={self.routing!r}, " \
               f"max_nonfinite_skips={self.max_nonfinite_skips!r})"


def trainer_optimizer(name: str, *, routing: Mapping[str, Any] | None = None, max_nonfinite_skips: int | None = 5,
                      **hparams: Any) -> tuple[ZooOptimizerFactory, dict[str, Any]]:
    """``(factory, hparams)`` for ``Trainer(optimizer_cls_and_kwargs=...)``: the zoo optimizer ``name`` built on
    the model's named parameters, so routing is right (also for DDP and FSDP2 models)::

        Trainer(model, args, train_dataset=ds,
                optimizer_cls_and_kwargs=optimzoo.hf.trainer_optimizer("normuon", lr=0.02, adamw_lr=3e-3))

    Args:
        name: a registry name or alias (case-insensitive); unknown names fail here with suggestions.
        routing: routing overrides, as for :func:`optimzoo.create_optimizer`.
        max_nonfinite_skips: steps with a non-finite gradient norm are skipped (see
            :class:`~optimzoo.hf.callbacks.NonFiniteGuard`); after this many in a row, the next one raises.
            ``None``: no skipping. Without :class:`~optimzoo.hf.OptimizerMetricsCallback` the lr scheduler
            still advances on a skipped step (the factory cannot reach accelerate's wrapper) and skips are only
            reported as warnings; with the callback they are counted as ``optim/skipped_steps`` and the
            schedule holds.
        **hparams: the optimizer's hyperparameters (``lr``, ``weight_decay``, ...); a key it does not take fails
            here. ``TrainingArguments.learning_rate``/``weight_decay`` do not reach a factory: set them here.
    """
    spec = get_spec(name)
    spec.check_hparams(hparams)
    return ZooOptimizerFactory(spec.name, routing, max_nonfinite_skips), dict(hparams)


# ------------------------------------------------------------------------------------------------ ZooTrainer


class ZooTrainer(Trainer):
    """A ``Trainer`` for :class:`~optimzoo.hf.ZooTrainingArguments` (see the module docstring).

    With plain ``TrainingArguments`` or a transformers optimizer name it behaves like ``Trainer`` and still
    logs the generic optimizer metrics; ``optimizer_cls_and_kwargs`` (e.g. :func:`trainer_optimizer`) wins over
    ``args.optim``, as in ``Trainer``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        mine = [cb for cb in self.callback_handler.callbacks if isinstance(cb, OptimizerMetricsCallback)]
        if mine:
            self._monitor = mine[0]
        else:
            self._monitor = OptimizerMetricsCallback()
            self.add_callback(self._monitor)
        self._monitor.in_trainer = True
        if hasattr(self.args, "max_nonfinite_skips"):
            self._monitor.max_nonfinite_skips = self.args.max_nonfinite_skips
            self._monitor.skip_flag_name = "ZooTrainingArguments(max_nonfinite_skips=...), --max_nonfinite_skips in the recipe"
        self._train_start: float | None = None

    @property
    def run_config(self) -> dict:
        """The wandb run config: the canonical keys and ``optimizer_config``, completed at train begin; entries
        set here before ``train()`` (a recipe's ``model``, ``tokens_per_step``, ...) win over computed ones."""
        return self._monitor.run_config

    @run_config.setter
    def run_config(self, value: dict) -> None:
        self._monitor.run_config = value

    # ------------------------------------------------------------------ optimizer

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        zoo_name = getattr(self.args, "zoo_optim", None)
        if self.optimizer is None and zoo_name is not None and self.optimizer_cls_and_kwargs is None:
            opt_model = self.model if model is None else model
            hparams = self.args.zoo_hparams()
            self.optimizer = create_optimizer(unwrap_model(opt_model), zoo_name,
                                              routing=self.args.zoo_routing_options(), **hparams)
            self.optimizer.zoo_hparams = dict(hparams)
        else:
            super().create_optimizer(model)
        return self.optimizer

    def _get_grad_norm(self, model, grad_norm=None):
        # the norm the Trainer computes anyway (for clipping and the log) decides whether the step is skipped
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._monitor.observe_grad_norm(grad_norm)
        return grad_norm

    # ------------------------------------------------------------------ logging

    def optimizer_metrics(self) -> dict[str, float]:
        """The optimizer entries of a training log record (see :func:`optimzoo.hf.callbacks.optimizer_metrics`)."""
        return self._monitor.metrics()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self.optimizer_metrics())
        if self._train_start is not None:
            logs["elapsed_s"] = time.time() - self._train_start  # wall time of this session, for loss-vs-time plots
        super().log(logs, start_time)

    def train(self, *args, **kwargs):
        self._train_start = time.time()
        return super().train(*args, **kwargs)
