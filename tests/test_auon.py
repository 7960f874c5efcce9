"""AuON and Hybrid-AuON against transliterations of the official code and the closed-form first step.

References written below from ryyzn9/AuON:

* the paper's semantics = the original training script ``Auon_Adam_train.py`` (commit c87b862): its
  ``auon`` optimizer and the brake in its ``zeropower_via_newtonschulz5``; the script computes the brake
  in bf16, ours in float32 (a documented difference), so the transliteration runs in float32 and a
  separate test bounds the bf16 difference;
* the package ``auon/optimizer.py`` (HEAD bba2e82) ``AuON`` and ``HybridAuON`` (``variant="packaged"``;
  its Newton-Schulz runs in the parameter dtype, so ours runs with ``ns_dtype="float32"``);
* the paper's Hybrid-AuON (section 3.2): one quintic Newton-Schulz step, then the brake (square-root
  form, as the code).
"""

from __future__ import annotations

import math

import pytest
import torch

import optimzoo
from optimzoo.optim.auon import AuON, HybridAuON
from optimzoo.testing import TinyLM, tiny_batch
from _tolerance import assert_close, bf16_bound, check, drift_bound

# these tests give bare hidden matrices to the optimizers on purpose (no embeddings or heads among them)
pytestmark = pytest.mark.filterwarnings("ignore:.*unnamed tensor:UserWarning")

A, B, C = 3.4445, -4.7750, 2.0315
SHAPES = [(32, 48), (48, 32), (32, 48), (6, 4)]  # includes a tiny matrix, where the brake is visible


def ns_reference(G, steps):
    X = G
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        Am = X @ X.mT
        Bm = B * Am + C * (Am @ Am)
        X = A * X + Bm @ X
    return X.mT if tall else X


def momentum(g, st, beta, nesterov):
    M = st.setdefault("M", torch.zeros_like(g))
    M.lerp_(g, 1 - beta)
    return g.lerp(M, beta) if nesterov else M


def script_step(p, g, st, lr, beta=0.95, nesterov=True, wd=0.0, dtype=torch.float32):
    """Auon_Adam_train.py: normalized Nesterov momentum, sqrt(mean cosh^2) brake, sqrt(max(1, m/n))."""
    u = momentum(g, st, beta, nesterov)
    X = u.to(dtype)
    X = X / (X.norm() + 1e-7)
    rms = torch.sqrt(torch.mean(torch.cosh(X).square()))
    G = X * 1 / (rms + 1e-8)
    p.mul_(1 - lr * wd)  # not in the script (no decay inside AuON): our decoupled extension
    p.add_(G.reshape(p.shape).to(p.dtype), alpha=-lr * max(1, p.size(-2) / p.size(-1)) ** 0.5)


def package_step(p, g, st, lr, beta=0.95, wd=0.0, gamma=1.5, ns_steps=None):
    """auon/optimizer.py AuON (ns_steps None) and HybridAuON (ns_steps k)."""
    if wd:
        p.mul_(1 - lr * wd)
    G = momentum(g, st, beta, True)
    if ns_steps is not None:
        G = ns_reference(G, ns_steps)
    norm = G.norm()
    if norm == 0:
        return
    r = torch.sqrt(torch.mean(torch.cosh(G / (norm + 1e-7) * gamma) ** 2))
    p.add_(G / (r + 1e-8), alpha=-lr)


def hybrid_paper_step(p, g, st, lr, beta=0.95, ns_steps=1, wd=0.0):
    X = ns_reference(momentum(g, st, beta, True), ns_steps)
    G = X / (torch.sqrt(torch.mean(torch.cosh(X) ** 2)) + 1e-8)
    p.mul_(1 - lr * wd)
    p.add_(G, alpha=-lr * max(1, p.size(-2) / p.size(-1)) ** 0.5)


def make_grads(shapes, steps, seed=1, spiky=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        grads = [torch.randn(s, generator=g) for s in shapes]
        if spiky:
            grads[-1][2, 1] += 20.0  # one entry carries most of the mass: the cosh brake engages
        out.append(grads)
    return out


def run(make_opt, steps=20, shapes=SHAPES):
    params = [torch.nn.Parameter(0.1 * torch.randn(s, generator=torch.Generator().manual_seed(0))) for s in shapes]
    opt = make_opt(params)
    for grads in make_grads(shapes, steps):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in params], opt


def run_reference(step_fn, steps=20, shapes=SHAPES, **kw):
    params = [(0.1 * torch.randn(s, generator=torch.Generator().manual_seed(0))) for s in shapes]
    states = [{} for _ in params]
    for grads in make_grads(shapes, steps):
        for p, g, st in zip(params, grads, states):
            step_fn(p, g.clone(), st, **kw)
    return params


def max_diff(xs, ys):
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(xs, ys))


@pytest.mark.parametrize("nesterov,wd", [(True, 0.0), (False, 0.0), (True, 0.1)])
def test_auon_paper_matches_the_original_script(nesterov, wd):
    ref = run_reference(script_step, lr=0.24, nesterov=nesterov, wd=wd)
    ours, _ = run(lambda ps: AuON(ps, lr=0.24, nesterov=nesterov, weight_decay=wd))
    check(max_diff(ref, ours), drift_bound(ref, 20))


