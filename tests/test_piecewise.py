"""The eager (single-tensor) and foreach paths of the element-wise optimizers run over cache-sized pieces
of each tensor (``optimzoo.optim._base.chunk_views``, ``foreach_chunks``), so that a step's temporaries
are piece-sized. Cut into
pieces of a few elements (ragged: 37 does not divide the sizes), an element-wise update must give the
same bits as one call on the whole tensor; Stable-SPAM, whose norm is summed piece by piece, the same
numbers to the rounding of that sum; and both the official code's (tests/test_spam.py)."""

from __future__ import annotations

import pytest
import torch

import optimzoo
from optimzoo.optim import _base
from _tolerance import EPS32, check

SHAPES = [(64, 50), (300,), (7, 5), (1,)]
STEPS = 4

#: (registry name, hyperparameters): every element-wise update whose eager path is piecewise
CASES = {
    "lion": ("lion", dict(lr=1e-3, weight_decay=0.1)),
    "lion_k[tanh]": ("lion_k", dict(lr=1e-3, kappa="tanh", a=3.0)),
    "lion_k[huber]": ("lion_k", dict(lr=1e-3, kappa="huber", a=0.5)),
    "lion_k[relativistic]": ("lion_k", dict(lr=1e-3, kappa="relativistic", a=0.5)),
    "diffgrad[wd]": ("diffgrad", dict(lr=1e-2, weight_decay=0.1)),
    "spam[clip]": ("spam", dict(lr=1e-2, threshold=2.0, grad_accu_steps=1, DeltaT=3, warmup_steps=2)),
}


def run(name: str, hp: dict, chunk: int | None, monkeypatch, foreach: bool = False) -> tuple[list[torch.Tensor], list[dict], list[dict]]:
    if chunk is not None:
        monkeypatch.setattr(_base, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    opt = optimzoo.create_optimizer(params, name, foreach=foreach, **hp)
    log = []
    for k in range(STEPS):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * (100.0 if k == 2 else 1.0)  # a spike at step 3
        opt.step()
        log.append(opt.metrics())
    monkeypatch.undo()
    return [p.detach().clone() for p in params], [dict(opt.state[p]) for p in params], log


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_elementwise_pieces_are_bitwise_whole(case, foreach, monkeypatch):
    name, hp = CASES[case]
    whole = run(name, hp, None, monkeypatch, foreach)
    pieces = run(name, hp, 37, monkeypatch, foreach)
    for a, b in zip(whole[0], pieces[0]):
        assert torch.equal(a, b)
    for sa, sb in zip(whole[1], pieces[1]):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert whole[2] == pieces[2]  # counters (SPAM's clip fraction) add up over the pieces
    if name == "spam":
        assert any(m.get("clip_fraction", 0) > 0 for m in pieces[2]), "the spike was not clipped: nothing tested"


@pytest.mark.parametrize("foreach", [False, True])
def test_stable_spam_pieces(foreach, monkeypatch):
    hp = dict(lr=1e-2, update_proj_gap=3)
    whole = run("stable_spam", hp, None, monkeypatch, foreach)
    pieces = run("stable_spam", hp, 37, monkeypatch, foreach)
    # the clipped gradient's norm is summed in pieces: float32 sums of n terms in another order differ by
    # at most ~n eps relative; through the AdaGN scale c = m_n / sqrt(v_n) (relative error ~2 of the norm's)
    # and Adam's m / sqrt(v) (scale-invariant apart from eps) each step moves by ~lr, so the weights
    # differ by at most lr * 4 n eps per step
    n = max(torch.Size(s).numel() for s in SHAPES)
    bound = hp["lr"] * 4 * n * EPS32 * STEPS
    check(max((a - b).abs().max().item() for a, b in zip(whole[0], pieces[0])), bound, "pieces vs whole")
    assert [m["clip_fraction"] for m in whole[2]] == [m["clip_fraction"] for m in pieces[2]]
    assert whole[2][2]["clip_fraction"] > 0, "the spike was not clipped: nothing tested"
