"""optimzoo.hf.runs (run identity, run clock) and the comparison's statistics (seeds, intervals, speedup fit)."""

from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("scipy")

from optimzoo.hf.runs import RunClock, clock_summary, contended, run_identity, settings_diff  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import compare_runs  # noqa: E402
import sweep  # noqa: E402


@dataclass
class _Data:
    max_length: int = 256
    max_eval_samples: int | None = None


@dataclass
class _Train:
    max_steps: int = 12
    seed: int = 0
    output_dir: str = "runs/a"
    logging_steps: int = 10


def test_identity_changes_with_a_result_setting_and_names_it():
    base = run_identity(_Data(), _Train(), world_size=1, model_config={"hidden_size": 128})
    assert base == run_identity(_Data(), _Train(), world_size=1, model_config={"hidden_size": 128})  # stable
    same = run_identity(_Data(), _Train(output_dir="elsewhere", logging_steps=1), world_size=1,
                        model_config={"hidden_size": 128})
    assert same["hash"] == base["hash"]  # where it writes and how often it logs change nothing
    for changed, key in ((run_identity(_Data(), _Train(max_steps=400), world_size=1,
                                       model_config={"hidden_size": 128}), "max_steps"),
                         (run_identity(_Data(max_length=128), _Train(), world_size=1,
                                       model_config={"hidden_size": 128}), "max_length"),
                         (run_identity(_Data(), _Train(), world_size=2, model_config={"hidden_size": 128}),
                          "world_size"),
                         (run_identity(_Data(), _Train(), world_size=1, model_config={"hidden_size": 256}),
                          "model_config_values")):
        assert changed["hash"] != base["hash"]
        assert list(settings_diff(base["settings"], changed["settings"])) == [key]
    assert set(base["settings"]["versions"]) == {"optimzoo", "torch", "transformers"}


def test_identity_refuses_one_setting_given_twice_differently():
    with pytest.raises(ValueError, match="max_steps"):
        run_identity(_Train(), {"max_steps": 5}, world_size=1)


def test_settings_diff_counts_a_missing_key_as_different():
    assert settings_diff({"a": 1, "b": 2}, {"a": 1}) == {"b": (2, "<not recorded>")}
    assert settings_diff({"a": 1, "seed": 0}, {"a": 1, "seed": 1}, ignore={"seed"}) == {}


def test_clock_state_round_trips_and_sums_sessions():
    first = RunClock()
    first.sessions, first.wall_s, first.cpu_s, first.step_ms, first.load = 1, 10.0, 18.0, [5.0, 7.0, 6.0], [2.1]
    saved = first.state()
    again = RunClock.from_state(saved)  # what transformers does with restore_callback_states_from_checkpoint
    assert again.state() == saved
    summary = clock_summary(saved)
    assert summary["sessions"] == 1 and summary["steps_timed"] == 3 and summary["median_step_s"] == 0.006
    assert clock_summary(None) is None


def test_contention_is_the_median_load_above_cores_plus_one_thread():
    assert contended([], 2) is None
    assert contended([2.0, 2.9, 3.0], 2) is False  # this run's own threads keep the load near the cores
    assert contended([3.2, 3.5, 1.0], 2) is True


# ---------------------------------------------------------------- seeds


