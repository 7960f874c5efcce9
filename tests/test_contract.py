"""The contract suite: every registered optimizer must honour torch.optim's contract.

Parametrized over the registry, so registering an optimizer is enough to have it checked. Each test
builds the optimizer by name on a tiny LLaMA-shaped model, routed the way users get it.
"""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch

import optimzoo
from optimzoo.testing import TinyLM, tiny_batch
from _tolerance import assert_close, drift_bound

SPECS = list(optimzoo.list_optimizers())
NAMES = [s.name for s in SPECS]

# Hyperparameters for the contract runs (defaults otherwise). Weight decay is switched on where the
# optimizer has it, so decay paths are exercised too.
CONTRACT_HPARAMS: dict[str, dict] = {"sgd": {"momentum": 0.9}}

# Bad values per hyperparameter name; each must raise ValueError naming the field. Entries marked
# zoo_only are values torch.optim's baselines accept (e.g. eps=0), so they are only checked on the zoo.
BAD_VALUES: dict[str, list[tuple[object, bool]]] = {
    "lr": [(-1e-3, False), (float("nan"), True)],
    "weight_decay": [(-0.1, False)],
    "eps": [(-1e-8, False), (0.0, True)],
    "betas": [((1.0, 0.999), False), ((0.9, -0.1), False)],
    "momentum": [(-0.1, False), (1.5, True)],
    "delta": [(-0.1, True)],
    "wd_ratio": [(-0.1, True), (1.5, True)],
    "dampening": [(-0.1, True), (1.5, True)],
    "adamw_lr": [(-1e-3, True)],
    "adamw_betas": [((1.0, 0.9), True)],
    "adamw_eps": [(-1e-8, True)],
    "adamw_weight_decay": [(-0.1, True)],
    "ns_steps": [(0, True), (2.5, True)],
    "batch_budget": [(0, True), (-1.0, True)],
    "beta2": [(-0.1, True), (1.0, True)],
    "ns_beta": [(0.0, True), (1.5, True)],
    "iterations": [(0, True), (2.5, True)],
    "gamma": [(0.0, True), (-1.0, True)],
    # SPAM / Stable-SPAM
    "threshold": [(-1.0, True)],
    "DeltaT": [(-1, True), (2.5, True)],
    "warmup_steps": [(-1, True)],
    "grad_accu_steps": [(-1, True)],
    "gamma1": [(1.5, True)],
    "gamma2": [(-0.1, True), (1.0, True)],
    "gamma3": [(-0.1, True), (1.0, True)],
    "total_T": [(0, True)],
    "eta_min": [(-0.1, True), (1.5, True)],
    "update_proj_gap": [(-1, True)],
    # Lion-K
    "p": [(0.5, True)],
    "a": [(0.0, True), (-1.0, True)],
}
# Synonyms torch.optim uses in its messages.
FIELD_WORDS = {"lr": ("lr", "learning rate"), "eps": ("eps", "epsilon"), "betas": ("betas", "beta"),
               "weight_decay": ("weight_decay",), "momentum": ("momentum",)}
# Constructor arguments that are switches or choices checked elsewhere, not numeric ranges.
NOT_RANGES = {"foreach", "fused", "maximize", "capturable", "differentiable", "amsgrad", "nesterov",
              "decoupled_weight_decay", "correct_bias", "reset_fix", "variant", "kappa", "adjust_lr",
              "ns_dtype", "whitening", "rescale", "compute_dtype"}


def build(name: str, model: torch.nn.Module | None = None, **hparams):
    spec = optimzoo.get_spec(name)
    model = model if model is not None else TinyLM()
    kw = dict(CONTRACT_HPARAMS.get(spec.name, {}))
    if "weight_decay" in spec.hparams:
        kw.setdefault("weight_decay", 0.01)
    kw.update(hparams)
    return model, optimzoo.create_optimizer(model, name, **kw)


def train(model, opt, steps: int, seed: int = 0, closure: bool = False) -> list[float]:
    losses = []
    for i in range(steps):
        tokens = tiny_batch(seed + i)

        def closure_fn():
            opt.zero_grad(set_to_none=True)
            loss = model.loss(tokens)
            loss.backward()
            return loss

        if closure:
            losses.append(float(opt.step(closure_fn).detach()))
        else:
            loss = closure_fn()
            opt.step()
            losses.append(float(loss.detach()))
    return losses


def params_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.fixture(params=NAMES)
def name(request):
    return request.param


def test_closure_returns_loss_and_updates(name):
    torch.manual_seed(0)
    model, opt = build(name)
    before = params_of(model)
    losses = train(model, opt, 3, closure=True)
    assert all(math.isfinite(x) for x in losses)
    after = params_of(model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before), f"parameters not updated: {sorted(set(before) - set(changed))}"


def test_state_dict_round_trip(name):
    torch.manual_seed(0)
    model, opt = build(name)
    train(model, opt, 4)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    reference = train(model, opt, 4, seed=100)
    ref_params = params_of(model)

    torch.manual_seed(1)  # a different init, fully overwritten by the load
    model2, opt2 = build(name)
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    resumed = train(model2, opt2, 4, seed=100)
    assert resumed == reference
    for k, v in params_of(model2).items():
        assert torch.equal(v, ref_params[k]), k


