"""Parameter routing (``optimzoo.param_groups``) on real ``transformers`` LLaMA models, and the matrix
optimizers built on it: embeddings and the LM head (tied or not) on AdamW, every attention and MLP
projection in the matrix group, decay flags against ``transformers``' own rule, pattern overrides, the
printable plan, and the declared state bytes on LLaMA-60M shapes (GaLore's ``llama_60m``).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

import optimzoo
from optimzoo.param_groups import plan_parameters

transformers = pytest.importorskip("transformers")

MATRIX_NAMES = ("matrix", "matrix_no_decay")
PROJ = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")
MATRIX_OPTIMIZERS = ["muon", "normuon", "swan", "sinkgd", "auon", "hybrid_auon"]


def tiny_llama(tie: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(config)


def hf_decay_names(model: nn.Module) -> set[str]:
    """transformers' decay rule (``Trainer.get_decay_parameter_names``; ``trainer_pt_utils`` in old versions)."""
    fn = getattr(transformers.Trainer, "get_decay_parameter_names", None)
    if fn is not None:
        return set(fn(None, model))
    from transformers.trainer_pt_utils import get_decay_parameter_names  # pragma: no cover

    return set(get_decay_parameter_names(model))  # pragma: no cover


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_llama_routing(tie):
    model = tiny_llama(tie)
    plan = plan_parameters(model)
    roles = {i.name: i.role for i in plan.infos}
    names = [n for n, _ in model.named_parameters()]  # tied: the shared tensor appears once
    assert set(roles) == set(names)
    assert roles["model.embed_tokens.weight"] == "vector"
    if tie:
        assert "lm_head.weight" not in roles and model.lm_head.weight is model.model.embed_tokens.weight
    else:
        assert roles["lm_head.weight"] == "vector"
    projections = [n for n in names if PROJ.search(n)]
    assert len(projections) == 2 * 7
    assert set(plan.names(role="matrix")) == set(projections)
    for n in names:
        if "norm" in n:
            assert roles[n] == "vector" and n in plan.names(decay=False)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("name", MATRIX_OPTIMIZERS)
def test_matrix_optimizers_route_and_train_a_llama(name, tie):
    model = tiny_llama(tie)
    opt = optimzoo.create_optimizer(model, name, weight_decay=0.01)
    by_id = {id(p): n for n, p in model.named_parameters()}
    matrix = {by_id[id(p)] for g in opt.param_groups if g["role"] == "matrix" for p in g["params"]}
    vector = {by_id[id(p)] for g in opt.param_groups if g["role"] == "vector" for p in g["params"]}
    assert matrix == {n for n in by_id.values() if PROJ.search(n)}
    assert "model.embed_tokens.weight" in vector and (tie or "lm_head.weight" in vector)
    assert not matrix & vector
    for g in opt.param_groups:  # no-decay groups are the norm gains; vector groups use AdamW's defaults
        assert g["group_name"] in ("matrix", "vector", "vector_no_decay")
        if g["group_name"] == "vector_no_decay":
            assert g["weight_decay"] == 0.0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all() and not torch.equal(p.detach(), before[n]), n
    spec = optimzoo.get_spec(name)
    assert optimzoo.state_bytes(opt) == spec.expected_state_bytes(opt.routing_plan)


