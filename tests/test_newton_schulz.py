"""Newton-Schulz cost and accuracy: the ``ns_dtype="auto"`` rule, coefficient schedules, and the memory
budget of batched matrix transforms.

* ``ns_dtype="auto"`` by capability: the decision for every combination of the CPU probes;
  bf16 iterations against float32 and the SVD polar factor.
* ``ns_coefficients``: Keller Jordan's fixed quintic and the Polar Express schedule (modded-nanogpt's
  ``train_gpt.py``), per iteration against the scalar polynomial map and the SVD polar factor; how a
  list sets the number of iterations; the optimizers that take it.
* ``batch_budget``: chunks that fit, identical updates whatever the chunking, and the measured
  transient memory of a step within the budget.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import optimzoo
from optimzoo.ops.orthogonalize import (MUON_COEFFICIENTS, NS_COEFFICIENTS, POLAR_EXPRESS_COEFFICIENTS,
                                        newton_schulz, newton_schulz_bytes, ns_compute_dtype, ns_schedule)
from optimzoo.optim._matrix import MIN_DEFAULT_BUDGET
from optimzoo.optim.auon import HybridAuON
from optimzoo.optim.muon import Muon, NorMuon
from _tolerance import EPS32, EPS_BF16, bf16_bound, check, drift_bound, weight_ulps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_step import step_transient_bytes  # noqa: E402  (the benchmark's own measurement)

pytestmark = pytest.mark.filterwarnings("ignore:.*unnamed tensor:UserWarning")

MATRIX_OPTIMIZERS = ["muon", "normuon", "auon", "hybrid_auon", "swan", "sinkgd"]
# modded-nanogpt train_gpt.py (KellerJordan/modded-nanogpt @ 93f0e6b9373b), as printed there
POLAR_EXPRESS_SOURCE = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def conditioned(m: int, n: int, cond: float, seed: int = 0) -> torch.Tensor:
    """A float32 ``m x n`` matrix with singular values log-spaced in ``[1/cond, 1]``."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return ((U * torch.logspace(0, -math.log10(cond), k, dtype=torch.float64)) @ V.T).float()


