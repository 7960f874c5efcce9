"""``ZooTrainingArguments``: ``TrainingArguments`` whose ``optim`` takes zoo names too.

Resolution of ``optim`` (case-insensitive, ``-``/``_`` ignored for zoo names):

1. a zoo name or alias (``normuon``, ``stable-spam``, ``torch_optimizer.lamb``, the baselines ``adamw``,
   ``adam``, ``sgd``) is built by :func:`optimzoo.create_optimizer` in :class:`~optimzoo.hf.ZooTrainer`;
2. otherwise a transformers ``OptimizerNames`` value (``adamw_torch_fused``, ``adafactor``, ...) is left
   to transformers;
3. otherwise construction fails with a one-line "did you mean" over both sets of names, before any training.

Hyperparameters of a zoo optimizer: ``learning_rate`` -> ``lr`` and ``weight_decay`` -> ``weight_decay``
(every decayed group, the AdamW part of matrix optimizers included; norms and biases get 0;
``optim_args="adamw_weight_decay=0.0"`` keeps a matrix optimizer's embeddings and head undecayed),
``adam_beta1/2`` and ``adam_epsilon`` -> ``betas``/``eps`` (``adamw_betas``/``adamw_eps`` for matrix
optimizers) when changed from transformers' defaults, and ``optim_args`` (``"k=v,k2=v2"``, values typed,
e.g. ``"betas=(0.9,0.95),ns_steps=6,adjust_lr=match_adamw"``), which wins over everything else.

``learning_rate`` left unset means the optimizer's own default from the registry (NorMuon 0.02, AdamW
0.001; transformers' 5e-5 only for transformers' optimizers), and ``zoo_lrs()`` / ``zoo_lr_sources()`` /
``zoo_lr_summary()`` say where each lr (``lr``, ``adamw_lr``) came from.

Every value is checked at construction, before a model is loaded or a file written: malformed ``optim_args``
items (no ``=``, unbalanced brackets), unknown keys (the message names the key and the accepted keys),
values the optimizer refuses (it is built through the registry on dummy parameters, so its own checks run)
and bad ``zoo_routing`` overrides raise ``ValueError`` naming the key. A changed ``adam_*`` value the
optimizer cannot take is reported with a warning, not dropped silently. On a machine without an
accelerator ``dataloader_pin_memory`` is turned off.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import TrainingArguments
from transformers.training_args import OptimizerNames

from ..cli import check_optimizer_args, parse_kv, resolve_optimizer
from ..registry import get_spec, list_optimizers

__all__ = ["ZooTrainingArguments", "parse_optim_args"]

_TRANSFORMERS_NAMES = tuple(o.value for o in OptimizerNames)
_ADAM_DEFAULTS = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8}


def parse_optim_args(text: str | None, what: str = "optim_args") -> dict[str, Any]:
    """Parse ``"k=v,k2=v2"`` into typed keyword arguments (``"lr=3e-4,betas=(0.9,0.95)"`` ->
    ``{"lr": 0.0003, "betas": (0.9, 0.95)}``); malformed items raise ``ValueError`` (see
    :func:`optimzoo.cli.parse_kv`)."""
    return parse_kv(text, what)


def _resolve(name: str) -> str | None:
    """The zoo's canonical name for ``name``, or None if transformers should handle it; an unknown name
    raises a one-line "did you mean" over both sets of names."""
    if name in _TRANSFORMERS_NAMES:
        try:
            return get_spec(name).name
        except ValueError:
            return None
    return resolve_optimizer(name, extra_names=_TRANSFORMERS_NAMES).name


@dataclass
class ZooTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with ``optim`` accepting zoo names (see the module docstring)."""

    optim: str = field(
        default="adamw",
        metadata={"help": "Optimizer name: any optimzoo name (`python -m optimzoo` lists them, e.g. normuon, "
                          "stable_spam, lion) or any transformers name (adamw_torch_fused, adafactor, ...)."},
    )
    optim_args: str | None = field(
        default=None,
        metadata={"help": "Optimizer keyword arguments as 'k=v,k2=v2' (typed: 'betas=(0.9,0.95),ns_steps=6')."},
    )
    zoo_routing: str | None = field(
        default=None,
        metadata={"help": "Routing overrides for optimzoo.plan_parameters as 'k=v' items, e.g. "
                          "\"vector_patterns=['\\.gate_proj\\.']\"."},
    )
    max_nonfinite_skips: int = field(
        default=5,
        metadata={"help": "An optimizer step whose gradient norm is NaN/Inf is skipped (weights, optimizer state "
                          "and lr schedule untouched; counted as optim/skipped_steps). After this many skipped "
                          "steps in a row, the next non-finite one stops training with an error (0: stop at the "
                          "first; -1: never stop)."},
    )

    learning_rate: float | None = field(
        default=None,
        metadata={"help": "Peak learning rate. Default: the optimizer's own default (`python -m optimzoo`; "
                          "NorMuon 0.02, AdamW 0.001), 5e-5 for transformers' optimizers."},
    )

    #: learning rate and its source for a transformers optimizer name when ``learning_rate`` is not set
    transformers_default_lr: ClassVar[tuple[float, str]] = (5e-5, "transformers default")

    def __post_init__(self):
        self.zoo_optim = _resolve(str(self.optim))
        self._resolve_learning_rate()
        if not torch.accelerator.is_available():
            self.dataloader_pin_memory = False  # nothing to pin to; torch warns at every DataLoader otherwise
        if self.zoo_optim is None:
            if self.zoo_routing:
                raise ValueError(f"zoo_routing: routes zoo optimizers only; {self.optim!r} is transformers' own")
            super().__post_init__()
            return
        self.zoo_check()  # fail now on bad keys and values, before a model is loaded or a file written
        requested = self.optim
        self.optim = OptimizerNames.ADAMW_TORCH.value  # a placeholder for transformers' own checks
        try:
            super().__post_init__()
        finally:
            self.optim = requested

    def zoo_hparams(self) -> dict[str, Any]:
        """Keyword arguments for the zoo optimizer (see the module docstring); validated against its signature."""
        spec = get_spec(self.zoo_optim)
        accepted = spec.hparams
        matrix = spec.kind == "matrix"
        hp: dict[str, Any] = {}
        if "lr" in accepted:
            hp["lr"] = self.learning_rate
        if "weight_decay" in accepted:
            hp["weight_decay"] = self.weight_decay
        changed = {k: getattr(self, k) for k, v in _ADAM_DEFAULTS.items() if getattr(self, k) != v}
        betas_key, eps_key = ("adamw_betas", "adamw_eps") if matrix else ("betas", "eps")
        if {"adam_beta1", "adam_beta2"} & changed.keys():
            if betas_key in accepted:
                hp[betas_key] = (self.adam_beta1, self.adam_beta2)
            else:
                warnings.warn(f"{spec.name} has no {betas_key!r}: adam_beta1/adam_beta2 are not used", stacklevel=2)
        if "adam_epsilon" in changed:
            if eps_key in accepted:
                hp[eps_key] = self.adam_epsilon
            else:
                warnings.warn(f"{spec.name} has no {eps_key!r}: adam_epsilon is not used", stacklevel=2)
        extra = parse_optim_args(self.optim_args)
        spec.check_hparams(extra, "optim_args")
        hp.update(extra)
        return hp

    def zoo_routing_options(self) -> dict[str, Any]:
        """``zoo_routing`` as keyword arguments of :func:`optimzoo.plan_parameters`."""
        return parse_optim_args(self.zoo_routing, "zoo_routing")

    def zoo_check(self) -> None:
        """Run the optimizer's own checks on every value (``learning_rate``, ``weight_decay``, ``optim_args``,
        ``zoo_routing``) by building it through the registry on dummy parameters; a refused value raises a
        ``ValueError`` naming its key. ``__post_init__`` calls this."""
        check_optimizer_args(self.zoo_optim, self.zoo_hparams(), routing=self.zoo_routing_options(),
                             user_keys=parse_optim_args(self.optim_args).keys())

    # ------------------------------------------------------------------ learning rates and their sources

    def _resolve_learning_rate(self) -> None:
        """Fill ``learning_rate`` when it is not set: the zoo optimizer's registry default, else
        ``transformers_default_lr``; ``lr`` in ``optim_args`` wins (and ``learning_rate`` then shows it)."""
        if self.learning_rate is not None:
            value, source = float(self.learning_rate), "learning_rate"
        else:
            value, source = self.transformers_default_lr
            if self.zoo_optim is not None:
                spec = get_spec(self.zoo_optim)
                default = spec.defaults.get("lr")
                if "lr" in spec.hparams and not isinstance(default, (int, float)):
                    raise ValueError(f"learning_rate: {spec.name} has no default lr; set learning_rate")
                if default is not None:
                    value, source = float(default), "registry default"
        if self.zoo_optim is not None:
            override = parse_optim_args(self.optim_args).get("lr")
            if isinstance(override, (int, float)) and not isinstance(override, bool):
                if source == "learning_rate" and float(override) != value:
                    source = f"optim_args (overrides learning_rate={value:g})"
                else:
                    source = "optim_args"
                value = float(override)
        self.learning_rate = value
        self._lr_source = (value, source)

    def zoo_lrs(self) -> dict[str, tuple[float, str]]:
        """Each learning rate of the run and where it comes from: ``{"lr": (0.02, "registry default"),
        "adamw_lr": (0.0003, "registry default")}`` (``adamw_lr`` for matrix optimizers only). Sources:
        ``learning_rate``, ``optim_args``, ``registry default``, ``transformers default`` (or the recipe's)."""
        value, source = getattr(self, "_lr_source", (None, None))
        if value != self.learning_rate:  # set after construction (or a copy made from to_dict())
            value, source = float(self.learning_rate), "learning_rate"
        out = {"lr": (value, source)}
        if self.zoo_optim is not None:
            spec = get_spec(self.zoo_optim)
            if "adamw_lr" in spec.hparams:
                given = parse_optim_args(self.optim_args).get("adamw_lr")
                out["adamw_lr"] = (given, "optim_args") if given is not None else \
                    (spec.defaults.get("adamw_lr"), "registry default")
        return out

    def zoo_lr_sources(self) -> dict[str, str]:
        """:meth:`zoo_lrs` as strings for a run config: ``{"lr": "registry default 0.02", "adamw_lr":
        "optim_args 0.003"}``."""
        return {k: f"{source} {value:g}" for k, (value, source) in self.zoo_lrs().items()}

    def zoo_lr_summary(self) -> str:
        """One phrase for a log line: ``"lr 0.02 (registry default), adamw_lr 0.0003 (registry default)"``."""
        return ", ".join(f"{k} {value:g} ({source})" for k, (value, source) in self.zoo_lrs().items())

    @staticmethod
    def optimizer_names() -> list[str]:
        """Every name ``optim`` accepts: the zoo's, then transformers'."""
        return list_optimizers().names() + list(_TRANSFORMERS_NAMES)