def _run(optim: str, lr: float, seed: int, loss: float, settings: dict | None = None,
         tokens: float = 1e5) -> compare_runs.Run:
    base = {"max_steps": int(tokens // 1000), "max_length": 256, "optim": optim, "learning_rate": lr, "seed": seed}
    return compare_runs.Run(name=f"{optim}-{lr}-{seed}", optim=optim, lr=lr, seed=seed, eval_loss=loss,
                            settings={**base, **(settings or {})},
                            records=[{"step": 12.0, "tokens": tokens, "eval_loss": loss}])


def test_best_lr_is_chosen_by_the_mean_over_seeds_not_the_luckiest_run():
    runs = [_run("adamw", 1e-3, 0, 2.0), _run("adamw", 1e-3, 1, 3.0),  # luckiest single run, mean 2.5
            _run("adamw", 3e-3, 0, 2.2), _run("adamw", 3e-3, 1, 2.3),  # mean 2.25: the best lr
            _run("adamw", 1e-2, 0, 2.9), _run("adamw", 1e-2, 1, 2.8)]
    (res,) = compare_runs.aggregate(runs)
    assert res.best.lr == 3e-3 and res.best.n == 2 and res.best.seeds == [0, 1]
    assert res.best.mean == pytest.approx(2.25) and res.best.std == pytest.approx(math.sqrt(0.005))
    assert not res.edge
    (edge,) = compare_runs.aggregate(runs[:4])
    assert edge.edge and sweep.extension(edge, [1e-3, 3e-3]) == 0.009  # the grid's own ratio beyond the edge


def test_t_interval_uses_the_t_quantile():
    low, high = compare_runs.t_interval([1.0, 2.0, 3.0])
    p = 0.975  # Student t with 2 degrees of freedom has the closed-form quantile (2p - 1) / sqrt(2p(1 - p))
    half = (2 * p - 1) / math.sqrt(2 * p * (1 - p)) / math.sqrt(3)
    assert (low, high) == pytest.approx((2.0 - half, 2.0 + half), rel=1e-9)
    assert compare_runs.t_interval([1.0]) is None


def test_runs_with_other_settings_are_refused_and_named():
    runs = [_run("adamw", 3e-3, 0, 2.0), _run("lion", 1e-4, 0, 2.1, {"max_length": 128})]
    message = compare_runs.check_settings(runs, "the runs")
    assert "max_length" in message and "128" in message and "256" in message
    with pytest.raises(ValueError, match="max_length.*--allow-mixed"):
        compare_runs.compare(runs, [])
    results, rows, _, note = compare_runs.compare(runs, [], allow_mixed=True)
    assert len(rows) == 2 and "max_length" in note
    with pytest.raises(ValueError, match="max_steps"):  # seeds of one (optimizer, lr) must agree in all else
        compare_runs.aggregate([_run("adamw", 3e-3, 0, 2.0), _run("adamw", 3e-3, 1, 2.0, {"max_steps": 13})])


# ---------------------------------------------------------------- speedup


A, B, C = 40.0, 0.3, 1.5  # a known AdamW curve L(D) = a D^-b + c


def _adamw(d: float) -> float:
    return A * d ** -B + C


@pytest.mark.parametrize("k", [0.6, 1.4])
def test_speedup_fit_recovers_a_known_effective_token_ratio(k):
    """An optimizer whose loss at D is AdamW's at k D has speedup D_eff/D = k."""
    budgets = [1e5, 2e5, 4e5, 8e5]
    rng = random.Random(0)
    noise = [-2e-4, 0.0, 2e-4]  # three seeds, symmetric about the curve
    adamw = [_run("adamw", 3e-3, s, _adamw(d) + e, tokens=d) for d in budgets for s, e in enumerate(noise)]
    d = 8e5
    other = [_run("x", 1e-3, s, _adamw(k * d) + e, tokens=d) for s, e in enumerate(noise)]
    sp = compare_runs.speedup(compare_runs.adamw_curve(adamw, rng, bootstrap=200), other, rng, bootstrap=200)
    assert sp["value"] == pytest.approx(k, rel=0.02)
    low, high = sp["ci95"]
    assert low <= sp["value"] <= high
    assert sp["extrapolated"] is (k * d > budgets[-1])
    assert sp["fit"]["b"] == pytest.approx(B, rel=0.1)


def test_adamw_against_its_own_curve_is_one_and_not_extrapolated():
    """The main job's case (its real tokens and eval losses at 50, 100 and 150 steps, one seed): AdamW's own run
    at the largest budget reads back D_eff/D = 1.0019 (the fit's residual), inside the budgets' range."""
    points = [(86009, 2.80081021478824), (171544, 2.4807517307016753), (257228, 2.3076337973508405)]
    adamw = [_run("adamw", 3e-3, 0, loss, tokens=d) for d, loss in points]
    rng = random.Random(0)
    sp = compare_runs.speedup(compare_runs.adamw_curve(adamw, rng), adamw[-1:], rng)
    assert sp["value"] == pytest.approx(1.0, abs=0.005)
    assert sp["extrapolated"] is False


def test_speedup_needs_three_budgets_and_says_none_otherwise():
    adamw = [_run("adamw", 3e-3, 0, _adamw(d), tokens=d) for d in (1e5, 2e5)]
    assert compare_runs.adamw_curve(adamw, random.Random(0)) is None
    assert compare_runs.speedup(None, [_run("x", 1e-3, 0, 2.0, tokens=2e5)], random.Random(0)) is None
    with pytest.raises(ValueError, match="3 or more"):
        compare_runs.fit_power_law([1e5, 2e5], [2.0, 1.9])


def test_tokens_to_reach_interpolates_between_eval_points():
    assert compare_runs.tokens_to_reach(([10.0, 20.0, 30.0], [3.0, 2.0, 1.0]), 1.5) == pytest.approx(25.0)
    assert compare_runs.tokens_to_reach(([10.0, 20.0], [3.0, 2.0]), 1.0) is None


# ---------------------------------------------------------------- sweep planning


def test_lr_grids_are_per_optimizer_in_its_own_units():
    lrs = sweep.parse_lrs("normuon=0.02,0.05;adamw=1e-3,3e-3", ["adamw", "normuon", "lion"])
    assert lrs == {"adamw": [1e-3, 3e-3], "normuon": [0.02, 0.05], "lion": [sweep.default_lr("lion")]}
    grid = sweep.parse_lrs("grid", ["adamw", "muon"])
    for name in ("adamw", "muon"):
        assert grid[name] == [float(f"{sweep.default_lr(name) * m:.3g}") for m in sweep.LR_MULTIPLIERS]
        assert sweep.default_lr(name) in grid[name]
    assert sweep.parse_lrs("1e-3;lion=grid", ["adamw", "lion"])["adamw"] == [1e-3]
    with pytest.raises(ValueError, match="not in --optims"):
        sweep.parse_lrs("muon=0.02", ["adamw"])
    assert sweep.parse_budgets("auto", 150, ["adamw"]) == [50, 100]
    assert sweep.parse_budgets("auto", 150, ["lion"]) == []
    with pytest.raises(ValueError, match="--budgets"):
        sweep.parse_budgets("200", 150, ["adamw"])


def test_lion_k_runs_with_a_non_sign_kappa_in_the_default_sweep():
    assert "lion_k" in sweep.default_optimizers()
    kappa = dict(kv.split("=") for kv in sweep.optim_args("lion_k", None).split(","))["kappa"]
    assert kappa != "sign"


def test_per_optimizer_optim_args_replace_the_defaults_key_by_key():
    from optimzoo.cli import merge_kv

    assert merge_kv("kappa=tanh,a=1000", None, "kappa=huber,a=0.001") == "kappa=huber,a=0.001"
    assert merge_kv("betas=(0.9,0.95),eps=1e-8", "eps=1e-6") == "betas=(0.9,0.95),eps=1e-6"
    assert merge_kv(None, "") is None
    own = sweep.parse_optim_args("weight_decay=0.1;lion_k:kappa=huber,a=0.001", ["lion", "lion_k"])
    assert own == {"lion": "weight_decay=0.1", "lion_k": "weight_decay=0.1,kappa=huber,a=0.001"}
    assert sweep.optim_args("lion_k", own["lion_k"]) == "kappa=huber,a=0.001,weight_decay=0.1"
    assert sweep.optim_args("lion", own["lion"]) == "weight_decay=0.1"
    assert sweep.optim_args("normuon", None) == f"adamw_lr={sweep.MATRIX_ADAMW_LR}"
    with pytest.raises(ValueError, match="not in --optims"):
        sweep.parse_optim_args("lion_k:kappa=tanh", ["lion"])
    with pytest.raises(ValueError, match="unknown optimizer 'lino'"):
        sweep.parse_optim_args("lino:kappa=tanh", ["lion"])


def test_plots_have_a_distinct_colour_per_optimizer():
    colours = compare_runs._colours(16)
    assert len({tuple(round(x, 3) for x in c[:3]) for c in colours}) == 16


def test_results_json_has_the_schema(tmp_path):
    runs = [_run("adamw", 3e-3, s, 2.0 + 0.01 * s) for s in range(3)] + [_run("lion", 1e-4, s, 2.1) for s in range(2)]
    results, rows, fit, mixed = compare_runs.compare(runs, [])
    doc = compare_runs.results_json(rows, "t", None, fit, mixed)
    for entry in doc["optimizers"]:
        assert {"optimizer", "best_lr", "lrs", "seeds", "n", "eval_loss_mean", "eval_loss_std", "eval_loss_ci95",
                "tokens", "speedup_vs_adamw", "speedup_ci95", "edge_lr"} <= set(entry)
    adamw = doc["optimizers"][0]
    assert adamw["optimizer"] == "adamw" and adamw["n"] == 3 and len(adamw["eval_loss_ci95"]) == 2
    assert adamw["speedup_vs_adamw"] is None  # no budgets: not estimable
    table = compare_runs.markdown_table(rows)
    assert "| adamw | 0.003 | 0.003 | 3 | 2.010 ± 0.010 |" in table  # fixed decimals
    assert "| lion | 0.0001 | 0.0001 | 2 | 2.100 ± 0.000 |" in table
    compare_runs.plot(results, tmp_path)
    assert (tmp_path / "lr_sensitivity.png").stat().st_size > 1000


def test_an_unbounded_speedup_interval_is_strict_json_and_reads_inf():
    """A bootstrap fit whose floor lies above the optimizer's loss makes ``D_eff`` infinite (the study's SWAN):
    results.json stays strict JSON (null, not Infinity) and the table says ``inf``."""
    row = {"optimizer": "swan", "best_lr": 0.01, "lrs": [0.01], "n": 3, "eval_loss_mean": 2.0, "eval_loss_std": 0.01,
           "eval_loss_ci95": [1.98, 2.02], "speedup_vs_adamw": 4.55, "speedup_ci95": [2.36, math.inf],
           "speedup_extrapolated": True, "edge_lr": False, "timing_contended": False, "tokens_to_adamw_loss": None,
           "tokens": 259212.0, "tokens_per_s": 1e4, "median_step_ms": 100.0, "state_MB": 0.6, "perplexity": 7.4}
    text = json.dumps(compare_runs.results_json([row], "t", None, None, None), allow_nan=False)
    assert json.loads(text)["optimizers"][0]["speedup_ci95"] == [2.36, None]
    assert "4.55 (2.36-inf)" in compare_runs.markdown_table([row])


# ---------------------------------------------------------------- the study


def _entry(mean: float, std: float, n: int = 3) -> dict:
    return {"eval_loss_mean": mean, "eval_loss_std": std, "n": n}


def test_claim_verdicts_follow_the_interval_of_the_difference():
    import study

    clear, tie = _entry(2.0, 0.01), _entry(2.001, 0.01)
    worse = _entry(2.2, 0.01)
    assert study.verdict(clear, "better", worse) == "agrees"
    assert study.verdict(worse, "better", clear) == "disagrees"
    assert study.verdict(clear, "better", tie) == "inside the noise"
    assert study.verdict(clear, "matches", tie) == "agrees (inside the noise)"
    assert study.verdict(worse, "matches", clear) == "disagrees"
    assert study.verdict(_entry(2.0, None, 1), "better", worse).startswith("not estimable")
    diff, low, high = study.difference_interval(clear, worse)
    assert diff == pytest.approx(0.2) and low < 0.2 < high
    table = study.claims_table({"optimizers": [{"optimizer": "adamw", **worse}, {"optimizer": "lion", **clear}]})
    assert "| Lion matches AdamW | lion matches adamw |" in table and "not measured" in table


def test_study_plan_names_every_stage_and_runs_nothing(tmp_path, capsys):
    import study

    assert study.main(["--dry-run", "--smoke", "--runs_dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    for stage in ("1. grid:", "2. seeds-small:", "3. seeds-mid:", "4. report:"):
        assert stage in out
    assert "--lrs adamw=1e-3,3e-3;lion=1e-4,3e-4 --extend-edges --seeds 0" in out and "--seeds 0,1 --budgets auto" in out
    assert not (tmp_path / "runs").exists()
    full = study.main(["--dry-run", "--runs_dir", str(tmp_path / "runs")])
    assert full == 0 and f"{len(sweep.default_optimizers())} optimizers" in capsys.readouterr().out


def test_study_report_runs_nothing_and_says_what_is_missing(tmp_path, monkeypatch):
    """``--report`` on a study with no finished run: nothing is trained (no recipe is launched), and the report
    says so for each size and names itself partial."""
    import study

    monkeypatch.setattr(sweep, "main", lambda *a, **k: pytest.fail("--report must not run a sweep"))
    runs = tmp_path / "runs"
    assert study.main(["--report", "--smoke", "--runs_dir", str(runs)]) == 0
    text = (runs / "study-smoke.md").read_text()
    assert "written by `.venv/bin/python scripts/study.py --smoke --report` from the runs finished so far" in text
    assert "## llama_tiny: no runs yet" in text and "## study-smoke-mid: no runs yet" in text


# ------------------------------------------------------------------ the low-bit comparison

import compare_lowbit  # noqa: E402


def _lowbit_run(optim: str, quant: str | None, seed: int, losses: list[float], norms: list[float], final: float):
    settings = {"optim": optim, "learning_rate": 1e-3, "seed": seed, "quant": quant, "max_steps": 10}
    records = [{"step": float(i), "loss": x, "grad_norm": g} for i, (x, g) in enumerate(zip(losses, norms), 1)]
    return compare_runs.Run(name=f"{optim}-{quant}-{seed}", optim=optim, lr=1e-3, seed=seed, eval_loss=final,
                            records=records, settings=settings)


def test_lowbit_rows_count_spikes_divergence_and_compare_to_fp32_adamw():
    calm, norms = [3.0, 2.5, 2.2, 2.0], [1.0, 1.0, 1.0, 1.0]
    runs = [_lowbit_run("adamw", None, s, calm, norms, 2.0 + 0.01 * s) for s in range(3)]
    runs += [_lowbit_run("adamw", "int4", s, [3.0, 2.5, 2.8, 2.6], [1.0, 1.0, 10.0, 1.0], 2.6) for s in range(2)]
    runs.append(_lowbit_run("adamw", "int4", 2, [3.0, 2.9, float("nan"), float("nan")], norms, float("nan")))
    rows = {(r["optimizer"], r["quant"]): r for r in compare_lowbit.rows_of(runs)}
    fp32, int4 = rows["adamw", "none"], rows["adamw", "int4"]
    assert fp32["n"] == 3 and math.isclose(fp32["eval_loss_mean"], 2.01) and fp32["vs_adamw_none"] == 0
    assert fp32["loss_spikes"] == 0 and fp32["diverged"] == 0 and fp32["grad_norm_spike"] == 1.0
    # 2.5 -> 2.8 is a spike (> 5%), in two runs; the NaN run diverged; 10 / median 1 is the grad-norm spike
    assert int4["loss_spikes"] == 2 and int4["diverged"] == 1
    assert int4["eval_loss_mean"] == math.inf and int4["eval_loss_std"] is None  # not a crash (it was one)
    assert math.isclose(int4["grad_norm_spike"], (10.0 + 10.0 + 1.0) / 3)
    assert "| int4 | adamw |" in compare_lowbit.markdown(list(rows.values()))


def _write_results(group_dir: Path, entries: dict[str, tuple[float, float, int]]) -> None:
    """A group's ``results.json`` with (best lr, eval loss mean, n) per optimizer."""
    group_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"optimizer": o, "best_lr": lr, "lrs": [lr / 2, lr, lr * 2], "n": n, "eval_loss_mean": loss,
             "eval_loss_std": 0.01 if n > 1 else None, "median_step_ms": None}
            for o, (lr, loss, n) in entries.items()]
    (group_dir / "results.json").write_text(json.dumps({"optimizers": rows}))
    (group_dir / "results.md").write_text("| table |")


def test_study_runs_the_later_stages_with_the_best_k_of_its_lr_grids(tmp_path, monkeypatch):
    """Stage 0 tunes each K on its lr grid; the K with the lowest loss at its best lr (not the main job's default)
    is the one the grid and seeds stages pass to Lion-K, and the report says both."""
    import study

    runs = tmp_path / "runs"
    losses = {0: 3.1, 1: 2.9, 2: 3.0}  # KAPPA_GRID[1] wins at its best lr
    calls = []

    def fake_sweep(argv):
        calls.append(argv)
        group = argv[argv.index("--group") + 1]
        if "-kappa" in group:
            _write_results(runs / group, {"lion_k": (2e-3, losses[int(group[-1])], 1)})
        elif not (runs / group).exists():
            _write_results(runs / group, {"lion": (1e-3, 2.5, 3), "lion_k": (2e-3, 2.6, 3)})
        return 0

    monkeypatch.setattr(sweep, "main", fake_sweep)
    monkeypatch.setattr(sweep, "DEFAULT_OPTIM_ARGS", {**sweep.DEFAULT_OPTIM_ARGS, "lion_k": study.KAPPA_GRID[0]})
    assert study.main(["--optims", "lion,lion_k", "--runs_dir", str(runs)]) == 0
    kappa_calls, later = calls[:len(study.KAPPA_GRID)], calls[len(study.KAPPA_GRID):]
    for i, argv in enumerate(kappa_calls):
        assert argv[argv.index("--optim_args") + 1] == f"lion_k:{study.KAPPA_GRID[i]}"
        assert "--extend-edges" in argv and argv[argv.index("--lrs") + 1] == "grid"
    assert len(later) == 3
    for argv in later:
        assert argv[argv.index("--optim_args") + 1] == f"lion_k:{study.KAPPA_GRID[1]}"
    text = (runs / "study.md").read_text()
    assert f"Best: {study.KAPPA_GRID[1]}; the stages below run Lion-K with it" in text
    assert f"(sweep.DEFAULT_OPTIM_ARGS) is another K, {study.KAPPA_GRID[0]}." in text
    assert f"--optims lion,lion_k" in text


def test_study_report_says_whether_runs_are_missing(tmp_path, monkeypatch):
    import study

    monkeypatch.setattr(sweep, "main", lambda *a, **k: pytest.fail("--report must not run a sweep"))
    monkeypatch.setattr(sweep, "compare_group", lambda *a, **k: None)
    runs = tmp_path / "runs"
    _write_results(runs / "study-smoke-llama_tiny", {"adamw": (1e-3, 2.5, 2), "lion": (1e-4, 2.6, 2)})
    _write_results(runs / "study-smoke-mid", {"adamw": (1e-3, 2.4, 2), "lion": (1e-4, 2.7, 1)})
    assert study.main(["--report", "--smoke", "--runs_dir", str(runs)]) == 0
    assert "runs missing: study-smoke-mid: lion;" in (runs / "study-smoke.md").read_text()
    _write_results(runs / "study-smoke-mid", {"adamw": (1e-3, 2.4, 2), "lion": (1e-4, 2.7, 2)})
    assert study.main(["--report", "--smoke", "--runs_dir", str(runs)]) == 0
    assert "every planned run had finished" in (runs / "study-smoke.md").read_text()