def svd_polar(G: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ Vh


# --------------------------------------------------------------------------------------------
# ns_dtype="auto"
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("avx512_bf16,amx", [(False, False), (True, False), (False, True), (True, True)])
def test_auto_dtype_follows_the_cpu_capability(monkeypatch, avx512_bf16, amx):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    expected = torch.bfloat16 if (avx512_bf16 or amx) else torch.float32
    assert ns_compute_dtype("auto", torch.device("cpu")) == expected
    assert ns_compute_dtype("auto", "cpu") == expected
    # accelerators: bf16 whatever the host CPU; explicit choices are used as given
    assert ns_compute_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert ns_compute_dtype("float32", "cpu") == torch.float32
    assert ns_compute_dtype("bfloat16", "cpu") == torch.bfloat16
    assert ns_compute_dtype("float32", "cuda") == torch.float32


def test_auto_dtype_reaches_the_optimizers(monkeypatch):
    """Muon's ``ns_dtype="auto"`` step runs the iteration in the dtype the rule picks."""
    seen = []
    import optimzoo.optim.muon as muon_module

    real = muon_module.newton_schulz
    monkeypatch.setattr(muon_module, "newton_schulz", lambda *a, **kw: seen.append(kw["dtype"]) or real(*a, **kw))
    for native in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        p = torch.nn.Parameter(torch.randn(8, 12))
        p.grad = torch.randn(8, 12)
        Muon([p]).step()
    assert seen == [torch.float32, torch.bfloat16]


# Tolerance of bf16 against float32 iterations. Each iteration rounds three results to bf16 (A = X X^T,
# B = b A + c A A, the new X; products accumulate in float32), each by at most half a bf16 ulp
# (EPS_BF16 / 2) relative. An error along a singular direction whose value is in the band around 1 is
# damped by later iterations (the polynomials flatten there); one along a direction whose value is
# still small grows like the value itself (slope ~ a), so it stays the same fraction of that
# component. When the small singular values hold little of the matrix (condition number <= 100 here),
# the errors of the ``steps`` iterations add up:
#   ||O_bf16 - O_fp32||_F / ||O_fp32||_F <= steps * 3 * EPS_BF16 / 2.
# With many tiny singular values (cond 1000: measured 0.075-0.10 against a bound of 0.059) the error
# lives in directions that are far from converged anyway, so the *distance to the polar factor*
# changes much less; that is bounded by the same figure for every conditioning.
def bf16_relative_bound(steps: int) -> float:
    return steps * 3 * EPS_BF16 / 2


@pytest.mark.parametrize("coefficients", list(NS_COEFFICIENTS))
@pytest.mark.parametrize("shape,cond", [((64, 128), 10.0), ((128, 64), 10.0), ((96, 96), 100.0),
                                        ((128, 344), 1000.0)], ids=str)
def test_bf16_iteration_against_float32_and_the_svd_polar_factor(coefficients, shape, cond):
    G = conditioned(*shape, cond=cond, seed=1)
    steps = len(ns_schedule(coefficients))
    O32 = newton_schulz(G, None, coefficients, dtype=torch.float32).double()
    O16 = newton_schulz(G, None, coefficients, dtype=torch.bfloat16)
    assert O16.dtype == torch.bfloat16
    O16 = O16.double()
    bound = bf16_relative_bound(steps)
    if cond <= 100:
        check(float((O16 - O32).norm() / O32.norm()), bound, "||O_bf16 - O_fp32|| / ||O_fp32||")
    # so bf16 is as close to the polar factor as float32, up to the same bound
    P = svd_polar(G)
    d32, d16 = float((O32 - P).norm() / P.norm()), float((O16 - P).norm() / P.norm())
    check(d16 - d32, bound * float(O32.norm() / P.norm()), "bf16 distance to U V^T - float32 distance")


# --------------------------------------------------------------------------------------------
# ns_coefficients
# --------------------------------------------------------------------------------------------


def test_schedules_by_name_triple_and_list():
    assert ns_schedule("muon") == [MUON_COEFFICIENTS] * 5
    assert ns_schedule("muon", 3) == [MUON_COEFFICIENTS] * 3
    assert ns_schedule(MUON_COEFFICIENTS, None, default_steps=1) == [MUON_COEFFICIENTS]
    assert ns_schedule([3.0, -3.0, 1.0], 2) == [(3.0, -3.0, 1.0)] * 2  # a list of three numbers is one triple
    assert ns_schedule("polar_express") == list(POLAR_EXPRESS_COEFFICIENTS)
    assert ns_schedule(POLAR_EXPRESS_SOURCE[:3]) == POLAR_EXPRESS_SOURCE[:3]  # a list sets the iterations
    assert ns_schedule(POLAR_EXPRESS_SOURCE[:3], 3) == POLAR_EXPRESS_SOURCE[:3]
    # the source's 1.02 normalization is folded into the first triple, the rest are the source's
    a, b, c = POLAR_EXPRESS_SOURCE[0]
    s = 1.02
    assert POLAR_EXPRESS_COEFFICIENTS[0] == pytest.approx((a / s, b / s**3, c / s**5), rel=4 * EPS32)
    assert list(POLAR_EXPRESS_COEFFICIENTS[1:]) == POLAR_EXPRESS_SOURCE[1:]


@pytest.mark.parametrize("coefficients,steps,match", [
    ("quintic", None, "ns_coefficients.*'muon', 'polar_express'"),
    ((1.0, 2.0), None, "ns_coefficients"),
    ((1.0, float("nan"), 2.0), None, "finite"),
    ([], None, "ns_coefficients"),
    ([(1.0, 2.0, 3.0), (1.0, 2.0)], None, "ns_coefficients"),
    (("a", "b", "c"), None, "ns_coefficients"),
    ((True, 1.0, 1.0), None, "ns_coefficients"),
    ("polar_express", 4, "ns_steps=4 does not match.*5 triples"),
    (MUON_COEFFICIENTS, -1, "ns_steps"),
    (MUON_COEFFICIENTS, 2.5, "ns_steps"),
])
def test_bad_schedules_name_the_argument(coefficients, steps, match):
    with pytest.raises(ValueError, match=match):
        ns_schedule(coefficients, steps)


def modded_nanogpt_polar_express(G: torch.Tensor) -> torch.Tensor:
    """modded-nanogpt's ``polar_express`` in float64 (its arithmetic, written out here): wide
    orientation, ``X / (1.02 ||X||_F + 1e-6)``, then the source's five quintics."""
    X = G.double()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    for a, b, c in POLAR_EXPRESS_SOURCE:
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


@pytest.mark.parametrize("shape", [(48, 80), (80, 48), (3, 40, 40)], ids=str)
def test_polar_express_matches_modded_nanogpt(shape):
    # ||G||_F ~ 1e4, so the two eps (1e-6 after the 1.02 there, 0 here) differ by ~1e-10 relative
    G = 1e4 * torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) / math.sqrt(
        shape[-1])
    ours = newton_schulz(G, None, "polar_express", eps=0.0, dtype=None)
    ref = modded_nanogpt_polar_express(G)
    # float64 rounding (2**-52 a step) times the schedule's largest slope (< 8.2 / 1.02) per later step,
    # plus the eps difference, each amplified the same way
    amplification = sum(8.2**j for j in range(6))
    tol = (2**-52 * 16 + 1e-6 / float(G.norm(dim=(-2, -1)).min())) * amplification
    check(float((ours - ref).abs().max()), tol)


