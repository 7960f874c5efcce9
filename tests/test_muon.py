"""Muon and NorMuon against independent references.

* A plain single-tensor transliteration of the official updates (KellerJordan/Muon ``muon_update``,
  zichongli5/NorMuon ``normuon_update`` + ``SingleDeviceNorMuon.step``) written below: momentum,
  Nesterov, quintic Newton-Schulz, row normalization, Frobenius restore, aspect-ratio scaling. Both
  sides run Newton-Schulz in float32 (``ns_dtype="float32"``), so the only differences are the order
  of floating-point operations (batched vs single matmuls, ``lr * s`` folded into one scalar).
* Peers, where their semantics coincide with ours:
  - ``torch.optim.Muon`` (2-D only, bf16 Newton-Schulz always, ``adjust_lr_fn="original"`` =
    ``sqrt(max(1, m/n))``, ``"match_rms_adamw"`` = ``0.2 sqrt(max(m, n))``, decoupled wd): ours with
    ``ns_dtype="bfloat16"``;
  - pytorch_optimizer ``Muon`` / ``NorMuon`` (``use_muon=True`` groups, ``foreach=False``, bf16
    Newton-Schulz, NorMuon's normalization in the gradient's float32, ``update_scale="preserve_norm"``
    = official, ``"match_rms"`` = the paper's RMS 0.2): ours with ``ns_dtype="bfloat16"``.
* The closed-form first steps of ALGORITHMS.md.
"""

from __future__ import annotations

import math

import pytest
import torch

import optimzoo
from optimzoo.optim.muon import Muon, NorMuon
from optimzoo.testing import TinyLM, tiny_batch
from _tolerance import EPS32, assert_close, bf16_bound, check, drift_bound, magnitude, ns_amplification, weight_ulps

# these tests give bare hidden matrices to the optimizers on purpose (no embeddings or heads among them)
pytestmark = pytest.mark.filterwarnings("ignore:.*unnamed tensor:UserWarning")

MUON_ABC = (3.4445, -4.7750, 2.0315)
SHAPES = [(32, 48), (48, 32), (32, 48), (40, 40), (24, 96)]  # wide, tall, a repeated shape (batched), square


def ns5_reference(G: torch.Tensor, steps: int = 5, dtype=torch.float32) -> torch.Tensor:
    """KellerJordan/Muon's ``zeropower_via_newtonschulz5``: in ``dtype``, on the wide orientation."""
    a, b, c = MUON_ABC
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X


def muon_reference_step(p, g, state, lr, beta=0.95, wd=0.0, nesterov=True, ns_dtype=torch.float32):
    """One official Muon step on one parameter (without overwriting ``g``)."""
    M = state.setdefault("M", torch.zeros_like(p))
    M.lerp_(g, 1 - beta)
    U = g.lerp(M, beta) if nesterov else M
    U = U.reshape(len(U), -1)
    O = ns5_reference(U, dtype=ns_dtype)
    O = O * max(1, U.size(-2) / U.size(-1)) ** 0.5
    p.mul_(1 - lr * wd)
    p.add_(O.reshape(p.shape), alpha=-lr)


def normuon_reference_step(p, g, state, lr, beta=0.95, beta2=0.95, wd=0.0, nesterov=True, ns_dtype=torch.float32):
    """One official NorMuon step (``normuon_update`` + ``SingleDeviceNorMuon``) on one 2-D parameter."""
    M = state.setdefault("M", torch.zeros_like(p))
    V = state.setdefault("V", torch.zeros_like(p[..., 0:1]))
    M.lerp_(g, 1 - beta)
    U = g.lerp(M, beta) if nesterov else M
    O = ns5_reference(U, dtype=ns_dtype).float()
    vnorm = O.norm(dim=(-2, -1), keepdim=True)
    V.lerp_(torch.mean(O * O, dim=-1, keepdim=True), 1 - beta2)
    O = O * (1 / (V.sqrt() + 1e-10))
    O = O * (vnorm / (O.norm(dim=(-2, -1), keepdim=True) + 1e-10))
    O = O * max(1, g.size(-2) / g.size(-1)) ** 0.5
    if wd:
        p.mul_(1 - lr * wd)
    p.add_(O, alpha=-lr)


