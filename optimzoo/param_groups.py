"""Parameter routing: which tensor gets which update, and which one is decayed.

From a model's named parameters we build a :class:`RoutingPlan` with two independent labels per tensor:

* **role**: ``"matrix"`` for the 2-D weights of hidden linear layers (and conv filters, flattened to
  ``(out, -1)`` by the matrix optimizers), ``"vector"`` for everything else: embeddings, the model's
  output layer (LM head, tied or not; classifier heads), norm gains, biases and any tensor with fewer
  than 2 dimensions. Matrix optimizers (Muon, NorMuon, SWAN, ...) apply their matrix update to the
  first and an AdamW step to the second; element-wise optimizers ignore the role.

  Roles are found by structure first, names second (the rule of every Muon-family paper: the input
  embedding and the final output layer are not hidden matrices):

  1. every ``nn.Embedding`` (or ``*Embedding*`` module) weight;
  2. the modules a model declares: ``get_output_embeddings()`` and ``get_input_embeddings()``
     (transformers), ``get_classifier()`` (timm);
  3. names: ``lm_head``, ``embed_tokens``, ``wte``, ... anywhere, and top-level head modules
     ``score`` (transformers' ``*ForSequenceClassification``), ``classifier``, ``fc``, ``head``;
  4. when none of these names an output layer of an ``nn.Module``, its last ``nn.Linear`` (in module
     order) is taken as the output layer, and the plan says so.

  Unnamed tensors (``model.parameters()``) carry no role; matrix optimizers then route by dimension
  and warn (see :func:`unnamed_plan`).
* **decay**: weight decay is off for norm weights (LayerNorm, LLaMA's RMSNorm, any module whose class
  name contains ``Norm``), biases and every tensor with fewer than 2 dimensions, as in
  ``transformers.trainer_pt_utils.get_decay_parameter_names`` (which misses 1-D tensors that are not
  in a norm module and not named ``bias``).

Every decision carries its reason, so ``print(plan)`` shows where each tensor went and why.
Users override with regular expressions (``re.search`` on the parameter name), which win over the
built-in rules.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ParamInfo", "RoutingPlan", "plan_parameters", "unnamed_plan", "unnamed_warning"]

#: names of embedding / output-embedding weights in common architectures (LLaMA, GPT-2, GPT-NeoX, Meta LLaMA)
DEFAULT_VECTOR_PATTERNS = (r"(^|\.)(lm_head|embed_tokens|embed_out|wte|wpe|tok_embeddings|output)\.weight$",)
#: top-level output heads: transformers' ``score`` / ``classifier``, torchvision's ``fc``, timm's ``head``
#: (also under a DDP / torch.compile / FSDP wrapper prefix)
DEFAULT_HEAD_PATTERNS = (r"^(module\.|_orig_mod\.|_fsdp_wrapped_module\.)*(score|classifier|fc|head)(\.|$)",)
#: the methods through which models declare their input/output layers, and what each one is
STRUCTURE_GETTERS = (("get_output_embeddings", "output layer (get_output_embeddings())"),
                     ("get_input_embeddings", "input embedding (get_input_embeddings())"),
                     ("get_classifier", "output layer (get_classifier())"))
#: names that mark norm parameters even when the module type is unknown (named parameters only)
DEFAULT_NO_DECAY_PATTERNS = (r"bias$", r"layernorm", r"rmsnorm", r"(^|\.)norm(\.|$)", r"_norm(\.|$)", r"(^|\.)ln_")


@dataclass(frozen=True)
class ParamInfo:
    """One parameter's routing: name, shape, role (``matrix``/``vector``), decay flag and the reasons."""

    name: str
    shape: tuple[int, ...]
    role: str
    decay: bool
    role_reason: str
    decay_reason: str

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def group_name(self) -> str:
        return self.role + ("" if self.decay else "_no_decay")