def propagated_bound(schedule, x0: torch.Tensor, ulps: float = 4.0) -> list[float]:
    """First-order float32 error bound of each iterate of the scalar map, on the singular values ``x0``:
    an error made at iteration ``j`` (``ulps`` float32 ulps of the largest value, from the matmuls'
    rounding) is multiplied by ``max |p_i'|`` over the iterates at every later iteration ``i``."""
    x, slopes, scale, bounds = x0.double(), [], [], []
    for a, b, c in schedule:
        slopes.append(float((a + 3 * b * x**2 + 5 * c * x**4).abs().max()))
        x = a * x + b * x**3 + c * x**5
        scale.append(float(x.abs().max()))
        k = len(slopes)
        bounds.append(sum(ulps * EPS32 * max(scale[j], 1.0) * math.prod(slopes[j + 1:k]) for j in range(k)))
    return bounds


@pytest.mark.parametrize("coefficients", list(NS_COEFFICIENTS))
@pytest.mark.parametrize("shape,cond", [((64, 160), 30.0), ((160, 64), 300.0)], ids=str)
def test_accuracy_per_iteration_against_the_svd_polar_factor(coefficients, shape, cond):
    """After every iteration, the singular values are the scalar polynomials' image of the normalized
    ones (within the propagated float32 rounding), the singular vectors stay those of ``G`` (distance to
    ``U V^T`` is then the RMS of ``|s - 1|``), and orthogonality ``||O^T O - I||`` follows."""
    G = conditioned(*shape, cond=cond, seed=3)
    schedule = ns_schedule(coefficients)
    sigma = torch.linalg.svdvals(G.double())
    x = sigma / sigma.square().sum().sqrt()
    bounds = propagated_bound(schedule, x)
    P = svd_polar(G)
    k_short = min(shape)
    for k, (a, b, c) in enumerate(schedule, start=1):
        x = a * x + b * x**3 + c * x**5
        O = newton_schulz(G, k, schedule[:k], dtype=torch.float32).double()
        s = torch.linalg.svdvals(O)
        check(float((s - x.sort(descending=True).values).abs().max()), bounds[k - 1], f"singular values, iteration {k}")
        # with G's singular vectors, ||O - U V^T||_F^2 = sum (s_i - 1)^2 and ||O^T O - I||_F^2 = sum (s_i^2 - 1)^2
        dist = float((O - P).norm())
        check(abs(dist - float((x - 1).norm())), 4 * math.sqrt(k_short) * bounds[k - 1] + 1e-6 * dist,
              f"distance to U V^T, iteration {k}")
        gram = O.mT @ O if shape[0] >= shape[1] else O @ O.mT
        orth = float((gram - torch.eye(k_short, dtype=gram.dtype)).norm())
        check(abs(orth - float((x**2 - 1).norm())), 4 * math.sqrt(k_short) * bounds[k - 1] * (2 + float(x.max())),
              f"orthogonality, iteration {k}")


def test_polar_express_ends_closer_to_the_polar_factor():
    """What the schedule is for: after its 5 iterations the singular values are in a narrower band than
    after the default's 5 (scalar maps on [1e-3, 1]: [0.85, 1.14] vs [0.47, 1.20])."""
    G = conditioned(96, 256, cond=100.0, seed=4)
    P = svd_polar(G)
    dist = {name: float((newton_schulz(G, None, name, dtype=torch.float32).double() - P).norm())
            for name in NS_COEFFICIENTS}
    assert dist["polar_express"] < 0.6 * dist["muon"], dist


