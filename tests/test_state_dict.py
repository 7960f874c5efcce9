"""``load_state_dict`` takes only state its own optimizer wrote, and matches it to parameters by name.

Every zoo optimizer records its registry name in ``state_dict()["optimizer_name"]`` and refuses a
state dict recorded by another one; a state dict without a record (torch.optim, another package, this
package before the record existed) is recognized by its param-group and per-parameter state keys.
Where both sides have parameter names (``param_names``, or the FQN keys of
``torch.distributed.checkpoint``), state follows the names, not the positions.
"""

from __future__ import annotations

import copy

import pytest
import torch

import optimzoo
from optimzoo.optim.lion import Lion
from optimzoo.optim.muon import NorMuon
from optimzoo.testing import TinyLM, tiny_batch

RECORD = "optimizer_name"


def stepped(name: str, model: torch.nn.Module | None = None, steps: int = 2, **hp):
    torch.manual_seed(0)
    model = model if model is not None else TinyLM()
    opt = optimzoo.create_optimizer(model, name, **hp)
    train(model, opt, steps)
    return model, opt


def train(model, opt, steps: int, seed: int = 0) -> None:
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        model.loss(tiny_batch(seed + i)).backward()
        opt.step()


def unrecorded(sd: dict) -> dict:
    """``sd`` as this package wrote it before the record (and as torch.optim or another package does)."""
    assert sd[RECORD]  # the current version writes the record
    return {k: v for k, v in sd.items() if k != RECORD}


def fresh(name: str, **hp):
    torch.manual_seed(1)
    model = TinyLM()
    return model, optimzoo.create_optimizer(model, name, **hp)


def by_name(model, opt, key: str) -> dict[str, torch.Tensor]:
    return {n: opt.state[p][key].clone() for n, p in model.named_parameters() if key in opt.state[p]}


# ------------------------------------------------------------------------------------ the record


def test_classes_built_directly_know_their_registry_name():
    model = TinyLM()
    assert NorMuon(model.named_parameters()).optimizer_name == "normuon"
    assert NorMuon.optimizer_name == "normuon"
    assert Lion(model.parameters()).state_dict()[RECORD] == "lion"
    assert optimzoo.create_optimizer(model, "lion_kappa").state_dict()[RECORD] == "lion_k"  # alias -> name


def test_adamw_state_is_refused_by_normuon():
    """create_optimizer's "adamw" is torch.optim.AdamW (no record): refused by its keys, named."""
    _, adamw = stepped("adamw")
    _, normuon = fresh("normuon")
    with pytest.raises(ValueError, match="written by another optimizer .*'adamw'.*cannot be loaded into 'normuon'"):
        normuon.load_state_dict(adamw.state_dict())
    # the same state recorded as adamw's (as a zoo optimizer would record it): refused by the record
    with pytest.raises(ValueError, match="written by 'adamw'; it cannot be loaded into 'normuon'"):
        normuon.load_state_dict({**adamw.state_dict(), RECORD: "adamw"})


def test_adamp_state_is_refused_by_lion():
    _, adamp = stepped("adamp")
    _, lion = fresh("lion")
    before = copy.deepcopy(lion.state_dict())
    with pytest.raises(ValueError, match="written by 'adamp'; it cannot be loaded into 'lion'"):
        lion.load_state_dict(adamp.state_dict())
    assert lion.state_dict()["param_groups"] == before["param_groups"]  # a refused load changes nothing


@pytest.mark.parametrize("writer, reader", [("lion", "lion_k"), ("lion_k", "lion")])
def test_lion_and_lion_k_are_different_optimizers(writer, reader):
    """Same state keys (``exp_avg``), different registry names: different optimizers, refused."""
    _, w = stepped(writer)
    _, r = fresh(reader)
    with pytest.raises(ValueError, match=f"written by '{writer}'.*'{reader}'"):
        r.load_state_dict(w.state_dict())
    with pytest.raises(ValueError, match=f"'{reader}'"):  # without the record: by its keys
        r.load_state_dict(unrecorded(w.state_dict()))


