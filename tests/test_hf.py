"""optimzoo.hf: zoo optimizers in the real transformers Trainer, their metrics in a real (offline) wandb run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

from optimzoo.hf import ZooTrainer, ZooTrainingArguments, parse_optim_args  # noqa: E402
from optimzoo.optim.muon import NorMuon  # noqa: E402
from optimzoo.optim.spam import StableSPAM  # noqa: E402

WANDB = [sys.executable, "-m", "wandb"]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def counting_task(n: int = 128, length: int = 16):
    """Sequences ``s, s+1, s+2, ... (mod 64)`` from random starts: a bigram rule, learnt in a few dozen steps."""
    g = torch.Generator().manual_seed(0)
    ids = (torch.randint(0, 64, (n, 1), generator=g) + torch.arange(length)) % 64
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def wandb_records(run_dir: Path) -> list[dict]:
    """The records of an offline wandb run, read back with wandb's own reader."""
    out = subprocess.run([*WANDB, "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True,
                         check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def wandb_summary(run_dir: Path) -> dict:
    out = subprocess.run([*WANDB, "leet", "inspect", "--summary", "--json", str(run_dir)], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out)


def train_with(tmp_path: Path, optim: str, steps: int = 40, **kw) -> ZooTrainer:
    kw = {"report_to": ["wandb"], **kw}
    args = ZooTrainingArguments(str(tmp_path / "out"), optim=optim, max_steps=steps, per_device_train_batch_size=16,
                                logging_steps=5, save_strategy="no", use_cpu=True, disable_tqdm=True, **kw)
    trainer = ZooTrainer(model=tiny_llama(), args=args, train_dataset=counting_task())
    trainer.train()
    if "wandb" in args.report_to:
        import wandb

        wandb.finish()  # flush the offline run before reading it back
        wandb.teardown()  # the next run in this process re-reads WANDB_DIR
    return trainer


@pytest.mark.parametrize("optim,cls,lr,optim_args,algo_key", [
    ("normuon", NorMuon, 0.02, "adamw_lr=3e-3", "optim/row_scale_spread"),
    ("stable-spam", StableSPAM, 3e-3, "update_proj_gap=10", "optim/clip_fraction"),
])
def test_trainer_uses_zoo_optimizer_and_logs_its_metrics_to_wandb(tmp_path, monkeypatch, optim, cls, lr, optim_args,
                                                                  algo_key):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    trainer = train_with(tmp_path, optim, learning_rate=lr, optim_args=optim_args, weight_decay=0.1)
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert type(opt) is cls

    # routing: embeddings and the LM head never get the matrix update; norms are not decayed
    groups = {g["group_name"]: g for g in opt.param_groups}
    names = {k: set(g["param_names"]) for k, g in groups.items()}
    if cls is NorMuon:
        assert {"model.embed_tokens.weight", "lm_head.weight"} <= names["vector"]
        assert all("proj" in n for n in names["matrix"])
        assert groups["matrix"]["weight_decay"] == 0.1 and groups["vector_no_decay"]["weight_decay"] == 0.0
    else:
        assert all("norm" in n for n in names["no_decay"]) and groups["no_decay"]["weight_decay"] == 0.0
    assert opt.param_groups[0]["lr"] < lr  # the scheduler drives every group

    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert logs[-1]["loss"] < 0.7 * logs[0]["loss"], "training did not learn the counting task"

    records = wandb_records(next((tmp_path / "wandb").glob("offline-run-*")))
    history = [r["history"]["item"] for r in records if r.get("type") == "history"]
    last = [h for h in history if "train/loss" in h][-1]
    group_names = list(groups)
    for key in ["train/optim/step_ms", "train/optim/state_MB", f"train/{algo_key}",
                *(f"train/optim/lr/{g}" for g in group_names), *(f"train/optim/update_rms/{g}" for g in group_names)]:
        assert key in last, f"{key} did not reach wandb"
    assert last["train/optim/update_rms/" + group_names[0]] > 0
    assert last["train/optim/state_MB"] > 0
    config = wandb_summary(next((tmp_path / "wandb").glob("offline-run-*")))["config"]
    assert config["optimizer"] == cls.__name__.lower().replace("stablespam", "stable_spam")
    assert [g["group_name"] for g in config["optimizer_config"]["groups"]] == group_names
    assert "model.embed_tokens.weight" in config["optimizer_config"]["routing"]["vector" if cls is NorMuon else "decay"]["names"]
    saved = json.loads((tmp_path / "out" / "optimizer_config.json").read_text())
    assert saved["hparams"]["lr"] == lr and "params" in saved["routing"]


def test_transformers_names_still_work(tmp_path):
    trainer = train_with(tmp_path, "adamw_torch", steps=5, report_to="none")
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert type(opt) is torch.optim.AdamW
    assert "optim/step_ms" in trainer.state.log_history[-2]


def test_unknown_name_fails_at_construction_with_suggestions():
    with pytest.raises(ValueError) as err:
        ZooTrainingArguments("out", optim="normoun")
    assert "did you mean 'normuon'?" in str(err.value) and len(str(err.value).splitlines()) == 1
    assert "transformers' names" in str(err.value)  # they are valid too, and suggested when close:
    with pytest.raises(ValueError, match="did you mean 'adamw_torch_fused'"):
        ZooTrainingArguments("out", optim="adamw_torch_fusd")
    with pytest.raises(ValueError):
        TrainingArguments("out", optim="normuon")  # why the subclass exists


def test_bad_optim_args_key_names_the_key_and_the_accepted_keys():
    with pytest.raises(ValueError) as err:
        ZooTrainingArguments("out", optim="lion", optim_args="betas=(0.9,0.99),bogus=1")
    msg = str(err.value)
    assert "'bogus'" in msg and "lion" in msg and "betas" in msg and "weight_decay" in msg
    with pytest.raises(ValueError, match="key=value"):
        ZooTrainingArguments("out", optim="lion", optim_args="betas")


def test_optim_args_are_typed_and_mapped():
    assert parse_optim_args("lr=3e-4, betas=(0.9,0.95), nesterov=false, adjust_lr=match_adamw, total_T=None") == {
        "lr": 3e-4, "betas": (0.9, 0.95), "nesterov": False, "adjust_lr": "match_adamw", "total_T": None}
    args = ZooTrainingArguments("out", optim="normuon", learning_rate=0.05, weight_decay=0.1, adam_beta2=0.95,
                                optim_args="ns_steps=6")
    assert args.zoo_hparams() == {"lr": 0.05, "weight_decay": 0.1, "adamw_betas": (0.9, 0.95), "ns_steps": 6}
    args = ZooTrainingArguments("out", optim="adamp", adam_beta2=0.95, adam_epsilon=1e-6,
                                optim_args="betas=(0.8,0.9)")
    assert args.zoo_hparams()["betas"] == (0.8, 0.9) and args.zoo_hparams()["eps"] == 1e-6  # optim_args win
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ZooTrainingArguments("out", optim="sgdp", adam_beta1=0.8).zoo_hparams()
    assert any("adam_beta1" in str(w.message) for w in caught)


# ---------------------------------------------------------------------------------------------------------
# The recipe, end to end (subprocesses, as users run it)
# ---------------------------------------------------------------------------------------------------------

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "pretrain_llama.py"
FAST = ["--max_eval_samples", "32", "--disable_tqdm", "true", "--dataloader_num_workers", "0"]


def run_recipe(tmp_path: Path, *args: str, nproc: int = 1, timeout: int = 240) -> subprocess.CompletedProcess:
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "WANDB_DIR"}  # the recipe puts wandb in the run dir
    env["OMP_NUM_THREADS"] = "1" if nproc > 1 else "2"
    if nproc == 1:
        cmd = [sys.executable, str(RECIPE), *args, *FAST]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(_free_port()), str(RECIPE), *args, *FAST]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_recipe_end_to_end_on_the_embedded_corpus(tmp_path):
    proc = run_recipe(tmp_path, "--optim", "normuon", "--learning_rate", "0.02", "--max_steps", "60",
                      "--logging_steps", "10", "--wandb_group", "e2e")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "llama_tiny-normuon-lr0.02-s0"
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["steps"] == 60 and summary["optim"] == "normuon"
    assert summary["final_loss"] < 0.75 * math.log(320)  # well below a uniform guess over the vocab
    assert math.isfinite(summary["eval_loss"]) and summary["eval_perplexity"] == pytest.approx(
        math.exp(summary["eval_loss"]))
    # GaLore's estimator divides by n_batches + 1: below the token-weighted loss by about that factor
    assert summary["eval_galore_loss"] < summary["eval_loss"]
    assert 0 < summary["tokens_seen"] < 60 * 8 * 256  # non-padding tokens only
    assert summary["optimizer"]["routing"]["vector"]["names"] == ["model.embed_tokens.weight", "lm_head.weight"]
    wandb_run = next((run / "wandb").glob("offline-run-*"))
    config = wandb_summary(wandb_run)["config"]
    assert config["model"] == "llama_tiny" and config["optimizer"] == "normuon"
    assert "optimzoo: llama_tiny-normuon-lr0.02-s0" in proc.stdout


