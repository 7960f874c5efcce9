"""Zoo optimizers in the stock ``Trainer`` and its subclasses (``trainer_optimizer`` + ``OptimizerMetricsCallback``),
non-finite step skipping (ZooTrainer and the callback route) and the canonical wandb run config.

Everything trains a 25k-parameter LLaMA for a few steps on CPU. The FSDP2 case runs this file as a torchrun
script on 2 gloo processes (``python -m torch.distributed.run ... tests/test_hf_trainers.py OUT``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from optimzoo.hf import OptimizerMetricsCallback, ZooTrainer, ZooTrainingArguments, trainer_optimizer  # noqa: E402
from optimzoo.hf.callbacks import unwrap_optimizer  # noqa: E402
from optimzoo.optim.muon import NorMuon  # noqa: E402

HERE = Path(__file__).resolve().parent
WANDB = [sys.executable, "-m", "wandb"]
VECTOR = {"model.embed_tokens.weight", "lm_head.weight"}
NAN_PARAM = "model.layers.0.self_attn.q_proj.weight"


def tiny_llama(seed: int = 0, vocab: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=64))


def counting_task(n: int = 128, length: int = 16):
    g = torch.Generator().manual_seed(0)
    ids = (torch.randint(0, 64, (n, 1), generator=g) + torch.arange(length)) % 64
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def train_args(out: Path, steps: int, cls=TrainingArguments, **kw):
    kw = {"per_device_train_batch_size": 16, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
          "use_cpu": True, "disable_tqdm": True, "dataloader_num_workers": 0, **kw}
    return cls(str(out), max_steps=steps, **kw)


def finish_wandb() -> None:
    import wandb

    wandb.finish()  # flush the offline run before reading it back
    wandb.teardown()  # the next run in this process re-reads WANDB_DIR


def wandb_run(tmp_path: Path) -> tuple[list[dict], dict]:
    """(history rows, config) of the one offline run under ``tmp_path``, read with wandb's own reader."""
    run = next((tmp_path / "wandb").glob("offline-run-*"))
    out = subprocess.run([*WANDB, "leet", "inspect", "--json", str(run)], capture_output=True, text=True,
                         check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    history = [r["history"]["item"] for r in rows if r.get("type") == "history"]
    summary = subprocess.run([*WANDB, "leet", "inspect", "--summary", "--json", str(run)], capture_output=True,
                             text=True, check=True).stdout
    return history, json.loads(summary)["config"]


class Snapshots(TrainerCallback):
    """Weights, optimizer state and lr after every step (on this rank: DTensors as their local shards)."""

    def __init__(self):
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.state: dict[int, dict] = {}

    @staticmethod
    def _local(t):
        return (t.to_local() if hasattr(t, "to_local") else t).detach().clone()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {n: self._local(p) for n, p in model.named_parameters()}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.weights[state.global_step] = {n: self._local(p) for n, p in model.named_parameters()}
        inner = unwrap_optimizer(optimizer)
        self.state[state.global_step] = {
            i: {k: self._local(v) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
            for i, s in enumerate(inner.state[p] for g in inner.param_groups for p in g["params"])}


class NanAfterNorm(TrainerCallback):
    """Puts a NaN into one gradient entry just before ``optimizer.step()`` at the given steps, after the
    Trainer computed its gradient norm (so only a check of the gradients themselves can see it)."""

    def __init__(self, steps, rank: int | None = None):
        self.steps, self.rank = set(steps), rank

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 in self.steps and (self.rank is None or args.process_index == self.rank):
            grad = dict(model.named_parameters())[NAN_PARAM].grad
            with torch.no_grad():
                (grad.to_local() if hasattr(grad, "to_local") else grad).view(-1)[0] = float("nan")


def nan_gradient_at(model, steps) -> None:
    """A NaN in one gradient entry during backward at the given steps (one backward per step), so that the
    Trainer's own gradient norm is NaN."""
    count = [0]

    def hook(grad):
        count[0] += 1
        if (count[0] >= 3) if steps == "from3" else (count[0] in steps):
            grad = grad.clone()
            grad.view(-1)[0] = float("nan")
        return grad

    dict(model.named_parameters())[NAN_PARAM].register_hook(hook)


def records(trainer) -> dict[int, dict]:
    return {r["step"]: r for r in trainer.state.log_history if "loss" in r}


def groups_by_name(optimizer) -> dict[str, set[str]]:
    return {g["group_name"]: set(g["param_names"]) for g in unwrap_optimizer(optimizer).param_groups}


def assert_equal_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            assert_equal_tensors(x, y, f"{what}/{k}")
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f"{what}/{k} changed"
        else:
            assert x == y, f"{what}/{k}: {x} != {y}"


# ---------------------------------------------------------------------------------------------------------
# The stock Trainer, one argument
# ---------------------------------------------------------------------------------------------------------


def test_trainer_optimizer_fails_early_on_bad_names_and_keys():
    with pytest.raises(ValueError, match="(?i)did you mean 'normuon'"):
        trainer_optimizer("normoun")
    with pytest.raises(ValueError, match="'bogus'.*accepted"):
        trainer_optimizer("lion", lr=1e-4, bogus=1)
    factory, kwargs = trainer_optimizer("NorMuon", lr=0.02)
    assert not (isinstance(factory, type) and issubclass(factory, torch.optim.Optimizer))  # transformers: a factory
    assert factory.name == "normuon" and kwargs == {"lr": 0.02}


def test_the_one_line_alone_routes_right_and_skips_a_nonfinite_step(tmp_path, caplog):
    """No callback, nothing but ``optimizer_cls_and_kwargs``: routing by name, and a NaN step still skipped."""
    model = tiny_llama()
    nan_gradient_at(model, {2})
    snaps = Snapshots()
    trainer = Trainer(model, train_args(tmp_path / "out", 3), train_dataset=counting_task(), callbacks=[snaps],
                      optimizer_cls_and_kwargs=trainer_optimizer("normuon", lr=0.02))
    with caplog.at_level("WARNING", logger="optimzoo.hf.callbacks"):
        trainer.train()
    groups = groups_by_name(trainer.optimizer)
    assert VECTOR <= groups["vector"] and all("proj" in n for n in groups["matrix"])
    assert_equal_tensors(snaps.weights[2], snaps.weights[1], "weights")
    assert not torch.equal(snaps.weights[3][NAN_PARAM], snaps.weights[2][NAN_PARAM])
    assert any("step 2" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)


def test_stock_trainer_routes_by_name_and_reports_metrics_and_canonical_config_to_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "optimzoo-tests")
    args = train_args(tmp_path / "out", 6, logging_steps=2, report_to=["wandb"], include_num_input_tokens_seen="all",
                      seed=3)
    model = tiny_llama()
    trainer = Trainer(model, args, train_dataset=counting_task(),
                      optimizer_cls_and_kwargs=trainer_optimizer("NorMuon", lr=0.02, adamw_lr=3e-3, weight_decay=0.1),
                      callbacks=[OptimizerMetricsCallback()])
    trainer.train()
    finish_wandb()

    opt = unwrap_optimizer(trainer.optimizer)
    assert type(opt) is NorMuon
    groups = groups_by_name(opt)
    assert VECTOR <= groups["vector"] and all("proj" in n for n in groups["matrix"])  # not by dimension

    logged = records(trainer)
    assert sorted(logged) == [2, 4, 6]
    for key in ["optim/step_ms", "optim/state_MB", "optim/update_rms/matrix", "optim/lr/vector",
                "optim/row_scale_spread", "optim/nonfinite_grads", "optim/skipped_steps"]:
        assert key in logged[6], f"{key} missing from trainer_state's log history"
    assert logged[6]["optim/skipped_steps"] == 0 and logged[6]["optim/update_rms/matrix"] > 0

    history, config = wandb_run(tmp_path)
    optim_rows = {h["train/global_step"]: h for h in history if "train/optim/step_ms" in h}
    assert sorted(optim_rows) == [2, 4, 6]  # on the Trainer's step axis
    assert optim_rows[6]["train/optim/update_rms/matrix"] == logged[6]["optim/update_rms/matrix"]

    n_params = sum(p.numel() for p in model.parameters())
    assert {k: config.get(k) for k in ["optimizer", "optimizer_kind", "lr", "vector_lr", "weight_decay", "seed",
                                       "model", "params", "tokens_per_step", "world_size", "parallelism",
                                       "project"]} == {
        "optimizer": "normuon", "optimizer_kind": "matrix", "lr": 0.02, "vector_lr": 3e-3, "weight_decay": 0.1,
        "seed": 3, "model": "llama", "params": n_params, "tokens_per_step": 16 * 16, "world_size": 1,
        "parallelism": "none", "project": "optimzoo-tests"}
    nested = config["optimizer_config"]
    assert nested["hparams"]["ns_steps"] == 5 and nested["hparams"]["adamw_lr"] == 3e-3  # full, defaults included
    assert VECTOR <= set(nested["routing"]["vector"]["names"])
    saved = json.loads((tmp_path / "out" / "optimizer_config.json").read_text())
    assert saved["name"] == "normuon" and saved["run_config"]["optimizer"] == "normuon"


def test_zoo_trainer_skips_a_nonfinite_step_and_reports_canonical_config(tmp_path, monkeypatch):
    """A NaN gradient at step 3: step 3 leaves weights, optimizer state and lr as they were, step 4 trains on,
    ``optim/skipped_steps`` reaches the log and wandb; the config says ``normuon`` though the user wrote NorMuon."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "optimzoo-tests")
    args = train_args(tmp_path / "out", 5, cls=ZooTrainingArguments, optim="NorMuon", learning_rate=0.02,
                      optim_args="adamw_lr=3e-3", report_to=["wandb"])
    model = tiny_llama()
    nan_gradient_at(model, {3})
    snaps = Snapshots()
    trainer = ZooTrainer(model=model, args=args, train_dataset=counting_task(), callbacks=[snaps])
    trainer.train()
    finish_wandb()

    assert_equal_tensors(snaps.weights[3], snaps.weights[2], "weights")
    assert_equal_tensors(snaps.state[3], snaps.state[2], "optimizer state")
    assert not torch.equal(snaps.weights[4][NAN_PARAM], snaps.weights[3][NAN_PARAM])  # training goes on
    assert all(torch.isfinite(w).all() for w in snaps.weights[5].values())
    logged = records(trainer)
    assert math.isnan(logged[3]["grad_norm"])
    assert [logged[s]["optim/skipped_steps"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    # the lr schedule holds on the skipped step: step 4 runs at step 3's lr
    assert logged[4]["learning_rate"] == logged[3]["learning_rate"] < logged[2]["learning_rate"]

    history, config = wandb_run(tmp_path)
    assert max(h.get("train/optim/skipped_steps", 0) for h in history) == 1
    assert config["optim"] == "NorMuon" and config["optimizer"] == "normuon"  # the canonical key does not split
    assert config["optimizer_kind"] == "matrix" and config["vector_lr"] == 3e-3 and config["lr"] == 0.02
    assert config["project"] == "optimzoo-tests" and config["parallelism"] == "none" and config["world_size"] == 1
    assert config["optimizer_config"]["name"] == "normuon"


def test_zoo_trainer_stops_after_max_nonfinite_skips_and_keeps_the_checkpoint(tmp_path):
    args = train_args(tmp_path / "out", 8, cls=ZooTrainingArguments, optim="adamw", learning_rate=1e-3,
                      max_nonfinite_skips=2, save_strategy="steps", save_steps=2)
    model = tiny_llama()
    nan_gradient_at(model, "from3")
    trainer = ZooTrainer(model=model, args=args, train_dataset=counting_task())
    with pytest.raises(RuntimeError) as err:
        trainer.train()
    msg = str(err.value)
    assert "steps 3-5" in msg and "max_nonfinite_skips" in msg and "=2" in msg and "step 2" in msg
    from safetensors.torch import load_file

    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    before, last = (load_file(out / c / "model.safetensors") for c in ("checkpoint-2", "checkpoint-4"))
    assert all(torch.isfinite(t).all() for t in last.values())
    assert_equal_tensors(last, before, "checkpoint-4 vs checkpoint-2")  # steps 3 and 4 were skipped


def test_stock_trainer_factory_route_resumes_from_checkpoint(tmp_path):
    """Stock Trainer + factory + callback, a NaN after the Trainer's norm at step 2 (skipped by the callback's own
    check), checkpoint at 3, resumed in a new Trainer: steps 4-6 log the same losses, weights and state."""

    def run(out, resume=None):
        trainer = Trainer(tiny_llama(seed=1), train_args(out, 6, save_strategy="steps", save_steps=3),
                          train_dataset=counting_task(),
                          optimizer_cls_and_kwargs=trainer_optimizer("normuon", lr=0.02, adamw_lr=3e-3),
                          callbacks=[OptimizerMetricsCallback(), NanAfterNorm({2})])
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "a")
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    a, b = records(full), records(resumed)
    assert a[2]["optim/skipped_steps"] == 1 and math.isfinite(a[2]["grad_norm"])
    assert {s: b[s]["loss"] for s in (4, 5, 6)} == {s: a[s]["loss"] for s in (4, 5, 6)}
    assert b[6]["optim/skipped_steps"] == 1  # the count goes on from the checkpoint's log history
    sa, sb = (unwrap_optimizer(t.optimizer).state_dict() for t in (full, resumed))
    assert sa["param_groups"] == sb["param_groups"]
    assert_equal_tensors(sa["state"], sb["state"], "optimizer state")
    assert_equal_tensors(dict(full.model.named_parameters()), dict(resumed.model.named_parameters()), "weights")


# ---------------------------------------------------------------------------------------------------------
# Subclasses: TRL's SFTTrainer, and one of our own
# ---------------------------------------------------------------------------------------------------------


class ScaledLossTrainer(Trainer):
    """A user's Trainer subclass: its own ``compute_loss``."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        loss = 0.5 * out.loss
        return (loss, out) if return_outputs else loss