@pytest.mark.parametrize("reader", ["lion", "normuon"])
def test_torch_adamw_state_without_record_is_refused(reader):
    """torch.optim.AdamW's state, in groups of exactly the reader's sizes (so positions fit)."""
    model, opt = fresh(reader)
    adamw = torch.optim.AdamW([{"params": list(g["params"])} for g in opt.param_groups])
    train(model, adamw, 1)
    sd = adamw.state_dict()
    assert RECORD not in sd
    with pytest.raises(ValueError, match=f"cannot be loaded into '{reader}'") as err:
        opt.load_state_dict(sd)
    assert "amsgrad" in str(err.value) and "'adamw'" in str(err.value)  # the foreign keys, the likely writer


def test_old_format_state_of_the_same_optimizer_still_loads():
    """No record, this optimizer's keys (what the package wrote before): loads, and resumes exactly."""
    for name in ("normuon", "stable_spam"):
        model, opt = stepped(name)
        torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0)  # groups get "initial_lr" (not a hyperparameter)
        saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(unrecorded(opt.state_dict()))
        train(model, opt, 2, seed=10)
        model2, opt2 = fresh(name)
        model2.load_state_dict(saved_model)
        opt2.load_state_dict(saved)
        train(model2, opt2, 2, seed=10)
        for (n, a), b in zip(model.named_parameters(), model2.parameters()):
            assert torch.equal(a, b), (name, n)
        assert opt2.state_dict()[RECORD] == name  # and the next save records it


def test_unrecorded_state_with_other_hyperparameters_is_refused():
    """Muon's state in NorMuon: same group layout, a subset of its keys (no beta2/eps, no row state)."""
    _, muon = stepped("muon")
    _, normuon = fresh("normuon")
    with pytest.raises(ValueError, match="'normuon'") as err:
        normuon.load_state_dict(unrecorded(muon.state_dict()))
    assert "beta2" in str(err.value)


# ------------------------------------------------------------------------------------ names


def test_regrouped_same_size_groups_get_state_by_name():
    """Groups of equal sizes, members swapped: q_proj gets q_proj's momentum, not k_proj's."""
    torch.manual_seed(0)
    model = TinyLM()
    named = dict(model.named_parameters())
    q, k, v, o = (f"layers.0.{x}_proj.weight" for x in "qkvo")
    rest = [(n, p) for n, p in named.items() if n not in (q, k, v, o)]

    def groups(first, second):
        return [{"params": [(n, named[n]) for n in first], "role": "matrix"},
                {"params": [(n, named[n]) for n in second], "role": "matrix", "lr": 0.01},
                {"params": rest, "role": "vector"}]

    opt = NorMuon(groups([q, v], [k, o]))
    train(model, opt, 2)
    saved = copy.deepcopy(opt.state_dict())
    momentum = {n: opt.state[named[n]]["momentum_buffer"].clone() for n in (q, k, v, o)}
    assert not torch.equal(momentum[q], momentum[k])

    opt2 = NorMuon(groups([k, v], [q, o]))  # same sizes, q and k swapped between groups
    opt2.load_state_dict(saved)
    for n in (q, k, v, o):
        assert torch.equal(opt2.state[named[n]]["momentum_buffer"], momentum[n]), n
    for g in opt2.param_groups:  # param_names tell the truth
        assert [id(named[n]) for n in g["param_names"]] == [id(p) for p in g["params"]]
    assert [g["lr"] for g in opt2.param_groups[:2]] == [g["lr"] for g in saved["param_groups"][:2]]
    train(model, opt2, 1, seed=5)


