"""AdamP and SGDP against torch-optimizer (a port of clovaai/AdamP), closed forms, and the projection."""

import pytest
import torch

from optimzoo.optim.adamp import SGDP, AdamP, blocked_projection_stats, projection_scale, projection_stats
from _tolerance import EPS32, EPS_BF16, assert_close, check, drift_bound, magnitude, weight_ulps

torch_optimizer = pytest.importorskip("torch_optimizer")

SHAPES = [(16, 8), (4, 3, 3, 3), (8,), (32, 16), (6, 10)]
PATHS = [pytest.param({"foreach": False}, id="single"), pytest.param({"foreach": True}, id="foreach"),
         pytest.param({"fused": True}, id="fused")]


def make_params(seed: int = 1, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def gradients(params, step: int, scale: float = 1.0):
    """Random gradients; for the first two tensors orthogonal to each weight row (scale-invariant
    weights: the channel test fires), for the last the whole-tensor radial part removed (the layer test
    can fire), the rest generic (no projection)."""
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for i, p in enumerate(params):
        gr = torch.randn(p.shape, generator=g) * scale
        w = p.detach()
        if i in (0, 1):
            wv, gv = w.reshape(w.size(0), -1), gr.view(w.size(0), -1)
            gv -= (gv * wv).sum(1, keepdim=True) / (wv * wv).sum(1, keepdim=True) * wv
        elif i == 4:
            gr += 5 * w[0].abs().mean()  # a common offset: rows are not orthogonal
            gv, wv = gr.view(1, -1), w.reshape(1, -1)
            gv -= (gv * wv).sum() / (wv * wv).sum() * wv
        out.append(gr)
    return out


def run_pair(ours_cls, ref_cls, kwargs, path, steps=30, scale=1.0):
    """Run both for ``steps`` steps on the same gradients; ``(max |ours - ref|, its float32 bound)``."""
    a, b = make_params(), make_params()
    oa, ob = ours_cls(a, **kwargs, **path), ref_cls(b, **kwargs)
    for s in range(steps):
        for p, q, g in zip(a, b, gradients(a, s, scale)):
            p.grad, q.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    return max((p - q).abs().max().item() for p, q in zip(a, b)), drift_bound(b, steps)


ADAMP_CONFIGS = [dict(weight_decay=0.0), dict(weight_decay=0.1), dict(weight_decay=0.0, nesterov=True),
                 dict(weight_decay=0.1, nesterov=True, lr=1e-2), dict(weight_decay=0.05, delta=0.3, wd_ratio=0.5)]
SGDP_CONFIGS = [dict(lr=0.01, momentum=0.9), dict(lr=0.01, momentum=0.9, weight_decay=1e-2),
                dict(lr=0.01, momentum=0.9, nesterov=True), dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-2),
                dict(lr=0.02, momentum=0.5, dampening=0.3, weight_decay=1e-3), dict(lr=0.01, momentum=0.0)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kwargs", ADAMP_CONFIGS, ids=str)
def test_adamp_matches_torch_optimizer(kwargs, path):
    check(*run_pair(AdamP, torch_optimizer.AdamP, kwargs, path))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kwargs", SGDP_CONFIGS, ids=str)
def test_sgdp_matches_torch_optimizer(kwargs, path):
    check(*run_pair(SGDP, torch_optimizer.SGDP, kwargs, path, scale=0.1))


def test_parity_problem_triggers_both_projections():
    """Otherwise the parity tests would not test the projection."""
    params = make_params()
    grads = gradients(params, 0)
    eps = torch.tensor(1e-8)
    fired = []
    for p, g in zip(params, grads):
        if p.dim() < 2:
            continue
        w, gv = p.detach().reshape(p.size(0), -1), g.reshape(p.size(0), -1)
        rows, cols = w.shape
        scale, project = projection_scale(projection_stats(w, gv, torch.randn_like(w)), eps,
                                          torch.tensor(0.1 / cols**0.5), torch.tensor(0.1 / (rows * cols) ** 0.5))
        fired.append("no" if not project else "layer" if torch.all(scale == scale[0]) else "channel")
    assert fired == ["channel", "channel", "no", "layer"]


def test_projection_removes_the_radial_part_as_the_official_formula():
    """u - w (w.u) / (||w|| + eps)^2 == u - w^ (w^.u) with w^ = w / (||w|| + eps), per row and whole."""
    torch.manual_seed(0)
    w, u = torch.randn(7, 5), torch.randn(7, 5)
    eps = torch.tensor(1e-8)
    for g, view in ((w - (w * w).sum(1, keepdim=True) * 0, None), (torch.randn(7, 5), "layer")):
        if view is None:  # gradients orthogonal to each row: channel projection
            g = torch.randn(7, 5)
            g -= (g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True) * w
            w_hat = w / (w.norm(dim=1, keepdim=True) + eps)
            expected = u - w_hat * (w_hat * u).sum(1, keepdim=True)
            thresholds = (torch.tensor(1e-3), torch.tensor(0.0))
        else:  # channel test off, layer test always on
            w_hat = w / (w.norm() + eps)
            expected = u - w_hat * (w_hat * u).sum()
            thresholds = (torch.tensor(0.0), torch.tensor(2.0))
        scale, project = projection_scale(projection_stats(w, g, u), eps, *thresholds)
        assert project
        # a dot product of 5 terms and a subtraction: a few ulps of the largest term per operation
        assert_close(u - w * scale.unsqueeze(1), expected, rtol=0, atol=8 * EPS32 * magnitude(u, w * scale.unsqueeze(1)))


def test_blocked_statistics_equal_whole():
    torch.manual_seed(0)
    w, g, m, d = torch.randn(37, 11), torch.randn(37, 11), torch.randn(37, 11), torch.rand(37, 11) + 0.5
    whole = projection_stats(w, g, m / d)
    for block in (1, 11, 40, 100, 10_000):
        blocked = blocked_projection_stats(lambda *rows: projection_stats(rows[0], rows[1], rows[2] / rows[3]),
                                           w, g, m, d, block_elements=block)
        for got, want in zip(blocked, whole):
            assert_close(got, want, rtol=1e-6, atol=1e-6)
    for got, want in zip(blocked_projection_stats(projection_stats, w, g, m, block_elements=30),
                         projection_stats(w, g, m)):
        assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_adamp_first_step_closed_form_without_projection():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 5))
    g = p.detach() * 3 + 0.1  # nearly parallel to the weight: no projection
    w0 = p.detach().clone()
    opt = AdamP([p], lr=0.01)
    p.grad = g.clone()
    opt.step()
    assert_close(p.detach() - w0, -0.01 * g / (g.abs() + 1e-8), rtol=1e-6, atol=weight_ulps(w0))


