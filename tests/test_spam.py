"""SPAM and Stable-SPAM against plain transliterations of the official code (no faithful peer package
exists: pytorch-optimizer's versions clip a copy of the gradient, see ALGORITHMS.md section 7).

The references below follow ``galore_torch/SPAM.py`` (TianjinYellow/SPAM-Optimizer @ e8185fbe695f) and
``galore_torch/stablespam.py`` (TianjinYellow/StableSPAM @ 6a66da1ea700) line by line, on clones of the
gradients (the official code clips ``p.grad`` in place). Runs cross at least two momentum resets and a
1000x gradient spike, so the reset and clipping branches are exercised, and the tests assert that they were.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from optimzoo.optim.spam import SPAM, StableSPAM, spam_warmup_scale
from _tolerance import assert_close, check, drift_bound

SHAPES = [(7, 5), (13,), (3, 4, 2), (1,)]


def official_cosine(base: float, t_max: int, eta_min: float, s: int) -> float:
    """``CosineAnnealingLR(T_max + 1, eta_min)`` stepped to epoch ``s`` (its closed form)."""
    return eta_min + (base - eta_min) * (1 + math.cos(math.pi * s / (t_max + 1))) / 2


class RefSPAM:
    """``SPAM.py``'s dense step, transliterated."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True,
                 warmup_steps=150, threshold=5000, DeltaT=500, grad_accu_steps=20):  # noqa: N803
        self.params, self.lr, self.betas, self.eps, self.wd = params, lr, betas, eps, weight_decay
        self.correct_bias, self.warmup_steps, self.thres = correct_bias, warmup_steps, threshold
        self.DeltaT, self.grad_accu_steps = DeltaT, grad_accu_steps
        self.state = {i: {} for i in range(len(params))}
        self.total_step, self.current_step = 0, warmup_steps + 1

    def get_dr(self, s):
        return 0.0 if s >= self.warmup_steps else official_cosine(0.99, self.warmup_steps, 0.0, s)

    def step(self, grads):
        scale_factor = 1 - self.get_dr(self.current_step)
        for i, (p, grad) in enumerate(zip(self.params, grads)):
            grad = grad.clone()
            state = self.state[i]
            state.setdefault("step", 0)
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(grad)
                state["exp_avg_sq"] = torch.zeros_like(grad)
            if (self.total_step + 1) % self.DeltaT == 0:
                state["exp_avg"] = torch.zeros_like(grad)
                state["exp_avg_sq"] = torch.zeros_like(grad)
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            beta1, beta2 = self.betas
            state["step"] += 1
            if self.thres != 0:
                current_step = self.total_step + 1
                if current_step >= self.grad_accu_steps:
                    mask = grad**2 > self.thres * exp_avg_sq
                    if self.DeltaT == 0 or current_step % self.DeltaT >= self.grad_accu_steps:
                        grad[mask] = grad[mask].sign() * torch.sqrt(exp_avg_sq[mask] * self.thres)
            exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            denom = exp_avg_sq.sqrt().add_(self.eps)
            step_size = self.lr
            if self.correct_bias:
                step_size *= math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
            p.add_(exp_avg / denom, alpha=-step_size * scale_factor)
            if self.wd > 0:
                p.add_(p, alpha=-self.lr * self.wd)
        self.total_step += 1
        self.current_step += 1
        if (self.total_step + 1) % self.DeltaT == 0:
            self.current_step = 0


class RefStableSPAM:
    """``stablespam.py``'s step, transliterated (amsgrad off), reset quirks included."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, gamma1=0.7, gamma2=0.9,
                 gamma3=0.999, total_T=None, eta_min=0.5, update_proj_gap=1000):  # noqa: N803
        self.params, self.lr, self.betas, self.eps, self.wd = params, lr, betas, eps, weight_decay
        self.gamma1 = betas[0] if gamma1 == -1 else gamma1
        self.gamma2, self.theta, self.total_T, self.eta_min = gamma2, gamma3, total_T, eta_min
        self.update_proj_gap = update_proj_gap
        self.state = {i: {} for i in range(len(params))}
        self.total_steps = 0

    def step(self, grads):
        self.total_steps += 1
        scale = 1.0 if self.total_T is None else official_cosine(1.0, self.total_T, self.eta_min, self.total_steps)
        for i, (p, grad) in enumerate(zip(self.params, grads)):
            p.mul_(1 - self.lr * self.wd)
            grad = grad.clone()
            state = self.state[i]
            if "exp_avg" not in state:
                state.update(step=0, exp_avg=torch.zeros_like(grad), exp_avg_sq=torch.zeros_like(grad),
                             m_norm_t=0, v_norm_t=0, m_max_t=0)
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            max_gradient = torch.max(grad.abs())
            state["step"] += 1
            m_max_t = self.theta * state["m_max_t"] + (1 - self.theta) * max_gradient
            m_max_hat = m_max_t / (1 - self.theta ** state["step"])
            mask = grad.abs() > m_max_hat
            if mask.sum() > 0:
                grad[mask] = grad[mask] / max_gradient * m_max_hat
            state["m_max_t"] = m_max_t
            grad_norm = torch.norm(grad)
            m_norm_t = self.gamma1 * scale * state["m_norm_t"] + (1 - self.gamma1 * scale) * grad_norm
            v_norm_t = self.gamma2 * state["v_norm_t"] + (1 - self.gamma2) * grad_norm**2
            m_norm_hat = m_norm_t / (1 - (self.gamma1 * scale) ** state["step"])
            v_norm_hat = v_norm_t / (1 - self.gamma2 ** state["step"])
            c_norm_t = m_norm_hat / (torch.sqrt(v_norm_hat) + self.eps)
            if grad_norm > 0:
                grad = grad / grad_norm * c_norm_t
            state["m_norm_t"], state["v_norm_t"] = m_norm_t, v_norm_t
            if self.update_proj_gap != 0 and self.total_steps % self.update_proj_gap == 0:
                state["exp_avg"] = torch.zeros_like(grad)
                state["exp_avg_sq"] = torch.zeros_like(grad)
                state["step"] = 1
            beta1, beta2 = self.betas
            beta1 = beta1 * scale
            bias_correction1 = 1 - beta1 ** state["step"]
            bias_correction2 = 1 - beta2 ** state["step"]
            exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(self.eps)
            p.addcdiv_(exp_avg, denom, value=-self.lr / bias_correction1)


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES]


def grad_stream(n_steps, spike_step, seed=1):
    """Smooth random gradients with a 1000x spike on a few entries of every tensor at ``spike_step``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(1, n_steps + 1):
        grads = [torch.randn(s, generator=g) * 0.1 for s in SHAPES]
        if k == spike_step:
            for gr in grads:
                gr.view(-1)[0] *= 1000.0
        out.append(grads)
    return out