def test_reordered_model_gets_state_by_name():
    """The same modules registered in another order: ``named_parameters`` order differs, names do not."""
    torch.manual_seed(0)
    model, opt = stepped("lion")
    expected = by_name(model, opt, "exp_avg")
    saved = copy.deepcopy(opt.state_dict())

    torch.manual_seed(1)
    model2 = TinyLM()
    for module, first in [(model2, "embed_tokens"), *((block, "q_proj") for block in model2.layers)]:
        module._modules[first] = module._modules.pop(first)  # registered last: embed_tokens after lm_head
    assert [n for n, _ in model2.named_parameters()] != [n for n, _ in model.named_parameters()]
    opt2 = optimzoo.create_optimizer(model2, "lion")
    opt2.load_state_dict(saved)
    got = by_name(model2, opt2, "exp_avg")
    assert got.keys() == expected.keys()
    for n in expected:
        assert torch.equal(got[n], expected[n]), n

    # names are compared without wrappers: torch.compile's "_orig_mod.", DDP's leading "module."
    for params in (torch.compile(model2), [("module." + n, p) for n, p in model2.named_parameters()]):
        opt3 = optimzoo.create_optimizer(params, "lion")
        assert opt3.param_groups[0]["param_names"][0].startswith(("_orig_mod.", "module."))
        opt3.load_state_dict(saved)
        for n, p in model2.named_parameters():
            assert torch.equal(opt3.state[p]["exp_avg"], expected[n]), n


def test_missing_and_extra_names_are_refused_with_the_names():
    _, opt = stepped("lion")
    torch.manual_seed(1)
    model2 = TinyLM()
    renamed = [("final_norm.weight" if n == "norm.weight" else n, p) for n, p in model2.named_parameters()]
    opt2 = optimzoo.create_optimizer(renamed, "lion")
    with pytest.raises(ValueError, match="norm.weight") as err:
        opt2.load_state_dict(opt.state_dict())
    assert "'final_norm.weight'" in str(err.value) and "'norm.weight'" in str(err.value)

    # a load_state_dict pre-hook runs first, so a user can adapt names (e.g. after a rename)
    def rename(optimizer, sd):
        for g in sd["param_groups"]:
            g["param_names"] = ["final_norm.weight" if n == "norm.weight" else n for n in g["param_names"]]

    opt2.register_load_state_dict_pre_hook(rename)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))


def test_unnamed_state_loads_by_position_and_is_still_checked():
    torch.manual_seed(0)
    model = TinyLM()
    opt = Lion(model.parameters())
    train(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    assert "param_names" not in sd["param_groups"][0]
    opt2 = Lion(model.parameters())  # unnamed: torch's positional matching
    opt2.load_state_dict(sd)
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])
    named = Lion(model.named_parameters())  # unnamed state into a named optimizer: positions too
    named.load_state_dict(sd)
    assert named.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]

    from optimzoo.optim.adamp import AdamP

    adamp = AdamP(model.parameters())
    train(model, adamp, 1)
    with pytest.raises(ValueError, match="written by 'adamp'; it cannot be loaded into 'lion'"):
        Lion(model.parameters()).load_state_dict(adamp.state_dict())


# ------------------------------------------------------------------------------------ DCP


def test_dcp_state_dicts_round_trip_and_foreign_ones_are_refused():
    """``get/set_optimizer_state_dict`` in one process: the FQN-keyed (and the flattened) state that DCP
    builds itself loads and resumes exactly; another optimizer's is refused."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    for flatten in (False, True):
        options = StateDictOptions(flatten_optimizer_state_dict=flatten)
        model, opt = stepped("normuon")
        sd = copy.deepcopy(get_optimizer_state_dict(model, opt, options=options))  # (it aliases the state)
        reference = copy.deepcopy(model)
        train(model, opt, 2, seed=10)
        model2 = copy.deepcopy(reference)
        opt2 = optimzoo.create_optimizer(model2, "normuon")
        set_optimizer_state_dict(model2, opt2, copy.deepcopy(sd), options=options)
        train(model2, opt2, 2, seed=10)
        for (n, a), b in zip(model.named_parameters(), model2.parameters()):
            assert torch.equal(a, b), (flatten, n)

    # FQN-keyed normuon state (no record: DCP keeps only "state" and "param_groups") into lion. (The
    # flattened form is rebuilt from the reader's own keys, so it carries too little to tell.)
    sd = copy.deepcopy(get_optimizer_state_dict(model, opt))
    assert isinstance(next(iter(sd["state"])), str)
    lion_model = TinyLM()
    lion = optimzoo.create_optimizer(lion_model, "lion")
    with pytest.raises(ValueError, match="cannot be loaded into 'lion'"):
        set_optimizer_state_dict(lion_model, lion, sd)