def test_lr_scheduler_scales_every_group(name):
    torch.manual_seed(0)
    model, opt = build(name)
    initial = [g["lr"] for g in opt.param_groups]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch < 2 else 0.0)
    for _ in range(2):
        train(model, opt, 1)
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.0] * len(initial)
    frozen = params_of(model)
    train(model, opt, 2, seed=7)
    for k, v in params_of(model).items():
        assert torch.equal(v, frozen[k]), f"{k} moved with lr=0"


def test_add_param_group(name):
    torch.manual_seed(0)
    model, opt = build(name)
    train(model, opt, 1)
    extra = torch.nn.Linear(32, 32, bias=False)
    group = {"params": list(extra.named_parameters(prefix="extra"))}  # groups are all named or all not
    if optimzoo.get_spec(name).kind == "matrix":
        group["role"] = "matrix"
    opt.add_param_group(group)
    before = extra.weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        (model.loss(tiny_batch(3)) + extra(torch.randn(4, 32)).square().mean()).backward()
        opt.step()
    assert not torch.equal(before, extra.weight)
    assert torch.isfinite(extra.weight).all()


def test_zero_gradients_give_no_nan(name):
    torch.manual_seed(0)
    model, opt = build(name)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    for k, v in model.named_parameters():
        assert torch.isfinite(v).all(), k
    # then real gradients still give finite updates
    train(model, opt, 2)
    for k, v in model.named_parameters():
        assert torch.isfinite(v).all(), k


def test_zero_gradient_step_with_zero_lr_changes_nothing(name):
    """What torch.distributed.checkpoint does to create state: zero grads, lr 0, one step."""
    torch.manual_seed(0)
    model, opt = build(name)
    for g in opt.param_groups:
        g["lr"] = 0.0
    before = params_of(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for k, v in params_of(model).items():
        assert torch.equal(v, before[k]), k


def test_params_without_grad_are_skipped(name):
    torch.manual_seed(0)
    model, opt = build(name)
    frozen = {id(model.layers[0].q_proj.weight), id(model.norm.weight)}
    before = params_of(model)
    for i in range(2):
        opt.zero_grad(set_to_none=True)
        model.loss(tiny_batch(i)).backward()
        model.layers[0].q_proj.weight.grad = None
        model.norm.weight.grad = None
        opt.step()
    after = params_of(model)
    assert torch.equal(before["layers.0.q_proj.weight"], after["layers.0.q_proj.weight"])
    assert torch.equal(before["norm.weight"], after["norm.weight"])
    assert not torch.equal(before["layers.1.q_proj.weight"], after["layers.1.q_proj.weight"])
    for p in model.parameters():
        if id(p) in frozen:
            assert not opt.state.get(p), "state created for a parameter that never had a gradient"


def test_bf16_parameters_train(name):
    torch.manual_seed(0)
    model = TinyLM().to(torch.bfloat16)
    model, opt = build(name, model)
    before = params_of(model)
    losses = train(model, opt, 3)
    assert all(math.isfinite(x) for x in losses)
    for k, v in model.named_parameters():
        assert v.dtype == torch.bfloat16 and torch.isfinite(v).all(), k
    assert any(not torch.equal(before[k], v) for k, v in params_of(model).items())


def test_state_bytes_match_the_registry(name):
    spec = optimzoo.get_spec(name)
    torch.manual_seed(0)
    model, opt = build(name)
    train(model, opt, 2)
    hparams = {**CONTRACT_HPARAMS.get(spec.name, {})}
    assert optimzoo.state_bytes(opt) == spec.expected_state_bytes(opt.routing_plan, hparams)


def test_sparse_gradients_are_refused(name):
    spec = optimzoo.get_spec(name)
    if spec.supports_sparse:
        pytest.skip(f"{name} supports sparse gradients")
    p = torch.nn.Parameter(torch.randn(8, 4))
    opt = spec.cls([("layers.0.weight", p)], **({"lr": 0.01} if "lr" in spec.hparams else {}))
    p.grad = torch.randn(8, 4).to_sparse()
    with pytest.raises(RuntimeError, match="(?i)sparse") as err:
        opt.step()
    if not spec.baseline:
        assert spec.cls.__name__ in str(err.value)


def test_complex_parameters_are_refused(name):
    spec = optimzoo.get_spec(name)
    if spec.baseline:
        pytest.skip("torch.optim baselines support complex parameters")
    p = torch.nn.Parameter(torch.randn(8, 4, dtype=torch.complex64))
    opt = spec.cls([("layers.0.weight", p)])
    p.grad = torch.randn(8, 4, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="(?i)complex") as err:
        opt.step()
    assert spec.cls.__name__ in str(err.value)


def test_invalid_hyperparameters_name_the_field(name):
    spec = optimzoo.get_spec(name)
    params = [torch.nn.Parameter(torch.randn(4, 4))]
    checked = 0
    for field, bad in BAD_VALUES.items():
        if field not in spec.hparams:
            continue
        for value, zoo_only in bad:
            if zoo_only and spec.baseline:
                continue
            with pytest.raises(ValueError) as err:
                spec.cls(params, **{field: value})
            words = FIELD_WORDS.get(field, (field,))
            assert any(w in str(err.value) for w in words), f"{field}={value!r}: {err.value}"
            checked += 1
    assert checked, "no hyperparameter was checked"
    if spec.baseline:
        return
    # Every numeric hyperparameter of a zoo optimizer must have bad values in the table above.
    for field, p in inspect.signature(spec.cls.__init__).parameters.items():
        default = p.default
        if field in ("self", "params") or field in NOT_RANGES or default is inspect.Parameter.empty:
            continue
        if isinstance(default, (int, float, tuple)) and not isinstance(default, bool) or default is None:
            assert field in BAD_VALUES, f"{spec.name}.{field} has no bad values in BAD_VALUES (add them)"


def test_foreach_matches_single_tensor(name):
    spec = optimzoo.get_spec(name)
    if "foreach" not in spec.hparams:
        pytest.skip("no foreach flag")
    results = []
    for foreach in (False, True):
        torch.manual_seed(0)
        model, opt = build(name, foreach=foreach)
        train(model, opt, 5)
        results.append(params_of(model))
    bound = drift_bound(results[0].values(), 5)  # float32 rounding of the two paths, 5 steps
    for k in results[0]:
        assert_close(results[1][k], results[0][k], rtol=0, atol=bound, msg=k)


@pytest.mark.slow
def test_fused_matches_single_tensor(name):
    spec = optimzoo.get_spec(name)
    if "fused" not in spec.hparams or spec.baseline:
        pytest.skip("no fused path")
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model, opt = build(name, fused=fused, **({"foreach": False} if "foreach" in spec.hparams else {}))
        train(model, opt, 5)
        results.append(params_of(model))
    bound = drift_bound(results[0].values(), 5)  # float32 rounding of the two paths, 5 steps
    for k in results[0]:
        assert_close(results[1][k], results[0][k], rtol=0, atol=bound, msg=k)


def test_foreach_chunks_cover_every_element_once():
    """The chunked foreach groups are views that tile every tensor exactly once, with their sources."""
    from optimzoo.optim._base import foreach_chunks

    a = [torch.zeros(7, 5), torch.zeros(3), torch.zeros(0), torch.zeros(4, 6).t(), torch.zeros(11)]
    b = [torch.zeros_like(t) for t in a]
    seen = []
    for (xs, ys), sources in foreach_chunks([a, b], elements=8):
        assert len(xs) == len(ys) == len(sources)
        assert sum(x.numel() for x in xs[:-1]) < 8  # a group closes once it holds 8 elements
        for x, y, i in zip(xs, ys, sources):
            assert x.shape == y.shape
            assert x.numel() <= 8 or i == 3  # pieces of 8 at most; the transposed tensor passes whole
            x.add_(1)
            y.add_(i + 1)
            seen.append(i)
    assert sorted(set(seen)) == [0, 1, 2, 3, 4]
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, torch.ones_like(x))  # every element once (the transposed one passed whole)
        assert torch.equal(y, torch.full_like(y, i + 1))


