"""Checks and error reporting shared by ``ZooTrainingArguments``, the recipe and the scripts.

Everything a user types (an optimizer name, ``k=v`` hyperparameters, routing overrides) is checked here
before anything is loaded or written, and a command line reports a bad value the argparse way: a usage line,
then ``prog: error: <one line>``, exit status 2, no traceback.

* :func:`parse_kv` parses ``"k=v,k2=v2"`` into typed values (``betas=(0.9,0.95)`` -> a tuple) and refuses
  malformed items (no ``=``, unbalanced brackets, a bracketed value that is not a Python literal);
* :func:`resolve_optimizer` is :func:`optimzoo.get_spec` with a one-line "did you mean" message;
* :func:`check_optimizer_args` builds the optimizer through the registry on two dummy parameters, so the
  optimizer's own checks run on every value, and names the offending key;
* :func:`brief_usage` and :func:`user_errors` turn those ``ValueError`` s into argparse errors.

Only torch is needed (the scripts import this module without transformers).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import inspect
import numbers
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NoReturn

from .param_groups import plan_parameters
from .registry import PEER_PREFIX, OptimizerSpec, _key, create_optimizer, get_spec, list_optimizers

__all__ = ["brief_usage", "check_optimizer_args", "fail", "merge_kv", "parse_kv", "resolve_optimizer", "user_errors"]

BRIEF_USAGE = "%(prog)s [-h] [options]"
_OPEN, _CLOSE = "([{", ")]}"


# ------------------------------------------------------------------------------------------ k=v items

def _split_top_level(text: str, what: str) -> list[str]:
    """Split on commas outside brackets and quotes, so ``betas=(0.9,0.95)`` and ``p=['a,b']`` stay whole;
    unbalanced brackets raise."""
    parts, depth, start, quote, escaped = [], 0, 0, "", False
    for i, ch in enumerate(text):
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
            if depth < 0:
                raise ValueError(f"{what}: unbalanced brackets in {text!r} (a {ch!r} closes nothing)")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth or quote:
        item = text[start:].strip()
        problem = f"{depth} bracket(s) not closed" if depth else f"a {quote} quote not closed"
        raise ValueError(f"{what}: unbalanced brackets or quotes in {item!r} ({problem})")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _typed(key: str, value: str, what: str) -> Any:
    """A Python literal when it parses as one (numbers, tuples, True/False/None), else the string.
    A value that starts with a bracket or a quote must be a literal."""
    lowered = {"true": True, "false": False, "none": None}
    if value.lower() in lowered:
        return lowered[value.lower()]
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        if value[:1] in _OPEN + "'\"":
            raise ValueError(f"{what}: {key}={value} is not a valid Python literal") from None
        return value


def parse_kv(text: str | None, what: str = "optim_args") -> dict[str, Any]:
    """Parse ``"k=v,k2=v2"`` into typed keyword arguments (``"lr=3e-4,betas=(0.9,0.95)"`` ->
    ``{"lr": 0.0003, "betas": (0.9, 0.95)}``); ``what`` names the option in error messages."""
    out: dict[str, Any] = {}
    for item in _split_top_level(text or "", what):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what}: invalid item {item!r}: expected key=value (items separated by commas)")
        key = key.strip()
        out[key] = _typed(key, value.strip(), what)
    return out


def merge_kv(*texts: str | None, what: str = "optim_args") -> str | None:
    """Join ``"k=v,..."`` texts into one, a later text's value replacing an earlier one's for the same key
    (``merge_kv("kappa=tanh,a=1000", "kappa=huber,a=0.001")`` -> ``"kappa=huber,a=0.001"``); the items keep their
    text and their first position. ``None`` when nothing is left."""
    items: dict[str, str] = {}
    for text in texts:
        for item in _split_top_level(text or "", what):
            key, sep, _ = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"{what}: invalid item {item!r}: expected key=value (items separated by commas)")
            items[key.strip()] = item
    return ",".join(items.values()) or None


# ------------------------------------------------------------------------------------------ names

def _suggest(name: str, candidates: dict[str, str]) -> list[str]:
    close = difflib.get_close_matches(_key(name), list(candidates), n=5, cutoff=0.6)
    return list(dict.fromkeys(candidates[c] for c in close))[:3]


def _unknown_message(name: str, extra_names: Iterable[str]) -> str:
    extra = list(extra_names)
    zoo = {_key(n): spec.name for spec in list_optimizers() for n in (spec.name, *spec.aliases)}
    # the zoo's names first: a transformers name is suggested only when no zoo name is close
    suggestions = _suggest(name, zoo) or _suggest(name, {_key(n): n for n in extra})
    hint = f"; did you mean {' or '.join(repr(s) for s in suggestions)}?" if suggestions else ""
    also = f"; transformers' names such as {extra[0]} work too" if extra else ""
    return f"unknown optimizer {name!r}{hint} (python -m optimzoo lists them{also})"


def resolve_optimizer(name: str, extra_names: Iterable[str] = ()) -> OptimizerSpec:
    """The registry's spec for ``name``; an unknown name raises a one-line ``ValueError`` with suggestions
    (from the zoo's names and aliases and from ``extra_names``, e.g. transformers' optimizer names)."""
    if name.lower().startswith(PEER_PREFIX):
        try:
            return get_spec(name)
        except ValueError as err:  # keep the registry's hint, not its list of every torch-optimizer name
            raise ValueError(str(err).split(" Available:")[0]) from None
    try:
        return get_spec(name)
    except ValueError:
        raise ValueError(_unknown_message(name, extra_names)) from None


# ------------------------------------------------------------------------------------------ values

def _dummy_params():
    import torch

    return [("w", torch.zeros(2, 2, requires_grad=True)), ("b", torch.zeros(2, requires_grad=True))]


def _build(name: str, hparams: Mapping[str, Any], routing: Mapping[str, Any] | None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        create_optimizer(_dummy_params(), name, routing=dict(routing) if routing else None, **hparams)


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _expects(default: Any) -> str | None:
    """What a value replacing ``default`` must be, when a string cannot be it (numbers, tuples)."""
    if _is_number(default):
        return "a number"
    if isinstance(default, tuple) and default and all(_is_number(d) for d in default):
        return f"a tuple of {len(default)} numbers"
    return None


def _reason(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def check_optimizer_args(name: str, hparams: Mapping[str, Any], *, routing: Mapping[str, Any] | None = None,
                         user_keys: Iterable[str] | None = None, what: str = "optim_args",
                         routing_what: str = "zoo_routing") -> None:
    """Run the optimizer's own checks on ``hparams`` (and ``routing``, keyword arguments of
    :func:`optimzoo.plan_parameters`) by building it through the registry on two dummy parameters.

    Raises a one-line ``ValueError`` naming the offending key: ``"{what}: adamw_lr='abc' is refused by
    normuon: ..."``. ``user_keys`` are the keys the user typed in ``what`` (default: every key); a refused
    value outside them is reported as such (e.g. a learning rate mapped from another option). An optimizer
    that cannot be built on dummy parameters with its defaults (a wrapper such as torch-optimizer's
    Lookahead) is not checked here.
    """
    spec = resolve_optimizer(name)
    hparams = dict(hparams)
    user = [k for k in (hparams if user_keys is None else user_keys) if k in hparams]
    spec.check_hparams(hparams, what)
    defaults = spec.defaults
    for k in user:  # a string where the optimizer wants a number: say so before its own message
        need = _expects(defaults.get(k))
        if need and isinstance(hparams[k], str):
            raise ValueError(f"{what}: {k}={hparams[k]!r} is not {need} (the default is {defaults[k]!r})")
    try:
        _build(spec.name, hparams, routing)
        return
    except Exception as err:  # noqa: BLE001 - every refusal is reported with the key that caused it
        first = err
    try:
        _build(spec.name, {}, None)
    except Exception:  # noqa: BLE001 - not buildable on dummy parameters: the real build will tell
        return
    base = {k: v for k, v in hparams.items() if k not in user}
    if routing:
        accepted_routing = [k for k in inspect.signature(plan_parameters).parameters][1:]
        unknown = [k for k in routing if k not in accepted_routing]
        if unknown:
            raise ValueError(f"{routing_what}: unknown key(s) {', '.join(map(repr, unknown))}; "
                             f"accepted keys: {', '.join(accepted_routing)}")
        for k, v in routing.items():
            try:
                _build(spec.name, {}, {k: v})
            except Exception as err:  # noqa: BLE001
                raise ValueError(f"{routing_what}: {k}={v!r} is refused: {_reason(err)}") from None
    try:
        _build(spec.name, base, None)
    except Exception as err:  # noqa: BLE001
        shown = ", ".join(f"{k}={v!r}" for k, v in base.items())
        raise ValueError(f"{spec.name} refuses {shown}: {_reason(err)}") from None
    for k in user:
        try:
            _build(spec.name, {**base, k: hparams[k]}, None)
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"{what}: {k}={hparams[k]!r} is refused by {spec.name}: {_reason(err)}") from None
    shown = ", ".join(f"{k}={hparams[k]!r}" for k in user)
    raise ValueError(f"{what}: {shown} are refused together by {spec.name}: {_reason(first)}")


# ------------------------------------------------------------------------------------------ command lines

def brief_usage(parser: argparse.ArgumentParser, usage: str = BRIEF_USAGE) -> argparse.ArgumentParser:
    """Give ``parser`` a one-line usage (``--help`` still lists every option), so an error is two lines."""
    parser.usage = usage
    return parser


def fail(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """argparse's error: the usage line, ``prog: error: message`` on stderr, exit status 2."""
    parser.error(" ".join(str(message).split()))


@contextlib.contextmanager
def user_errors(parser: argparse.ArgumentParser,
                kinds: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)) -> Iterator[None]:
    """Report ``kinds`` raised inside the block as argparse errors of ``parser`` (exit 2, no traceback).

    Wrap only what checks the user's input (parsing, name and value checks), so a bug elsewhere still
    shows its traceback.
    """
    try:
        yield
    except kinds as err:
        fail(parser, _reason(err))