def test_lr_schedulers_scale_both_kinds_of_group():
    model = tiny_llama(False)
    opt = optimzoo.create_optimizer(model, "normuon", lr=0.02, adamw_lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    lrs = {g["group_name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"matrix": 0.01, "vector": 5e-4, "vector_no_decay": 5e-4}
    opt.step()  # no gradients: a no-op, but keeps the scheduler's step order
    sched.step()
    assert {g["group_name"]: g["lr"] for g in opt.param_groups} == lrs


def test_decay_flags_match_transformers():
    for tie in (False, True):
        model = tiny_llama(tie)
        plan = plan_parameters(model)
        assert set(plan.names(decay=True)) == hf_decay_names(model) & set(plan.names())


class _Mixed(nn.Module):
    """Biases, a LayerNorm, a conv filter, a 1-D scale outside any norm, a frozen tensor."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.conv = nn.Conv2d(3, 4, 3)
        self.scale = nn.Parameter(torch.ones(16))
        self.head = nn.Linear(16, 10, bias=False)
        self.frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)


def test_decay_flags_on_biases_norms_and_scales():
    model = _Mixed()
    plan = plan_parameters(model)
    decay = set(plan.names(decay=True))
    assert decay == {"embed.weight", "fc.weight", "conv.weight", "head.weight"}
    hf = hf_decay_names(model) & set(plan.names())
    # transformers agrees except on the 1-D 'scale' outside a norm module, which it decays (we do not)
    assert hf - decay == {"scale"} and decay <= hf
    roles = {i.name: (i.role, i.role_reason) for i in plan.infos}
    assert roles["conv.weight"] == ("matrix", "4-D weight (flattened)")
    assert roles["embed.weight"][0] == "vector" and roles["fc.bias"][0] == "vector"
    # no get_output_embeddings() here: top-level 'head' and 'fc' are output-head names (timm, torchvision)
    assert roles["head.weight"] == ("vector", "output head name (score/classifier/fc/head)")
    assert roles["fc.weight"][0] == "vector"
    assert "frozen" not in roles and "frozen" in {i.name for i in plan_parameters(model, include_frozen=True).infos}


def test_pattern_overrides():
    model = tiny_llama(False)
    plan = plan_parameters(
        model,
        vector_patterns=[r"\.gate_proj\."],
        matrix_patterns=r"^lm_head\.",
        no_decay_patterns=[r"\.o_proj\."],
        decay_patterns=[r"input_layernorm"],
    )
    info = {i.name: i for i in plan.infos}
    gate = info["model.layers.0.mlp.gate_proj.weight"]
    assert gate.role == "vector" and "vector pattern" in gate.role_reason
    assert info["lm_head.weight"].role == "matrix" and "matrix pattern" in info["lm_head.weight"].role_reason
    assert not info["model.layers.1.self_attn.o_proj.weight"].decay
    assert info["model.layers.0.input_layernorm.weight"].decay
    # a matrix pattern wins over a vector pattern; a no-decay pattern over a decay pattern
    both = plan_parameters(model, matrix_patterns=[r"gate_proj"], vector_patterns=[r"gate_proj"],
                           no_decay_patterns=[r"q_proj"], decay_patterns=[r"q_proj"])
    info = {i.name: i for i in both.infos}
    assert info["model.layers.0.mlp.gate_proj.weight"].role == "matrix"
    assert not info["model.layers.0.self_attn.q_proj.weight"].decay
    # through create_optimizer
    opt = optimzoo.create_optimizer(model, "muon", routing={"vector_patterns": [r"\.gate_proj\."]})
    vector_ids = {id(p) for g in opt.param_groups if g["role"] == "vector" for p in g["params"]}
    assert id(model.model.layers[0].mlp.gate_proj.weight) in vector_ids


def test_printable_plan():
    model = tiny_llama(False)
    plan = plan_parameters(model)
    text = str(plan)
    assert text == plan.summary()
    lines = text.splitlines()
    assert lines[0].split() == ["group", "tensors", "params", "shapes"]
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert set(rows) == {"matrix", "vector", "vector_no_decay"}
    assert rows["matrix"][1] == "14" and rows["vector_no_decay"][1] == str(2 * 2 + 1)
    assert lines[-1] == f"total: {len(plan)} tensors, {plan.count():,} parameters"
    verbose = plan.summary(verbose=True)
    for i in plan.infos:
        assert i.name in verbose
    assert "output layer (get_output_embeddings())" in verbose and "embedding (Embedding)" in verbose
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["groups"]["matrix"]["tensors"] == 14
    assert d["params"]["lm_head.weight"]["role"] == "vector"
    assert "RoutingPlan(" in repr(plan)
    groups = plan.groups("elementwise")
    assert [g["group_name"] for g in groups] == ["decay", "no_decay"]
    with pytest.raises(ValueError, match="kind"):
        plan.groups("both")


# --------------------------------------------------------------------------------------------
# Declared state bytes on LLaMA-60M (GaLore llama_60m), built on the meta device
# --------------------------------------------------------------------------------------------


def llama_60m_plan():
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
        max_position_embeddings=1024, tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    return plan_parameters(model)


def test_llama_60m_state_bytes():
    plan = llama_60m_plan()
    total = plan.count()
    matrix, vector = plan.count(role="matrix"), plan.count(role="vector")
    assert total == pytest.approx(58.1e6, rel=2e-3) and matrix == 8 * (4 * 512 * 512 + 3 * 512 * 1376)
    rows = sum(i.shape[0] for i in plan.infos if i.role == "matrix")
    expected = {
        "muon": 4 * matrix + 8 * vector,
        "normuon": 4 * matrix + 4 * rows + 8 * vector,
        "swan": 8 * vector,
        "sinkgd": 8 * vector,
        "auon": 4 * matrix + 8 * vector,
        "hybrid_auon": 4 * matrix + 8 * vector,
        "adamw": 8 * total,
    }
    for name, nbytes in expected.items():
        assert optimzoo.get_spec(name).expected_state_bytes(plan) == nbytes, name


# --------------------------------------------------------------------------------------------
# Routing that cannot go wrong quietly: heads by structure and name, unnamed tensors warn
# --------------------------------------------------------------------------------------------


def tiny_llama_classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_labels=3, pad_token_id=0,
    )
    return transformers.LlamaForSequenceClassification(config)


def roles_of(opt, model) -> dict[str, str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)]: g["role"] for g in opt.param_groups for p in g["params"]}


HEADS = {"causal": ("lm_head.weight", lambda: tiny_llama(False)), "classifier": ("score.weight", tiny_llama_classifier)}


@pytest.mark.parametrize("route", ["model", "named_parameters", "class_named"])
@pytest.mark.parametrize("kind", list(HEADS))
def test_embeddings_and_heads_are_vectors_on_every_route(kind, route):
    """A real LlamaForCausalLM and LlamaForSequenceClassification: the embedding and the output layer
    (lm_head / score) take AdamW whichever way the optimizer is built from names, with no warning."""
    import warnings

    head, make = HEADS[kind]
    model = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 'unnamed tensors' warning on any named route
        if route == "model":
            opt = optimzoo.create_optimizer(model, "normuon")
        elif route == "named_parameters":
            opt = optimzoo.create_optimizer(model.named_parameters(), "normuon")
        else:
            opt = optimzoo.get_optimizer("normuon")(model.named_parameters())
    roles = roles_of(opt, model)
    assert roles["model.embed_tokens.weight"] == "vector" and roles[head] == "vector"
    assert {n for n, r in roles.items() if r == "matrix"} == {n for n, _ in model.named_parameters() if PROJ.search(n)}
    plan = {i.name: i.role for i in opt.routing_plan.infos}
    assert plan[head] == "vector" and opt.routing_plan.warning is None


@pytest.mark.parametrize("route", ["class", "create_optimizer"])
@pytest.mark.parametrize("name", MATRIX_OPTIMIZERS)
def test_unnamed_tensors_warn_once_with_the_count_and_the_fix(name, route):
    model = tiny_llama_classifier()
    n2d = sum(p.dim() >= 2 for p in model.parameters())
    with pytest.warns(UserWarning) as record:
        if route == "class":
            opt = optimzoo.get_optimizer(name)(model.parameters())
        else:
            opt = optimzoo.create_optimizer(model.parameters(), name)
    ours = [w for w in record if "unnamed tensor" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in record]
    text = str(ours[0].message)
    assert f"{n2d} unnamed tensor(s)" in text and "named_parameters()" in text
    assert ours[0].filename == __file__  # points at the caller's line, not at optimzoo
    plan = opt.routing_plan
    assert plan is not None and plan.warning is not None and f"{n2d} unnamed" in plan.warning
    assert f"warning: {plan.warning}" in str(plan)
    assert len(plan.names(role="matrix")) == n2d
    # explicit roles: no warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimzoo.get_optimizer(name)([{"params": list(model.parameters()), "role": "vector"}])


def test_heads_found_by_structure_before_names():
    class TimmLike(nn.Module):  # timm: get_classifier(); an unusual head name
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
            self.last_layer = nn.Linear(8, 5)
            self.extra = nn.Linear(5, 5)  # registered after the head

        def get_classifier(self):
            return self.last_layer

    class InputOnly(nn.Module):  # get_input_embeddings() on a non-Embedding module
        def __init__(self):
            super().__init__()
            self.tok = nn.Linear(10, 8, bias=False)
            self.body = nn.Linear(8, 8)
            self.out = nn.Linear(8, 10)

        def get_input_embeddings(self):
            return self.tok

    plan = {i.name: (i.role, i.role_reason) for i in plan_parameters(TimmLike()).infos}
    assert plan["last_layer.weight"] == ("vector", "output layer (get_classifier())")
    assert plan["extra.weight"][0] == "matrix" and plan["blocks.1.weight"][0] == "matrix"
    plan = {i.name: (i.role, i.role_reason) for i in plan_parameters(InputOnly()).infos}
    assert plan["tok.weight"] == ("vector", "input embedding (get_input_embeddings())")
    assert plan["out.weight"][0] == "vector" and "last nn.Linear" in plan["out.weight"][1]
    assert plan["body.weight"][0] == "matrix"
    # a plain MLP: its last Linear is the output layer, and the plan says why
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    plan = {i.name: (i.role, i.role_reason) for i in plan_parameters(mlp).infos}
    assert [plan[f"{k}.weight"][0] for k in (0, 2, 4)] == ["matrix", "matrix", "vector"]
    # a model whose logits are tied to its embedding (no head module): the last Linear is hidden
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(50, 8)
            self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    plan = {i.name: i.role for i in plan_parameters(Tied()).infos}
    assert plan == {"wte.weight": "vector", "up.weight": "matrix", "up.bias": "vector", "down.weight": "matrix",
                    "down.bias": "vector"}


def test_elementwise_optimizers_print_their_own_groups():
    model = tiny_llama(False)
    opt = optimzoo.create_optimizer(model, "adamw", weight_decay=0.1)
    plan = opt.routing_plan
    assert plan.kind == "elementwise"
    rows = {line.split()[0] for line in str(plan).splitlines()[1:-1]}
    assert rows == {g["group_name"] for g in opt.param_groups} == {"decay", "no_decay"}
    assert "matrix" not in plan.summary(verbose=True) and set(plan.to_dict()["groups"]) == {"decay", "no_decay"}
    assert "role" not in next(iter(plan.to_dict()["params"].values()))
    mplan = optimzoo.create_optimizer(model, "normuon").routing_plan
    assert {line.split()[0] for line in str(mplan).splitlines()[1:-1]} == {"matrix", "vector", "vector_no_decay"}


@pytest.mark.parametrize("name", MATRIX_OPTIMIZERS)
def test_weight_decay_reaches_every_decayed_group(name):
    """weight_decay=0.1 decays the embeddings and the head of a matrix optimizer as AdamW decays them
    (a comparison at the same arguments is not confounded); adamw_weight_decay overrides it."""
    model = tiny_llama(False)
    wd = {g["group_name"]: g["weight_decay"] for g in optimzoo.create_optimizer(model, name, weight_decay=0.1).param_groups}
    assert wd == {"matrix": 0.1, "vector": 0.1, "vector_no_decay": 0.0}
    adamw = {g["group_name"]: g["weight_decay"] for g in optimzoo.create_optimizer(model, "adamw", weight_decay=0.1).param_groups}
    assert adamw == {"decay": 0.1, "no_decay": 0.0}
    opt = optimzoo.create_optimizer(model, name, weight_decay=0.1, adamw_weight_decay=0.0)
    assert {g["group_name"]: g["weight_decay"] for g in opt.param_groups}["vector"] == 0.0
