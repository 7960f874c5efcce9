"""Non-finite gradients: no optimizer hides them, every zoo optimizer counts them.

The policy (README, "Non-finite gradients"): an optimizer never masks a NaN/Inf gradient entry. It
propagates into the weights (element-wise optimizers: that entry and its state; matrix optimizers and
Stable-SPAM's whole-tensor statistics: the whole tensor), so a broken run shows, and every zoo
optimizer reports the number of non-finite gradient entries it was given as
``metrics()["nonfinite_grads"]`` (counted on the device, no host sync in ``step()``). Skipping such a
step is the Trainer's job (``optimzoo.hf``).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import optimzoo
from optimzoo.testing import TinyLM, tiny_batch

NAMES = optimzoo.list_optimizers().names()
ZOO = optimzoo.list_optimizers(baselines=False).names()


def poisoned_step(name: str):
    """One step of ``name`` on TinyLM with one NaN in a hidden weight's gradient and one Inf in the
    embedding's; returns the model, the optimizer and the two poisoned tensors."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = optimzoo.create_optimizer(model, name)
    model.loss(tiny_batch(0)).backward()
    w, e = model.layers[0].q_proj.weight, model.embed_tokens.weight
    w.grad[1, 2] = float("nan")
    e.grad[3, 4] = float("inf")
    opt.step()
    return model, opt, w, e


@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_gradients_show_in_the_weights(name):
    model, _, w, e = poisoned_step(name)
    assert not torch.isfinite(w[1, 2]), "a NaN gradient entry was masked: the weight looks healthy"
    assert not torch.isfinite(e[3, 4]), "an Inf gradient entry was masked: the weight looks healthy"
    healthy = [p for p in model.parameters() if p is not w and p is not e]
    assert all(torch.isfinite(p).all() for p in healthy), "a non-finite entry leaked into another tensor"


@pytest.mark.parametrize("name", ZOO)
def test_nonfinite_gradients_are_counted(name):
    _, opt, _, _ = poisoned_step(name)
    assert opt.metrics()["nonfinite_grads"] == 2.0
    assert opt.metrics()["nonfinite_grads"] == 0.0  # reset on read


def test_the_count_is_exact_and_kept_on_the_device_between_reads():
    p = torch.nn.Parameter(torch.zeros(40, 30))
    opt = optimzoo.create_optimizer([("layer.weight", p)], "lion", lr=1e-3)
    for k in range(3):
        g = torch.randn(40, 30)
        g.view(-1)[: k + 1] = float("nan")
        g[-1, -1] = float("-inf")
        p.grad = g
        opt.step()
    assert isinstance(opt._nonfinite, torch.Tensor)  # a running tensor, read only by metrics()
    assert opt.metrics()["nonfinite_grads"] == (1 + 2 + 3) + 3


def test_counting_does_not_synchronize_on_cpu_or_touch_finite_steps():
    """A finite step adds no counter at all (the flag pass found nothing)."""
    model = TinyLM()
    opt = optimzoo.create_optimizer(model, "normuon")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.loss(tiny_batch(1)).backward()
        opt.step()
    assert "_nonfinite" not in opt.__dict__ and opt.metrics()["nonfinite_grads"] == 0.0


def test_the_count_survives_torch_compile():
    """Dynamo drops attribute writes on the optimizer made inside a compiled step: the counter runs
    outside the graph (torch.compiler.disable), so a compiled step counts like an eager one."""
    torch._dynamo.reset()
    p = torch.nn.Parameter(torch.zeros(8, 4))
    opt = optimzoo.create_optimizer([("layer.weight", p)], "lion", lr=1e-3)
    g = torch.randn(8, 4)
    g[2, 3] = float("nan")
    p.grad = g
    torch.compile(opt.step)()
    assert opt.metrics()["nonfinite_grads"] == 1.0
    torch._dynamo.reset()


def test_counting_can_be_switched_off():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    opt = optimzoo.create_optimizer([("layer.weight", p)], "lion", lr=1e-3)
    opt.count_nonfinite = False
    p.grad = torch.full((4, 4), float("nan"))
    opt.step()
    assert opt.metrics()["nonfinite_grads"] == 0.0 and torch.isnan(p).all()  # not counted, still not masked
