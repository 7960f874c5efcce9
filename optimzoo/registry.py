"""The optimizer registry: every optimizer described once, constructed by name.

>>> import optimzoo
>>> print(optimzoo.list_optimizers())                       # the table
>>> opt = optimzoo.create_optimizer(model, "normuon", lr=0.02)  # routed parameter groups

Names are case-insensitive and ignore ``-``/``_`` (``stable_spam``, ``StableSPAM``, ``stable-spam``).
torch-optimizer's catalogue is reachable lazily under the prefix ``torch_optimizer.`` (e.g.
``torch_optimizer.lamb``) when that package is installed.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .param_groups import RoutingPlan, plan_parameters

__all__ = [
    "OptimizerSpec",
    "OptimizerTable",
    "StateCost",
    "create_optimizer",
    "get_optimizer",
    "get_spec",
    "list_optimizers",
    "register_optimizer",
]

PEER_PREFIX = "torch_optimizer."
KINDS = ("elementwise", "matrix")


@dataclass(frozen=True)
class StateCost:
    """Persistent optimizer-state size of one parameter, in state elements.

    ``per_element`` state values per parameter element plus ``per_row`` per row (first dimension) of a
    matrix; bytes use the state dtype's item size (4 for fp32 state). Step counters and other 0-d
    tensors are not counted (see :func:`optimzoo.optim.state_bytes`).
    """

    per_element: int = 0
    per_row: int = 0

    def bytes(self, shape: Iterable[int], itemsize: int = 4) -> int:
        shape = tuple(shape)
        numel = 1
        for s in shape:
            numel *= s
        rows = shape[0] if len(shape) >= 2 else 0
        return itemsize * (self.per_element * numel + self.per_row * rows)

    def __str__(self) -> str:
        parts = [str(4 * self.per_element)] if self.per_element or not self.per_row else []
        if self.per_row:
            parts.append(f"{4 * self.per_row}/cols")
        return " + ".join(parts)


ADAMW_STATE = StateCost(per_element=2)


@dataclass(frozen=True)
class OptimizerSpec:
    """Everything the zoo knows about one optimizer.

    Attributes:
        name: canonical name (lower case, ``_`` between words).
        target: the class, or ``"module:Class"`` imported on first use.
        kind: ``"elementwise"`` (one rule for every tensor; routing only splits decay/no-decay) or
            ``"matrix"`` (a matrix update for hidden 2-D weights, AdamW for the vector parameters).
        state: persistent state per parameter; for matrix optimizers, per *matrix* parameter. A
            callable receives the constructor's hyperparameters (defaults filled in) and returns the
            cost, for optimizers whose state depends on them (SGD's momentum buffer).
        vector_state: state of vector parameters (matrix optimizers: their AdamW fallback).
        paper, arxiv, code: the source: paper title, arXiv id, official implementation.
        aliases: other accepted names.
        summary: one line for the table.
        baseline: a torch.optim reference rather than a zoo algorithm.
        supports_sparse: whether sparse gradients are accepted.
    """

    name: str
    target: Any
    kind: str
    state: Any
    paper: str = ""
    arxiv: str = ""
    code: str = ""
    aliases: tuple[str, ...] = ()
    summary: str = ""
    vector_state: StateCost | None = None
    baseline: bool = False
    supports_sparse: bool = False
    state_note: str = ""
    _cls_cache: list = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Invalid kind: {self.kind!r} (kind must be one of {KINDS})")

    @property
    def cls(self) -> type:
        """The optimizer class (imported on first access when ``target`` is a string)."""
        if not self._cls_cache:
            t = self.target
            if isinstance(t, str):
                module, _, attr = t.partition(":")
                t = getattr(importlib.import_module(module), attr)
            self._cls_cache.append(t)
        return self._cls_cache[0]

    @property
    def defaults(self) -> dict[str, Any]:
        """Default hyperparameters, read from the constructor's signature (the single source)."""
        return {
            k: p.default
            for k, p in _init_params(self.cls).items()
            if p.default is not inspect.Parameter.empty
        }

    @property
    def hparams(self) -> tuple[str, ...]:
        """Names of the keyword hyperparameters the constructor accepts."""
        return tuple(_init_params(self.cls))

    def check_hparams(self, keys: Iterable[str], what: str = "") -> None:
        """Refuse keys the constructor does not take: ``ValueError`` naming them and the accepted keys
        (``what``, e.g. ``"optim_args"``, prefixes the message)."""
        unknown = [k for k in keys if k not in self.hparams]
        if unknown:
            raise ValueError(f"{what + ': ' if what else ''}{self.name} does not take hyperparameter(s) "
                             f"{', '.join(map(repr, unknown))}; accepted: {', '.join(self.hparams)}")

    def state_cost(self, role: str = "matrix", hparams: Mapping[str, Any] | None = None) -> StateCost | None:
        """The declared :class:`StateCost` of one parameter of ``role`` under ``hparams``."""
        if self.kind == "matrix" and role != "matrix":
            return self.vector_state
        if callable(self.state):
            return self.state({**self.defaults, **dict(hparams or {})})
        return self.state

    def state_bytes(self, shape: Iterable[int], role: str = "matrix", hparams: Mapping[str, Any] | None = None,
                    itemsize: int = 4) -> int:
        """Declared state bytes for one parameter of ``shape`` and ``role`` (role matters for matrix kinds)."""
        cost = self.state_cost(role, hparams)
        return cost.bytes(tuple(shape), itemsize) if cost is not None else 0

    def expected_state_bytes(self, plan: RoutingPlan, hparams: Mapping[str, Any] | None = None,
                             itemsize: int = 4) -> int:
        """Declared state bytes for every parameter of a routing plan."""
        return sum(self.state_bytes(i.shape, i.role, hparams, itemsize) for i in plan.infos)

    @property
    def state_text(self) -> str:
        cost = self.state_cost("matrix")
        text = "?" if cost is None else str(cost)
        if self.state_note:
            text += f" ({self.state_note})"
        if self.kind == "matrix":
            text += f"; AdamW params {self.vector_state}"
        return text


def _init_params(cls: type) -> dict[str, inspect.Parameter]:
    sig = inspect.signature(cls.__init__)
    return {
        k: p
        for k, p in list(sig.parameters.items())[2:]  # drop self, params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


class OptimizerTable(list):
    """A list of :class:`OptimizerSpec` that prints as a table."""

    def __str__(self) -> str:
        head = ("name", "kind", "state B/param", "paper", "aliases")
        rows = [
            (s.name, s.kind + (" (baseline)" if s.baseline else ""), s.state_text,
             f"{s.paper} (arXiv {s.arxiv})" if s.arxiv else s.paper, ", ".join(s.aliases))
            for s in self
        ]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)])

    def markdown(self) -> str:
        lines = ["| name | aliases | kind | state bytes/param | paper |", "|---|---|---|---|---|"]
        for s in self:
            paper = f"{s.paper} ([arXiv {s.arxiv}](https://arxiv.org/abs/{s.arxiv}))" if s.arxiv else s.paper
            lines.append(f"| `{s.name}` | {', '.join(f'`{a}`' for a in s.aliases)} | {s.kind} | {s.state_text} | {paper} |")
        return "\n".join(lines)

    def names(self) -> list[str]:
        return [s.name for s in self]


