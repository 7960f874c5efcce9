"""Lion and Lion-K against independent references.

* Lion: lucidrains/lion-pytorch (same math as google/automl) as the oracle, and the closed-form first
  step of ALGORITHMS.md.
* The kappa maps: hand-computed values, and autograd / central finite differences of each ``K``
  (written here from the paper's table, independently of ``optimzoo.ops.kappa``).
* The three paths (single-tensor, foreach, fused) against each other. Fused runs compile (seconds each);
  they are kept few.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import optimzoo
from optimzoo.ops.kappa import (
    KAPPAS,
    kappa_grad,
    kappa_grad_foreach,
    kappa_huber,
    kappa_l2,
    kappa_lp,
    kappa_nuclear,
    kappa_relativistic,
    kappa_sign,
    kappa_tanh,
)
from optimzoo.ops.orthogonalize import MUON_COEFFICIENTS, polar_factor
from optimzoo.optim.lion import Lion, LionK
from optimzoo.testing import TinyLM, tiny_batch
from _tolerance import assert_close, check, drift_bound, weight_ulps

lion_pytorch = pytest.importorskip("lion_pytorch")

SHAPES = [(7,), (33, 17), (4, 3, 5, 5), (1,), (1000,), ()]
PATHS = {"single": {"foreach": False}, "foreach": {"foreach": True}}
ALL_KAPPAS = list(KAPPAS)
NON_NUCLEAR = [k for k in ALL_KAPPAS if k != "nuclear"]


def make_params(shapes, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def make_grads(shapes, steps, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(steps)]


def run(make_opt, shapes, steps, dtype=torch.float32, seed=0):
    params = make_params(shapes, seed, dtype)
    opt = make_opt(params)
    for grads in make_grads(shapes, steps, seed + 1, dtype):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in params], opt


def max_diff(xs, ys) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(xs, ys))


# --------------------------------------------------------------------------------------------
# Lion against lucidrains/lion-pytorch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_lion_matches_lion_pytorch(path, weight_decay):
    hp = dict(lr=3e-3, betas=(0.9, 0.99), weight_decay=weight_decay)
    ref, _ = run(lambda ps: lion_pytorch.Lion(ps, **hp), SHAPES, steps=40)
    ours, _ = run(lambda ps: Lion(ps, **hp, **PATHS[path]), SHAPES, steps=40)
    check(max_diff(ref, ours), drift_bound(ref, 40))
    start = make_params(SHAPES)
    assert max_diff(ref, start) > 0.05  # the run moved the parameters


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_lion_foreach_in_chunks_matches_lion_pytorch(weight_decay, monkeypatch):
    """The foreach path run over chunks that split tensors (tiny chunks here) is still bit-exact."""
    import optimzoo.optim._base as base

    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 7)
    hp = dict(lr=3e-3, betas=(0.9, 0.99), weight_decay=weight_decay)
    ref, _ = run(lambda ps: lion_pytorch.Lion(ps, **hp), SHAPES, steps=20)
    ours, _ = run(lambda ps: Lion(ps, **hp, foreach=True), SHAPES, steps=20)
    assert max_diff(ref, ours) == 0.0


def test_lion_fused_matches_lion_pytorch():
    hp = dict(lr=3e-3, betas=(0.95, 0.98), weight_decay=0.1)
    ref, _ = run(lambda ps: lion_pytorch.Lion(ps, **hp), SHAPES, steps=30)
    ours, _ = run(lambda ps: Lion(ps, **hp, fused=True), SHAPES, steps=30)
    check(max_diff(ref, ours), drift_bound(ref, 30))


def test_lion_first_step_closed_form():
    lr, (b1, b2) = 1e-2, (0.9, 0.99)
    for path in PATHS.values():
        p = torch.nn.Parameter(torch.tensor([[0.5, -1.0, 2.0], [0.0, 3.0, -0.25]]))
        w0 = p.detach().clone()
        g = torch.tensor([[0.3, -2.0, 0.0], [1e-8, -1e-8, 5.0]])
        p.grad = g.clone()
        opt = Lion([p], lr=lr, betas=(b1, b2), **path)
        opt.step()
        expected_delta = -lr * torch.tensor([[1.0, -1.0, 0.0], [1.0, -1.0, 1.0]])
        assert_close(p.detach() - w0, expected_delta, rtol=0, atol=weight_ulps(w0))
        assert_close(opt.state[p]["exp_avg"], (1 - b2) * g, rtol=1e-6, atol=0)
        assert list(opt.state[p]) == ["exp_avg"]
        assert_close(p.grad, g, rtol=0, atol=0)  # p.grad untouched


def test_lion_first_step_with_weight_decay():
    lr, wd = 0.1, 0.5
    p = torch.nn.Parameter(torch.tensor([2.0, -4.0, 1.0]))
    p.grad = torch.tensor([1.0, 1.0, -1.0])
    Lion([p], lr=lr, weight_decay=wd).step()
    # W (1 - lr wd) - lr sign(g) = W * 0.95 - 0.1 sign(g)
    assert_close(p.detach(), torch.tensor([1.8, -3.9, 1.05]))


def test_lion_k_sign_is_lion_bitwise():
    hp = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.2)
    for path in PATHS.values():
        a, _ = run(lambda ps: Lion(ps, **hp, **path), SHAPES, steps=12)
        b, _ = run(lambda ps: LionK(ps, **hp, kappa="sign", **path), SHAPES, steps=12)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
        c, _ = run(lambda ps: LionK(ps, **hp, kappa="lp", p=1.0, **path), SHAPES, steps=12)
        assert max_diff(a, c) == 0  # lp with p = 1 is sign


# --------------------------------------------------------------------------------------------
# The kappa maps: hand-computed values
# --------------------------------------------------------------------------------------------


def close(x, expected, atol=1e-6):
    assert_close(x, torch.tensor(expected, dtype=x.dtype), rtol=0, atol=atol)


def test_kappa_closed_forms():
    x = torch.tensor([3.0, -4.0, 0.0, 12.0])
    close(kappa_sign(x), [1.0, -1.0, 0.0, 1.0])
    close(kappa_l2(x), [3 / 13, -4 / 13, 0.0, 12 / 13])
    n3 = (27 + 64 + 1728) ** (1 / 3)
    close(kappa_lp(x, 3.0), [9 / n3**2, -16 / n3**2, 0.0, 144 / n3**2])
    n15 = (3**1.5 + 4**1.5 + 12**1.5) ** (1 / 1.5)
    close(kappa_lp(x, 1.5), [math.sqrt(3 / n15), -math.sqrt(4 / n15), 0.0, math.sqrt(12 / n15)])
    close(kappa_lp(x, 2.0), [3 / 13, -4 / 13, 0.0, 12 / 13])
    close(kappa_lp(x, 1.0), [1.0, -1.0, 0.0, 1.0])
    y = torch.tensor([3.0, -1.0, 0.5, -4.0, 0.0])
    close(kappa_huber(y, 2.0), [1.0, -0.5, 0.25, -1.0, 0.0])
    close(kappa_tanh(y, 0.5), [math.tanh(1.5), -math.tanh(0.5), math.tanh(0.25), -math.tanh(2.0), 0.0])
    close(kappa_relativistic(y, 4.0), [3 / 5, -1 / math.sqrt(17), 0.5 / math.sqrt(16.25), -4 / math.sqrt(32), 0.0])
    # the scalars may be 0-d tensors (the fused kernel's convention)
    close(kappa_lp(x, torch.tensor(3.0)), [9 / n3**2, -16 / n3**2, 0.0, 144 / n3**2])
    close(kappa_relativistic(y, torch.tensor(4.0)), kappa_relativistic(y, 4.0).tolist(), atol=0)


def test_kappa_scale_robustness():
    # the norms are taken after dividing by max|x|: no underflow for tiny x, no overflow for large p
    x = torch.tensor([3e-25, -4e-25, 0.0])
    close(kappa_l2(x), [0.6, -0.8, 0.0])
    close(kappa_lp(torch.tensor([3e20, -4e20]), 50.0), kappa_lp(torch.tensor([3.0, -4.0]), 50.0).tolist())


def quintic(s: float, steps: int = 5) -> float:
    a, b, c = MUON_COEFFICIENTS
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return s


def test_kappa_nuclear_hand_made():
    # X = [[0, 2], [-1, 0]] = e1 (2) e2^T + (-e2) (1) e1^T: polar factor [[0, 1], [-1, 0]]. Newton-Schulz
    # maps each singular value s (after X / max|X| and / ||.||_F) through the quintic five times.
    X = torch.tensor([[0.0, 2.0], [-1.0, 0.0]])
    fro = math.sqrt(1 + 0.25) + 1e-7  # of X / max|X|, plus newton_schulz's eps
    hi, lo = quintic(1 / fro), quintic(0.5 / fro)
    close(kappa_nuclear(X), [[0.0, hi], [-lo, 0.0]], atol=1e-5)
    close(polar_factor(X), [[0.0, 1.0], [-1.0, 0.0]])
    assert 0.6 < hi < 1.25 and 0.6 < lo < 1.25  # "within NS tolerance" of the polar factor
    D = torch.tensor([[3.0, 0.0], [0.0, -1.0]])
    fro = math.sqrt(1 + 1 / 9) + 1e-7
    close(kappa_nuclear(D), [[quintic(1 / fro), 0.0], [0.0, -quintic(1 / 3 / fro)]], atol=1e-5)
    # 1-D (and 0-d) tensors fall back to sign
    close(kappa_nuclear(torch.tensor([2.0, -0.1, 0.0])), [1.0, -1.0, 0.0])
    close(kappa_nuclear(torch.tensor(-3.0)), -1.0)


@pytest.mark.parametrize("shape", [(8, 5), (5, 8), (16, 16), (4, 3, 3, 3)])
def test_kappa_nuclear_is_polar_factor_within_ns_tolerance(shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    K = kappa_nuclear(x).reshape(shape[0], -1)
    M = x.reshape(shape[0], -1)
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    D = U.mT @ K @ Vh.mT  # = f(S): diagonal, entries in Newton-Schulz's band around 1
    diag = torch.diagonal(D)
    assert ((diag > 0.6) & (diag < 1.25)).all(), diag
    assert (D - torch.diag_embed(diag)).abs().max() < 1e-5
    P = polar_factor(M)
    assert (K - P).norm() / P.norm() < 0.3
    # scale-invariant: a tiny momentum is not shrunk by Newton-Schulz's 1e-7 epsilon
    assert_close(kappa_nuclear(x * 1e-12), kappa_nuclear(x), rtol=0, atol=1e-5)
    assert torch.equal(kappa_nuclear(x, ns_steps=5, ns_dtype=torch.float32), kappa_nuclear(x))


def test_kappa_zero_inputs_give_zero():
    for name in ALL_KAPPAS:
        for shape in [(5,), (3, 4), (2, 3, 2, 2), (), (0,), (0, 3)]:
            out = kappa_grad(name, torch.zeros(shape), p=1.5, a=0.5)
            assert out.shape == torch.Size(shape)
            assert torch.equal(out, torch.zeros(shape)), (name, shape)


def test_kappa_grad_dispatch_and_foreach():
    torch.manual_seed(0)
    xs = [torch.randn(s) for s in [(6,), (4, 5), (4, 5), (3, 2, 2, 2), (1,)]]
    p, a = torch.tensor(1.7), torch.tensor(0.3)
    for name in ALL_KAPPAS:
        single = [kappa_grad(name, x, p=p, a=a) for x in xs]
        many = kappa_grad_foreach(name, [x.clone() for x in xs], p=p, a=a)
        for s, m in zip(single, many):  # nuclear: batched vs single matmuls round differently
            assert_close(m, s, rtol=0, atol=1e-5 if name == "nuclear" else 0, msg=name)
    assert torch.equal(kappa_grad("lp", xs[1], p=p), kappa_lp(xs[1], p))
    with pytest.raises(ValueError, match="'sign', 'l2', 'lp', 'huber', 'tanh', 'relativistic', 'nuclear'"):
        kappa_grad("l1", xs[0])
    with pytest.raises(ValueError, match="kappa"):
        kappa_grad_foreach("abs_max", xs)


# --------------------------------------------------------------------------------------------
# Each kappa is the gradient of its K: autograd and central finite differences (float64)
# --------------------------------------------------------------------------------------------

A, P = 0.7, 1.6

K_FUNCTIONS = {
    "sign": lambda x: x.abs().sum(),
    "l2": lambda x: x.square().sum().sqrt(),
    "lp": lambda x: x.abs().pow(P).sum().pow(1 / P),
    "huber": lambda x: torch.where(x.abs() <= A, x.square() / (2 * A), x.abs() - A / 2).sum(),
    "tanh": lambda x: (torch.log(torch.cosh(A * x)) / A).sum(),
    "relativistic": lambda x: torch.sqrt(x.square() + A * A).sum(),
}


@pytest.mark.parametrize("name", list(K_FUNCTIONS))
def test_kappa_is_gradient_of_K(name):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    x = x + 0.05 * x.sign()  # keep away from the kinks of |x| and Huber's |x| = a
    K = K_FUNCTIONS[name]
    kappa = kappa_grad(name, x, p=P, a=A)
    assert kappa.dtype == torch.float64
    xr = x.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(K(xr), xr)
    assert_close(kappa, auto, rtol=1e-10, atol=1e-12)
    h = 1e-6
    for _ in range(3):
        v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        fd = (K(x + h * v) - K(x - h * v)) / (2 * h)
        assert abs(fd.item() - (kappa * v).sum().item()) < 1e-6, name


def test_kappa_nuclear_is_gradient_of_nuclear_norm():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    K = lambda X: torch.linalg.matrix_norm(X, "nuc")  # noqa: E731
    xr = x.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(K(xr), xr)
    assert_close(polar_factor(x).double(), auto, rtol=0, atol=1e-5)
    h = 1e-6
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    fd = (K(x + h * v) - K(x - h * v)) / (2 * h)
    assert abs(fd.item() - (auto * v).sum().item()) < 1e-6
    # kappa_nuclear is the same direction up to Newton-Schulz's singular-value band
    U, _, Vh = torch.linalg.svd(x, full_matrices=False)
    D = U.mT @ kappa_nuclear(x) @ Vh.mT
    diag = torch.diagonal(D)
    assert ((diag > 0.6) & (diag < 1.25)).all()
    assert (D - torch.diag_embed(diag)).abs().max() < 1e-8


# --------------------------------------------------------------------------------------------
# Lion-K updates
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", list(PATHS))
def test_lion_k_first_step_closed_forms(path):
    lr, b1, b2, a, p_ = 0.1, 0.9, 0.99, 0.05, 3.0
    g = torch.tensor([[0.3, -0.4], [0.0, 1.2]])  # ||g||_2 = 1.3
    c = (1 - b1) * g
    l3 = (0.3**3 + 0.4**3 + 1.2**3) ** (1 / 3)
    expected = {
        "sign": [[1.0, -1.0], [0.0, 1.0]],
        "l2": [[0.3 / 1.3, -0.4 / 1.3], [0.0, 1.2 / 1.3]],
        "lp": [[(0.3 / l3) ** 2, -((0.4 / l3) ** 2)], [0.0, (1.2 / l3) ** 2]],
        "huber": [[0.6, -0.8], [0.0, 1.0]],  # clip(0.1 g, -0.05, 0.05) / 0.05
        "tanh": torch.tanh(a * c).tolist(),
        "relativistic": (c / torch.sqrt(c * c + a * a)).tolist(),
        "nuclear": kappa_nuclear(g).tolist(),  # checked against the polar factor above
    }
    for name, exp in expected.items():
        w = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        w0 = w.detach().clone()
        w.grad = g.clone()
        opt = LionK([w], lr=lr, betas=(b1, b2), kappa=name, p=p_, a=a, ns_dtype="float32", **PATHS[path])
        opt.step()
        assert_close(w.detach() - w0, -lr * torch.tensor(exp), rtol=0, atol=2e-6, msg=name)
        assert_close(opt.state[w]["exp_avg"], (1 - b2) * g, rtol=1e-6, atol=0, msg=name)
        assert torch.equal(w.grad, g)


def test_lion_k_weight_decay_is_decoupled_and_first():
    p = torch.nn.Parameter(torch.tensor([2.0, -4.0]))
    p.grad = torch.tensor([3.0, 4.0])
    LionK([p], lr=0.1, weight_decay=0.5, kappa="l2").step()
    # W - lr (kappa(c) + wd W) with kappa(c) = g / ||g||
    assert_close(p.detach(), torch.tensor([2.0 - 0.1 * (0.6 + 1.0), -4.0 - 0.1 * (0.8 - 2.0)]))


def test_lion_k_nuclear_uses_sign_for_vectors():
    w, b = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(5))
    w0, b0 = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = torch.randn(5, 3), torch.randn(5)
    LionK([w, b], lr=0.01, kappa="nuclear", ns_dtype="float32").step()
    assert_close(b.detach() - b0, -0.01 * b.grad.sign(), rtol=0, atol=weight_ulps(b0))
    assert_close(w.detach() - w0, -0.01 * kappa_nuclear(0.1 * w.grad), rtol=0, atol=weight_ulps(w0))


@pytest.mark.parametrize("kappa", ALL_KAPPAS)
def test_lion_k_single_matches_foreach(kappa):
    shapes = [(7,), (6, 5), (6, 5), (2, 3, 3, 3), (1,), ()]
    hp = dict(lr=1e-2, weight_decay=0.1, kappa=kappa, p=1.3, a=0.4)
    for dtype in (torch.float32, torch.bfloat16):
        a, _ = run(lambda ps: LionK(ps, **hp, foreach=False), shapes, steps=6, dtype=dtype)
        b, _ = run(lambda ps: LionK(ps, **hp, foreach=True), shapes, steps=6, dtype=dtype)
        check(max_diff(a, b), drift_bound(a, 6), f"{kappa} {dtype}")
        assert all(x.dtype == dtype for x in b)


@pytest.mark.parametrize("kappa,dtype", [("lp", torch.float32), ("relativistic", torch.float32),
                                         ("sign", torch.bfloat16), ("nuclear", torch.float32)])
def test_fused_matches_single_tensor(kappa, dtype):
    shapes = [(7,), (6, 5), (2, 3, 3, 3), (1,), ()]
    hp = dict(lr=1e-2, weight_decay=0.1, kappa=kappa, p=1.3, a=0.4)
    a, _ = run(lambda ps: LionK(ps, **hp, foreach=False), shapes, steps=5, dtype=dtype)
    b, _ = run(lambda ps: LionK(ps, **hp, fused=True), shapes, steps=5, dtype=dtype)
    check(max_diff(a, b), drift_bound(a, 5))
    # channels_last (non-contiguous) parameters take the eager kernel inside the fused path
    conv = torch.nn.Parameter(torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last).to(dtype))
    ref = conv.detach().clone()
    g = torch.randn(4, 3, 2, 2).to(dtype)
    conv.grad = g.clone()
    LionK([conv], **hp, fused=True).step()
    ref_p = torch.nn.Parameter(ref)
    ref_p.grad = g.clone()
    LionK([ref_p], **hp, foreach=False).step()
    check(max_diff([conv.detach()], [ref_p.detach()]), drift_bound(ref_p, 1))


def test_bf16_update_is_computed_in_float32_and_rounded_once():
    lr, wd = 1e-3, 0.1
    w32 = torch.randn(64, 8)
    g32 = torch.randn(64, 8)
    for path in PATHS.values():
        p = torch.nn.Parameter(w32.bfloat16())
        p.grad = g32.bfloat16()
        opt = Lion([p], lr=lr, weight_decay=wd, **path)
        opt.step()
        w = w32.bfloat16().float()
        expected = (w * (1 - lr * wd) - lr * p.grad.float().sign()).bfloat16()
        assert torch.equal(p.detach(), expected)
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16


@pytest.mark.parametrize("kappa", ALL_KAPPAS)
def test_zero_gradients_give_finite_updates(kappa):
    for path in PATHS.values():
        ps = make_params([(4, 3), (5,), (2, 2, 2, 2)])
        before = [p.detach().clone() for p in ps]
        opt = LionK(ps, lr=0.1, kappa=kappa, **path)
        for _ in range(2):
            for p in ps:
                p.grad = torch.zeros_like(p)
            opt.step()
        for p, b in zip(ps, before):
            assert torch.equal(p.detach(), b)  # no weight decay, zero momentum: no move


ALL_PATHS = {**PATHS, "fused": {"fused": True}}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("path", list(ALL_PATHS))
@pytest.mark.parametrize("make", [Lion, lambda ps, **kw: LionK(ps, kappa="sign", **kw)], ids=["lion", "lion_k_sign"])
def test_nonfinite_gradient_entry_makes_that_weight_nan(make, path, bad):
    # torch.sign(nan) is 0: with a plain sign, one NaN gradient element would make its momentum NaN
    # and freeze that weight for ever, silently. The NaN must reach the weight; every other entry must
    # move exactly as in a twin run whose bad gradient entry is replaced by a finite value.
    shapes = [(6, 5), (7,)]
    hp = dict(lr=0.1, weight_decay=0.1, **ALL_PATHS[path])
    ps, twin = make_params(shapes), make_params(shapes)
    opt, opt_twin = make(ps, **hp), make(twin, **hp)
    for step, grads in enumerate(make_grads(shapes, 2)):
        for p, q, g in zip(ps, twin, grads):
            p.grad, q.grad = g.clone(), g.clone()
        if step == 0:
            ps[0].grad[2, 3] = bad
            twin[0].grad[2, 3] = 0.5
        opt.step()
        opt_twin.step()
        assert torch.isnan(ps[0].detach()[2, 3]), f"step {step}: the weight hides a non-finite gradient"
        assert not torch.isfinite(opt.state[ps[0]]["exp_avg"][2, 3])  # the momentum keeps it (NaN or inf)
        finite = torch.ones(6, 5, dtype=torch.bool)
        finite[2, 3] = False
        assert torch.equal(ps[0].detach()[finite], twin[0].detach()[finite])
        assert torch.equal(ps[1].detach(), twin[1].detach())
        assert not torch.equal(ps[1].detach(), make_params(shapes)[1].detach())  # they did move


@pytest.mark.parametrize("kappa", ALL_KAPPAS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_kappa_maps_propagate_nonfinite(kappa, bad):
    # element-wise maps: NaN at the bad entry only; norms (l2, lp, nuclear): the whole tensor is NaN.
    # Never a finite value where the input was not finite (torch.sign/clamp/tanh alone give 0 or +-1).
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(3))
    x[1, 2] = bad
    whole = kappa in ("l2", "lp", "nuclear")
    one = kappa_grad(kappa, x.clone(), p=torch.tensor(1.5), a=torch.tensor(0.7))
    (many,) = kappa_grad_foreach(kappa, [x.clone()], p=torch.tensor(1.5), a=torch.tensor(0.7))
    for y in (one, many):
        assert torch.isnan(y[1, 2])
        assert int(torch.isnan(y).sum()) == (x.numel() if whole else 1)
    if not whole:  # finite entries are the plain formula's, bit for bit
        plain = {"sign": lambda t: torch.sign(t), "huber": lambda t: torch.clamp(t, -0.7, 0.7) / 0.7,
                 "tanh": lambda t: torch.tanh(t * torch.tensor(0.7)),
                 "relativistic": lambda t: t / torch.hypot(t, torch.tensor(0.7))}[kappa](x)
        keep = torch.isfinite(x)
        assert torch.equal(one[keep], plain[keep]) and torch.equal(many[keep], plain[keep])


def test_per_group_kappa_and_state_dict_round_trip():
    def build(model):
        hidden = [p for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("layers.")]
        rest = [p for n, p in model.named_parameters() if not (p.dim() == 2 and n.startswith("layers."))]
        assert hidden and rest
        return LionK([{"params": hidden, "kappa": "nuclear", "lr": 1e-3}, {"params": rest}],
                     lr=1e-4, weight_decay=0.1)

    def train(model, opt, steps, seed):
        for i in range(steps):
            opt.zero_grad()
            model.loss(tiny_batch(seed + i)).backward()
            opt.step()

    torch.manual_seed(0)
    model = TinyLM()
    opt = build(model)
    train(model, opt, 2, 0)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    train(model, opt, 2, 10)
    reference = {k: v.detach().clone() for k, v in model.named_parameters()}

    torch.manual_seed(1)
    model2 = TinyLM()
    model2.load_state_dict(saved[0])
    opt2 = build(model2)
    opt2.load_state_dict(saved[1])
    assert [g["kappa"] for g in opt2.param_groups] == ["nuclear", "sign"]
    train(model2, opt2, 2, 10)
    for k, v in model2.named_parameters():
        assert torch.equal(v, reference[k]), k


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def test_invalid_hyperparameters():
    ps = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match=r"kappa must be one of 'sign', 'l2', 'lp', 'huber', 'tanh', "
                                         r"'relativistic', 'nuclear'"):
        LionK(ps, kappa="l1")
    for field, value in [("p", 0.99), ("p", float("inf")), ("a", 0.0), ("a", -2.0), ("ns_steps", 0),
                         ("ns_steps", 3.0), ("lr", -1.0), ("weight_decay", -1e-3), ("betas", (0.9, 1.0))]:
        with pytest.raises(ValueError, match=field):
            LionK(ps, **{field: value})
    with pytest.raises(ValueError, match="beta"):
        Lion(ps, betas=(1.0, 0.99))
    with pytest.raises(ValueError, match="foreach"):
        Lion(ps, foreach=True, fused=True)
    opt = LionK(ps)
    with pytest.raises(ValueError, match="kappa"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "kappa": "max"})
    with pytest.raises(ValueError, match="Invalid a"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "a": -1.0})
    assert len(opt.param_groups) == 1
    # Lion has no kappa hyperparameters; the registry sees the signatures
    assert "kappa" not in optimzoo.get_spec("lion").hparams
    assert {"kappa", "p", "a", "ns_steps"} <= set(optimzoo.get_spec("lion_k").hparams)
    assert optimzoo.get_spec("lion_kappa").cls is LionK


def test_grad_is_not_modified_and_no_state_without_grad():
    ps = make_params([(4, 4), (3,)])
    ps[0].grad = torch.randn(4, 4)
    g = ps[0].grad.clone()
    for path in ({"foreach": False}, {"foreach": True}):
        opt = LionK(ps, lr=0.1, weight_decay=0.1, kappa="l2", **path)
        opt.step()
        assert torch.equal(ps[0].grad, g)
        assert ps[1] not in opt.state


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kappa", ["sign", "lp", "nuclear"])
def test_cuda_matches_cpu(kappa):
    shapes = [(7,), (6, 5), (2, 3, 3, 3)]
    hp = dict(lr=1e-2, weight_decay=0.1, kappa=kappa)
    cpu, _ = run(lambda ps: LionK(ps, **hp, foreach=False), shapes, steps=4)
    for path in ({"foreach": False}, {"foreach": True}, {"fused": True}):
        params = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(shapes)]
        opt = LionK(params, **hp, **path)
        for grads in make_grads(shapes, 4):
            for p, g in zip(params, grads):
                p.grad = g.cuda()
            opt.step()
        # nuclear runs Newton-Schulz in bf16 on accelerators
        tol = 2e-3 if kappa == "nuclear" else 1e-6
        assert max_diff(cpu, [p.detach().cpu() for p in params]) <= tol, path
