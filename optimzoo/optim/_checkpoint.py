"""Checkpoints that cannot load into the wrong optimizer: the ``state_dict``/``load_state_dict`` of
every zoo optimizer (:class:`CheckpointMixin`, a base of :class:`~optimzoo.optim._base.ZooOptimizer`).

``state_dict()`` is torch.optim's plus ``"optimizer_name"``: the registry name of the
class (:attr:`optimizer_name`, looked up in the registry, so ``NorMuon(model.named_parameters())``
knows it is ``"normuon"``; an unregistered class is ``"module.QualName"``). ``load_state_dict``,
after the user's ``register_load_state_dict_pre_hook`` hooks and before torch.optim's load:

* refuses (``ValueError`` naming both) state recorded by another name: different registry names
  are different optimizers, even with the same state keys (``lion`` / ``lion_k``);
* recognizes state without the record (torch.optim's, another package's, this package's before
  the record; ``torch.distributed.checkpoint`` keeps only ``state`` and ``param_groups``, so its
  state never has one) by its keys, and refuses it when a param group lacks one of this
  optimizer's keys (those of a group it builds itself), or has a key that another registered
  optimizer's groups have and this one's do not (AdamW's ``amsgrad``/``eps`` in Lion), or when a
  parameter's state keys are not those this optimizer creates for a parameter of that group and
  rank (learned from one step of a probe on tiny tensors with the checkpoint's hyperparameters,
  so a matrix optimizer's vector groups expect AdamW's ``exp_avg``/``exp_avg_sq``, its matrix
  groups their own). Keys that are no registered optimizer's (a scheduler's ``initial_lr``, the
  routing's ``group_name``) are tolerated, and keys the checkpoint lacks keep this optimizer's
  values;
* matches state to parameters by name where both sides have names: the checkpoint's
  ``param_names`` (torch records them for groups built from ``(name, tensor)`` pairs, as
  ``create_optimizer`` builds them), or the FQN keys of DCP's state, against our groups'
  ``param_names``, compared without wrapper modules (``torch.compile``'s ``_orig_mod``, DDP's
  leading ``module.``). A reordered or regrouped model gets each parameter's own state; each of
  our groups takes the hyperparameters of the saved group that held most of its members (ties:
  the one at its position). A name on one side only is a ``ValueError`` listing them (FQNs of
  another naming scheme altogether fall back to positions: DCP builds its groups in our order).
  Without names on both sides, matching is torch's: by position.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["STATE_DICT_RECORD", "CheckpointMixin"]

#: the ``state_dict()`` entry that records which optimizer wrote the state: its registry name
STATE_DICT_RECORD = "optimizer_name"
#: module names that torch.distributed.checkpoint leaves out of parameter FQNs (wrapper modules)
_WRAPPER_MODULES = ("_checkpoint_wrapped_module", "_fsdp_wrapped_module", "_orig_mod")
#: param-group entries that are not hyperparameters
_GROUP_LISTS = ("params", "param_names")


class _RegistryName:
    """``optimizer_name``: the name the class is registered under (one source of truth: the registry,
    :func:`optimzoo.registry.registered_name`), or ``module.QualName`` for a class that is not
    registered. A non-data descriptor, so an instance attribute (``create_optimizer`` sets the name it
    was given) takes precedence."""

    def __get__(self, obj: Any, cls: type | None = None) -> str:
        from ..registry import registered_name

        cls = cls if cls is not None else type(obj)
        return registered_name(cls) or f"{cls.__module__}.{cls.__qualname__}"


def _canonical_name(name: str) -> str:
    """A recorded name as the registry spells it (aliases and spellings resolved); unknown names as they are."""
    from ..registry import get_spec

    try:
        return get_spec(name).name
    except (TypeError, ValueError):
        return name


def _listing(items: Iterable[Any], limit: int = 5) -> str:
    items = sorted(items, key=str)
    text = ", ".join(repr(x) for x in items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _refusal(written: str, into: str, writer: str | None = None) -> str:
    writer = repr(writer) if writer is not None else "<its name>"
    return (f"{written}; it cannot be loaded into {into!r}: optimizer state (buffers and hyperparameters) "
            "means something only to the algorithm that wrote it. To resume, build the optimizer that wrote "
            f"it (optimzoo.create_optimizer(model, {writer}, ...)); to switch to {into!r}, load only the "
            "model weights and start it from fresh state.")


def _group_keys_of(spec: Any) -> set[str]:
    """The keys of a param group that the registered optimizer ``spec`` builds (its constructor's
    hyperparameters where it cannot be built from a group alone)."""
    try:
        probe = spec.cls([{"params": [_probe_tensor(2)], **({"role": "matrix"} if spec.kind == "matrix" else {})}])
        return set(probe.param_groups[0]) - set(_GROUP_LISTS)
    except Exception:
        try:
            return set(spec.hparams)
        except Exception:  # a registered third-party target that does not import
            return set()


def _registered_group_keys() -> dict[str, set[str]]:
    """Registry name -> the keys of a param group that optimizer builds (torch.optim's baselines
    included). A group key among them that an optimizer does not have marks another optimizer's
    state; keys that are not (a scheduler's ``initial_lr``, the routing's ``group_name``) do not."""
    from ..registry import list_optimizers

    return {s.name: _group_keys_of(s) for s in list_optimizers()}


def _likely_writers(keys: set[str], registered: dict[str, set[str]], reader: str) -> str:
    """`` (it looks like 'adamw' or 'adam' state)``: the registered optimizers whose param-group keys
    are closest to ``keys`` (those of a saved group that some registered optimizer uses)."""
    scored = {name: len(keys ^ own) for name, own in registered.items() if name != reader}
    if not scored:
        return ""
    best = min(scored.values())
    names = [n for n, score in scored.items() if score == best][:3]
    return f" (it looks like {' or '.join(map(repr, names))} state)"


def _fqn(name: str) -> str:
    """A parameter name as torch.distributed.checkpoint writes it: without wrapper modules."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_MODULES)