_REGISTRY: dict[str, OptimizerSpec] = {}  # canonical name -> spec (insertion order = table order)
_LOOKUP: dict[str, str] = {}  # normalised name or alias -> canonical name


def register_optimizer(
    name: str,
    target: Any,
    *,
    kind: str = "elementwise",
    state: Any = StateCost(),
    vector_state: StateCost | None = None,
    state_note: str = "",
    aliases: Iterable[str] = (),
    paper: str = "",
    arxiv: str = "",
    code: str = "",
    summary: str = "",
    baseline: bool = False,
    supports_sparse: bool = False,
    overwrite: bool = False,
) -> OptimizerSpec:
    """Add an optimizer to the registry (third parties welcome); returns its spec.

    ``target`` is a ``torch.optim.Optimizer`` subclass or a ``"module:Class"`` string imported on
    first use. Matrix optimizers must accept groups with ``role`` ``"matrix"``/``"vector"`` (see
    :mod:`optimzoo.param_groups`). Re-registering a taken name or alias raises unless ``overwrite``.
    """
    if kind == "matrix" and vector_state is None:
        vector_state = ADAMW_STATE
    spec = OptimizerSpec(
        name=name, target=target, kind=kind, state=state, vector_state=vector_state,
        aliases=tuple(aliases), paper=paper, arxiv=arxiv, code=code, summary=summary,
        baseline=baseline, supports_sparse=supports_sparse, state_note=state_note,
    )
    keys = [_key(name), *(_key(a) for a in spec.aliases)]
    for k in keys:
        owner = _LOOKUP.get(k)
        if owner is not None and not overwrite:
            raise ValueError(f"optimizer name {k!r} is already registered (by {owner!r}); pass overwrite=True")
        if k.startswith(_key(PEER_PREFIX)):
            raise ValueError(f"names starting with {PEER_PREFIX!r} are reserved for torch-optimizer's catalogue")
    if name in _REGISTRY:
        for k in [k for k, v in _LOOKUP.items() if v == name]:
            del _LOOKUP[k]
    _REGISTRY[name] = spec
    for k in keys:
        _LOOKUP[k] = name
    return spec