def test_adamp_first_step_with_channel_projection_is_orthogonal_to_rows():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 5))
    g = torch.randn(6, 5)
    w0 = p.detach().clone()
    opt = AdamP([p], lr=0.01, delta=1e9)  # the channel test always fires
    p.grad = g.clone()
    opt.step()
    delta = p.detach() - w0
    u = g / (g.abs() + 1e-8)
    w_hat = w0 / (w0.norm(dim=1, keepdim=True) + 1e-8)
    expected = -0.01 * (u - w_hat * (w_hat * u).sum(1, keepdim=True))
    assert_close(delta, expected, rtol=1e-5, atol=weight_ulps(w0))
    # each delta entry carries the rounding of its weight (<= EPS32 |w|): the row dot product w . delta
    # then is within 2 EPS32 ||w_row||^2 of 0
    check((delta * w0).sum(1).abs().max().item(), 2 * EPS32 * (w0 * w0).sum(1).max().item())


def test_sgdp_first_step_closed_form():
    p = torch.nn.Parameter(torch.randn(4, 3))
    g = p.detach() * 2  # parallel: no projection
    w0 = p.detach().clone()
    opt = SGDP([p], lr=0.1, momentum=0.9)
    p.grad = g.clone()
    opt.step()
    assert_close(p.detach(), w0 - 0.1 * g)