def _same_names(theirs: list[str], ours: list[str]) -> tuple[list[str], list[str]]:
    """Two lists of parameter names in comparable form: without wrapper modules (``_orig_mod`` of
    ``torch.compile``, FSDP1's and activation checkpointing's), and without DDP's leading ``module.``
    where one side has it on every name and dropping it makes the two sides the same."""
    theirs, ours = [_fqn(n) for n in theirs], [_fqn(n) for n in ours]
    if set(theirs) != set(ours):
        bare = [[n[len("module."):] for n in ns] if ns and all(n.startswith("module.") for n in ns) else ns
                for ns in (theirs, ours)]
        if set(bare[0]) == set(bare[1]):
            return bare[0], bare[1]
    return theirs, ours


def _probe_tensor(ndim: int) -> torch.Tensor:
    """A tiny float32 parameter of rank ``ndim``, with a deterministic gradient (no RNG is drawn)."""
    shape = ((4, 3) + (2,) * (ndim - 2))[:ndim] if ndim else ()
    p = torch.zeros(shape, requires_grad=True)
    p.grad = torch.arange(1, p.numel() + 1, dtype=torch.float32).cos().reshape(shape)
    return p


def _probe_step(optimizer: Optimizer) -> None:
    """``optimizer.step()`` of a probe: without torch.optim's wrapper (which runs global step hooks),
    without gradients, and leaving the global (CPU) random state as it was."""
    step = type(optimizer).step
    step = step.__wrapped__ if getattr(step, "hooked", False) else step
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        step(optimizer)