def _peer_catalogue() -> dict[str, type]:
    try:
        import torch_optimizer
    except ImportError:
        return {}
    return dict(getattr(torch_optimizer, "_NAME_OPTIM_MAP", {}))


def _peer_spec(name: str) -> OptimizerSpec:
    sub = name[len(PEER_PREFIX):].lower()
    catalogue = _peer_catalogue()
    if not catalogue:
        raise ValueError(
            f"optimizer {name!r} comes from torch-optimizer, which is not installed "
            "(pip install 'optimzoo[peers]')"
        )
    by_key = {_key(k): k for k in catalogue}
    if _key(sub) not in by_key:
        close = difflib.get_close_matches(_key(sub), list(by_key), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(PEER_PREFIX + by_key[c]) for c in close)}?" if close else ""
        raise ValueError(f"Unknown torch-optimizer optimizer {name!r}.{hint} Available: "
                         f"{', '.join(PEER_PREFIX + k for k in sorted(catalogue))}")
    canonical = by_key[_key(sub)]
    cls = catalogue[canonical]
    return OptimizerSpec(
        name=PEER_PREFIX + canonical, target=cls, kind="elementwise", state=None,
        paper=f"torch-optimizer {cls.__name__}", code="jettify/pytorch-optimizer", baseline=True,
        summary="peer implementation from torch-optimizer (state size not declared)",
    )


def get_spec(name: str) -> OptimizerSpec:
    """The :class:`OptimizerSpec` for a name or alias; unknown names raise ``ValueError`` with suggestions."""
    if not isinstance(name, str):
        raise TypeError(f"optimizer name must be a string, got {type(name).__name__}")
    if name.lower().startswith(PEER_PREFIX):
        return _peer_spec(name)
    canonical = _LOOKUP.get(_key(name))
    if canonical is None:
        candidates = {**{k: v for k, v in _LOOKUP.items()}}
        close = difflib.get_close_matches(_key(name), list(candidates), n=5, cutoff=0.6)
        suggestions = list(dict.fromkeys(candidates[c] for c in close))
        hint = f" Did you mean {' or '.join(repr(s) for s in suggestions[:3])}?" if suggestions else ""
        raise ValueError(
            f"Unknown optimizer {name!r}.{hint} List every name with optimzoo.list_optimizers() "
            f"or `python -m optimzoo`; torch-optimizer's catalogue is under '{PEER_PREFIX}<name>'."
        )
    return _REGISTRY[canonical]


def get_optimizer(name: str) -> type:
    """The optimizer class registered under ``name`` (or an alias)."""
    return get_spec(name).cls


def registered_name(cls: type) -> str | None:
    """The canonical name ``cls`` is registered under (the first one, if several), or None.

    The registry is the one source of optimizer names: ``ZooOptimizer.optimizer_name`` (what
    ``state_dict()`` records) is looked up here. String targets are matched without importing them
    unless their class name matches (a target may name a re-exporting module).
    """
    for spec in _REGISTRY.values():
        target = spec.target
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            if attr != cls.__qualname__:
                continue
            if module != cls.__module__:
                try:
                    target = spec.cls
                except Exception:  # an unimportable third-party target is not this class
                    continue
            else:
                target = cls
        if target is cls:
            return spec.name
    return None