class RoutingPlan:
    """The routing of a model's parameters; see the module docstring.

    ``groups(kind)`` turns it into ``torch.optim`` parameter groups; ``summary()`` (also ``str(plan)``)
    prints it; ``to_dict()`` is a JSON-able form for run configs. ``kind`` (``"elementwise"``,
    ``"matrix"`` or None) is the kind of optimizer the plan was made for (:meth:`for_kind`): printed and
    exported groups are the groups that optimizer really has (``decay``/``no_decay`` for element-wise
    ones; the roles only matter to matrix optimizers). ``warning`` is a sentence a user must read
    (e.g. that roles were guessed from dimensions), or None.
    """

    def __init__(self, infos: Sequence[ParamInfo], params: Sequence[torch.Tensor], kind: str | None = None,
                 warning: str | None = None):
        self.infos = list(infos)
        self.params = list(params)
        self.kind = kind
        self.warning = warning

    def for_kind(self, kind: str) -> RoutingPlan:
        """The same routing, described as the groups of an optimizer of ``kind``."""
        _check_kind(kind)
        return RoutingPlan(self.infos, self.params, kind, self.warning)

    def group_of(self, info: ParamInfo) -> str:
        """The name of the optimizer group ``info`` lands in, for this plan's kind."""
        if self.kind == "elementwise":
            return "decay" if info.decay else "no_decay"
        return info.group_name

    def __len__(self) -> int:
        return len(self.infos)

    def groups(self, kind: str) -> list[dict]:
        """Parameter groups for an optimizer of ``kind`` (``"elementwise"`` or ``"matrix"``).

        Element-wise: ``decay`` and ``no_decay``. Matrix: ``matrix``, ``matrix_no_decay``, ``vector``,
        ``vector_no_decay`` with a ``role`` key. Each group holds ``(name, tensor)`` pairs (so
        ``torch.optim`` records ``param_names``) and a ``group_name``; no-decay groups set
        ``weight_decay=0``, decay groups leave it to the optimizer's default. Empty groups are dropped.
        """
        _check_kind(kind)
        buckets: dict[str, dict] = {}
        for info, p in zip(self.infos, self.params):
            key = info.group_name if kind == "matrix" else ("decay" if info.decay else "no_decay")
            if key not in buckets:
                g: dict = {"params": [], "group_name": key}
                if kind == "matrix":
                    g["role"] = info.role
                if not info.decay:
                    g["weight_decay"] = 0.0
                buckets[key] = g
            buckets[key]["params"].append((info.name, p))
        order = ["matrix", "matrix_no_decay", "vector", "vector_no_decay", "decay", "no_decay"]
        return [buckets[k] for k in order if k in buckets]

    def count(self, role: str | None = None, decay: bool | None = None) -> int:
        """Number of parameter elements with the given role and/or decay flag."""
        return sum(
            i.numel
            for i in self.infos
            if (role is None or i.role == role) and (decay is None or i.decay == decay)
        )

    def names(self, role: str | None = None, decay: bool | None = None) -> list[str]:
        return [i.name for i in self.infos if (role is None or i.role == role) and (decay is None or i.decay == decay)]

    def to_dict(self) -> dict:
        """JSON-able plan: per group the tensor count, element count and names, plus per-tensor reasons."""
        out: dict = {}
        for i in self.infos:
            g = out.setdefault(self.group_of(i), {"tensors": 0, "numel": 0, "names": []})
            g["tensors"] += 1
            g["numel"] += i.numel
            g["names"].append(i.name)
        params = {}
        for i in self.infos:
            params[i.name] = {"shape": list(i.shape), "decay": i.decay, "why": i.decay_reason}
            if self.kind != "elementwise":
                params[i.name].update(role=i.role, why=f"{i.role_reason}; {i.decay_reason}")
        return {"kind": self.kind, "groups": out, "params": params, "warning": self.warning}

    def summary(self, verbose: bool = False) -> str:
        """A table: group, tensor count, distinct shapes, parameter count (and every tensor if ``verbose``)."""
        rows = []
        for gname in ("matrix", "matrix_no_decay", "vector", "vector_no_decay", "decay", "no_decay"):
            members = [i for i in self.infos if self.group_of(i) == gname]
            if not members:
                continue
            shapes: dict[tuple, int] = {}
            for i in members:
                shapes[i.shape] = shapes.get(i.shape, 0) + 1
            shape_txt = ", ".join(f"{'x'.join(map(str, s)) or 'scalar'}" + (f" (x{c})" if c > 1 else "")
                                  for s, c in shapes.items())
            rows.append((gname, str(len(members)), f"{sum(i.numel for i in members):,}", shape_txt))
        head = ("group", "tensors", "params", "shapes")
        widths = [max(len(r[k]) for r in [head, *rows]) for k in range(3)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)) + "  " + head[3]]
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3])
        lines.append(f"total: {len(self.infos)} tensors, {self.count():,} parameters")
        if self.warning:
            lines.append(f"warning: {self.warning}")
        if verbose:
            lines.append("")
            for i in self.infos:
                why = i.decay_reason if self.kind == "elementwise" else f"{i.role_reason}; {i.decay_reason}"
                lines.append(f"{i.name:<50} {'x'.join(map(str, i.shape)):<14} {self.group_of(i):<16} {why}")
        return "\n".join(lines)

    __str__ = summary

    def __repr__(self) -> str:
        sizes: dict[str, int] = {}
        for i in self.infos:
            sizes[self.group_of(i)] = sizes.get(self.group_of(i), 0) + i.numel
        return f"RoutingPlan({len(self.infos)} tensors: " + ", ".join(f"{g}={n:,}" for g, n in sizes.items()) + ")"


