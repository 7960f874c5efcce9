"""SWAN and SinkGD: closed-form steps (ALGORITHMS.md), statelessness, whitening accuracy.

Neither algorithm has official code; the references are the papers' operators written here from
the formulas (float64), independently of ``optimzoo.ops``.
"""

from __future__ import annotations

import math

import pytest
import torch

import optimzoo
from optimzoo.optim.sinkgd import SinkGD
from optimzoo.optim.swan import SWAN
from optimzoo.testing import TinyLM, tiny_batch
from _tolerance import EPS32, EPS_BF16, assert_close, drift_bound, magnitude

# these tests give bare hidden matrices to the optimizers on purpose (no embeddings or heads among them)
pytestmark = pytest.mark.filterwarnings("ignore:.*unnamed tensor:UserWarning")

SHAPES = [(24, 40), (40, 24), (24, 40), (32, 32)]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def gradnorm_reference(G: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    G = G.double()
    n = G.size(-1)
    mean = G.sum(-1, keepdim=True) / n
    std = ((G - mean) ** 2).sum(-1, keepdim=True).div(n).sqrt()
    return (G - mean) / (std + eps)


def polar_reference(G: torch.Tensor) -> torch.Tensor:
    """``(G G^T)^{+1/2} G = U 1[S > 0] V^T`` in float64.

    GradNorm makes every row mean-zero, so ``GradNorm(g) 1 = 0``: for ``m >= n`` the matrix has rank
    ``<= n - 1`` and the whitening's pseudo-inverse sends that direction to zero (as Newton-Schulz does).
    """
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return (U * (S > 1e-9 * S.max())) @ Vh


def sinkhorn_reference(X: torch.Tensor, L: int) -> torch.Tensor:
    X = X.double().clone()
    m, n = X.shape
    for _ in range(L):
        X = math.sqrt(n) * X / X.norm(dim=1, keepdim=True).clamp_min(1e-8)
        X = math.sqrt(m) * X / X.norm(dim=0, keepdim=True).clamp_min(1e-8)
    return X


def one_step(opt_cls, shapes, grads, **hp):
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]  # zero start: the step is exact in float32
    start = [p.detach().clone() for p in params]
    opt = opt_cls(params, **hp)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    return [(p.detach() - s).double() for p, s in zip(params, start)], opt, params


def grads_for(shapes, seed=1):
    g = gen(seed)
    return [torch.randn(s, generator=g) * torch.logspace(-1, 1, s[0])[:, None] + torch.randn(s[0], 1, generator=g)
            for s in shapes]


# --------------------------------------------------------------------------------------------
# SWAN
# --------------------------------------------------------------------------------------------


def test_swan_exact_first_step_closed_form():
    """Exact whitening, rescale on: step = -lr sqrt(mn) U V^T / ||U V^T||_F with U S V^T = GradNorm(g)."""
    grads = grads_for(SHAPES)
    steps, opt, _ = one_step(SWAN, SHAPES, grads, lr=0.01, whitening="exact")
    for (m, n), g, d in zip(SHAPES, grads, steps):
        P = polar_reference(gradnorm_reference(g))
        expected = -0.01 * math.sqrt(m * n) * P / P.norm()
        # a float32 SVD's polar factor: a few ulps per inner dimension of its largest entry
        assert_close(d, expected, rtol=0, atol=4 * max(m, n) * EPS32 * magnitude(expected))
        assert d.square().mean().sqrt().item() == pytest.approx(0.01, rel=1e-5)  # RMS lr
    # without rescale: the whitened matrix itself (Frobenius norm sqrt(min(m, n)))
    steps, _, _ = one_step(SWAN, SHAPES, grads, lr=0.01, whitening="exact", rescale=False)
    for (m, n), g, d in zip(SHAPES, grads, steps):
        expected = -0.01 * polar_reference(gradnorm_reference(g))
        assert_close(d, expected, rtol=0, atol=4 * max(m, n) * EPS32 * magnitude(expected))
        rank = m if m < n else n - 1  # GradNorm centres the rows: for m >= n the all-ones input direction is lost
        assert d.norm().item() == pytest.approx(0.01 * math.sqrt(rank), rel=1e-5)


@pytest.mark.parametrize("whitening,beta,steps,low,high", [
    ("newton_schulz", 0.5, 16, 0.0, 1e-4),
    ("coupled", 0.5, 16, 0.0, 1e-4),
    ("newton_schulz", 0.5, 8, 1e-3, 0.3),
    ("newton_schulz", 0.8, 10, 0.1, 0.35),  # the default: a band around the exact whitening, not a limit
])
def test_swan_newton_schulz_whitening_against_exact(whitening, beta, steps, low, high):
    """Relative error of the NS-whitened SWAN step against the exact one. Measured on these four gradients
    (24x40, 40x24, 24x40, 32x32): beta 0.5: k=8 4e-2/5e-3/7e-3/0.20, k=12 7e-7/2e-6/6e-7/1e-2 (the square one
    has a small singular value), k=16 <= 7e-6; beta 0.8: k=10 (default) 0.27-0.29 for every shape."""
    grads = grads_for(SHAPES)
    exact, _, _ = one_step(SWAN, SHAPES, grads, lr=0.01, whitening="exact")
    ns, _, _ = one_step(SWAN, SHAPES, grads, lr=0.01, whitening=whitening, ns_steps=steps, ns_beta=beta)
    for e, d in zip(exact, ns):
        rel = ((d - e).norm() / e.norm()).item()
        assert low <= rel < high, rel
        assert d.square().mean().sqrt().item() == pytest.approx(0.01, rel=1e-5)