@pytest.mark.parametrize("cls,kw", [(AdamP, {"weight_decay": 0.1, "nesterov": True}),
                                    (SGDP, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1})])
def test_gradients_are_not_modified(cls, kw):
    params = make_params()
    opt = cls(params, **kw)
    grads = gradients(params, 0)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)


def test_sgdp_nesterov_needs_momentum():
    with pytest.raises(ValueError, match="nesterov"):
        SGDP([torch.nn.Parameter(torch.zeros(2))], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="foreach"):
        AdamP([torch.nn.Parameter(torch.zeros(2))], foreach=True, fused=True)


def test_bf16_single_and_foreach_agree():
    res = []
    for foreach in (False, True):
        ps = [torch.nn.Parameter(p.detach().bfloat16()) for p in make_params()]
        opt = AdamP(ps, lr=1e-2, weight_decay=0.1, foreach=foreach)
        for s in range(3):
            for p, g in zip(ps, gradients(make_params(), s)):
                p.grad = g.bfloat16()
            opt.step()
        res.append(ps)
    for p, q in zip(*res):
        assert torch.isfinite(p).all()
        # both paths compute in float32 and round to bf16 once per step: at most one bf16 ulp
        # (<= EPS_BF16 |p|) apart per step, plus a bf16 ulp of the lr-sized update near zero
        assert_close(p, q, rtol=3 * EPS_BF16, atol=3 * EPS_BF16 * 1e-2)


@pytest.mark.parametrize("kwargs", ADAMP_CONFIGS[:4], ids=str)
def test_adamp_foreach_over_row_blocks_matches(kwargs, monkeypatch):
    """The foreach path's statistics and projected update over several row blocks (tiny blocks here)."""
    import optimzoo.optim._base as base
    import optimzoo.optim.adamp as adamp

    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 20)
    assert len(adamp.row_blocks(torch.zeros(16, 8))) > 1
    check(*run_pair(AdamP, torch_optimizer.AdamP, kwargs, {"foreach": True}))


@pytest.mark.parametrize("kwargs", SGDP_CONFIGS[:4], ids=str)
def test_sgdp_foreach_over_row_blocks_matches(kwargs, monkeypatch):
    import optimzoo.optim._base as base

    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 20)
    check(*run_pair(SGDP, torch_optimizer.SGDP, kwargs, {"foreach": True}, scale=0.1))


#: pieces of 45 elements: ragged row blocks (5 rows of (16, 8), the channel-projected tensor; 4 rows of
#: (6, 10), the layer-projected one; 1 row of (4, 3, 3, 3) and 2 of (32, 16)) and 45-element flat pieces
#: of a 300-element vector (6 full and a ragged one)
PIECE_ELEMENTS = 45
PIECE_SHAPES = SHAPES + [(300,)]


def run_in_pieces(ours_cls, ref_cls, kwargs, monkeypatch, steps=30, scale=1.0):
    """The single-tensor path with ``CHUNK_ELEMENTS = PIECE_ELEMENTS`` and with whole tensors (the default
    is larger than every tensor here), and the reference, side by side on the same gradients; returns the
    three parameter lists and the largest gradient entry."""
    import optimzoo.optim._base as base
    import optimzoo.optim.adamp as adamp

    default = base.CHUNK_ELEMENTS
    runs = [make_params(shapes=PIECE_SHAPES) for _ in range(3)]
    opts = [ours_cls(runs[0], **kwargs, foreach=False), ours_cls(runs[1], **kwargs, foreach=False),
            ref_cls(runs[2], **kwargs)]
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", PIECE_ELEMENTS)
    assert all(len(adamp.row_blocks(p.detach().view(p.size(0), -1))) > 1 for p in runs[0] if p.dim() > 1)
    assert len(base.chunk_views([runs[0][-1]])) == 7
    g_max = 0.0
    for s in range(steps):
        grads = gradients(runs[1], s, scale)
        g_max = max(g_max, max(g.abs().max().item() for g in grads))
        for params in runs:
            for p, g in zip(params, grads):
                p.grad = g.clone()
        for opt, chunk in zip(opts, (PIECE_ELEMENTS, default, default)):
            monkeypatch.setattr(base, "CHUNK_ELEMENTS", chunk)
            opt.step()
    return *runs, g_max


