"""Checkpoints of FSDP2 runs that resume exactly: ``ShardedPretrainTrainer``, a
:class:`~optimzoo.hf.PretrainTrainer` whose checkpoints are written with ``torch.distributed.checkpoint`` (DCP).

The recipe's ``--fsdp2`` shards the model at load time (``from_pretrained(..., distributed_config=
DistributedConfig(...))``, the route that shards on CPU/gloo, where accelerate's FSDP plugin is ignored).
transformers 5.24 refuses to checkpoint such a model for resuming; this Trainer writes and reads every part
itself, each rank writing only its own shards (no full state gathered anywhere)::

    checkpoint-N/
        config.json                             the model config (rank 0)
        shard-0000r-model-0000R-of-...safetensors   model weights: DCP with the HF safetensors layout, one file
                                                per rank (torch's ``HuggingFaceStorageWriter``)
        optimizer/                              optimizer state: DCP (``transformers.distributed.
                                                save_optimizer_distributed``: FQN-keyed, flattened, so a
                                                different world size or grouping reshards it on load), and
                                                optimizer_name.json: the optimizer that wrote it
        scheduler.pt, rng_state_<rank>.pth      (``rng_state.pth`` in one process), trainer_state.json
                                                (global step, log history: the data position), training_args.bin

Loading (``resume_from_checkpoint``) reads the model and optimizer into the shards of the current job,
whatever its world size: 2 ranks to 1 process (an unsharded model), 1 process to 2 ranks. The optimizer is the
zoo's, built on the model's named parameters by ``ZooTrainer``; its ``state_dict`` passes through DCP's
``get/set_optimizer_state_dict`` (:mod:`optimzoo.optim._checkpoint` matches the FQN-keyed state by name).
The per-rank RNG files are restored when the world size is the one that wrote them; with another world size
the data order differs anyway (each rank reads another slice of every batch). Resuming with another optimizer is
refused: by the record (DCP drops the ``state_dict``'s ``optimizer_name``), and by :func:`load_sharded_optimizer`,
strict about per-parameter state. Under ``--fsdp2 --bf16`` (FSDP2's ``MixedPrecisionPolicy``) the shards, and so the
checkpoint, are fp32.

The same checkpoints are written by one process (an unsharded model, e.g. ``--fsdp2`` run without torchrun), so
a run can start on one machine and continue sharded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from transformers.distributed import save_optimizer_distributed

from ..optim._checkpoint import STATE_DICT_RECORD
from .callbacks import unwrap_optimizer
from .pretrain import PretrainTrainer

__all__ = ["OPTIMIZER_DIR", "OPTIMIZER_RECORD", "ShardedPretrainTrainer", "is_dcp_checkpoint", "load_sharded_model",
           "load_sharded_optimizer", "save_sharded_model"]

#: the subdirectory of a checkpoint that holds the optimizer's DCP files
OPTIMIZER_DIR = "optimizer"
#: the file of ``OPTIMIZER_DIR`` that records which optimizer wrote the state (DCP keeps only state and groups)
OPTIMIZER_RECORD = "optimizer_name.json"
_SCHEDULER = "scheduler.pt"


def _optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """The registry name of a zoo optimizer (its ``state_dict`` record), the class name of any other."""
    return getattr(optimizer, "optimizer_name", None) or f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"


def _is_sharded(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "device_mesh") for p in model.parameters())


def is_dcp_checkpoint(checkpoint: str | os.PathLike) -> bool:
    """Whether ``checkpoint`` holds model weights written by :func:`save_sharded_model`."""
    path = Path(checkpoint)
    return path.is_dir() and any(path.glob("shard-*-model-*.safetensors"))


def save_sharded_model(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Write the model's weights with DCP: every rank writes its own shards into one safetensors file of
    ``directory``; no rank gathers the full weights. Call it on every rank (in one process it writes one file).
    The files are those of ``save_pretrained(..., distributed_checkpoint=True)``, which only takes sharded
    models."""
    dcp.save(get_model_state_dict(model),
             storage_writer=HuggingFaceStorageWriter(str(directory), save_distributed=True, enable_consolidation=False))