class Recorder(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def _sft_trainer(out: Path, callbacks):
    trl = pytest.importorskip("trl")
    from optimzoo.hf.data import byte_tokenizer

    tok = byte_tokenizer(32)
    text = datasets.Dataset.from_dict({"text": [f"line {i}: to be or not to be" for i in range(64)]})
    args = trl.SFTConfig(str(out), max_steps=4, per_device_train_batch_size=8, logging_steps=1, save_strategy="no",
                         report_to="none", use_cpu=True, disable_tqdm=True, max_length=32, packing=False,
                         dataloader_num_workers=0)
    return trl.SFTTrainer(model=tiny_llama(vocab=320), args=args, train_dataset=text, processing_class=tok,
                          optimizer_cls_and_kwargs=trainer_optimizer("normuon", lr=0.02, adamw_lr=3e-3),
                          callbacks=callbacks)


def _own_subclass(out: Path, callbacks):
    return ScaledLossTrainer(tiny_llama(), train_args(out, 4), train_dataset=counting_task(),
                             optimizer_cls_and_kwargs=trainer_optimizer("normuon", lr=0.02, adamw_lr=3e-3),
                             callbacks=callbacks)


@pytest.mark.parametrize("make", [_sft_trainer, _own_subclass], ids=["trl-SFTTrainer", "own-subclass"])
def test_trainer_subclasses_take_the_factory_and_the_callback(tmp_path, make):
    snaps, recorder = Snapshots(), Recorder()
    trainer = make(tmp_path / "out", [snaps, recorder, NanAfterNorm({2})])
    monitor = OptimizerMetricsCallback().attach(trainer)  # ahead of every callback: `recorder` sees the metrics
    trainer.train()

    assert type(unwrap_optimizer(trainer.optimizer)) is NorMuon
    groups = groups_by_name(trainer.optimizer)
    assert VECTOR <= groups["vector"] and all("proj" in n for n in groups["matrix"])
    train_logs = [r for r in recorder.logs if "loss" in r]  # steps 1-4
    assert [r["optim/skipped_steps"] for r in train_logs] == [0, 1, 1, 1]
    assert ["optim/update_rms/matrix" in r for r in train_logs] == [True, False, True, True]  # none for a skip
    assert_equal_tensors(snaps.weights[2], snaps.weights[1], "weights")  # NaN after the Trainer's norm: skipped
    assert not torch.equal(snaps.weights[3][NAN_PARAM], snaps.weights[2][NAN_PARAM])
    assert monitor.run_config["optimizer"] == "normuon" and monitor.run_config["parallelism"] == "none"


# ---------------------------------------------------------------------------------------------------------
# FSDP2 on 2 gloo processes: the factory route on a model sharded by transformers' DistributedConfig
# ---------------------------------------------------------------------------------------------------------


def _fsdp2_worker(out: Path) -> None:
    """torchrun entry point: 4 steps of the stock Trainer with the factory and the callback on an FSDP2 model;
    a NaN in rank 0's shard only at step 3 (both ranks must skip it, else NorMuon's all_to_all would hang)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from transformers.distributed import DistributedConfig

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    init = out / "init"
    if rank == 0:
        tiny_llama().save_pretrained(init)
    dist.barrier()
    model = LlamaForCausalLM.from_pretrained(init, distributed_config=DistributedConfig(fsdp_size=world))
    snaps = Snapshots()
    trainer = Trainer(model, train_args(out / "run", 4, per_device_train_batch_size=8), train_dataset=counting_task(),
                      optimizer_cls_and_kwargs=trainer_optimizer("normuon", lr=0.02, adamw_lr=3e-3),
                      callbacks=[OptimizerMetricsCallback(), snaps, NanAfterNorm({3}, rank=0)])
    monitor = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, OptimizerMetricsCallback))
    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    result = {
        "optimizer": type(opt).__name__,
        "groups": {k: sorted(v) for k, v in groups_by_name(opt).items()},
        "all_dtensors": all(isinstance(p, DTensor) for g in opt.param_groups for p in g["params"]),
        "skipped": {r["step"]: r["optim/skipped_steps"] for r in trainer.state.log_history if "loss" in r},
        "step3_unchanged": all(torch.equal(snaps.weights[3][n], snaps.weights[2][n]) for n in snaps.weights[2]),
        "step4_changed": not torch.equal(snaps.weights[4][NAN_PARAM], snaps.weights[3][NAN_PARAM]),
        "finite": all(bool(torch.isfinite(w).all()) for w in snaps.weights[4].values()),
        "update_rms": trainer.state.log_history[-2].get("optim/update_rms/matrix"),
        "config": {k: v for k, v in monitor.run_config.items() if k != "optimizer_config"},
        "full_params": sum(p.numel() for p in tiny_llama().parameters()),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_factory_route_under_fsdp2_on_two_processes(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(port), str(Path(__file__).resolve()), str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun stops its workers (they run in their own sessions: a SIGKILL would orphan them)
        _, err = proc.communicate(timeout=60)
        pytest.fail("the 2-process job hung (did the ranks disagree on skipping a step?)\n" + err[-3000:])
    assert proc.returncode == 0, err[max(err.find("Traceback"), 0):][:5000]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["optimizer"] == "NorMuon" and r["all_dtensors"]
        assert VECTOR <= set(r["groups"]["vector"]) and all("proj" in n for n in r["groups"]["matrix"])
        assert r["skipped"] == {"1": 0, "2": 0, "3": 1, "4": 1}  # both ranks skipped step 3
        assert r["step3_unchanged"] and r["step4_changed"] and r["finite"]
        assert r["update_rms"] > 0
        c = r["config"]
        assert c["parallelism"] == "fsdp2" and c["world_size"] == 2 and c["optimizer"] == "normuon"
        assert c["params"] == r["full_params"]  # DTensors count their full size


if __name__ == "__main__":
    _fsdp2_worker(Path(sys.argv[1]))