def make_params(shapes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((0.1 * torch.randn(s, generator=g)).to(dtype)) for s in shapes]


def make_grads(shapes, steps, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(steps)]


def run(make_opt, shapes=SHAPES, steps=20):
    params = make_params(shapes)
    opt = make_opt(params)
    for grads in make_grads(shapes, steps):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in params], opt


def run_reference(step_fn, shapes=SHAPES, steps=20, **kw):
    params = [p.detach().clone() for p in make_params(shapes)]
    states = [{} for _ in params]
    for grads in make_grads(shapes, steps):
        for p, g, st in zip(params, grads, states):
            step_fn(p, g.clone(), st, **kw)
    return params, states


def max_diff(xs, ys) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(xs, ys))


# --------------------------------------------------------------------------------------------
# Muon
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("wd,nesterov", [(0.0, True), (0.1, True), (0.1, False)])
def test_muon_matches_the_official_update(wd, nesterov, foreach):
    hp = dict(lr=0.02, wd=wd, nesterov=nesterov)
    ref, _ = run_reference(muon_reference_step, **hp)
    ours, _ = run(lambda ps: Muon(ps, lr=0.02, weight_decay=wd, nesterov=nesterov, ns_dtype="float32",
                                  foreach=foreach))
    # float32 rounding only (batched matmuls, lr * s folded into one scalar); the same comparison with
    # both sides in bf16 differs by 2e-3, since bf16 rounding depends on the order of operations
    check(max_diff(ref, ours), drift_bound(ref, 20))


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_muon_matches_torch_optim_muon(wd, adjust):
    """Same bf16 Newton-Schulz, same momentum, same decoupled decay: bit-identical on CPU (measured 0.0)."""
    ours_adjust = {"original": "keller", "match_rms_adamw": "match_adamw"}[adjust]
    ref, _ = run(lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=wd, momentum=0.95, nesterov=True,
                                             adjust_lr_fn=adjust))
    ours, _ = run(lambda ps: Muon(ps, lr=0.02, weight_decay=wd, ns_dtype="bfloat16", adjust_lr=ours_adjust))
    check(max_diff(ref, ours), bf16_bound(max_diff(ref, make_params(SHAPES))))


@pytest.mark.parametrize("adjusted", [False, True])
def test_muon_matches_pytorch_optimizer(adjusted):
    po = pytest.importorskip("pytorch_optimizer")
    ref, _ = run(lambda ps: po.Muon([dict(params=ps, use_muon=True)], lr=0.02, weight_decay=0.1,
                                    use_adjusted_lr=adjusted, foreach=False))
    ours, _ = run(lambda ps: Muon(ps, lr=0.02, weight_decay=0.1, ns_dtype="bfloat16",
                                  adjust_lr="match_adamw" if adjusted else "keller"))
    check(max_diff(ref, ours), bf16_bound(max_diff(ref, make_params(SHAPES))))


def test_muon_first_step_closed_form():
    """Nesterov, beta 0.95: U = 0.0975 g; step = -lr sqrt(max(1, m/n)) NS5(g) (NS is scale-free)."""
    for shape in [(48, 16), (16, 48)]:
        (p,) = make_params([shape])
        start = p.detach().clone()
        g = torch.randn(shape, generator=torch.Generator().manual_seed(5))
        opt = Muon([p], lr=0.1, ns_dtype="float32")
        p.grad = g
        opt.step()
        expected = -0.1 * math.sqrt(max(1, shape[0] / shape[1])) * ns5_reference(0.0975 * g)
        atol = weight_ulps(start) + 4 * EPS32 * ns_amplification() * magnitude(expected)
        assert_close(p.detach() - start, expected, rtol=0, atol=atol)
        assert_close(opt.state[p]["momentum_buffer"], 0.05 * g)
        assert torch.equal(p.grad, g)  # p.grad untouched


