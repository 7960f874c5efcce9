"""diffGrad against torch-optimizer's DiffGrad (= official diffGrad_v2) and its closed-form first step."""

import pytest
import torch

from optimzoo.optim.diffgrad import DiffGrad
from _tolerance import assert_close, check, drift_bound, weight_ulps

torch_optimizer = pytest.importorskip("torch_optimizer")

SHAPES = [(16, 8), (4, 3, 3, 3), (8,), (1,)]
PATHS = [pytest.param({"foreach": False}, id="single"), pytest.param({"foreach": True}, id="foreach"),
         pytest.param({"fused": True}, id="fused")]


def make_params():
    g = torch.Generator().manual_seed(3)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def grads_at(step):
    g = torch.Generator().manual_seed(50 + step)
    # a slowly varying gradient plus noise, so the friction coefficient takes many values
    return [torch.randn(s, generator=torch.Generator().manual_seed(7)) * 0.5 + torch.randn(s, generator=g) * 0.1
            for s in SHAPES]


def max_diff(kwargs, path, steps=30):
    a, b = make_params(), make_params()
    oa, ob = DiffGrad(a, **kwargs, **path), torch_optimizer.DiffGrad(b, **kwargs)
    for s in range(steps):
        for p, q, g in zip(a, b, grads_at(s)):
            p.grad, q.grad = g.clone(), g.clone()  # torch-optimizer adds weight decay into its grad
        oa.step()
        ob.step()
    return max((p - q).abs().max().item() for p, q in zip(a, b)), drift_bound(b, steps)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kwargs", [dict(), dict(weight_decay=0.1), dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6)],
                         ids=str)
def test_matches_torch_optimizer(kwargs, path):
    check(*max_diff(kwargs, path))


def test_first_step_closed_form():
    p = torch.nn.Parameter(torch.randn(5, 4))
    g = torch.randn(5, 4)
    w0 = p.detach().clone()
    opt = DiffGrad([p], lr=0.01)
    p.grad = g.clone()
    opt.step()
    expected = -0.01 * torch.sigmoid(g.abs()) * g / (g.abs() + 1e-8 / (1 - 0.999) ** 0.5)
    assert_close(p.detach() - w0, expected, rtol=1e-5, atol=weight_ulps(w0))


def test_friction_uses_the_previous_augmented_gradient_and_grad_is_untouched():
    p = torch.nn.Parameter(torch.ones(3))
    opt = DiffGrad([p], lr=0.1, weight_decay=0.5)
    g = torch.tensor([1.0, -2.0, 0.0])
    p.grad = g.clone()
    opt.step()
    assert torch.equal(p.grad, g)
    assert_close(opt.state[p]["previous_grad"], g + 0.5 * torch.ones(3))


def test_state_layout():
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = DiffGrad([p])
    p.grad = torch.randn(4, 4)
    opt.step()
    st = opt.state[p]
    assert set(st) == {"step", "exp_avg", "exp_avg_sq", "previous_grad"} and float(st["step"]) == 1


@pytest.mark.parametrize("kwargs", [dict(), dict(weight_decay=0.1)], ids=str)
def test_foreach_in_chunks_matches_torch_optimizer(kwargs, monkeypatch):
    """The foreach path over chunks that split tensors (tiny chunks here), per-tensor step sizes included."""
    import optimzoo.optim._base as base

    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 5)
    check(*max_diff(kwargs, {"foreach": True}))