def test_swan_is_stateless_and_memoryless():
    grads = grads_for(SHAPES)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen(0))) for s in SHAPES]
    opt = SWAN(params, lr=0.01, weight_decay=0.1)
    deltas = []
    for _ in range(2):
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        deltas.append([p.detach() - b * (1 - 0.01 * 0.1) for p, b in zip(params, before)])
    for a, b in zip(*deltas):  # the same gradient gives the same update: nothing is remembered
        assert_close(a, b, rtol=0, atol=1e-6)
    assert optimzoo.state_bytes(opt) == 0
    assert all(not st for st in opt.state.values())


def test_swan_dead_rows_and_zero_gradients():
    g = torch.randn(16, 24, generator=gen(2))
    g[3] = 0.0  # a dead neuron
    g[7] = 5.0  # a constant row: zero variance
    for whitening in ("newton_schulz", "exact"):
        steps, _, _ = one_step(SWAN, [(16, 24)], [g], lr=0.01, whitening=whitening)
        assert torch.isfinite(steps[0]).all()
        assert steps[0][3].abs().max() < 1e-7 and steps[0][7].abs().max() < 1e-7
    steps, _, _ = one_step(SWAN, [(16, 24)], [torch.zeros(16, 24)], lr=0.01)
    assert torch.equal(steps[0], torch.zeros(16, 24, dtype=torch.float64))


def test_swan_conv_filters_and_bf16():
    g = torch.randn(8, 3, 3, 3, generator=gen(3))
    (conv,), _, _ = one_step(SWAN, [(8, 3, 3, 3)], [g], lr=0.01)
    (flat,), _, _ = one_step(SWAN, [(8, 27)], [g.reshape(8, 27)], lr=0.01)
    assert_close(conv.reshape(8, 27), flat, rtol=0, atol=0)  # a filter is its (out, -1) matrix
    p = torch.nn.Parameter(torch.zeros(8, 27, dtype=torch.bfloat16))
    opt = SWAN([p], lr=0.01)
    p.grad = g.reshape(8, 27).bfloat16()
    opt.step()
    (ref,), _, _ = one_step(SWAN, [(8, 27)], [g.reshape(8, 27).bfloat16().float()], lr=0.01)
    assert p.dtype == torch.bfloat16
    # bf16 rounding twice (the gradient, then the weight): two bf16 ulps
    assert_close(p.detach().double(), ref, rtol=2 * EPS_BF16, atol=2 * EPS_BF16 * 1e-2)


# --------------------------------------------------------------------------------------------
# SinkGD
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("iterations", [1, 5])
def test_sinkgd_first_step_closed_form(iterations):
    """step = -lr SR-Sinkhorn(g, L); columns of -step/lr have norm exactly sqrt(m)."""
    grads = grads_for(SHAPES)
    steps, opt, _ = one_step(SinkGD, SHAPES, grads, lr=0.01, iterations=iterations)
    for (m, n), g, d in zip(SHAPES, grads, steps):
        assert_close(d, -0.01 * sinkhorn_reference(g, iterations), rtol=0, atol=1e-7)
        col = (d / -0.01).norm(dim=0)
        assert_close(col, torch.full_like(col, math.sqrt(m)), rtol=1e-5, atol=0)
    assert optimzoo.state_bytes(opt) == 0


def test_sinkgd_rows_approach_sqrt_n():
    g = torch.randn(32, 64, generator=gen(4)) * torch.logspace(-2, 2, 32)[:, None] * torch.logspace(1, -1, 64)
    dev = []
    for L in (1, 3, 10):
        (d,), _, _ = one_step(SinkGD, [(32, 64)], [g], lr=1.0, iterations=L)
        dev.append(((-d).norm(dim=1) / math.sqrt(64) - 1).abs().max().item())
    assert dev[0] > dev[1] > dev[2] and dev[2] < 1e-3, dev


def test_sinkgd_is_memoryless_and_handles_zeros():
    g = torch.randn(12, 20, generator=gen(5))
    g[:, 3] = 0
    params = [torch.nn.Parameter(torch.zeros(12, 20))]
    opt = SinkGD(params, lr=1.0)
    for k in range(2):
        params[0].grad = g
        opt.step()
    expected = -2 * sinkhorn_reference(g, 5)
    # float32 Sinkhorn: a few ulps per normalization, 5 iterations x 2 steps
    assert_close(params[0].detach().double(), expected, rtol=0, atol=drift_bound(expected.float(), 2 * 5))
    assert torch.equal(params[0].detach()[:, 3], torch.zeros(12))
    assert all(not st for st in opt.state.values())


# --------------------------------------------------------------------------------------------
# both, through the registry
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["swan", "sinkgd", "multinorm"])
def test_stateless_through_the_registry(name):
    torch.manual_seed(0)
    model = TinyLM()
    opt = optimzoo.create_optimizer(model, name, weight_decay=0.01)
    model.loss(tiny_batch(0)).backward()
    opt.step()
    plan = opt.routing_plan
    vector_numel = plan.count(role="vector")
    assert optimzoo.state_bytes(opt) == 8 * vector_numel  # AdamW's two moments on vector params only
    for name_, p in model.named_parameters():
        if name_ in plan.names(role="matrix"):
            assert not opt.state[p], name_