def load_sharded_model(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Load weights written by :func:`save_sharded_model` (by any number of ranks) into ``model``'s own shards
    (or its full tensors, unsharded). Strict: a parameter the checkpoint lacks is an error."""
    state = get_model_state_dict(model)
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(directory)))
    set_model_state_dict(model, state)


def _prefixes(key: str) -> list[str]:
    """``"a.b.c"`` -> ``["a", "a.b", "a.b.c"]``."""
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _listing(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_sharded_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           directory: str | os.PathLike) -> None:
    """Load optimizer state written by ``transformers.distributed.save_optimizer_distributed`` (DCP, flattened
    FQN keys ``state.<fqn>.<key>`` and ``param_groups.<fqn>.<key>``, by any number of ranks) into ``optimizer``,
    resharded to the current model's shards.

    As :meth:`optimzoo.optim._checkpoint.CheckpointMixin.load_state_dict` does, a hyperparameter the checkpoint
    lacks (one added to the optimizer after the checkpoint was written) keeps this optimizer's value; DCP
    alone would refuse the whole load for it. Per-parameter state is strict both ways: state that the
    checkpoint lacks, or has and this optimizer does not keep, is a ``ValueError`` naming it. Placements are
    FSDP's ``Shard`` (not the strided shards of FSDP combined with tensor parallelism).

    ``get_optimizer_state_dict`` creates missing state with one step of zero gradients at lr 0 (DCP's
    ``_init_optim_state``); the loaded state replaces it.
    """
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    current = get_optimizer_state_dict(model, optimizer, options=options)
    # DCP's keys: "optimizer." + ours, and a list value (a group's betas) may be stored under "<key>.<index>"
    saved = {key.removeprefix("optimizer.")
             for key in dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata}
    in_saved = {prefix for key in saved for prefix in _prefixes(key)}
    lacking = sorted(k for k in current if k.startswith("state.") and k not in in_saved)
    extra = sorted(k for k in saved if k.startswith("state.") and not set(_prefixes(k)) & current.keys())
    if lacking or extra:
        raise ValueError(
            f"the optimizer state in {directory} does not fit {type(optimizer).__name__}: the checkpoint lacks "
            f"{_listing(lacking) or 'nothing'} and has {_listing(extra) or 'nothing'} that it does not keep. "
            "It was written by another optimizer or configuration: resume with the one that wrote it.")
    to_load = {k: v for k, v in current.items() if k in in_saved}
    dcp.load({"optimizer": to_load}, checkpoint_id=str(directory))
    set_optimizer_state_dict(model, optimizer, {**current, **to_load}, options=options)


class ShardedPretrainTrainer(PretrainTrainer):
    """A :class:`~optimzoo.hf.PretrainTrainer` whose checkpoints are DCP checkpoints (see the module docstring):
    model and optimizer sharded per rank, scheduler, per-rank RNG and trainer state, resumable at any world size.

    ``save_only_model=True`` writes the weights only (as in ``Trainer``); such a checkpoint cannot be resumed.
    ``save_model()`` called by the user (not by a checkpoint) is ``Trainer``'s: a full ``save_pretrained`` export.
    """

    def __init__(self, *args, **kwargs):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        # Trainer.__init__ refuses to checkpoint a model sharded at load time unless save_only_model: this class
        # writes the optimizer itself, so the refusal does not apply; the flag is the user's again right after
        only_model = getattr(training_args, "save_only_model", True)
        if training_args is not None:
            training_args.save_only_model = True
        try:
            super().__init__(*args, **kwargs)
        finally:
            if training_args is not None:
                training_args.save_only_model = only_model

    # ------------------------------------------------------------------ saving

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not _internal_call:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        save_sharded_model(self.model, output_dir)
        if self.args.should_save:
            self.model.config.save_pretrained(output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        optimizer = unwrap_optimizer(self.optimizer)
        save_optimizer_distributed(self.model, optimizer, os.path.join(output_dir, OPTIMIZER_DIR))
        if self.args.should_save:
            record = {STATE_DICT_RECORD: _optimizer_name(optimizer)}
            Path(output_dir, OPTIMIZER_DIR, OPTIMIZER_RECORD).write_text(json.dumps(record) + "\n")
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, _SCHEDULER))

    # ------------------------------------------------------------------ loading

    def _not_ours(self, checkpoint: str, what: str) -> ValueError:
        return ValueError(
            f"{checkpoint} has no {what} written by ShardedPretrainTrainer (the recipe's --fsdp2): it cannot be "
            "loaded into a sharded model. Resume it the way it was written (without --fsdp2), or start from its "
            "weights only.")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        model = self.model if model is None else model
        if is_dcp_checkpoint(resume_from_checkpoint):
            load_sharded_model(model, resume_from_checkpoint)
        elif _is_sharded(model):
            raise self._not_ours(resume_from_checkpoint, "DCP model shards (shard-*-model-*.safetensors)")
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        optimizer_dir = Path(checkpoint) / OPTIMIZER_DIR
        if not (optimizer_dir / ".metadata").is_file():
            if _is_sharded(self.model):
                raise self._not_ours(checkpoint, f"optimizer state ({OPTIMIZER_DIR}/.metadata)")
            return super()._load_optimizer_and_scheduler(checkpoint)
        optimizer = unwrap_optimizer(self.optimizer)
        record = optimizer_dir / OPTIMIZER_RECORD
        writer = json.loads(record.read_text())[STATE_DICT_RECORD] if record.is_file() else None
        reader = _optimizer_name(optimizer)
        if writer is not None and writer != reader:
            raise ValueError(
                f"{checkpoint} holds the state of the optimizer {writer!r}; this run's optimizer is {reader!r}. "
                f"Resume with --optim {writer}, or start {reader!r} from fresh state on the checkpoint's weights only.")
        load_sharded_optimizer(self.model, optimizer, optimizer_dir)
        self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / _SCHEDULER, weights_only=True))
