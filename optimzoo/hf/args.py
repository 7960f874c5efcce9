"""``ZooTrainingArguments``: ``TrainingArguments`` whose ``optim`` takes zoo names too.

Resolution of ``optim`` (case-insensitive, ``-``/``_`` ignored for zoo names):

1. a zoo name or alias (``normuon``, ``stable-spam``, ``torch_optimizer.lamb``, the baselines ``adamw``,
   ``adam``, ``sgd``) is built by :func:`optimzoo.create_optimizer` in :class:`~optimzoo.hf.ZooTrainer`;
2. otherwise a transformers ``OptimizerNames`` value (``adamw_torch_fused``, ``adafactor``, ...) is left
   to transformers;
3. otherwise construction fails with the registry's "did you mean" message, before any training.

Hyperparameters of a zoo optimizer: ``learning_rate`` -> ``lr`` and ``weight_decay`` -> ``weight_decay``
(decay groups only; norms and biases get 0), ``adam_beta1/2`` and ``adam_epsilon`` -> ``betas``/``eps``
(``adamw_betas``/``adamw_eps`` for matrix optimizers) when changed from transformers' defaults, and
``optim_args`` (``"k=v,k2=v2"``, values typed, e.g. ``"betas=(0.9,0.95),ns_steps=6,adjust_lr=match_adamw"``),
which wins over everything else. Unknown ``optim_args`` keys fail at construction, naming the key and
the optimizer's accepted keys. A changed ``adam_*`` value the optimizer cannot take is reported with a
warning, not dropped silently.
"""

from __future__ import annotations

import ast
import warnings
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments
from transformers.training_args import OptimizerNames

from ..registry import get_spec, list_optimizers

__all__ = ["ZooTrainingArguments", "parse_optim_args"]

_TRANSFORMERS_NAMES = tuple(o.value for o in OptimizerNames)
_ADAM_DEFAULTS = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8}


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets, so ``betas=(0.9,0.95)`` stays whole."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _typed(value: str) -> Any:
    """A Python literal when it parses as one (numbers, tuples, True/False/None), else the string."""
    lowered = {"true": True, "false": False, "none": None}
    if value.lower() in lowered:
        return lowered[value.lower()]
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def parse_optim_args(text: str | None) -> dict[str, Any]:
    """Parse ``"k=v,k2=v2"`` into typed keyword arguments (``"lr=3e-4,betas=(0.9,0.95)"`` ->
    ``{"lr": 0.0003, "betas": (0.9, 0.95)}``)."""
    out: dict[str, Any] = {}
    for item in _split_top_level(text or ""):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"Invalid optim_args item {item!r}: expected key=value (items separated by commas)")
        out[key.strip()] = _typed(value.strip())
    return out


def _resolve(name: str) -> str | None:
    """The zoo's canonical name for ``name``, or None if transformers should handle it."""
    try:
        return get_spec(name).name
    except ValueError as zoo_error:
        if name in _TRANSFORMERS_NAMES:
            return None
        raise ValueError(f"{zoo_error} transformers' own names ({', '.join(_TRANSFORMERS_NAMES)}) work too.") \
            from None


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

    def __post_init__(self):
        self.zoo_optim = _resolve(str(self.optim))
        if self.zoo_optim is None:
            super().__post_init__()
            return
        self.zoo_hparams()  # fail now on bad keys, not after the model is loaded
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
        unknown = [k for k in extra if k not in accepted]
        if unknown:
            raise ValueError(f"optim_args: {spec.name} does not take {', '.join(map(repr, unknown))}; "
                             f"accepted keys: {', '.join(accepted)}")
        hp.update(extra)
        return hp

    def zoo_routing_options(self) -> dict[str, Any]:
        return parse_optim_args(self.zoo_routing)

    @staticmethod
    def optimizer_names() -> list[str]:
        """Every name ``optim`` accepts: the zoo's, then transformers'."""
        return list_optimizers().names() + list(_TRANSFORMERS_NAMES)