def test_a_list_sets_the_number_of_iterations():
    G = torch.randn(24, 40, generator=torch.Generator().manual_seed(5))
    three = POLAR_EXPRESS_SOURCE[:3]
    assert torch.equal(newton_schulz(G, None, three, dtype=torch.float32),
                       newton_schulz(G, 3, three, dtype=torch.float32))
    assert not torch.equal(newton_schulz(G, None, three, dtype=torch.float32),
                           newton_schulz(G, None, POLAR_EXPRESS_SOURCE[:2], dtype=torch.float32))
    p = torch.nn.Parameter(torch.randn(24, 40))
    for cls, default in ((Muon, 5), (NorMuon, 5), (HybridAuON, 1)):
        assert cls([p]).param_groups[0]["ns_steps"] == default
        assert cls([p], ns_coefficients=three).param_groups[0]["ns_steps"] == 3
        assert cls([p], ns_coefficients="polar_express").param_groups[0]["ns_steps"] == 5
        assert cls([p], ns_coefficients=MUON_COEFFICIENTS, ns_steps=2).param_groups[0]["ns_steps"] == 2
        with pytest.raises(ValueError, match="ns_steps=4 does not match"):
            cls([p], ns_coefficients="polar_express", ns_steps=4)
        with pytest.raises(ValueError, match="ns_coefficients"):
            cls([p], ns_coefficients="fast")


@pytest.mark.parametrize("name", ["muon", "normuon", "hybrid_auon"])
def test_optimizers_run_the_schedule(name, monkeypatch):
    """The transform runs Newton-Schulz with the group's schedule (NorMuon and Hybrid-AuON then
    normalize its output; their own tests check that part); for Muon one step from zero momentum is
    ``W - lr O`` with ``O`` that iteration's output."""
    import optimzoo.optim.muon as muon_module

    calls = []
    real = muon_module.newton_schulz

    def spy(U, steps, coefficients, **kw):
        out = real(U, steps, coefficients, **kw)
        calls.append((U.clone(), ns_schedule(coefficients, steps), out))
        return out

    monkeypatch.setattr(muon_module, "newton_schulz", spy)
    torch.manual_seed(6)
    w0 = torch.randn(24, 40)
    p = torch.nn.Parameter(w0.clone())
    p.grad = torch.randn(24, 40)
    opt = optimzoo.get_optimizer(name)([p], lr=0.1, ns_coefficients="polar_express", ns_dtype="float32")
    opt.step()
    (U, schedule, O), = calls
    assert schedule == list(POLAR_EXPRESS_COEFFICIENTS)
    assert torch.equal(O, newton_schulz(U, None, "polar_express", dtype=torch.float32))
    if name == "muon":  # s = sqrt(max(1, 24/40)) = 1
        check(float((p.detach() - (w0 - 0.1 * O[0])).abs().max()), weight_ulps(w0))


# --------------------------------------------------------------------------------------------
# batch_budget
# --------------------------------------------------------------------------------------------