class CheckpointMixin:
    """``state_dict``/``load_state_dict`` for a ``torch.optim.Optimizer`` subclass (see the module
    docstring). Put it before ``Optimizer`` among the bases."""

    #: the registry name (``"normuon"``), looked up in the registry; ``state_dict()`` records it
    optimizer_name = _RegistryName()

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict, plus ``"optimizer_name"``: the registry name of the writer."""
        state_dict = super().state_dict()
        state_dict[STATE_DICT_RECORD] = self.optimizer_name
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state this optimizer wrote; refuse another's; match state to parameters by name.

        See the class docstring. Runs after the ``register_load_state_dict_pre_hook`` hooks (so a
        hook can adapt a state dict), then torch.optim's load. A refused load changes nothing.
        """
        handle = self.register_load_state_dict_pre_hook(type(self)._own_state_dict)  # the last pre-hook
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()

    def _own_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """The pre-hook of :meth:`load_state_dict`: ``state_dict`` checked, with its param groups
        aligned with this optimizer's (by name where both sides have names) and without the record."""
        reader = self.optimizer_name
        writer = state_dict.get(STATE_DICT_RECORD)
        if writer is not None:
            writer = _canonical_name(writer)
        if writer is not None and writer != reader:
            raise ValueError(_refusal(f"this state_dict was written by {writer!r}", reader, writer))
        groups = [dict(g) for g in state_dict["param_groups"]]
        state = state_dict["state"]
        if writer is None:
            self._check_group_keys(groups)
        aligned = self._align_by_name(groups)
        if aligned is None and len(groups) == len(self.param_groups) and all(
                len(s["params"]) == len(g["params"]) for s, g in zip(groups, self.param_groups)):
            aligned = groups  # torch's positional matching
        if aligned is not None:  # (otherwise torch.optim refuses the layout)
            if writer is None:
                self._check_state_keys(aligned, state)
            for saved, group in zip(aligned, self.param_groups):
                for key, value in group.items():  # keys the state dict lacks keep their values
                    saved.setdefault(key, value)
            groups = aligned
        out = {k: v for k, v in state_dict.items() if k != STATE_DICT_RECORD}
        out["param_groups"] = groups
        return out

    def _probe(self, groups: list[dict]) -> Optimizer | None:
        """A new optimizer of this class on ``groups`` (of probe tensors), or None if it cannot be
        built from groups alone."""
        try:
            return type(self)(groups)
        except Exception:
            return None

    def _roles(self) -> dict[Any, dict]:
        """The extra keys a probe group needs to be a group like each of ours (its ``role``)."""
        return {g.get("role"): ({"role": g["role"]} if "role" in g else {}) for g in self.param_groups}

    def _check_group_keys(self, groups: list[dict]) -> None:
        """Refuse unrecorded param groups that are not this optimizer's: a hyperparameter it lacks
        (one that a registered optimizer takes), or one of its own missing. Its own keys are those of
        a group it builds itself."""
        roles = self._roles()
        probe = self._probe([{**extra, "params": [_probe_tensor(1)]} for extra in roles.values()])
        if probe is None:
            return
        own = {role: set(g) - set(_GROUP_LISTS) for role, g in zip(roles, probe.param_groups)}
        present = set().union(*self.param_groups) - set(_GROUP_LISTS)  # incl. keys a user put in our groups
        registered = _registered_group_keys()
        known = set().union(*registered.values())
        reader = self.optimizer_name
        for i, saved in enumerate(groups):
            keys = set(saved) - set(_GROUP_LISTS)
            mine = own.get(saved.get("role"), next(iter(own.values())))
            foreign = (keys & known) - mine - present
            missing = mine - keys
            if foreign or missing:
                has = [f"hyperparameters {_listing(foreign)} that {reader!r} does not have"] if foreign else []
                has += [f"no {_listing(missing)}"] if missing else []
                writers = _likely_writers(keys & known, registered, reader)
                raise ValueError(_refusal(f"this state_dict was written by another optimizer{writers}: its param "
                                          f"group {i} has {' and '.join(has)}", reader))

    def _check_state_keys(self, groups: list[dict], state: dict) -> None:
        """Refuse unrecorded per-parameter state whose keys are not those this optimizer creates for a
        parameter of the same group and rank (learned from one step of a probe with the state dict's
        hyperparameters, so keys that depend on them are expected too)."""
        probe_groups, probes = [], []
        for saved, group in zip(groups, self.param_groups):
            tensors = {p.dim(): _probe_tensor(p.dim()) for p in group["params"]}
            if not tensors:
                continue
            hp = {k: v for k, v in saved.items() if k not in _GROUP_LISTS}
            if "fused" in hp:
                hp["fused"] = False  # same state; no compilation
            probe_groups.append({**hp, "params": list(tensors.values())})
            probes.append(tensors)
        probe = self._probe(probe_groups)
        if probe is None:
            return
        reader = self.optimizer_name
        try:
            _probe_step(probe)
        except Exception as err:
            raise ValueError(_refusal(
                f"this state_dict's hyperparameters do not work in {reader!r} ({type(err).__name__}: {err})",
                reader)) from err
        tensors = iter(probes)
        for saved, group in zip(groups, self.param_groups):
            if not group["params"]:
                continue
            expected = {d: set(probe.state[t]) for d, t in next(tensors).items()}
            for i, (key, p) in enumerate(zip(saved["params"], group["params"])):
                st = state.get(key)
                if isinstance(st, dict) and st and set(st) != expected[p.dim()]:
                    keeps = _listing(expected[p.dim()]) or "no state"
                    raise ValueError(_refusal(
                        f"this state_dict was written by another optimizer: the state of parameter "
                        f"{self._param_name(group, i)!r} has {_listing(st)} where {reader!r} keeps {keeps}",
                        reader))

    def _align_by_name(self, groups: list[dict]) -> list[dict] | None:
        """``groups`` rebuilt in this optimizer's layout by parameter name, or None where names are
        not known on both sides (then torch's positional matching applies).

        Saved names are the groups' ``param_names``, or, for FQN-keyed state (torch.distributed.
        checkpoint), the FQNs themselves; ours are our groups' ``param_names``. Names are compared
        without wrapper modules (:func:`_same_names`). Each of our groups takes the hyperparameters of
        the saved group that held most of its members (ties: the group at its position) and the saved
        keys of its members, in its order.
        """
        names = [g.get("param_names") for g in self.param_groups]
        if any(n is None or len(n) != len(g["params"]) for n, g in zip(names, self.param_groups)):
            return None
        keys = [list(g.get("params", ())) for g in groups]
        fqn = any(keys) and all(isinstance(k, str) for ks in keys for k in ks)
        # FQN-keyed state: a group's param_names are copied from the checkpoint, the FQNs are the keys
        saved_names = keys if fqn else [g.get("param_names") for g in groups]
        if any(n is None or len(n) != len(k) for n, k in zip(saved_names, keys)):
            return None
        theirs, ours = _same_names([n for ns in saved_names for n in ns], [n for ns in names for n in ns])
        if len(set(theirs)) != len(theirs) or len(set(ours)) != len(ours):
            return None  # names that are not unique cannot be matched
        where = dict(zip(theirs, ((j, k) for j, ks in enumerate(keys) for k in ks)))
        missing = [n for n in ours if n not in where]
        extra = set(where) - set(ours)
        if missing or extra:
            if fqn and len(missing) == len(ours):
                return None  # FQNs of another naming scheme: DCP built the groups in our order
            reader = self.optimizer_name
            raise ValueError(
                "the state_dict's parameters do not match this optimizer's by name: the state_dict has "
                f"{_listing(extra) or 'none'} that {reader!r} does not, and {reader!r} has "
                f"{_listing(missing) or 'none'} that the state_dict does not. State is matched to "
                "parameters by name (param_names): rename the parameters, or adapt the state dict "
                "(e.g. in optimizer.register_load_state_dict_pre_hook) before loading.")
        aligned, ours_of_group = [], iter(ours)
        for i, group in enumerate(self.param_groups):
            members = [where[next(ours_of_group)] for _ in group["params"]]
            sources = [j for j, _ in members]
            j = max(set(sources), key=lambda s: (sources.count(s), s == i, -s)) if sources else i
            hp = {k: v for k, v in groups[j].items() if k not in _GROUP_LISTS} if j < len(groups) else {}
            aligned.append({**hp, "params": [k for _, k in members], "param_names": list(group["param_names"])})
        return aligned
