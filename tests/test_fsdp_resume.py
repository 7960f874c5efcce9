"""The recipe under FSDP2 survives a preemption: ``--fsdp2`` checkpoints (DCP, :mod:`optimzoo.hf.sharded_checkpoint`)
resumed after SIGKILL, from a copy in a fresh directory, at another world size, and with bf16 mixed precision.

Every run is the real recipe (``recipes/pretrain_llama.py``) under ``torchrun --nproc_per_node 2`` on gloo, llama_tiny,
6 steps, a checkpoint at step 3. This file is also the launcher of those runs (``torchrun ... test_fsdp_resume.py
<recipe args>``): as a script it runs the recipe with a callback that, per the environment,

* ``FSDP_TEST_KILL_AT=k``: SIGKILLs its own process when step k is done (before it is logged or saved), on every
  rank (torchrun's workers run in their own sessions: killing torchrun alone would leave them running);
* ``FSDP_TEST_DUMP=file``: when training begins (after the checkpoint was loaded), rank 0 writes the optimizer
  state (all ranks gathered, DCP's flattened FQN keys) and the parameters' dtypes to ``file``.

The first tests run in this process (no recipe, no process group): the DCP round trip of zoo optimizers through
``load_sharded_optimizer``, a hyperparameter the checkpoint predates, another optimizer's state refused.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "pretrain_llama.py"
STEPS, SAVE_AT = 6, 3
# a momentum reset of Stable-SPAM at step 5 (T % update_proj_gap == 0): between the checkpoint and the end
OPTIMS = {"normuon": ["--learning_rate", "0.02", "--optim_args", "adamw_lr=1e-3"],
          "stable_spam": ["--learning_rate", "1e-3", "--optim_args", "update_proj_gap=5"],
          "adamw": ["--learning_rate", "1e-3"]}
COMMON = ["--fsdp2", "--max_steps", str(STEPS), "--logging_steps", "1", "--save_strategy", "steps",
          "--save_steps", str(SAVE_AT), "--report_to", "none", "--per_device_train_batch_size", "4",
          "--max_eval_samples", "8", "--disable_tqdm", "true", "--dataloader_num_workers", "0"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, optim: str, *extra: str, nproc: int = 2, kill_at: int | None = None,
           dump: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """The recipe (through this file's launcher) with ``optim`` into the run directory ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_DIR", "FSDP_TEST_KILL_AT", "FSDP_TEST_DUMP")}
    env["OMP_NUM_THREADS"] = "1"
    if kill_at is not None:
        env["FSDP_TEST_KILL_AT"] = str(kill_at)
    if dump is not None:
        env["FSDP_TEST_DUMP"] = str(dump)
    args = [__file__, "--optim", optim, *OPTIMS[optim], *COMMON, "--output_dir", str(out), *extra]
    cmd = [sys.executable, *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
        str(_free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=out.parent)


def losses(run: Path) -> dict[int, float]:
    state = json.loads((run / "trainer_state.json").read_text())
    return {r["step"]: r["loss"] for r in state["log_history"] if "loss" in r}


def saved_optimizer(checkpoint: Path, tmp: Path) -> dict[str, object]:
    """A checkpoint's optimizer state, every rank's shards in one (flattened FQN keys), read in this process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp / f"{checkpoint.parent.name}-{checkpoint.name}-optimizer.pt"
    dcp_to_torch_save(checkpoint / "optimizer", target)
    return torch.load(target, weights_only=False)["optimizer"]


def saved_model(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's weights as full tensors (the per-rank shards concatenated along dim 0)."""
    from safetensors import safe_open

    parts: dict[str, list[torch.Tensor]] = {}
    for file in sorted(checkpoint.glob("shard-*-model-*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                parts.setdefault(key, []).append(f.get_tensor(key))
    return {k: torch.cat(v) if len(v) > 1 else v[0] for k, v in parts.items()}


def assert_same_state(a: dict, b: dict, what: str) -> None:
    assert sorted(a) == sorted(b), f"{what}: different keys"
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"{what}: {key} differs"
        else:
            assert a[key] == b[key], f"{what}: {key} is {a[key]!r}, not {b[key]!r}"


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])


def reference(root: Path, optim: str, *extra: str) -> Path:
    """The uninterrupted run (checkpoints at SAVE_AT and STEPS), run once per module for each configuration."""
    run = root / "-".join((optim, *extra)).replace("--", "") / "run"
    if not (run / "run_summary.json").exists():
        check_ok(launch(run, optim, *extra))
    return run


def killed_and_resumed(root: Path, optim: str, *extra: str, dump: Path | None = None) -> Path:
    """A run SIGKILLed on every rank when step SAVE_AT + 1 is done, then resumed with ``last``."""
    run = root / "killed" / "run"
    proc = launch(run, optim, *extra, kill_at=SAVE_AT + 1)
    assert proc.returncode != 0 and f"Signal {int(signal.SIGKILL)} (SIGKILL)" in proc.stdout + proc.stderr, \
        proc.stderr[-3000:]
    assert (run / f"checkpoint-{SAVE_AT}" / "trainer_state.json").is_file()
    assert not (run / f"checkpoint-{STEPS}").exists() and not (run / "run_summary.json").exists()
    check_ok(launch(run, optim, *extra, "--resume_from_checkpoint", "last", dump=dump))
    return run


# ------------------------------------------------------------------------------------------------ in one process

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _stepped(name: str, steps: int = 2, **hp):
    """A small model and the zoo optimizer ``name`` on it, after ``steps`` steps."""
    from optimzoo import create_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    optimizer = create_optimizer(model, name, **hp)
    for i in range(steps):
        model(torch.randn(16, 8, generator=torch.Generator().manual_seed(i))).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _fresh(model: torch.nn.Module, name: str, **hp):
    from optimzoo import create_optimizer

    return create_optimizer(model, name, **hp)


@pytest.mark.parametrize("name", ["normuon", "stable_spam", "adamw"])
def test_optimizer_state_round_trips_through_dcp(tmp_path, name):
    from transformers.distributed import save_optimizer_distributed

    from optimzoo.hf.sharded_checkpoint import load_sharded_optimizer

    model, optimizer = _stepped(name)
    save_optimizer_distributed(model, optimizer, str(tmp_path))
    fresh = _fresh(model, name)
    load_sharded_optimizer(model, fresh, tmp_path)
    a, b = optimizer.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i, state in a["state"].items():
        assert_same_state(state, b["state"][i], f"state of parameter {i}")


def test_hyperparameter_the_checkpoint_predates_keeps_the_optimizers_value(tmp_path):
    from transformers.distributed import save_optimizer_distributed

    from optimzoo.hf.sharded_checkpoint import load_sharded_optimizer

    model, optimizer = _stepped("normuon")
    for group in optimizer.param_groups:
        del group["ns_steps"]  # a checkpoint written before the optimizer had this hyperparameter
    save_optimizer_distributed(model, optimizer, str(tmp_path))
    fresh = _fresh(model, "normuon", ns_steps=3)
    load_sharded_optimizer(model, fresh, tmp_path)
    assert all(g["ns_steps"] == 3 for g in fresh.param_groups if "ns_steps" in g)
    assert any("ns_steps" in g for g in fresh.param_groups)
    assert_same_state(optimizer.state_dict()["state"][0], fresh.state_dict()["state"][0], "state")


def test_state_of_another_optimizer_is_refused(tmp_path):
    from transformers.distributed import save_optimizer_distributed

    from optimzoo.hf.sharded_checkpoint import load_sharded_optimizer

    model, optimizer = _stepped("adamw")
    save_optimizer_distributed(model, optimizer, str(tmp_path))
    fresh = _fresh(model, "normuon")
    with pytest.raises(ValueError, match="does not fit NorMuon: the checkpoint lacks state.*momentum"):
        load_sharded_optimizer(model, fresh, tmp_path)


# ------------------------------------------------------------------------------------------------ the recipe

@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("references")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("optim", list(OPTIMS))
def test_sigkill_and_resume_is_bit_identical(tmp_path, refs, optim):
    ref = reference(refs, optim)
    run = killed_and_resumed(tmp_path, optim)
    assert sorted(losses(run)) == list(range(1, STEPS + 1))
    assert losses(run) == losses(ref)  # bit-identical, step for step
    final = f"checkpoint-{STEPS}"
    assert_same_state(saved_optimizer(ref / final, tmp_path), saved_optimizer(run / final, tmp_path), "optimizer")
    assert_same_state(saved_model(ref / final), saved_model(run / final), "model")
    assert json.loads((ref / "run_summary.json").read_text())["eval_loss"] == \
        json.loads((run / "run_summary.json").read_text())["eval_loss"]


@pytest.mark.slow
@pytest.mark.distributed
def test_checkpoint_copied_into_a_fresh_directory_resumes_there(tmp_path, refs):
    ref = reference(refs, "normuon")
    fresh = tmp_path / "fresh" / "run"
    fresh.mkdir(parents=True)
    shutil.copytree(ref / f"checkpoint-{SAVE_AT}", fresh / f"checkpoint-{SAVE_AT}")
    check_ok(launch(fresh, "normuon", "--resume_from_checkpoint", "last"))
    assert losses(fresh) == losses(ref)


@pytest.mark.slow
@pytest.mark.distributed
def test_resuming_with_another_optimizer_is_refused(tmp_path, refs):
    ref = reference(refs, "normuon")
    run = tmp_path / "other" / "run"
    run.mkdir(parents=True)
    shutil.copytree(ref / f"checkpoint-{SAVE_AT}", run / f"checkpoint-{SAVE_AT}")
    proc = launch(run, "adamw", "--resume_from_checkpoint", "last", nproc=1)
    assert proc.returncode != 0
    assert "holds the state of the optimizer 'normuon'; this run's optimizer is 'adamw'" in proc.stderr


def _check_resharded(dump: Path, checkpoint: Path, run: Path, tmp: Path) -> None:
    """The optimizer state right after loading equals the saved one (gathered); training went on from SAVE_AT."""
    loaded = torch.load(dump, weights_only=False)
    saved = saved_optimizer(checkpoint, tmp)
    tensors = [k for k, v in saved.items() if isinstance(v, torch.Tensor)]
    assert tensors and any(".exp_avg" in k or "momentum" in k for k in tensors)  # real state, not only counters
    assert_same_state(loaded["optimizer"], saved, "optimizer after loading")
    history = losses(run)
    assert sorted(history) == list(range(1, STEPS + 1))
    assert all(history[s] == v for s, v in losses(checkpoint).items())  # steps 1..SAVE_AT are the checkpoint's
    assert all(torch.isfinite(torch.tensor(history[s])) for s in range(SAVE_AT + 1, STEPS + 1))


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_checkpoint_resumes_in_one_process(tmp_path, refs):
    ref = reference(refs, "normuon")
    run = tmp_path / "one" / "run"
    run.mkdir(parents=True)
    checkpoint = run / f"checkpoint-{SAVE_AT}"
    shutil.copytree(ref / checkpoint.name, checkpoint)
    dump = tmp_path / "loaded.pt"
    check_ok(launch(run, "normuon", "--resume_from_checkpoint", "last", nproc=1, dump=dump))
    _check_resharded(dump, checkpoint, run, tmp_path)


@pytest.mark.slow
@pytest.mark.distributed
def test_one_process_checkpoint_resumes_on_two_ranks(tmp_path):
    written = tmp_path / "one" / "run"
    check_ok(launch(written, "normuon", nproc=1))
    run = tmp_path / "two" / "run"
    run.mkdir(parents=True)
    checkpoint = run / f"checkpoint-{SAVE_AT}"
    shutil.copytree(written / checkpoint.name, checkpoint)
    dump = tmp_path / "loaded.pt"
    check_ok(launch(run, "normuon", "--resume_from_checkpoint", "last", dump=dump))
    _check_resharded(dump, checkpoint, run, tmp_path)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("optim", ["adamw", "normuon"])
def test_bf16_mixed_precision_trains_resumes_and_keeps_fp32_state(tmp_path, refs, optim):
    ref = reference(refs, optim, "--bf16")
    dump = tmp_path / "loaded.pt"
    run = killed_and_resumed(tmp_path, optim, "--bf16", dump=dump)
    assert losses(run) == losses(ref)
    loaded = torch.load(dump, weights_only=False)
    assert loaded["compute_dtypes"] == {torch.bfloat16}  # FSDP2 casts the gathered weights for compute
    assert set(loaded["param_dtypes"].values()) == {torch.float32}  # master weights
    state = {k: v for k, v in loaded["optimizer"].items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    assert state and {v.dtype for v in state.values()} == {torch.float32}
    assert_same_state(saved_optimizer(ref / f"checkpoint-{STEPS}", tmp_path),
                      saved_optimizer(run / f"checkpoint-{STEPS}", tmp_path), "optimizer")


# ------------------------------------------------------------------------------------------------ the launcher


def _launcher_main() -> None:
    import copy
    import runpy

    import transformers
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from transformers import TrainerCallback

    from optimzoo.hf.callbacks import unwrap_optimizer

    kill_at = int(os.environ.get("FSDP_TEST_KILL_AT", "0"))
    dump = os.environ.get("FSDP_TEST_DUMP")

    class Hooks(TrainerCallback):
        loaded: dict | None = None
        compute_dtypes: set = set()

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            if dump:
                options = StateDictOptions(full_state_dict=True, flatten_optimizer_state_dict=True)
                optim_sd = get_optimizer_state_dict(model, unwrap_optimizer(optimizer), options=options)
                # a copy: in one process the state dict holds the optimizer's own tensors, which the next step changes
                self.loaded = copy.deepcopy(
                    {"optimizer": optim_sd, "param_dtypes": {n: p.dtype for n, p in model.named_parameters()}})
                # the dtype of a weight inside forward: bf16 under FSDP2's MixedPrecisionPolicy (autocast alone
                # leaves it fp32 and casts inside the matmul)
                proj = next(m for n, m in model.named_modules() if n.endswith("self_attn.q_proj"))
                proj.register_forward_pre_hook(lambda module, inputs: self.compute_dtypes.add(module.weight.dtype))

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if self.loaded is not None and state.is_world_process_zero:
                torch.save({**self.loaded, "compute_dtypes": self.compute_dtypes}, dump)
                self.loaded = None

    init = transformers.Trainer.__init__

    def with_hooks(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(Hooks())

    transformers.Trainer.__init__ = with_hooks
    sys.argv = [str(RECIPE), *sys.argv[1:]]
    runpy.run_path(str(RECIPE), run_name="__main__")


if __name__ == "__main__":
    _launcher_main()
