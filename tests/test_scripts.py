"""scripts/: the sweep (run identity, seeds, budgets, progress), the run comparison (seed means, intervals, speedup fit,
resumed-run time, table, results.json, plots) and the step benchmark's bytes."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytestmark = pytest.mark.timeout(1200)  # the sweep fixture's real runs count toward its first test; a busy machine

import optimzoo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import compare_runs  # noqa: E402
from optimzoo.hf.runs import clock_summary  # noqa: E402


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "WANDB_DIR"}


SWEEP = [sys.executable, str(ROOT / "scripts" / "sweep.py"), "--optims", "adamw", "--lrs", "1e-5,3e-3",
         "--seeds", "0,1", "--max_steps", "8", "--eval_steps", "4", "--max_eval_samples", "16", "--budgets", "3,6", "--budget_seeds", "0",
         "--group", "fixture"]


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory) -> tuple[Path, str]:
    """Real recipe runs through the sweep script: AdamW at a tiny and at a sensible lr, 2 seeds each, and at two
    more budgets (3 and 6 steps, seed 0) for the speedup fit. (group directory, the sweep's stdout)"""
    tmp = tmp_path_factory.mktemp("sweep")
    proc = subprocess.run([*SWEEP, "--progress_s", "1"], capture_output=True, text=True, cwd=tmp, env=_env(),
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return tmp / "runs" / "fixture", proc.stdout


@pytest.fixture(scope="module")
def sweep_dir(sweep_run) -> Path:
    return sweep_run[0]


def _summaries(directory: Path) -> dict[str, dict]:
    return {p.name: json.loads((p / "run_summary.json").read_text()) for p in directory.iterdir()
            if (p / "run_summary.json").is_file()}


@pytest.mark.slow
def test_sweep_prints_a_banner_and_progress(sweep_run):
    _, out = sweep_run
    assert "sweep fixture: 4 runs planned" in out and "0 done earlier and reused, 4 to run" in out
    lines = out.splitlines()
    banner = next(i for i, line in enumerate(lines) if line.startswith("sweep fixture: 4 runs planned"))
    assert "recipe.log" in lines[banner + 1] and "started" in lines[banner + 2]  # where the logs are, then runs
    assert "[1/4] adamw" in out and "[4/4] adamw" in out  # a line per run
    assert re.search(r"  \.\.\. llama_tiny-adamw-\S+: (starting|step \d+/[368], loss)", out), out  # progress
    assert "AdamW budgets for the speedup fit: [3, 6] steps at lr 0.003" in out


@pytest.mark.slow
def test_sweep_writes_runs_table_json_and_plots_and_reuses(sweep_dir):
    runs = _summaries(sweep_dir)
    assert set(runs) == {f"llama_tiny-adamw-lr{lr}-s{s}" for lr in ("1e-05", "0.003") for s in (0, 1)}
    assert {r["steps"] for r in runs.values()} == {8}
    assert {r["steps"] for r in _summaries(sweep_dir / "budgets").values()} == {3, 6}
    assert "| adamw | 0.003 | 1e-05, 0.003 | 2 |" in (sweep_dir / "results.md").read_text()
    assert json.loads((sweep_dir / "results.json").read_text())["optimizers"][0]["optimizer"] == "adamw"
    for name in ("eval_loss_vs_tokens.png", "loss_vs_time.png", "lr_sensitivity.png"):
        assert (sweep_dir / name).stat().st_size > 5000
    again = subprocess.run(SWEEP, capture_output=True, text=True, cwd=sweep_dir.parents[1], env=_env(), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 done earlier and reused, 0 to run" in again.stdout and " started, log " not in again.stdout


@pytest.mark.slow
def test_sweep_refuses_a_group_made_with_other_settings(sweep_dir):
    """The same run names with another budget: nothing is reused or overwritten, the settings are named."""
    before = {p.name: p.stat().st_mtime_ns for p in sweep_dir.glob("*/run_summary.json")}
    changed = list(SWEEP)
    changed[changed.index("--max_steps") + 1] = "9"
    proc = subprocess.run(changed, capture_output=True, text=True, cwd=sweep_dir.parents[1], env=_env(), timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "max_steps: 8 there, 9 now" in proc.stderr and "another --group" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in sweep_dir.glob("*/run_summary.json")} == before


@pytest.mark.slow
@pytest.mark.parametrize("source", ["wandb", "trainer_state"])
def test_compare_aggregates_seeds_and_picks_the_best_lr_by_mean(sweep_dir, tmp_path, source):
    table = compare_runs.main([str(sweep_dir), "--source", source, "--out", str(tmp_path), "--logx",
                               "--budgets", str(sweep_dir / "budgets")])
    rows = [line for line in table.splitlines() if line.startswith("| adamw")]
    assert len(rows) == 1, table  # one row per optimizer, the seeds aggregated
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    summaries = _summaries(sweep_dir)
    means = {lr: statistics.fmean(s["eval_loss"] for s in summaries.values() if s["learning_rate"] == lr)
             for lr in (1e-5, 3e-3)}
    best = min(means, key=means.get)
    assert cells[1] == f"{best:g}" and cells[2] == "1e-05, 0.003" and cells[3] == "2"
    assert float(cells[4].split(" ± ")[0]) == pytest.approx(means[best], abs=5e-4)  # printed to 3 decimals
    low, high = (float(x) for x in cells[5].split("-"))
    assert low < means[best] < high
    doc = json.loads((tmp_path / "results.json").read_text())
    (entry,) = doc["optimizers"]
    assert entry["seeds"] == [0, 1] and entry["n"] == 2 and entry["eval_loss_mean"] == pytest.approx(means[best])
    assert entry["edge_lr"] is True  # two lrs: the best is at an edge
    # the speedup fit on real AdamW runs at 3 budgets (3, 6, 8 steps): finite and positive
    assert 0 < entry["speedup_vs_adamw"] < math.inf and doc["adamw_fit"]["b"] > 0
    assert len(doc["adamw_fit"]["budgets"]) == 3
    assert (tmp_path / "results.md").read_text().strip() == table.strip()
    for png in ("eval_loss_vs_tokens.png", "loss_vs_time.png", "lr_sensitivity.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.slow
def test_compare_refuses_runs_with_other_settings_unless_allowed(sweep_dir, tmp_path, capsys):
    """Budget runs (3 and 6 steps) in one table with the 8-step runs: refused, naming max_steps."""
    with pytest.raises(SystemExit) as e:
        compare_runs.main([str(sweep_dir), str(sweep_dir / "budgets"), "--source", "trainer_state",
                           "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "max_steps" in err and "--allow-mixed" in err
    table = compare_runs.main([str(sweep_dir), str(sweep_dir / "budgets"), "--source", "trainer_state",
                               "--out", str(tmp_path), "--allow-mixed"])
    assert "Mixed settings (--allow-mixed)" in table
    for steps in (3, 6, 8):  # one row per budget, never averaged together
        assert f"| adamw [max_steps={steps}] |" in table


@pytest.mark.slow
def test_both_sources_read_the_same_numbers(sweep_dir):
    """One code path: a run read from its wandb offline files and from trainer_state.json agrees."""
    run_dir = sweep_dir / "llama_tiny-adamw-lr0.003-s0"
    a = compare_runs.load_run_dir(run_dir, "wandb")
    b = compare_runs.load_run_dir(run_dir, "trainer_state")
    assert (a.source, b.source) == ("wandb", "trainer_state")
    assert (a.optim, a.lr, a.seed) == (b.optim, b.lr, b.seed) == ("adamw", 0.003, 0)
    for key in ("loss", "eval_loss", "tokens", "state_MB", "wall_s", "cpu_s"):
        assert a.last(key) == pytest.approx(b.last(key)), key
    assert a.series("tokens", "eval_loss") == b.series("tokens", "eval_loss")
    assert a.settings == b.settings and a.clock == b.clock


@pytest.mark.slow
def test_a_killed_and_resumed_run_adds_up_its_sessions(tmp_path):
    """A run killed (SIGKILL) after its first checkpoint and resumed: the run clock holds every step once (the
    steps of the killed session after the checkpoint are trained and timed again), two sessions, and time that
    only grows; the comparison's tokens/s divides all tokens by the time of both sessions."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "recipes" / "pretrain_llama.py"), "--optim", "adamw", "--max_steps", "16",
           "--save_strategy", "steps", "--save_steps", "4", "--logging_steps", "2", "--max_eval_samples", "8",
           "--report_to", "none", "--disable_tqdm", "true", "--output_dir", str(out)]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.monotonic() + 300
    try:
        while not (out / "checkpoint-4" / "trainer_state.json").exists() and first.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint-4 within 300 s"
            time.sleep(0.05)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL and not (out / "run_summary.json").exists()
    at_checkpoint = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["stateful_callbacks"]
    resumed = subprocess.run([*cmd, "--resume_from_checkpoint", "last"], capture_output=True, text=True, env=_env(),
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    clock = clock_summary(state["stateful_callbacks"]["RunClock"])
    before = clock_summary(at_checkpoint["RunClock"])
    assert before["sessions"] == 1 and before["steps_timed"] == 4
    assert clock["sessions"] == 2 and clock["steps_timed"] == state["global_step"] == 16
    assert clock["wall_s"] > before["wall_s"] and clock["cpu_s"] > before["cpu_s"]
    session2 = json.loads((out / "run_summary.json").read_text())["train_seconds"]
    assert clock["wall_s"] - before["wall_s"] <= session2  # the second session's share, timed inside train()
    times = [r["time/wall_s"] for r in state["log_history"] if "time/wall_s" in r]
    steps = [r["step"] for r in state["log_history"] if "time/wall_s" in r]
    assert steps == sorted(steps) and times == sorted(times) and len(times) >= 8  # never back in time
    run = compare_runs.load_run_dir(out, "trainer_state")
    assert run.tokens_per_s == pytest.approx(state["num_input_tokens_seen"] / clock["wall_s"], rel=1e-12)


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