@pytest.mark.slow
def test_recipe_packed_mode_and_transformers_optimizer(tmp_path):
    proc = run_recipe(tmp_path, "--optim", "adamw_torch", "--packing", "packed", "--max_steps", "5",
                      "--report_to", "none", "--run_name", "packed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "packed" / "run_summary.json").read_text())
    assert summary["tokens_seen"] == 5 * 8 * 256  # packed sequences have no padding


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("optim,lr,mode", [("adamp", "1e-3", "fsdp2"), ("normuon", "0.02", "fsdp2"),
                                           ("normuon", "0.02", "ddp")])
def test_recipe_under_torchrun(tmp_path, optim, lr, mode):
    flags = ["--fsdp2"] if mode == "fsdp2" else []
    proc = run_recipe(tmp_path, *flags, "--optim", optim, "--learning_rate", lr, "--max_steps", "6",
                      "--logging_steps", "3", "--report_to", "none", nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "runs" / f"llama_tiny-{optim}-lr{float(lr):g}-s0" / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    assert math.isfinite(summary["eval_loss"])
    assert proc.stdout.count("optimzoo: llama_tiny-") == 1  # one main process, not two
    described = [line for line in proc.stdout.splitlines() if line.startswith("optimzoo: run ")]
    assert len(described) == 1, proc.stdout  # one line (rank 0) says what the run is
    assert "world size 2 (gloo, cpu)" in described[0] and f"optimizer {optim}: lr {float(lr):g}" in described[0]
    assert ("FSDP2 (mesh " if mode == "fsdp2" else "DDP (2 replicas)") in described[0]
    assert summary["tokens_seen"] > 6 * 8 * 256  # both ranks read different data: more than one rank's slots


def _logged_losses(run_dir: Path) -> dict[int, float]:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return {r["step"]: r["loss"] for r in state["log_history"] if "loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize("optim,lr,extra", [
    ("stable_spam", "1e-3", "update_proj_gap=6"),  # a momentum reset falls after the kill: counters must survive
    ("normuon", "0.02", "adamw_lr=1e-3"),
])
def test_sigkill_and_resume_logs_the_same_losses(tmp_path, optim, lr, extra):
    common = ["--optim", optim, "--learning_rate", lr, "--optim_args", extra, "--max_steps", "16",
              "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "8", "--report_to", "none",
              "--max_eval_samples", "16"]
    reference = run_recipe(tmp_path / "a", *common, "--output_dir", str(tmp_path / "a" / "run"))
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "b" / "run"
    out.parent.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_DIR"}, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, str(RECIPE), *common, *FAST, "--output_dir", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path / "b")
    marker = out / "checkpoint-8" / "trainer_state.json"
    try:
        deadline = time.time() + 180
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert marker.exists(), "the run never wrote checkpoint-8"
        time.sleep(0.2)  # let the save finish; the run is somewhere in steps 9-16 when killed
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "run_summary.json").exists(), "the run finished before it was killed"

    resumed = run_recipe(tmp_path / "b", *common, "--output_dir", str(out),
                         "--resume_from_checkpoint", str(out / "checkpoint-8"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = _logged_losses(tmp_path / "a" / "run"), _logged_losses(out)
    assert sorted(got) == list(range(1, 17))
    assert got == expected  # bit-identical losses, before and after the kill
    a = torch.load(tmp_path / "a" / "run" / "checkpoint-16" / "optimizer.pt", weights_only=False)
    b = torch.load(out / "checkpoint-16" / "optimizer.pt", weights_only=False)
    assert a["param_groups"] == b["param_groups"]  # step counters in the groups (Stable-SPAM's total steps)
    for key in a["state"]:
        for name, value in a["state"][key].items():
            assert torch.equal(value, b["state"][key][name]), f"state {key}/{name} differs after resume"
    sa = json.loads((tmp_path / "a" / "run" / "run_summary.json").read_text())
    sb = json.loads((out / "run_summary.json").read_text())
    assert sa["eval_loss"] == sb["eval_loss"]
