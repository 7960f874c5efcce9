"""``torch.compile(opt.step)`` for every registered optimizer: two compiled steps give the parameters
of the same two eager steps, within float32 rounding.

Each case builds two copies of a tiny LM with the same optimizer, computes the gradients of a batch
on the eager copy and gives the compiled copy the same gradients (so that the comparison measures
the optimizer's arithmetic alone, not the model's response to slightly different weights), then
steps one with ``opt.step()`` and the other with ``torch.compile(opt.step)()``. Graph breaks are
allowed (several optimizers read step counters on the host); errors and wrong numbers are not.

Compile time on a shared 2-core CPU with a cold Inductor cache is 1-25 s per optimizer (about 3 minutes
for all cases; each case prints its figure), so one optimizer per code path is unmarked (about 75 s
cold, 20 s warm) and the others are marked ``compile_all``: they still run by default,
``-m "not compile_all"`` skips them. ``torch._dynamo.reset()`` runs around every case.
"""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch

import optimzoo
from optimzoo.testing import TinyLM, tiny_batch

from _tolerance import EPS32  # 2**-23
STEPS = 2

# Tolerance, per parameter tensor. The eager and compiled steps evaluate the same formulas in float32
# and differ only in rounding:
# * the weight: given the same update u, both runs store fl(w (1 - lr wd) + u) and agree, except where
#   one contracts the multiply-add into an FMA: at most 1 ulp of |w| per step; 2 for margin;
# * the update itself: Inductor fuses element-wise loops (FMA contraction, reassociation), reorders
#   the reductions of norms, and torch.optim's AdamW kernel computes its bias corrections with float32
#   tensor ops instead of Python floats when compiled: a few ulps of |u| per step (U_ULPS["elementwise"]
#   = 8). The matrix optimizers then run Newton-Schulz-type iterations, which amplify a perturbation of
#   their input by up to the composed polynomial's slope at small singular values, a^5 ~ 490 for the
#   quintic's a = 3.4445 over 5 steps: U_ULPS["matrix"] = 512;
# * the state (momentum, second moments) carries a step's rounding into the next update, which the
#   update term covers when summed over steps.
# So for a tensor with largest magnitude max|w| and eager updates u_s:
#     |w_compiled - w_eager| <= EPS32 * (W_ULPS * STEPS * max|w| + U_ULPS * sum_s max|u_s|).
# An update 0.1% off (a hyperparameter read wrong at trace time, a stale step counter, a lost state
# write) exceeds it on every tensor whose two updates add up to more than ~5e-4 of its weights
# (1e-3 sum|u| against 4.8e-7 max|w| + at most 6.1e-5 sum|u|): checked by giving the compiled copy
# lr * 1.001, which fails every optimizer here.
W_ULPS = 2
U_ULPS = {"elementwise": 8, "matrix": 512}

#: one optimizer per code path, in the default selection
REPRESENTATIVES = {
    "adamw": "torch.optim baselines (adam, sgd)",
    "lion": "Lion / Lion-K foreach kernel",
    "adamp": "projection optimizers (sgdp): host-read step counter, row-blocked projection",
    "spam": "spike-aware Adam (stable_spam), diffGrad's step-counter pattern",
    "normuon": "Muon family: Nesterov momentum, batched Newton-Schulz, row state, metrics; AdamW vector groups",
    "swan": "SWAN: stateless normalization and whitening",
    "auon": "AuON / Hybrid-AuON",
}

#: extra cases: (name, hyperparameters)
EXTRA = [("lion", {"fused": True})]  # a fused (inner torch.compile) kernel inside the compiled step


def _cases():
    names = [spec.name for spec in optimzoo.list_optimizers()]
    missing = set(REPRESENTATIVES) - set(names)
    assert not missing, f"REPRESENTATIVES names unregistered optimizers: {sorted(missing)}"
    cases = [pytest.param(n, {}, id=n, marks=() if n in REPRESENTATIVES else pytest.mark.compile_all)
             for n in names]
    cases += [pytest.param(n, hp, id=f"{n}-" + "-".join(f"{k}={v}" for k, v in hp.items()),
                           marks=pytest.mark.compile_all) for n, hp in EXTRA]
    return cases


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(device: str = "cpu") -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(vocab=32, dim=16, layers=1, heads=2, hidden=24).to(device)


CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("name,hparams", _cases())
def test_compiled_step_matches_eager(name, hparams, device, capsys):
    if "ns_dtype" in optimzoo.get_spec(name).hparams:
        hparams = {"ns_dtype": "float32", **hparams}  # the bound assumes float32 matmuls (auto may be bf16)
    eager_model = _model(device)
    compiled_model = copy.deepcopy(eager_model)
    start = [p.detach().clone() for p in eager_model.parameters()]
    eager = optimzoo.create_optimizer(eager_model, name, **hparams)
    compiled = optimzoo.create_optimizer(compiled_model, name, **hparams)
    step = torch.compile(compiled.step)

    params = list(eager_model.parameters())
    updates = [0.0] * len(params)  # sum over steps of max |u_s|, per tensor (eager run)
    seconds = 0.0
    for s in range(STEPS):
        eager.zero_grad(set_to_none=True)
        eager_model.loss(tiny_batch(s, vocab=32).to(device)).backward()
        for p, q in zip(params, compiled_model.parameters()):
            q.grad = p.grad.clone()
        before = [p.detach().clone() for p in params]
        eager.step()
        updates = [u + float((p.detach() - b).abs().max()) for u, p, b in zip(updates, params, before)]
        t0 = time.perf_counter()
        step()
        seconds += time.perf_counter() - t0
    with capsys.disabled():
        print(f"\n[compile] {name} {hparams or ''}: {seconds:.1f} s for {STEPS} compiled steps", end="")

    u_ulps = U_ULPS[optimzoo.get_spec(name).kind]
    for (pname, p), q, w0, u in zip(eager_model.named_parameters(), compiled_model.parameters(), start, updates):
        ref, ours = p.detach(), q.detach()
        assert ours.dtype == ref.dtype and ours.shape == ref.shape
        w_max = max(float(ref.abs().max()), float(w0.abs().max()))
        bound = EPS32 * (W_ULPS * STEPS * w_max + u_ulps * u)
        diff = float((ours - ref).abs().max())
        assert diff <= bound, f"{name}: {pname} differs by {diff:.3g} > {bound:.3g}"
    assert any(u > 0 for u in updates), "the eager steps moved nothing"

    # the compiled step kept the state's bookkeeping: same keys, step counters equal and on the same device
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        se, sc = eager.state.get(p, {}), compiled.state.get(q, {})
        assert set(se) == set(sc), name
        for key, v in se.items():
            if isinstance(v, torch.Tensor) and v.dim() == 0 and "step" in key:
                assert sc[key].device == v.device and float(sc[key]) == float(v), (name, key)

    # metrics accumulated inside the compiled step are neither lost nor counted twice (a factor of 2 or
    # more); 1e-3 relative is far above rounding and far below such an error
    if hasattr(eager, "metrics"):
        me, mc = eager.metrics(), compiled.metrics()
        assert set(me) == set(mc), name
        for key in me:
            assert math.isclose(mc[key], me[key], rel_tol=1e-3, abs_tol=1e-12), (name, key, mc[key], me[key])