# --------------------------------------------------------------------------------------------
# NorMuon
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("wd,nesterov,beta2", [(0.0, True, 0.95), (0.1, True, 0.95), (0.1, False, 0.9)])
def test_normuon_matches_the_official_update(wd, nesterov, beta2, foreach):
    ref, ref_states = run_reference(normuon_reference_step, lr=0.02, wd=wd, nesterov=nesterov, beta2=beta2)
    ours, opt = run(lambda ps: NorMuon(ps, lr=0.02, weight_decay=wd, nesterov=nesterov, beta2=beta2,
                                       ns_dtype="float32", foreach=foreach))
    check(max_diff(ref, ours), drift_bound(ref, 20))
    V = [opt.state[p]["second_momentum_buffer"] for p in opt.param_groups[0]["params"]]
    check(max_diff([st["V"] for st in ref_states], V), drift_bound(V, 20))


@pytest.mark.parametrize("update_scale", ["preserve_norm", "match_rms"])
def test_normuon_matches_pytorch_optimizer(update_scale):
    """pytorch_optimizer's NorMuon: bf16 Newton-Schulz, normalization in float32 (as our decision)."""
    po = pytest.importorskip("pytorch_optimizer")
    ref, _ = run(lambda ps: po.NorMuon([dict(params=ps, use_muon=True)], lr=0.02, weight_decay=0.1,
                                       update_scale=update_scale, foreach=False))
    adjust = "keller" if update_scale == "preserve_norm" else "match_adamw"
    ours, _ = run(lambda ps: NorMuon(ps, lr=0.02, weight_decay=0.1, ns_dtype="bfloat16", adjust_lr=adjust))
    check(max_diff(ref, ours), bf16_bound(max_diff(ref, make_params(SHAPES))))


def test_normuon_first_step_closed_form():
    """O = NS5(g); rows of O rescaled to equal RMS, then the matrix to ||O||_F; times -lr sqrt(max(1, m/n))."""
    for shape in [(48, 16), (16, 48)]:
        (p,) = make_params([shape])
        start = p.detach().clone()
        g = torch.randn(shape, generator=torch.Generator().manual_seed(6)) * torch.logspace(-1, 1, shape[0])[:, None]
        opt = NorMuon([p], lr=0.1, ns_dtype="float32")
        p.grad = g
        opt.step()
        O = ns5_reference(g).double()
        rows = O / O.square().mean(dim=1, keepdim=True).sqrt()
        expected = -0.1 * math.sqrt(max(1, shape[0] / shape[1])) * rows * (O.norm() / rows.norm())
        step = (p.detach() - start).double()
        # the weight's rounding, plus 4 ulps of the update amplified by the Newton-Schulz iterations
        atol = weight_ulps(start) + 4 * EPS32 * ns_amplification() * magnitude(expected)
        assert_close(step, expected, rtol=0, atol=atol)
        row_rms = step.square().mean(dim=1).sqrt()
        assert_close(row_rms, row_rms.mean().expand_as(row_rms), rtol=1e-4, atol=0)
        V = opt.state[p]["second_momentum_buffer"]
        assert V.shape == (shape[0], 1) and V.dtype == torch.float32
        # V is quadratic in O: twice O's relative error (4 ulps amplified by the iterations)
        assert_close(V.double(), 0.05 * O.square().mean(dim=1, keepdim=True), rtol=8 * EPS32 * ns_amplification(), atol=0)


def test_normuon_match_adamw_gives_update_rms_0_2_lr():
    shapes = [(32, 48), (48, 32), (16, 100)]
    params = make_params(shapes)
    opt = NorMuon(params, lr=1e-3, adjust_lr="match_adamw", ns_dtype="float32")
    for grads in make_grads(shapes, 5):
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for p, b in zip(params, before):
            rms = (p.detach() - b).double().square().mean().sqrt().item()
            assert rms == pytest.approx(0.2 * 1e-3, rel=1e-4)