def list_optimizers(kind: str | None = None, *, baselines: bool = True, peers: bool = False) -> OptimizerTable:
    """Registered optimizers (a list of specs that prints as a table).

    Args:
        kind: only ``"elementwise"`` or ``"matrix"`` ones.
        baselines: include torch.optim's baselines (``adamw``, ``adam``, ``sgd``).
        peers: include torch-optimizer's catalogue (``torch_optimizer.*``) when installed.
    """
    specs = [s for s in _REGISTRY.values() if (kind is None or s.kind == kind) and (baselines or not s.baseline)]
    if peers:
        specs += [_peer_spec(PEER_PREFIX + k) for k in sorted(_peer_catalogue())]
    return OptimizerTable(specs)


def _is_named(params: list) -> bool:
    return bool(params) and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in params)


def create_optimizer(
    model_or_params: nn.Module | Iterable,
    name: str,
    *,
    routing: RoutingPlan | Mapping[str, Any] | None = None,
    **hparams: Any,
) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name``.

    Args:
        model_or_params: an ``nn.Module`` or an iterable of ``(name, tensor)`` pairs: parameters are
            routed (:func:`optimzoo.param_groups.plan_parameters`) into decay/no-decay groups, and
            for matrix optimizers into matrix/vector groups. Plain tensors or explicit group dicts
            are passed through unchanged.
        name: a registered name or alias (case-insensitive), or ``torch_optimizer.<name>``.
        routing: a prepared :class:`RoutingPlan`, or keyword arguments for ``plan_parameters``
            (e.g. ``{"vector_patterns": [r"\\.gate\\."]}``).
        **hparams: constructor keyword arguments (``lr``, ``weight_decay``, ...); a key the optimizer
            does not take raises ``ValueError`` naming the key and the accepted keys.

    The returned optimizer has a ``routing_plan`` attribute (``None`` when groups were given).
    """
    spec = get_spec(name)
    spec.check_hparams(hparams)
    plan: RoutingPlan | None = None
    if isinstance(routing, RoutingPlan):
        plan = routing
    elif isinstance(model_or_params, nn.Module):
        plan = plan_parameters(model_or_params, **dict(routing or {}))
    else:
        items = list(model_or_params)
        if _is_named(items):
            plan = plan_parameters(items, **dict(routing or {}))
        else:
            if routing:
                raise ValueError("routing options need a model or (name, tensor) pairs, not plain tensors or groups")
            params = items
    if plan is not None:
        if len(plan) == 0:
            raise ValueError("the model has no trainable parameters")
        params = plan.groups(spec.kind)
    optimizer = spec.cls(params, **hparams)
    # the plan of the groups this optimizer has; for bare tensors, the one a matrix optimizer made (or None)
    optimizer.routing_plan = plan.for_kind(spec.kind) if plan is not None else getattr(optimizer, "routing_plan", None)
    optimizer.optimizer_name = spec.name
    return optimizer


# --------------------------------------------------------------------------------------------
# The built-in table. Classes are imported lazily, on first use.
# --------------------------------------------------------------------------------------------

def _adam_state(h: Mapping[str, Any]) -> StateCost:
    return StateCost(3 if h.get("amsgrad") else 2)


register_optimizer("adamw", "torch.optim:AdamW", state=_adam_state, state_note="12 with amsgrad", baseline=True,
                   paper="Decoupled Weight Decay Regularization", arxiv="1711.05101", code="torch.optim",
                   summary="torch.optim.AdamW (reference baseline)")
register_optimizer("adam", "torch.optim:Adam", state=_adam_state, state_note="12 with amsgrad", baseline=True,
                   paper="Adam: A Method for Stochastic Optimization", arxiv="1412.6980", code="torch.optim",
                   summary="torch.optim.Adam (GaLore's baseline)")
register_optimizer("sgd", "torch.optim:SGD", state=lambda h: StateCost(1 if h.get("momentum") else 0),
                   state_note="4 with momentum", baseline=True, supports_sparse=True,
                   paper="SGD with momentum", code="torch.optim",
                   summary="torch.optim.SGD")

register_optimizer("adamp", "optimzoo.optim.adamp:AdamP", state=StateCost(2),
                   paper="AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights",
                   arxiv="2006.08217", code="clovaai/AdamP",
                   summary="Adam with projection of the update off scale-invariant weights")
register_optimizer("sgdp", "optimzoo.optim.adamp:SGDP", state=StateCost(1),
                   paper="AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights",
                   arxiv="2006.08217", code="clovaai/AdamP",
                   summary="SGD with momentum and AdamP's projection")
register_optimizer("diffgrad", "optimzoo.optim.diffgrad:DiffGrad", state=StateCost(3),
                   paper="diffGrad: An Optimization Method for Convolutional Neural Networks",
                   arxiv="1909.11015", code="shivram1987/diffGrad (diffGrad_v2)",
                   summary="Adam with a friction coefficient from the gradient change")
register_optimizer("lion", "optimzoo.optim.lion:Lion", state=StateCost(1),
                   paper="Symbolic Discovery of Optimization Algorithms", arxiv="2302.06675",
                   code="google/automl (lion)", summary="sign of an interpolated momentum")
register_optimizer("lion_k", "optimzoo.optim.lion:LionK", state=StateCost(1), aliases=("lion_kappa",),
                   paper="Lion Secretly Solves Constrained Optimization: As Lyapunov Predicts",
                   arxiv="2310.05898", code="(no official code; paper formulas)",
                   summary="Lion with a general convex K: sign, l2, lp, huber, tanh, relativistic, nuclear")
register_optimizer("spam", "optimzoo.optim.spam:SPAM", state=StateCost(2),
                   paper="SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training",
                   arxiv="2501.06842", code="TianjinYellow/SPAM-Optimizer",
                   summary="Adam with periodic momentum reset and spike-aware gradient clipping")
register_optimizer("stable_spam", "optimzoo.optim.spam:StableSPAM", state=StateCost(2),
                   paper="Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam",
                   arxiv="2502.17055", code="TianjinYellow/StableSPAM",
                   summary="SPAM with adaptive spike clipping (AdaClip) and gradient-norm scaling (AdaGN)")
register_optimizer("muon", "optimzoo.optim.muon:Muon", kind="matrix", state=StateCost(1),
                   paper="Muon: An optimizer for hidden layers in neural networks", code="KellerJordan/Muon",
                   summary="Newton-Schulz orthogonalized Nesterov momentum")
register_optimizer("normuon", "optimzoo.optim.muon:NorMuon", kind="matrix", state=StateCost(1, 1),
                   paper="NorMuon: Making Muon more efficient and scalable", arxiv="2510.05491",
                   code="zichongli5/NorMuon", summary="Muon with per-neuron (row) second-moment normalization")
register_optimizer("swan", "optimzoo.optim.swan:SWAN", kind="matrix", state=StateCost(0),
                   paper="SWAN: SGD with Normalization and Whitening Enables Stateless LLM Training",
                   arxiv="2412.13148", code="(no official code)",
                   summary="stateless: row standardization then whitening of the raw gradient")
register_optimizer("sinkgd", "optimzoo.optim.sinkgd:SinkGD", kind="matrix", state=StateCost(0),
                   aliases=("multinorm", "gradient_multi_normalization"),
                   paper="Gradient Multi-Normalization for Efficient LLM Training", arxiv="2502.06742",
                   code="(no official code)", summary="stateless: square-root Sinkhorn row/column normalization")
register_optimizer("auon", "optimzoo.optim.auon:AuON", kind="matrix", state=StateCost(1),
                   paper="AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates", arxiv="2509.24320",
                   code="ryyzn9/AuON", summary="normalized Nesterov momentum with a cosh-RMS brake (no Newton-Schulz)")
register_optimizer("hybrid_auon", "optimzoo.optim.auon:HybridAuON", kind="matrix", state=StateCost(1),
                   paper="AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates", arxiv="2509.24320",
                   code="ryyzn9/AuON", summary="one Newton-Schulz step, then AuON's cosh-RMS brake")
