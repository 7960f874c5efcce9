"""The registry: names, aliases, errors, construction, third-party registration, the lazy peer catalogue."""

import subprocess
import sys

import pytest
import torch

import optimzoo
from optimzoo.registry import StateCost
from optimzoo.testing import TinyLM

ISSUE_NAMES = {"adamw", "adam", "sgd", "adamp", "sgdp", "diffgrad", "lion", "lion_k", "spam", "stable_spam",
               "muon", "normuon", "swan", "sinkgd", "auon", "hybrid_auon"}


def test_every_optimizer_is_listed():
    table = optimzoo.list_optimizers()
    assert set(table.names()) == ISSUE_NAMES
    text = str(table)
    for name in ISSUE_NAMES:
        assert name in text
    assert {s.name for s in optimzoo.list_optimizers(kind="matrix")} == {
        "muon", "normuon", "swan", "sinkgd", "auon", "hybrid_auon"}
    assert "adamw" not in optimzoo.list_optimizers(baselines=False).names()


def test_every_entry_resolves_to_an_optimizer_class():
    for spec in optimzoo.list_optimizers():
        assert issubclass(spec.cls, torch.optim.Optimizer), spec.name
        assert spec.defaults.get("lr") is not None, f"{spec.name} has no default lr"


def test_command_line_listing():
    out = subprocess.run([sys.executable, "-m", "optimzoo"], capture_output=True, text=True, check=True).stdout
    assert "stable_spam" in out and "normuon" in out


@pytest.mark.parametrize("alias", ["stable_spam", "stablespam", "stable-spam", "StableSPAM", "Stable_Spam"])
def test_aliases_are_case_and_separator_insensitive(alias):
    assert optimzoo.get_spec(alias).name == "stable_spam"


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError) as err:
        optimzoo.create_optimizer(TinyLM(), "stabel_spam")
    msg = str(err.value)
    assert "did you mean 'stable_spam'" in msg.lower()
    assert "list_optimizers" in msg
    with pytest.raises(ValueError, match="(?i)did you mean 'normuon'"):
        optimzoo.get_optimizer("nor_muon2")
    with pytest.raises(ValueError, match="Unknown optimizer 'zzzzzz'"):
        optimzoo.get_spec("zzzzzz")


def test_unknown_hyperparameter_names_key_and_accepted_keys():
    with pytest.raises(ValueError) as err:
        optimzoo.create_optimizer(TinyLM(), "adamw", lr=1e-3, betaz=(0.9, 0.9))
    assert "'betaz'" in str(err.value) and "betas" in str(err.value) and "adamw" in str(err.value)


def test_create_optimizer_routes_decay_groups():
    model = TinyLM(bias=True)
    opt = optimzoo.create_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    groups = {g["group_name"]: g for g in opt.param_groups}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert "norm.weight" in groups["no_decay"]["param_names"]
    assert "layers.0.q_proj.bias" in groups["no_decay"]["param_names"]
    assert "layers.0.q_proj.weight" in groups["decay"]["param_names"]
    assert opt.routing_plan is not None and opt.optimizer_name == "adamw"


def test_create_optimizer_passes_explicit_groups_through():
    model = TinyLM()
    groups = [{"params": list(model.layers.parameters()), "lr": 0.1}, {"params": [model.norm.weight]}]
    opt = optimzoo.create_optimizer(groups, "sgd", lr=0.01)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    assert opt.routing_plan is None
    with pytest.raises(ValueError, match="routing"):
        optimzoo.create_optimizer(list(model.parameters()), "sgd", routing={"vector_patterns": ["x"]})


def test_create_optimizer_for_matrix_kind_tags_roles():
    opt = optimzoo.create_optimizer(TinyLM(), "muon")
    roles = {g["group_name"]: g["role"] for g in opt.param_groups}
    assert roles == {"matrix": "matrix", "vector": "vector", "vector_no_decay": "vector"}
    vector = next(g for g in opt.param_groups if g["group_name"] == "vector")
    assert vector["lr"] == optimzoo.get_spec("muon").defaults["adamw_lr"]
    assert set(vector["param_names"]) == {"embed_tokens.weight", "lm_head.weight"}


def test_register_third_party_optimizer():
    class MySGD(torch.optim.SGD):
        pass

    spec = optimzoo.register_optimizer("my_sgd_test", MySGD, aliases=("mysgd_alias",), state=StateCost(1),
                                       paper="mine", summary="test entry")
    try:
        assert optimzoo.get_optimizer("MY-SGD-TEST") is MySGD
        assert optimzoo.get_spec("mysgd_alias") is spec
        opt = optimzoo.create_optimizer(TinyLM(), "my_sgd_test", lr=0.1, momentum=0.9)
        assert isinstance(opt, MySGD)
        with pytest.raises(ValueError, match="already registered"):
            optimzoo.register_optimizer("mysgd-alias", MySGD)
        with pytest.raises(ValueError, match="already registered"):
            optimzoo.register_optimizer("adamw", MySGD)
        optimzoo.register_optimizer("my_sgd_test", torch.optim.SGD, overwrite=True)
        assert optimzoo.get_optimizer("my_sgd_test") is torch.optim.SGD
    finally:
        from optimzoo import registry

        registry._REGISTRY.pop("my_sgd_test", None)
        for k in [k for k, v in registry._LOOKUP.items() if v == "my_sgd_test"]:
            del registry._LOOKUP[k]


def test_torch_optimizer_catalogue_is_reachable_lazily():
    pytest.importorskip("torch_optimizer")
    opt = optimzoo.create_optimizer(TinyLM(), "torch_optimizer.lamb", lr=1e-3)
    assert type(opt).__name__ == "Lamb"
    assert {g["group_name"] for g in opt.param_groups} == {"decay", "no_decay"}
    assert "torch_optimizer.radam" in optimzoo.list_optimizers(peers=True).names()
    with pytest.raises(ValueError, match="(?i)did you mean 'torch_optimizer.lamb'"):
        optimzoo.get_spec("torch_optimizer.lambb")


def test_state_cost_arithmetic():
    assert StateCost(2).bytes((10, 4)) == 320
    assert StateCost(1, 1).bytes((10, 4)) == 4 * (40 + 10)
    assert StateCost(1, 1).bytes((7,)) == 28
    assert str(StateCost(1, 1)) == "4 + 4/cols" and str(StateCost(0)) == "0"
    assert optimzoo.get_spec("sgd").state_cost(hparams={"momentum": 0.9}) == StateCost(1)
    assert optimzoo.get_spec("sgd").state_cost() == StateCost(0)


def test_markdown_table_lists_every_optimizer():
    md = optimzoo.list_optimizers().markdown()
    for name in ISSUE_NAMES:
        assert f"`{name}`" in md


def test_import_needs_torch_only():
    code = ("import sys, optimzoo; optimzoo.list_optimizers(); "
            "bad = [m for m in ('transformers', 'datasets', 'wandb', 'accelerate') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
