"""``PretrainTrainer``: a :class:`~optimzoo.hf.ZooTrainer` whose evaluation reports causal-LM loss the right way.

``evaluate()`` reports, for the evaluation set:

* ``eval_loss``: the **token-weighted** mean cross-entropy over every label token of every rank (the
  Trainer's default averages per-batch means, which over-weights short batches), and
  ``eval_perplexity = exp(eval_loss)``;
* ``eval_galore_loss``: GaLore's estimator, reproduced for comparison with the papers' tables: per rank
  the sum of per-batch mean losses divided by ``n_batches + 1`` (its counter starts at 1), then averaged
  over ranks; biased low by ``n/(n+1)``. ``eval_galore_perplexity = exp(eval_galore_loss)``;
* ``eval_tokens``: the number of label tokens evaluated (all ranks).

Its run clock (:class:`~optimzoo.hf.runs.RunClock`, added as a callback) sums wall time, process CPU time and
optimizer-step times over the sessions of a resumed run; every training log record gets the cumulative
``time/wall_s`` and ``time/cpu_s``, so loss-vs-time curves never go back in time after a resume.
"""

from __future__ import annotations

import math
import time

import torch

from .runs import RunClock
from .trainer import ZooTrainer

__all__ = ["PretrainTrainer"]


class PretrainTrainer(ZooTrainer):
    """See the module docstring."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.clock is None:
            self.add_callback(RunClock())

    @property
    def clock(self) -> RunClock | None:
        """The run clock (looked up each time: resuming with ``restore_callback_states_from_checkpoint`` replaces
        the callback by a restored copy)."""
        return next((cb for cb in self.callback_handler.callbacks if isinstance(cb, RunClock)), None)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        clock = self.clock
        if "loss" in logs and clock is not None:
            logs.update({f"time/{k}": v for k, v in clock.totals().items()})
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        loader = self.get_eval_dataloader(eval_dataset)
        model = self.model
        was_training = model.training
        model.eval()
        start = time.time()
        device = self.args.device
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        mean_sum = torch.zeros((), dtype=torch.float64, device=device)
        tokens = torch.zeros((), dtype=torch.float64, device=device)
        batches = 0
        with torch.no_grad():
            for inputs in loader:
                inputs = self._prepare_inputs(inputs)
                with self.compute_loss_context_manager():
                    loss = model(**inputs).loss.double()
                n = (inputs["labels"][..., 1:] != -100).sum()
                loss_sum += loss * n
                mean_sum += loss
                tokens += n
                batches += 1
        galore = mean_sum / (batches + 1)
        totals = self.accelerator.reduce(torch.stack([loss_sum, tokens, galore]), reduction="sum")
        loss_sum, tokens, galore = (float(x) for x in totals)
        galore /= self.accelerator.num_processes
        eval_loss = loss_sum / tokens if tokens else float("nan")
        metrics = {
            f"{metric_key_prefix}_loss": eval_loss,
            f"{metric_key_prefix}_perplexity": math.exp(min(eval_loss, 50.0)),
            f"{metric_key_prefix}_galore_loss": galore,
            f"{metric_key_prefix}_galore_perplexity": math.exp(min(galore, 50.0)),
            f"{metric_key_prefix}_tokens": tokens,
            f"{metric_key_prefix}_runtime": round(time.time() - start, 4),
        }
        if was_training:
            model.train()
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