def check_pieces(pieces, whole, reference, steps, step):
    """Pieces against whole tensors: 1-D tensors (element-wise updates over flat pieces) bitwise; tested
    tensors, whose row statistics are float32 sums over row blocks, to the rounding of those sums; and
    both against the reference (:func:`drift_bound`).

    A tested tensor's update depends on the blocking only through the projection's statistics (pass 2 is
    element-wise given the per-row scale). Each is a sum of ``D`` products (a row of the ``(C, D)`` view;
    the layer view's totals add the same row sums in the same order), and float32 sums of ``D`` terms in
    two orders differ by at most ``2 D EPS32`` times the sum of the terms' magnitudes. So
    ``scale = w.u / (||w|| + eps)^2`` moves by at most ``4 D EPS32 ||u|| / ||w||`` and the radial part of
    the step, ``step_size w_i scale``, by at most ``4 D EPS32 sqrt(N) step`` (``step_size ||u|| <= sqrt(N)
    step``, ``N`` entries in the view, ``step`` bounding an unprojected step's entries); once the weights
    differ, each run rounds its own weights: :func:`drift_bound` per step on top."""
    for p, q in zip(pieces, whole):
        if p.dim() == 1:
            assert torch.equal(p, q)
    order = max(4 * p[0].numel() * p.numel() ** 0.5 for p in whole if p.dim() > 1) * EPS32 * step * steps
    check(max((p - q).abs().max().item() for p, q in zip(pieces, whole)), drift_bound(whole, steps) + order,
          "pieces vs whole")
    check(max((p - q).abs().max().item() for p, q in zip(pieces, reference)), drift_bound(reference, steps),
          "pieces vs torch-optimizer")


#: the configurations of the file's oracle tests, and a delta that projects every tested tensor's rows
#: (cos <= 1 < delta / sqrt(D)): the projection fires at each step, so a wrong row block of the scale fails
PIECE_ADAMP = [*ADAMP_CONFIGS, dict(weight_decay=0.1, delta=100.0, wd_ratio=0.5, lr=1e-2)]
PIECE_SGDP = [*SGDP_CONFIGS, dict(lr=0.02, momentum=0.9, weight_decay=1e-2, delta=100.0, wd_ratio=0.5)]


@pytest.mark.parametrize("kwargs", PIECE_ADAMP, ids=str)
def test_adamp_single_tensor_in_pieces(kwargs, monkeypatch):
    *runs, _ = run_in_pieces(AdamP, torch_optimizer.AdamP, kwargs, monkeypatch)
    # an Adam step with the default betas: |m| <= (1 - b1) sqrt(v) / sqrt((1 - b2) (1 - b1^2 / b2))
    # (Cauchy-Schwarz over the EMAs), so an entry moves by at most 7.3 lr (9.8 lr with Nesterov's
    # b1 m + (1 - b1) g) at any step
    check_pieces(*runs, steps=30, step=10 * kwargs.get("lr", 1e-3))


@pytest.mark.parametrize("kwargs", PIECE_SGDP, ids=str)
def test_sgdp_single_tensor_in_pieces(kwargs, monkeypatch):
    *runs, g_max = run_in_pieces(SGDP, torch_optimizer.SGDP, kwargs, monkeypatch, scale=0.1)
    # ||b|| <= sqrt(N) max |g| / (1 - momentum) (the projection only shortens it), as ||g + momentum b||
    check_pieces(*runs, steps=30, step=kwargs["lr"] * g_max / (1 - kwargs["momentum"]))
