"""scripts/: the sweep (resumable), the run comparison (table, best lr, plots) and the step benchmark's bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

import optimzoo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import compare_runs  # noqa: E402


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "WANDB_DIR"}


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """Two real runs of the recipe through the sweep script: AdamW at a tiny and at a sensible lr."""
    tmp = tmp_path_factory.mktemp("sweep")
    cmd = [sys.executable, str(ROOT / "scripts" / "sweep.py"), "--optims", "adamw", "--lrs", "1e-5,3e-3",
           "--max_steps", "12", "--eval_steps", "6", "--max_eval_samples", "16", "--group", "fixture"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "[1/2] adamw" in proc.stdout and "[2/2] adamw" in proc.stdout  # a progress line per run
    return tmp / "runs" / "fixture"


@pytest.mark.slow
def test_sweep_writes_runs_table_and_plots_and_resumes(sweep_dir):
    runs = {p.name for p in sweep_dir.iterdir() if p.is_dir()}
    assert runs == {"llama_tiny-adamw-lr1e-05-s0", "llama_tiny-adamw-lr0.003-s0"}
    for run in runs:
        assert json.loads((sweep_dir / run / "run_summary.json").read_text())["steps"] == 12
    assert "| adamw | 0.003 |" in (sweep_dir / "results.md").read_text()
    for name in ("eval_loss_vs_tokens.png", "loss_vs_time.png"):
        assert (sweep_dir / name).stat().st_size > 5000
    again = subprocess.run([sys.executable, str(ROOT / "scripts" / "sweep.py"), "--optims", "adamw", "--lrs",
                            "1e-5,3e-3", "--max_steps", "12", "--group", "fixture"], capture_output=True, text=True,
                           cwd=sweep_dir.parents[1], env=_env(), timeout=120)
    assert again.returncode == 0 and again.stdout.count("skipped") == 2


@pytest.mark.slow
@pytest.mark.parametrize("source", ["wandb", "trainer_state"])
def test_compare_picks_best_lr_and_writes_plots(sweep_dir, tmp_path, source):
    table = compare_runs.main([str(sweep_dir), "--source", source, "--out", str(tmp_path), "--logx"])
    rows = [line for line in table.splitlines() if line.startswith("| adamw")]
    assert len(rows) == 1, table  # one row per optimizer
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1] == "0.003" and cells[2] == "1e-05, 0.003"  # best lr of the two, both listed
    eval_loss, ppl = float(cells[4]), float(cells[5])
    assert 0 < eval_loss < 6 and ppl == pytest.approx(2.718281828 ** eval_loss, rel=1e-3)
    assert (tmp_path / "results.md").read_text().strip() == table.strip()
    for png in ("eval_loss_vs_tokens.png", "loss_vs_time.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.slow
def test_both_sources_read_the_same_numbers(sweep_dir):
    """One code path: a run read from its wandb offline files and from trainer_state.json agrees."""
    run_dir = sweep_dir / "llama_tiny-adamw-lr0.003-s0"
    a = compare_runs.load_run_dir(run_dir, "wandb")
    b = compare_runs.load_run_dir(run_dir, "trainer_state")
    assert (a.source, b.source) == ("wandb", "trainer_state")
    assert (a.optim, a.lr) == (b.optim, b.lr) == ("adamw", 0.003)
    for key in ("loss", "eval_loss", "tokens", "state_MB"):
        assert a.last(key) == pytest.approx(b.last(key)), key
    assert a.series("tokens", "eval_loss") == b.series("tokens", "eval_loss")


def test_compare_normalizes_both_key_styles():
    assert compare_runs.normalize({"loss": 2.0, "num_input_tokens_seen": 10, "optim/step_ms": 3.0, "step": 4}) == \
        compare_runs.normalize({"train/loss": 2.0, "train/num_input_tokens_seen": 10, "train/optim/step_ms": 3.0,
                                "train/global_step": 4})


@pytest.mark.slow
def test_bench_quick_runs_and_state_bytes_match_the_registry(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_step.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    ours = [r for r in result["rows"] if r["ours"]]
    assert {r["algorithm"] for r in ours} >= set(optimzoo.list_optimizers(baselines=False).names())
    for r in ours:
        assert r["state_bytes"] == r["registry_bytes"], r
    assert result["newton_schulz"] and result["auon_vs_normuon"]


def test_runs_are_grouped_by_the_canonical_optimizer_name():
    """'NorMuon' and 'normuon' are one optimizer in the comparison, not two rows."""
    names = {compare_runs.optimizer_name(c) for c in
             ({"optim": "NorMuon"}, {"optim": "normuon"}, {"optimizer": "normuon", "optim": "NorMuon"},
              {"optim": "stable-spam"})}
    assert names == {"normuon", "stable_spam"}
    assert compare_runs.optimizer_name({"optim": "adamw_torch_fused"}) == "adamw_torch_fused"  # transformers' own