def matrices(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def test_chunks_fit_the_budget_and_are_balanced():
    ps = matrices([(32, 48)] * 16 + [(48, 32)] * 3 + [(32, 48)])
    grads = [torch.zeros_like(p) for p in ps]
    opt = Muon(ps)
    group = opt.param_groups[0]
    per = opt._chunk_bytes(group, 32, 48, 4)
    assert per == 2 * 32 * 48 * 4 + newton_schulz_bytes(32, 48)
    for fit in (1, 3, 5, 17, 100):
        group["batch_budget"] = fit * per + per // 2
        chunks = opt._chunks(group, ps, grads)
        assert sorted(i for c in chunks for i in c) == list(range(20))
        wide = [c for c in chunks if ps[c[0]].shape == (32, 48)]
        assert all(len(c) <= fit for c in chunks)
        assert len(wide) == -(-17 // fit)  # the fewest chunks that fit
        assert max(map(len, wide)) - min(map(len, wide)) <= 1  # as equal as possible
    group["batch_budget"] = 1  # less than one matrix: one matrix per chunk
    assert all(len(c) == 1 for c in opt._chunks(group, ps, grads))
    # default: 4 float32 copies of the largest parameter, at least MIN_DEFAULT_BUDGET
    group["batch_budget"] = None
    assert max(map(len, opt._chunks(group, ps, grads))) == 17  # 20 small matrices: far below 256 MiB
    # shapes only matter here: meta tensors
    big = [torch.nn.Parameter(torch.empty(1024, 1024, device="meta")) for _ in range(20)]
    opt = Muon(big)
    per = opt._chunk_bytes(opt.param_groups[0], 1024, 1024, 4)
    assert per == 7 * 1024 * 1024 * 4 and MIN_DEFAULT_BUDGET // per == 9  # 4 MB matrices: 9 under the floor
    assert [len(c) for c in opt._chunks(opt.param_groups[0], big, big)] == [7, 7, 6]
    opt.add_param_group({"params": [torch.nn.Parameter(torch.empty(32000, 512, device="meta"))], "role": "vector"})
    assert 4 * 4 * 32000 * 512 // per == 8  # a 65 MB embedding: 4x it is 262 MB, still 9 under the floor
    assert [len(c) for c in opt._chunks(opt.param_groups[0], big, big)] == [7, 7, 6]
    opt.add_param_group({"params": [torch.nn.Parameter(torch.empty(32000, 2048, device="meta"))], "role": "vector"})
    assert 4 * 4 * 32000 * 2048 // per == 35  # a 262 MB embedding (LLaMA-1B): 4x it fits all 20
    assert [len(c) for c in opt._chunks(opt.param_groups[0], big, big)] == [20]


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_bad_batch_budget_names_the_argument(bad):
    with pytest.raises(ValueError, match="batch_budget"):
        Muon(matrices([(4, 4)]), batch_budget=bad)


@pytest.mark.parametrize("name", MATRIX_OPTIMIZERS)
def test_chunked_equals_unchunked(name):
    """The same updates whatever the chunking: each matrix of a batched matmul is computed on its own.
    Bit-exact on the kernels seen here; the bound allows a batched kernel that orders a reduction
    differently for another batch size (a few float32 ulps of the weights per step)."""
    shapes = [(24, 40)] * 7 + [(40, 24)] * 3 + [(16, 16)] * 2
    runs = []
    for budget in (1, 2.0**62):  # one matrix per chunk; one chunk per shape
        ps = matrices(shapes)
        hp = {"ns_dtype": "float32"} if name in ("muon", "normuon", "hybrid_auon") else {}
        opt = optimzoo.get_optimizer(name)([{"params": ps, "role": "matrix"}], batch_budget=budget, **hp)
        for step in range(3):
            for i, p in enumerate(ps):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))
            opt.step()
        runs.append([p.detach() for p in ps])
    check(max(float((a - b).abs().max()) for a, b in zip(*runs)), drift_bound(runs[0], 3))


def test_bf16_chunked_equals_unchunked():
    shapes = [(24, 40)] * 6
    runs = []
    for budget in (1, 2.0**62):
        ps = matrices(shapes)
        w0 = [p.detach().clone() for p in ps]
        opt = NorMuon(ps, lr=0.02, ns_dtype="bfloat16", batch_budget=budget)
        for step in range(3):
            for i, p in enumerate(ps):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))
            opt.step()
        runs.append([p.detach() for p in ps])
    moved = max(float((a - b).abs().max()) for a, b in zip(runs[0], w0))
    check(max(float((a - b).abs().max()) for a, b in zip(*runs)), bf16_bound(moved))


@pytest.mark.parametrize("name", ["muon", "normuon", "swan"])
def test_step_transient_stays_within_the_budget(name):
    """The measured peak of a step (the benchmark's allocation-event count) is within the budget when
    it binds, and several times larger without it, so the budget is what bounds it."""
    shapes = [(96, 160)] * 12
    hp = {"ns_dtype": "float32"} if name != "swan" else {}
    probe = optimzoo.get_optimizer(name)(matrices(shapes[:1]), **hp)
    per = probe._chunk_bytes(probe.param_groups[0], 96, 160, 4)
    measured = {}
    for budget in (3 * per, 2.0**62):
        ps = matrices(shapes)
        for p in ps:
            p.grad = torch.randn_like(p)
        opt = optimzoo.get_optimizer(name)([{"params": ps, "role": "matrix"}], batch_budget=budget, **hp)
        opt.step()  # state exists
        measured[budget] = step_transient_bytes(opt.step, "cpu")
    small = 64 * 1024  # per-chunk scalars and row-state stacks, far below one matrix (61 kB here)
    check(measured[3 * per], 3 * per + small, "transient with the budget")
    assert measured[2.0**62] > 3 * measured[3 * per], measured