def _check_kind(kind: str) -> None:
    if kind not in ("elementwise", "matrix"):
        raise ValueError(f"Invalid kind: {kind!r} (kind must be 'elementwise' or 'matrix')")


def unnamed_plan(params: Sequence[torch.Tensor], first_index: int = 0) -> RoutingPlan:
    """The routing a matrix optimizer falls back to for tensors without names or roles: by dimension
    (``ndim >= 2`` -> matrix). It cannot tell an embedding or an output layer from a hidden weight, so
    the plan carries a warning naming the count of 2-D tensors that take the matrix update and the fix."""
    infos = []
    for k, p in enumerate(params, start=first_index):
        matrix = p.dim() >= 2
        infos.append(ParamInfo(
            f"#{k}", tuple(p.shape), "matrix" if matrix else "vector", True,
            f"unnamed {p.dim()}-D tensor: " + ("matrix update by dimension (role unknown)" if matrix else "AdamW"),
            "decay as its group says"))
    return RoutingPlan(infos, params, "matrix", unnamed_warning(infos))


def unnamed_warning(infos: Sequence[ParamInfo]) -> str | None:
    """The warning for the unnamed tensors among ``infos`` that take the matrix update (None if none)."""
    n = sum(i.role == "matrix" and i.role_reason.startswith("unnamed") for i in infos)
    if not n:
        return None
    return (f"{n} unnamed tensor(s) with >= 2 dimensions take the matrix update: without names the "
            "optimizer cannot tell embeddings or the output layer (LM head, classifier) from hidden "
            "weights. Pass the model (optimzoo.create_optimizer(model, ...)) or model.named_parameters(), "
            "or give groups an explicit role='matrix'/'vector'.")


