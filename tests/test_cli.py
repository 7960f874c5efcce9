"""What a person reads and what the defaults mean: lr defaults and their sources, weight decay on every decayed
group, values checked at construction, argparse-style errors of the recipe and the scripts (real processes,
exit status and stderr), resume guards, a readable log, and ``python -m optimzoo``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM  # noqa: E402

import optimzoo  # noqa: E402
from optimzoo.__main__ import main as optimzoo_main  # noqa: E402
from optimzoo.hf import ZooTrainingArguments  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "pretrain_llama.py"
SCRIPTS = ROOT / "scripts"


def _recipe_module():
    """The recipe as a module (loaded once; dataclasses need it in ``sys.modules``)."""
    name = "pretrain_llama_recipe"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, RECIPE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def parse_recipe(*argv: str):
    """The recipe's (model, data, training) arguments for a command line, without running it."""
    r = _recipe_module()
    return HfArgumentParser((r.ModelArguments, r.DataArguments, r.RecipeTrainingArguments)).parse_args_into_dataclasses(
        args=list(argv))


def run(script: Path, *args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_DIR"}
    env["OMP_NUM_THREADS"] = "2"
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env)


def assert_usage_error(proc: subprocess.CompletedProcess, prog: str, *needles: str) -> str:
    """argparse style: exit status 2, a usage line and one error line on stderr, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith(f"usage: {prog} ") and lines[1].startswith(f"{prog}: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[1], (needle, lines[1])
    return lines[1]


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, max_position_embeddings=32))


# ------------------------------------------------------------------------------ defaults that mean what they say

@pytest.mark.parametrize("optim,lr,source", [
    ("normuon", 0.02, "registry default 0.02"),  # not transformers' 5e-5
    ("adamw", 1e-3, "registry default 0.001"),
    ("adamw_torch", 5e-5, "transformers default 5e-05"),
])
def test_unset_learning_rate_is_the_optimizers_own_default(optim, lr, source):
    args = ZooTrainingArguments("out", optim=optim)
    assert args.learning_rate == lr
    assert args.zoo_lr_sources()["lr"] == source
    if args.zoo_optim is not None:
        assert args.zoo_hparams()["lr"] == lr


def test_a_set_learning_rate_wins_even_at_transformers_default_value():
    args = ZooTrainingArguments("out", optim="normuon", learning_rate=5e-5, optim_args="adamw_lr=3e-3")
    assert args.zoo_hparams()["lr"] == 5e-5
    assert args.zoo_lr_sources() == {"lr": "learning_rate 5e-05", "adamw_lr": "optim_args 0.003"}
    assert args.zoo_lr_summary() == "lr 5e-05 (learning_rate), adamw_lr 0.003 (optim_args)"
    assert ZooTrainingArguments("out", optim="lion", optim_args="lr=1e-4").learning_rate == 1e-4  # optim_args win


def test_recipe_without_learning_rate_uses_the_registry_default():
    _, _, targs = parse_recipe("--optim", "normuon")
    assert targs.learning_rate == 0.02 and targs.zoo_lr_sources()["lr"] == "registry default 0.02"
    _, _, targs = parse_recipe("--optim", "adamw_torch")  # transformers' names: the harness's 1e-3
    assert targs.learning_rate == 1e-3 and targs.zoo_lr_sources()["lr"] == "recipe default 0.001"
    _, _, targs = parse_recipe("--optim", "normuon", "--learning_rate", "5e-5")
    assert targs.learning_rate == 5e-5 and targs.zoo_lr_sources()["lr"] == "learning_rate 5e-05"


@pytest.mark.parametrize("optim", ["adamw", "normuon"])
def test_weight_decay_reaches_every_decayed_group(optim):
    def decay_of(args):
        opt = optimzoo.create_optimizer(tiny_llama(), args.zoo_optim, **args.zoo_hparams())
        return {n: g["weight_decay"] for g in opt.param_groups for n in g["param_names"]}

    wd = decay_of(ZooTrainingArguments("out", optim=optim, weight_decay=0.1))
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.up_proj.weight"):
        assert wd[name] == 0.1, (optim, name)
    assert wd["model.norm.weight"] == 0.0
    if optim == "normuon":  # the documented override for the AdamW part
        wd = decay_of(ZooTrainingArguments("out", optim=optim, weight_decay=0.1,
                                           optim_args="adamw_weight_decay=0.0"))
        assert wd["lm_head.weight"] == wd["model.embed_tokens.weight"] == 0.0
        assert wd["model.layers.0.mlp.up_proj.weight"] == 0.1


@pytest.mark.parametrize("kw,needles", [
    ({"optim": "adamw", "optim_args": "betas=(0.9,0.95"}, ["optim_args", "betas=(0.9,0.95", "unbalanced"]),
    ({"optim": "normuon", "optim_args": "adamw_lr=abc"}, ["optim_args", "adamw_lr='abc'", "not a number"]),
    ({"optim": "adamw", "optim_args": "betas=(0.9,1.5)"}, ["optim_args", "betas=(0.9, 1.5)", "refused by adamw"]),
    ({"optim": "normuon", "optim_args": "adjust_lr=fast"}, ["adjust_lr='fast'", "keller"]),
    ({"optim": "normuon", "zoo_routing": "vector_patterns=['(']"}, ["zoo_routing", "vector_patterns"]),
    ({"optim": "normuon", "zoo_routing": "vectors=['x']"}, ["zoo_routing", "'vectors'", "vector_patterns"]),
    ({"optim": "adamw_torch", "zoo_routing": "vector_patterns=['x']"}, ["zoo_routing", "adamw_torch"]),
])
def test_every_value_is_checked_at_construction(kw, needles):
    with pytest.raises(ValueError) as err:
        ZooTrainingArguments("out", **kw)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_no_pin_memory_without_an_accelerator():
    if torch.accelerator.is_available():
        pytest.skip("has an accelerator")
    assert ZooTrainingArguments("out", optim="normuon").dataloader_pin_memory is False


# ------------------------------------------------------------------------------ the recipe's command-line errors

@pytest.mark.parametrize("args,needles", [
    (["--optim", "stabel_spam"], ["unknown optimizer 'stabel_spam'; did you mean 'stable_spam'?",
                                  "(python -m optimzoo lists them"]),
    (["--optim", "adamw", "--optim_args", "betas=(0.9,0.95"], ["optim_args", "unbalanced"]),
    (["--optim", "normuon", "--optim_args", "adamw_lr=abc"], ["optim_args", "adamw_lr='abc'"]),
    (["--model_config", "llama_7b"], ["no model config 'llama_7b'", "llama_60m"]),
    (["--optim", "normuon", "--resume_from_checkpoint", "last"], ["no checkpoint", "--allow_no_checkpoint"]),
])
def test_recipe_reports_bad_input_in_two_lines_before_doing_anything(tmp_path, args, needles):
    proc = run(RECIPE, *args, "--report_to", "wandb", cwd=tmp_path)
    error = assert_usage_error(proc, "pretrain_llama.py", *needles)
    assert len(error) < 240 and "adafactor" not in error  # not buried under transformers' names
    assert list(tmp_path.iterdir()) == [], "something was written before the error"


def test_recipe_does_not_train_a_finished_checkpoint_further(tmp_path):
    ckpt = tmp_path / "run" / "checkpoint-4"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 4, "max_steps": 4}))
    proc = run(RECIPE, "--optim", "normuon", "--max_steps", "4", "--output_dir", str(tmp_path / "run"),
               "--resume_from_checkpoint", "last", "--report_to", "none", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is already at step 4 of --max_steps 4: nothing to train" in proc.stdout
    assert '"loss"' not in proc.stdout and not (tmp_path / "run" / "run_summary.json").exists()


@pytest.mark.slow
def test_recipe_run_says_what_it_is_and_logs_readably(tmp_path):
    proc = run(RECIPE, "--optim", "normuon", "--max_steps", "2", "--logging_steps", "1", "--max_eval_samples", "16",
               "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--report_to", "wandb",
               "--resume_from_checkpoint", "last", "--allow_no_checkpoint", cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "no checkpoint in runs/llama_tiny-normuon-lr0.02-s0: training from scratch" in out
    runs = [line for line in out.splitlines() if line.startswith("optimzoo: run ")]
    assert len(runs) == 1, out
    assert runs[0].startswith("optimzoo: run llama_tiny-normuon-lr0.02-s0: world size 1")
    assert "float32 weights" in runs[0] and "lr 0.02 (registry default), adamw_lr 0.0003 (registry default)" in runs[0]
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert records and all(isinstance(r["loss"], float) for r in records if "loss" in r)
    assert isinstance(records[-1]["eval_loss"], float)
    assert "\x1b[" not in out + proc.stderr  # no raw ANSI codes (they end up in the sweep's recipe.log)
    assert "pin_memory" not in proc.stderr
    run_dir = tmp_path / "runs" / "llama_tiny-normuon-lr0.02-s0"
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["lr_source"] == {"lr": "registry default 0.02", "adamw_lr": "registry default 0.0003"}
    wandb_run = next((run_dir / "wandb").glob("offline-run-*"))
    config = json.loads(subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json",
                                        str(wandb_run)], capture_output=True, text=True, check=True).stdout)["config"]
    assert config["lr_source"]["lr"] == "registry default 0.02"


def test_offline_wandb_note_is_printed_once_per_job(monkeypatch, tmp_path, capsys):
    recipe = _recipe_module()
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not logged in
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for rank, expected in (("1", 0), ("0", 1)):
        monkeypatch.delenv("WANDB_MODE", raising=False)
        monkeypatch.setenv("RANK", rank)
        recipe.wandb_offline_unless_logged_in()
        assert os.environ["WANDB_MODE"] == "offline"
        assert capsys.readouterr().out.count("no wandb login found") == expected


# ------------------------------------------------------------------------------ the scripts' command-line errors

@pytest.mark.parametrize("script,args,needles", [
    ("sweep.py", ["--optims", "adamw,stabel_spam"], ["unknown optimizer 'stabel_spam'; did you mean 'stable_spam'?"]),
    ("sweep.py", ["--optims", "normuon", "--optim_args", "adamw_lr=abc"], ["optim_args", "adamw_lr='abc'"]),
    ("bench_step.py", ["--only", "stabel_spam"], ["did you mean 'stable_spam'?"]),
    ("compare_runs.py", ["no_such_dir"], ["no such directory: no_such_dir"]),
])
def test_scripts_report_bad_input_in_two_lines(tmp_path, script, args, needles):
    assert_usage_error(run(SCRIPTS / script, *args, cwd=tmp_path), script, *needles)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ python -m optimzoo

def test_python_m_optimzoo_has_help_and_fits_120_columns(capsys):
    proc = subprocess.run([sys.executable, "-m", "optimzoo", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m optimzoo") and "--wide" in proc.stdout
    assert optimzoo_main([]) == 0
    table = capsys.readouterr().out
    assert max(len(line) for line in table.splitlines()) <= 120
    for spec in optimzoo.list_optimizers():
        assert f"\n{spec.name} " in table and spec.arxiv in table
    assert "multinorm" in table  # aliases are still listed
    optimzoo_main(["--wide"])
    wide = capsys.readouterr().out
    assert "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights" in wide