def test_fused_groups_have_few_lengths_and_keep_order():
    """A compiled kernel sees at most five group lengths, and results come back in item order."""
    from optimzoo.optim._base import FUSED_GROUP, _power_of_two_groups

    for n in range(0, 3 * FUSED_GROUP + 7):
        groups = list(_power_of_two_groups(list(range(n))))
        assert [x for g in groups for x in g] == list(range(n))
        assert {len(g) for g in groups} <= {FUSED_GROUP, 8, 4, 2, 1}


ZOO_NAMES = [s.name for s in SPECS if not s.baseline]
_WRITTEN: dict[str, dict] = {}


def _written_state_dict(name: str) -> dict:
    """The state dict of ``name`` after one step on the tiny model (built once per session)."""
    if name not in _WRITTEN:
        torch.manual_seed(0)
        model, opt = build(name)
        train(model, opt, 1)
        _WRITTEN[name] = opt.state_dict()
    return _WRITTEN[name]


@pytest.mark.parametrize("writer", ZOO_NAMES)
def test_state_dict_of_one_optimizer_is_refused_by_every_other(writer):
    """X's state: accepted by X; refused by every other zoo optimizer Y, by the record (naming both)
    and, with the record removed (state written before it existed), by its keys."""
    saved = _written_state_dict(writer)
    unrecorded = {k: v for k, v in saved.items() if k != "optimizer_name"}
    for reader in ZOO_NAMES:
        if reader == writer:
            for sd in (saved, unrecorded):
                model, opt = build(reader)
                opt.load_state_dict(copy.deepcopy(sd))
                train(model, opt, 1)
            continue
        _, opt = build(reader)
        with pytest.raises(ValueError, match=f"written by '{writer}'; it cannot be loaded into '{reader}'"):
            opt.load_state_dict(saved)
        with pytest.raises(ValueError, match=f"cannot be loaded into '{reader}'"):
            opt.load_state_dict(unrecorded)
