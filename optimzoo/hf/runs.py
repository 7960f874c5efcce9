"""What makes two pretraining runs comparable, and how long a run took across resumed sessions.

* **Run identity** (:func:`run_identity`): every setting that changes a run's result, as one flat, canonical
  dict (``settings``) and a stable hash of it. The settings are the fields of the argument dataclasses (model
  and data arguments, ``TrainingArguments``) minus the ones that only say where output goes or how often it is
  logged or saved (``NOT_RESULT``), plus the model config's values, the world size and the versions of optimzoo,
  torch and transformers. :func:`settings_diff` names the settings in which two runs differ.
* **Run clock** (:class:`RunClock`, a ``TrainerCallback``): wall time, process CPU time and the time of every
  optimizer step (``on_step_begin`` to ``on_step_end``: forward, backward, clipping, optimizer and scheduler step;
  not data loading, evaluation or checkpointing), summed over every session of a resumed run. Its totals travel
  in the checkpoint as one of transformers' stateful callbacks (``trainer_state.json``, ``stateful_callbacks``),
  are restored when the run resumes (whatever ``restore_callback_states_from_checkpoint`` says) and are written
  into the final ``trainer_state.json`` at train end. It also samples the 1-minute load average, so that timing
  measured on a machine busy with other work can be marked (:func:`clock_summary`), and writes
  ``<output_dir>/progress.json`` every few seconds for a process watching the run (the sweep's progress lines).
  Time lost in a killed session after its last checkpoint is not counted: the steps are trained again, and timed,
  in the next session.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .callbacks import _jsonable

__all__ = ["NOT_RESULT", "RunClock", "clock_summary", "contended", "run_identity", "settings_diff", "usable_cores"]

#: argument fields that do not change a run's result: where it writes, how it is named, logged, saved, reported,
#: resumed, how many loader workers feed it, how often it evaluates (the final evaluation is the same), and the
#: process's own rank
NOT_RESULT = frozenset({
    "output_dir", "logging_dir", "run_name", "wandb_group", "report_to", "project", "disable_tqdm",
    "logging_strategy", "logging_steps", "logging_first_step", "logging_nan_inf_filter", "log_level",
    "log_level_replica", "log_on_each_node", "save_strategy", "save_steps", "save_total_limit", "save_only_model",
    "save_safetensors", "save_on_each_node", "overwrite_output_dir", "resume_from_checkpoint", "allow_no_checkpoint",
    "restore_callback_states_from_checkpoint", "eval_strategy", "eval_steps", "eval_delay", "eval_on_start",
    "push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo", "hub_always_push",
    "hub_revision", "local_rank", "dataloader_num_workers", "dataloader_prefetch_factor",
    "dataloader_persistent_workers", "dataloader_pin_memory", "skip_memory_metrics", "ddp_timeout", "use_cpu",
    "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id", "load_best_model_at_end",
    "metric_for_best_model", "greater_is_better", "prediction_loss_only", "per_device_eval_batch_size",
})


def _fields(args: Any) -> dict[str, Any]:
    """A dataclass's fields as plain values (``TrainingArguments.to_dict`` for those, which masks tokens)."""
    if hasattr(args, "to_dict"):
        return dict(args.to_dict())
    if dataclasses.is_dataclass(args):
        return {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}
    if isinstance(args, Mapping):
        return dict(args)
    raise TypeError(f"run_identity: {type(args).__name__} is neither a dataclass nor a mapping of settings")


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from .. import __version__

    return {"optimzoo": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def run_identity(*arg_groups: Any, world_size: int, model_config: Mapping[str, Any] | None = None) -> dict:
    """``{"settings": {...}, "hash": "<16 hex>"}``: every setting that changes the result of a run.

    Args:
        arg_groups: the run's argument dataclasses (a recipe's ``ModelArguments``, ``DataArguments`` and
            ``TrainingArguments``) or mappings of settings; their fields are merged into one flat dict, without
            the ``NOT_RESULT`` ones. A field name given twice with different values is an error.
        world_size: number of processes of the run (data-parallel replicas or shards).
        model_config: the model config's values (e.g. the config JSON), as ``model_config_values``; ``None``
            leaves them out (the model is then known by the arguments' name for it only).
    """
    settings: dict[str, Any] = {}
    for group in arg_groups:
        for key, value in _fields(group).items():
            if key in NOT_RESULT or key.startswith("_"):
                continue
            value = _jsonable(value)
            if key in settings and settings[key] != value:
                raise ValueError(f"run_identity: setting {key!r} given twice, as {settings[key]!r} and {value!r}")
            settings[key] = value
    settings["world_size"] = int(world_size)
    if model_config is not None:
        settings["model_config_values"] = _jsonable(dict(model_config))
    settings["versions"] = _versions()
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return {"settings": settings, "hash": hashlib.sha256(text.encode()).hexdigest()[:16]}


_MISSING = "<not recorded>"


def settings_diff(a: Mapping[str, Any], b: Mapping[str, Any], ignore: frozenset[str] | set[str] = frozenset()
                  ) -> dict[str, tuple[Any, Any]]:
    """``{key: (value in a, value in b)}`` for every setting (outside ``ignore``) that differs; a key one side
    lacks counts as different (``"<not recorded>"``)."""
    keys = (set(a) | set(b)) - set(ignore)
    return {k: (a.get(k, _MISSING), b.get(k, _MISSING)) for k in sorted(keys)
            if a.get(k, _MISSING) != b.get(k, _MISSING)}


# ------------------------------------------------------------------------------------------------ clock


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def contended(load_samples: list[float], cores: int) -> bool | None:
    """Whether timing was measured under contention: the median sampled 1-minute load average exceeded the usable
    cores by more than one runnable thread (the load counts this run's own threads, which alone keep it near the
    cores). ``None`` without samples."""
    if not load_samples:
        return None
    return statistics.median(load_samples) > cores + 1


def clock_summary(saved: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What a :class:`RunClock` state (``trainer_state.json["stateful_callbacks"]["RunClock"]``) says, summed over
    the run's sessions: ``sessions``, ``wall_s``, ``cpu_s``, ``steps_timed``, ``median_step_s``, ``load_median``,
    ``cores``, ``contended``. ``None`` when there is no state (a run made without the clock)."""
    if not saved:
        return None
    a = saved.get("attributes", saved)
    steps = a.get("step_ms") or []
    load = a.get("load") or []
    return {
        "sessions": int(a.get("sessions", 0)),
        "wall_s": float(a.get("wall_s", 0.0)),
        "cpu_s": float(a.get("cpu_s", 0.0)),
        "steps_timed": len(steps),
        "median_step_s": statistics.median(steps) / 1000.0 if steps else None,
        "load_median": statistics.median(load) if load else None,
        "cores": int(a.get("cores", 0)),
        "contended": contended(load, int(a.get("cores", 0) or usable_cores())),
    }


class RunClock(TrainerCallback, ExportableState):
    """Time of a run summed over its sessions (see the module docstring).

    Args:
        progress_every_s: seconds between writes of ``<output_dir>/progress.json`` and between load-average samples
            (default 5). The file holds ``step``, ``max_steps``, ``loss`` (the last logged), ``tokens``,
            ``session_s`` (wall time of this session), ``tokens_per_s`` (this session) and ``eta_s``.

    Attributes (summed over sessions, restored on resume): ``sessions``, ``wall_s``, ``cpu_s`` (process CPU time,
    all threads), ``step_ms`` (every timed training step: forward, backward and optimizer, from the
    Trainer's step begin to step end), ``load`` (1-minute load averages), ``cores``.
    """

    def __init__(self, progress_every_s: float = 5.0):
        self.progress_every_s = float(progress_every_s)
        self.sessions = 0
        self.wall_s = 0.0
        self.cpu_s = 0.0
        self.step_ms: list[float] = []
        self.load: list[float] = []
        self.cores = usable_cores()
        self._t0: float | None = None
        self._cpu0 = 0.0
        self._step_t0: float | None = None
        self._last_write = 0.0
        self._tokens0 = 0
        self._steps0 = 0
        self._loss: float | None = None

    # ---------------------------------------------------------------- totals

    def totals(self) -> dict[str, float]:
        """Cumulative ``wall_s`` and ``cpu_s`` up to now (earlier sessions plus this one)."""
        if self._t0 is None:
            return {"wall_s": self.wall_s, "cpu_s": self.cpu_s}
        return {"wall_s": self.wall_s + time.time() - self._t0, "cpu_s": self.cpu_s + time.process_time() - self._cpu0}

    def state(self) -> dict:
        running = self._t0 is not None
        return {"args": {"progress_every_s": self.progress_every_s},
                "attributes": {"sessions": self.sessions + int(running), **self.totals(), "step_ms": list(self.step_ms),
                               "load": list(self.load), "cores": self.cores}}

    # ---------------------------------------------------------------- events

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__) if state.global_step > 0 else None
        if isinstance(saved, list):
            saved = saved[0]
        a = (saved or {}).get("attributes", {})
        self.sessions = int(a.get("sessions", 0))
        self.wall_s, self.cpu_s = float(a.get("wall_s", 0.0)), float(a.get("cpu_s", 0.0))
        self.step_ms, self.load = list(a.get("step_ms", [])), list(a.get("load", []))
        self._t0, self._cpu0 = time.time(), time.process_time()
        self._tokens0, self._steps0 = state.num_input_tokens_seen or 0, state.global_step
        self._last_write = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_t0 is not None:
            self.step_ms.append(round(1000.0 * (time.perf_counter() - self._step_t0), 3))
            self._step_t0 = None
        now = time.time()
        if now - self._last_write >= self.progress_every_s:
            self._last_write = now
            self.load.append(round(os.getloadavg()[0], 2))
            self._write_progress(args, state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._loss = float(logs["loss"])

    def on_train_end(self, args, state, control, **kwargs):
        self._write_progress(args, state)
        state.stateful_callbacks[type(self).__name__] = self.state()  # into the final trainer_state.json
        totals = self.totals()
        self.sessions += 1
        self.wall_s, self.cpu_s = totals["wall_s"], totals["cpu_s"]
        self._t0 = None

    def _write_progress(self, args, state) -> None:
        if not state.is_world_process_zero or self._t0 is None:
            return
        session = time.time() - self._t0
        done = state.global_step - self._steps0
        tokens = state.num_input_tokens_seen or 0
        left = max(state.max_steps - state.global_step, 0)
        record = {"step": state.global_step, "max_steps": state.max_steps, "loss": self._loss, "tokens": tokens,
                  "session_s": session, "tokens_per_s": (tokens - self._tokens0) / session if session > 0 else None,
                  "eta_s": session / done * left if done else None}
        path = Path(args.output_dir) / "progress.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)  # a reader never sees half a file