def test_auon_paper_vs_the_script_in_bf16():
    """The script computes the brake in bf16; ours in float32. Each step's update then differs by the bf16
    rounding of the brake's chain (normalize, cosh, square, mean, sqrt, divide: ~6 roundings of 2^-8 relative
    each), so the weights differ by at most ~8 bf16 ulps of the distance they moved, per matrix."""
    ref = run_reference(script_step, lr=0.24, dtype=torch.bfloat16)
    ours, _ = run(lambda ps: AuON(ps, lr=0.24))
    start = run_reference(script_step, steps=0)
    assert max_diff(ref, ours) > 0  # bf16 and float32 brakes do differ
    for r, o, s in zip(ref, ours, start):
        check(max_diff([r], [o]), bf16_bound(max_diff([r], [s]), ulps=8))


@pytest.mark.parametrize("wd,gamma", [(0.0, 1.5), (0.1, 1.5), (0.0, 3.0)])
def test_auon_packaged_matches_the_package(wd, gamma):
    ref = run_reference(package_step, lr=0.08, wd=wd, gamma=gamma)
    ours, _ = run(lambda ps: AuON(ps, lr=0.08, weight_decay=wd, variant="packaged", gamma=gamma))
    check(max_diff(ref, ours), drift_bound(ref, 20))


@pytest.mark.parametrize("ns_steps", [1, 5])
def test_hybrid_auon_packaged_matches_the_package(ns_steps):
    ref = run_reference(package_step, lr=0.08, wd=0.01, ns_steps=ns_steps)
    ours, _ = run(lambda ps: HybridAuON(ps, lr=0.08, weight_decay=0.01, variant="packaged", ns_steps=ns_steps,
                                        ns_dtype="float32"))
    check(max_diff(ref, ours), drift_bound(ref, 20))


@pytest.mark.parametrize("ns_steps", [1, 3])
def test_hybrid_auon_paper(ns_steps):
    ref = run_reference(hybrid_paper_step, lr=0.24, ns_steps=ns_steps, wd=0.01)
    ours, _ = run(lambda ps: HybridAuON(ps, lr=0.24, ns_steps=ns_steps, weight_decay=0.01, ns_dtype="float32"))
    check(max_diff(ref, ours), drift_bound(ref, 20))


def test_auon_first_step_closed_form():
    """ALGORITHMS.md: U = 0.0975 g; step = -lr sqrt(max(1, m/n)) X / (sqrt(mean cosh(X)^2) + 1e-8), X = g/||g||_F."""
    for shape in [(12, 4), (4, 12), (30, 30)]:
        g = torch.randn(shape, generator=torch.Generator().manual_seed(3)).double()
        g[1, 2] = 30.0
        p = torch.nn.Parameter(torch.zeros(shape))
        opt = AuON([p], lr=0.24)
        p.grad = g.float()
        opt.step()
        X = g / g.norm()
        r = torch.cosh(X).square().mean().sqrt()
        expected = -0.24 * math.sqrt(max(1, shape[0] / shape[1])) * X / (r + 1e-8)
        assert_close(p.detach().double(), expected, rtol=1e-6, atol=1e-8)
        assert r > math.sqrt(1 + 1 / g.numel())  # mean cosh^2 = 1 + mean sinh^2 > 1 + mean X^2 = 1 + 1/N
        assert_close(opt.state[p]["momentum_buffer"].double(), 0.05 * g, rtol=1e-6, atol=0)


def test_auon_paper_is_scale_invariant_and_packaged_is_not():
    g = torch.randn(16, 24, generator=torch.Generator().manual_seed(4))
    steps = {}
    for variant in ("paper", "packaged"):
        for scale in (1.0, 100.0):
            p = torch.nn.Parameter(torch.zeros(16, 24))
            opt = AuON([p], lr=0.1, variant=variant)
            p.grad = scale * g
            opt.step()
            steps[variant, scale] = p.detach().clone()
    assert_close(steps["paper", 1.0], steps["paper", 100.0], rtol=1e-5, atol=1e-9)
    assert_close(steps["packaged", 100.0], 100 * steps["packaged", 1.0], rtol=1e-5, atol=1e-9)
    # zero gradients: zero update, no NaN, for every variant
    for cls, variant in [(AuON, "paper"), (AuON, "packaged"), (HybridAuON, "paper"), (HybridAuON, "packaged")]:
        p = torch.nn.Parameter(torch.ones(5, 7))
        opt = cls([p], variant=variant)
        p.grad = torch.zeros(5, 7)
        opt.step()
        assert torch.equal(p.detach(), torch.ones(5, 7))


@pytest.mark.parametrize("name", ["auon", "hybrid_auon"])
def test_auon_through_the_registry(name):
    torch.manual_seed(0)
    model = TinyLM()
    opt = optimzoo.create_optimizer(model, name, weight_decay=0.01)
    model.loss(tiny_batch(0)).backward()
    opt.step()
    assert set(opt.state[model.layers[0].up_proj.weight]) == {"momentum_buffer"}
    assert set(opt.state[model.lm_head.weight]) == {"exp_avg", "exp_avg_sq", "step"}
    assert optimzoo.state_bytes(opt) == optimzoo.get_spec(name).expected_state_bytes(opt.routing_plan)
    assert opt.param_groups[0]["variant"] == "paper"
    if name == "hybrid_auon":
        assert opt.param_groups[0]["ns_steps"] == 1
