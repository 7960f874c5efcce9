"""The contract on a CUDA device, for every registered optimizer (skipped without one; run them with
``pytest -m cuda`` or ``scripts/gpu_check.py``). Users train on GPUs, so the device handling of every
path (dtype, device of the step counters and scalars, fused kernels on Triton, bf16) is checked there
against the CPU:

* the same gradients on CPU and CUDA give the same parameters to float32 rounding, on every path
  (default, foreach, single-tensor, fused): the bound of tests/test_compile.py, whose terms are the
  same (a weight rounded per step, an update computed in another order or with FMA contraction, and
  the Newton-Schulz amplification for the matrix optimizers, which run it in float32 here);
* bf16 parameters train (finite, changed, still bf16) with the defaults (Newton-Schulz in bf16).
``torch.compile(opt.step)`` on CUDA is tests/test_compile.py's cuda variant.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import optimzoo
from optimzoo.testing import TinyLM, tiny_batch
from _tolerance import EPS32
from test_compile import U_ULPS, W_ULPS
from test_contract import NAMES, build, params_of

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
STEPS = 3


def paths(name: str) -> list[dict]:
    """The paths a user can pick for ``name``."""
    spec = optimzoo.get_spec(name)
    out = [{}]
    if "foreach" in spec.hparams:
        out += [{"foreach": True}, {"foreach": False}]
    if "fused" in spec.hparams:
        out.append({"fused": True} | ({"foreach": False} if "foreach" in spec.hparams else {}))
    return out


CASES = [pytest.param(n, hp, id=f"{n}-" + ("-".join(f"{k}={v}" for k, v in hp.items()) or "default"))
         for n in NAMES for hp in paths(n)]


@pytest.mark.parametrize("name,hparams", CASES)
def test_cuda_matches_cpu(name, hparams):
    spec = optimzoo.get_spec(name)
    if "ns_dtype" in spec.hparams:
        hparams = {**hparams, "ns_dtype": "float32"}  # the CPU reference's arithmetic
    torch.manual_seed(0)
    cpu_model = TinyLM()
    cuda_model = copy.deepcopy(cpu_model).cuda()
    start = [p.detach().clone() for p in cpu_model.parameters()]
    _, cpu_opt = build(name, cpu_model, **{k: v for k, v in hparams.items() if k != "fused"})
    _, cuda_opt = build(name, cuda_model, **hparams)
    params = list(cpu_model.parameters())
    updates = [0.0] * len(params)  # sum over steps of max |u_s| per tensor (CPU run)
    for s in range(STEPS):
        cpu_opt.zero_grad(set_to_none=True)
        cpu_model.loss(tiny_batch(s)).backward()
        for p, q in zip(params, cuda_model.parameters()):
            q.grad = p.grad.cuda()
        before = [p.detach().clone() for p in params]
        cpu_opt.step()
        cuda_opt.step()
        updates = [u + float((p.detach() - b).abs().max()) for u, p, b in zip(updates, params, before)]
    assert any(u > 0 for u in updates), "the steps moved nothing"
    for (pname, p), q, w0, u in zip(cpu_model.named_parameters(), cuda_model.parameters(), start, updates):
        w_max = max(float(p.abs().max()), float(w0.abs().max()))
        bound = EPS32 * (W_ULPS * STEPS * w_max + U_ULPS[spec.kind] * u)
        diff = float((q.detach().cpu() - p.detach()).abs().max())
        assert diff <= bound, f"{name} {hparams}: {pname} differs by {diff:.3g} > {bound:.3g}"
    for q in cuda_model.parameters():
        for key, v in cuda_opt.state.get(q, {}).items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                assert v.device.type == "cuda", (name, key)


@pytest.mark.parametrize("name", NAMES)
def test_cuda_bf16_parameters_train(name):
    torch.manual_seed(0)
    model = TinyLM().cuda().to(torch.bfloat16)
    _, opt = build(name, model)
    before = params_of(model)
    tokens_device = next(model.parameters()).device
    losses = []
    for i in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = model.loss(tiny_batch(i).to(tokens_device))
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(math.isfinite(x) for x in losses)
    for k, v in model.named_parameters():
        assert v.dtype == torch.bfloat16 and v.is_cuda and torch.isfinite(v).all(), k
    assert any(not torch.equal(before[k], v) for k, v in params_of(model).items())