def test_normuon_bf16_parameters_keep_float32_statistics():
    params = make_params([(32, 48), (48, 32)], dtype=torch.bfloat16)
    opt = NorMuon(params, lr=0.02)
    for grads in make_grads([(32, 48), (48, 32)], 3, dtype=torch.bfloat16):
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    for p in params:
        st = opt.state[p]
        assert st["momentum_buffer"].dtype == torch.bfloat16
        assert st["second_momentum_buffer"].dtype == torch.float32
        assert torch.isfinite(p).all() and torch.isfinite(st["second_momentum_buffer"]).all()


@pytest.mark.parametrize("cls", [Muon, NorMuon])
def test_conv_filters_are_flattened(cls):
    """A (out, in, k, k) filter is updated as the (out, in k k) matrix: same numbers as the 2-D parameter."""
    conv = make_params([(8, 3, 3, 3)])
    flat = [torch.nn.Parameter(conv[0].detach().clone().reshape(8, 27))]
    opts = [cls(conv, lr=0.02, ns_dtype="float32"), cls(flat, lr=0.02, ns_dtype="float32")]
    for (g,) in make_grads([(8, 3, 3, 3)], 4):
        conv[0].grad, flat[0].grad = g, g.reshape(8, 27)
        for o in opts:
            o.step()
    assert_close(conv[0].detach().reshape(8, 27), flat[0].detach(), rtol=0, atol=1e-7)
    if cls is NorMuon:
        assert opts[0].state[conv[0]]["second_momentum_buffer"].shape == (8, 1)


def test_normuon_metrics_report_the_row_scale_spread():
    shapes = [(16, 32), (16, 32), (32, 8)]
    params = make_params(shapes)
    opt = NorMuon(params, lr=0.02, ns_dtype="float32")
    assert opt.metrics() == {"nonfinite_grads": 0.0}

    def spreads():
        out = []
        for p in params:
            scale = 1 / (opt.state[p]["second_momentum_buffer"].sqrt() + 1e-10)
            out.append((scale.max() / scale.min()).item())
        return out

    seen = []
    for grads in make_grads(shapes, 2):
        for p, g in zip(params, grads):
            p.grad = g * torch.logspace(-2, 0, p.shape[0])[:, None]  # rows of very different scales
        opt.step()
        seen += spreads()
    m = opt.metrics()
    assert set(m) == {"row_scale_spread", "nonfinite_grads"}
    assert m["row_scale_spread"] == pytest.approx(sum(seen) / len(seen), rel=1e-5)  # 2 steps x 3 matrices
    assert m["row_scale_spread"] > 10
    assert opt.metrics() == {"nonfinite_grads": 0.0}  # reset on read
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    assert opt.metrics()["row_scale_spread"] == pytest.approx(sum(spreads()) / 3, rel=1e-5)


def test_normuon_through_the_registry():
    torch.manual_seed(0)
    model = TinyLM()
    opt = optimzoo.create_optimizer(model, "NorMuon", lr=0.02, weight_decay=0.01)
    assert isinstance(opt, NorMuon)
    model.loss(tiny_batch(0)).backward()
    opt.step()
    q = model.layers[0].q_proj.weight
    assert set(opt.state[q]) == {"momentum_buffer", "second_momentum_buffer"}
    assert set(opt.state[model.embed_tokens.weight]) == {"exp_avg", "exp_avg_sq", "step"}
    spec = optimzoo.get_spec("normuon")
    assert optimzoo.state_bytes(opt) == spec.expected_state_bytes(opt.routing_plan)
    assert NorMuon.__init__.__kwdefaults__["adamw_lr"] == 3e-4
    with pytest.raises(ValueError, match="adjust_lr"):
        NorMuon(model.parameters(), adjust_lr="moonshot")