def run_pair(zoo_cls, ref_cls, hparams, n_steps, spike_step, path, *, check_each_step=True, metrics_log=None):
    init = make_params()
    zoo_params = [torch.nn.Parameter(p.clone()) for p in init]
    ref_params = [p.clone() for p in init]
    flags = {"single": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[path]
    opt = zoo_cls(zoo_params, **hparams, **flags)
    ref = ref_cls(ref_params, **hparams)
    worst = 0.0
    for k, grads in enumerate(grad_stream(n_steps, spike_step), start=1):
        for p, g in zip(zoo_params, grads):
            p.grad = g.clone()
        opt.step()
        ref.step(grads)
        for p, g in zip(zoo_params, grads):
            assert torch.equal(p.grad, g), "the optimizer modified p.grad"
        if metrics_log is not None:
            metrics_log.append(opt.metrics())
        diff = max((p.detach() - r).abs().max().item() for p, r in zip(zoo_params, ref_params))
        worst = max(worst, diff)
        if check_each_step:
            check(diff, drift_bound(ref_params, k), f"step {k}: max |zoo - official|")
    return opt, worst


PATHS = pytest.mark.parametrize("path", ["single", "foreach", pytest.param("fused", marks=pytest.mark.slow)])


def reset_steps(log: list[dict]) -> list[int]:
    """The (1-based) steps whose metrics report a momentum reset."""
    return [k for k, m in enumerate(log, 1) if m["resets"]]


SPAM_CASES = {
    "wd0": dict(lr=1e-2, warmup_steps=8, threshold=50.0, DeltaT=20, grad_accu_steps=5),
    "wd": dict(lr=1e-2, weight_decay=0.1, warmup_steps=8, threshold=50.0, DeltaT=20, grad_accu_steps=5),
    "no_bias_correction": dict(lr=1e-2, correct_bias=False, warmup_steps=8, threshold=50.0, DeltaT=20,
                               grad_accu_steps=5),
}


@PATHS
@pytest.mark.parametrize("case", sorted(SPAM_CASES))
def test_spam_matches_official(case, path):
    log: list[dict] = []
    # 65 steps: resets at 20, 40, 60; the spike at 33 falls where clipping is on (33 % 20 >= 5)
    run_pair(SPAM, RefSPAM, SPAM_CASES[case], 65, spike_step=33, path=path, metrics_log=log)
    assert reset_steps(log) == [20, 40, 60]
    clipped = [k for k, m in enumerate(log, 1) if m.get("clip_fraction", 0) > 0]
    assert 33 in clipped, "the 1000x spike was not clipped"
    assert all(k >= 5 and k % 20 >= 5 for k in clipped), "clipping outside its window"


STABLE_CASES = {
    "defaults": dict(lr=1e-2, update_proj_gap=15),
    "schedule_wd": dict(lr=1e-2, weight_decay=0.1, gamma1=0.85, gamma2=0.99999, total_T=60, eta_min=0.5,
                        update_proj_gap=15),
    "gamma1_is_beta1": dict(lr=1e-2, betas=(0.8, 0.99), gamma1=-1, update_proj_gap=15),
}


@PATHS
@pytest.mark.parametrize("case", sorted(STABLE_CASES))
def test_stable_spam_matches_official(case, path):
    log: list[dict] = []
    # 50 steps: resets at 15, 30, 45; spike at 22
    run_pair(StableSPAM, RefStableSPAM, STABLE_CASES[case], 50, spike_step=22, path=path, metrics_log=log)
    assert reset_steps(log) == [15, 30, 45]
    assert log[21]["clip_fraction"] > 0, "the 1000x spike was not clipped"
    # AdaGN: the spike inflates v_norm, so the scale c falls over the following steps
    assert log[25]["adagn_scale"] < 0.75 * log[20]["adagn_scale"], "AdaGN did not damp after the spike"


def test_reset_fix_differs_and_gives_a_clean_first_step():
    """``reset_fix=True``: the reset step is a fresh Adam first step, ``-lr g/(|g| + eps)`` elementwise."""
    hp = dict(lr=1e-2, update_proj_gap=5, eps=1e-8)
    init = make_params()
    fixed_params = [torch.nn.Parameter(p.clone()) for p in init]
    fixed = StableSPAM(fixed_params, reset_fix=True, **hp)
    official_params = [torch.nn.Parameter(p.clone()) for p in init]
    official = StableSPAM(official_params, **hp)
    for k, grads in enumerate(grad_stream(6, spike_step=0), start=1):
        before = [p.detach().clone() for p in fixed_params]
        for ps, opt in ((fixed_params, fixed), (official_params, official)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
        if k == 5:
            for b, p in zip(before, fixed_params):
                delta = p.detach() - b
                # the AdaGN-scaled gradient has the sign of g; a clean first step moves by ~lr against it
                assert_close(delta.abs(), torch.full_like(delta, 1e-2), atol=1e-7, rtol=1e-5)
                assert torch.all(delta * p.grad < 0)
    assert max((a - b).abs().max().item() for a, b in zip(fixed_params, official_params)) > 1e-4
    assert "norm_step" in fixed.state[fixed_params[0]] and float(fixed.state[fixed_params[0]]["step"]) == 2


def test_first_steps_closed_form():
    """ALGORITHMS.md closed-form first steps: both move every entry by ``lr g/(|g| + eps')`` at step 1."""
    torch.manual_seed(0)
    g = torch.randn(6, 4)
    lr, b1, b2 = 1e-3, 0.9, 0.999
    p = torch.nn.Parameter(torch.zeros(6, 4))
    p.grad = g.clone()
    SPAM([p], lr=lr).step()
    expected = -lr * math.sqrt(1 - b2) / (1 - b1) * (1 - b1) * g / (math.sqrt(1 - b2) * g.abs() + 1e-6)
    assert_close(p.detach(), expected, rtol=1e-5, atol=1e-9)

    q = torch.nn.Parameter(torch.zeros(6, 4))
    q.grad = g.clone()
    StableSPAM([q], lr=lr).step()
    n = g.norm()
    gs = g / n * (n / (n + 1e-8))  # AdaGN at step 1: c = ||g|| / (||g|| + eps)
    expected = -lr / (1 - b1) * (1 - b1) * gs / ((1 - b2) ** 0.5 * gs.abs() / (1 - b2) ** 0.5 + 1e-8)
    assert_close(q.detach(), expected, rtol=1e-5, atol=1e-9)


def test_warmup_scale_after_reset():
    assert spam_warmup_scale(0, 150) == pytest.approx(0.01)
    assert spam_warmup_scale(150, 150) == 1.0
    assert 0.01 < spam_warmup_scale(75, 150) < 1.0
    assert spam_warmup_scale(151, 150) == 1.0  # the initial current_step: no warm-up before the first reset


@pytest.mark.parametrize("cls,hp", [(SPAM, SPAM_CASES["wd"]), (StableSPAM, STABLE_CASES["schedule_wd"])])
def test_state_dict_resume_crosses_resets_identically(cls, hp):
    """Stop at step 12, reload into a fresh optimizer: the global counters (group dict) survive, so the
    resets and warm-up land on the same steps as an uninterrupted run."""
    grads = grad_stream(40, spike_step=25)

    def run(params, opt, steps):
        for gs in steps:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()

    a = [torch.nn.Parameter(p) for p in make_params()]
    opt_a = cls(a, **hp)
    run(a, opt_a, grads)

    b = [torch.nn.Parameter(p) for p in make_params()]
    opt_b = cls(b, **hp)
    run(b, opt_b, grads[:12])
    saved = copy.deepcopy(opt_b.state_dict())
    c = [torch.nn.Parameter(p.detach().clone()) for p in b]
    opt_c = cls(c, **hp)
    opt_c.load_state_dict(saved)
    run(c, opt_c, grads[12:])
    for x, y in zip(a, c):
        assert torch.equal(x, y)


def test_zero_threshold_and_zero_delta_t_disable_clipping_and_resets():
    log: list[dict] = []
    hp = dict(lr=1e-2, threshold=0.0, DeltaT=0, grad_accu_steps=1)
    p = [torch.nn.Parameter(x) for x in make_params()]
    opt = SPAM(p, **hp)
    for gs in grad_stream(30, spike_step=10):
        for x, g in zip(p, gs):
            x.grad = g.clone()
        opt.step()
        log.append(opt.metrics())
    assert all(m["resets"] == 0 and m.get("clip_fraction", 0.0) == 0.0 for m in log)