def _compile(patterns: Iterable[str] | str | None) -> list[re.Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    return [re.compile(p) for p in patterns]


def _first_match(patterns: list[re.Pattern], name: str) -> str | None:
    for p in patterns:
        if p.search(name):
            return p.pattern
    return None


def plan_parameters(
    model_or_named_params: nn.Module | Iterable[tuple[str, torch.Tensor]],
    *,
    matrix_patterns: Iterable[str] | str | None = None,
    vector_patterns: Iterable[str] | str | None = None,
    no_decay_patterns: Iterable[str] | str | None = None,
    decay_patterns: Iterable[str] | str | None = None,
    include_frozen: bool = False,
) -> RoutingPlan:
    """Route a model's parameters (see the module docstring).

    Args:
        model_or_named_params: an ``nn.Module`` (module structure is used: ``nn.Embedding``, norm
            modules, ``get_output_embeddings()``/``get_input_embeddings()``/``get_classifier()``, the
            last ``nn.Linear``) or an iterable of ``(name, tensor)`` pairs (names and shapes only).
        matrix_patterns / vector_patterns: regular expressions forcing a role.
        no_decay_patterns / decay_patterns: regular expressions forcing the decay flag.
        include_frozen: also route parameters with ``requires_grad=False`` (default: skip them).
    """
    force_matrix, force_vector = _compile(matrix_patterns), _compile(vector_patterns)
    force_nodecay, force_decay = _compile(no_decay_patterns), _compile(decay_patterns)
    default_vector = _compile(DEFAULT_VECTOR_PATTERNS)
    default_head = _compile(DEFAULT_HEAD_PATTERNS)
    default_nodecay = _compile(DEFAULT_NO_DECAY_PATTERNS)

    module_of: dict[int, nn.Module] = {}
    declared: dict[int, str] = {}  # id(tensor) -> why it is an input/output layer
    if isinstance(model_or_named_params, nn.Module):
        model = model_or_named_params
        named = list(model.named_parameters())
        for mod in model.modules():
            for p in mod.parameters(recurse=False):
                module_of.setdefault(id(p), mod)
        for getter, why in STRUCTURE_GETTERS:
            fn = getattr(model, getter, None)
            try:
                layer = fn() if callable(fn) else None
            except (NotImplementedError, AttributeError, TypeError):
                layer = None
            if isinstance(layer, nn.Module):
                for p in layer.parameters():
                    declared.setdefault(id(p), why)
        has_output = any("output layer" in why for why in declared.values()) or any(
            p.dim() >= 2 and (_first_match(default_head, n) or _first_match(default_vector, n))
            for n, p in named)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        vocabs = {m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)}
        # the last nn.Linear is the output layer unless the model has an embedding whose vocabulary it
        # does not produce (then the output is most likely tied to the embedding, already a vector)
        if not has_output and linears and (not vocabs or linears[-1].out_features in vocabs):
            declared.setdefault(id(linears[-1].weight),
                                "output layer (the model's last nn.Linear: no output layer is declared or "
                                "named; use matrix_patterns to override)")
    else:
        named = list(model_or_named_params)

    infos, params, seen = [], [], set()
    for name, p in named:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"parameter {name!r} is a {type(p).__name__}, not a tensor")
        if id(p) in seen or (not include_frozen and not p.requires_grad):
            continue
        seen.add(id(p))
        mod = module_of.get(id(p))
        mod_type = type(mod).__name__ if mod is not None else ""

        # role
        if (pat := _first_match(force_matrix, name)) is not None:
            role, role_reason = "matrix", f"matches matrix pattern {pat!r}"
        elif (pat := _first_match(force_vector, name)) is not None:
            role, role_reason = "vector", f"matches vector pattern {pat!r}"
        elif p.dim() < 2:
            role, role_reason = "vector", f"{p.dim()}-D tensor"
        elif isinstance(mod, nn.Embedding) or "Embedding" in mod_type:
            role, role_reason = "vector", f"embedding ({mod_type})"
        elif id(p) in declared:
            role, role_reason = "vector", declared[id(p)]
        elif (pat := _first_match(default_vector, name)) is not None:
            role, role_reason = "vector", "embedding/LM-head name"
        elif (pat := _first_match(default_head, name)) is not None:
            role, role_reason = "vector", "output head name (score/classifier/fc/head)"
        else:
            role, role_reason = "matrix", "hidden weight" if p.dim() == 2 else f"{p.dim()}-D weight (flattened)"

        # decay
        if (pat := _first_match(force_nodecay, name)) is not None:
            decay, decay_reason = False, f"matches no-decay pattern {pat!r}"
        elif (pat := _first_match(force_decay, name)) is not None:
            decay, decay_reason = True, f"matches decay pattern {pat!r}"
        elif p.dim() < 2:
            decay, decay_reason = False, "no decay: 1-D (bias/norm/scale)"
        elif "Norm" in mod_type or isinstance(mod, (nn.LayerNorm, nn.GroupNorm)):
            decay, decay_reason = False, f"no decay: norm module ({mod_type})"
        elif _first_match(default_nodecay, name) is not None:
            decay, decay_reason = False, "no decay: bias/norm name"
        else:
            decay, decay_reason = True, "decay"
        infos.append(ParamInfo(name, tuple(p.shape), role, decay, role_reason, decay_reason))
        params.append(p)
    return RoutingPlan(infos, params)
