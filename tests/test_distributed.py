"""FSDP2 (``fully_shard``, DTensor parameters) against one process, for every registered optimizer.

Two gloo processes on CPU, launched by the tests themselves (``_dist_worker.launch``). All cases run
in two spawned jobs (module fixtures): ``main`` (parity, uneven rows, construction before sharding,
the zero-gradient step, orthogonalization counts, DCP saves) and ``resume`` (DCP loads in new
processes). The tests below only read their results.
"""

from __future__ import annotations

import math

import pytest
import torch

from _dist_worker import CASES, MATRIX_CASES, STEPS, launch, max_diff, resume, save_one_process

pytestmark = [pytest.mark.distributed, pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]

WORLD = 2
TOL = 1e-5  # fp32, 5 steps
CASE_IDS = [c[0] for c in CASES]
MODELS = ("tiny_lm", "uneven")
#: cases also checkpointed in one process and resumed on 2 ranks, and saved on 2 and resumed in one
CROSS_CASES = tuple(CASE_IDS)


def _case(case_id: str) -> tuple[str, dict]:
    _, name, hp = next(c for c in CASES if c[0] == case_id)
    return name, hp


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tmp_path_factory.mktemp("dcp")


@pytest.fixture(scope="module")
def main_job(checkpoints) -> dict:
    return launch("main", world=WORLD, root=str(checkpoints))


@pytest.fixture(scope="module")
def resume_job(main_job, checkpoints) -> dict:
    for case in CROSS_CASES:
        save_one_process(case, *_case(case), checkpoints)
    return launch("resume", world=WORLD, root=str(checkpoints))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", CASE_IDS)
def test_sharded_matches_one_process(main_job, case, model):
    """5 steps on 2 ranks vs 1 process; ``uneven`` has 45-, 3- and 1-row matrices (one rank empty)."""
    r = main_job[model][case]
    assert r["max_diff"] <= TOL, f"{case} on {model}: max |sharded - one process| = {r['max_diff']:.3g}"


#: metrics of whole tensors: every rank reports the one-process value (``nonfinite_grads`` is per rank)
WHOLE_METRICS = ("clip_fraction", "adagn_scale", "resets", "row_scale_spread")


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", [c for c in CASE_IDS if "spam" in c])
def test_sharded_metrics_match_one_process(main_job, case, model):
    """SPAM's clip counts are counted per piece of the local shards and all-reduced per tensor; Stable-SPAM's
    AdaGN scales come from all-reduced norms: the sharded job's metrics are the one-process ones."""
    res = main_job[model][case]
    want = res["reference_metrics"]
    keys = [k for k in WHOLE_METRICS if k in want]
    assert keys, want
    for rank, got in enumerate(res["metrics"]):
        for k in keys:
            assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-12), (rank, k, got, want)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", CASE_IDS)
def test_optimizer_built_before_sharding(main_job, case, model):
    """Built on the unsharded model, parameters swapped for DTensors in ``param_groups`` (accelerate)."""
    r = main_job[model][case]
    assert r["swapped_max_diff"] <= TOL, f"{case} on {model}: {r['swapped_max_diff']:.3g}"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", CASE_IDS)
def test_zero_gradient_step_with_zero_lr_changes_nothing(main_job, case, model):
    assert main_job[model][case]["zero_step_changed"] == []


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", [c[0] for c in MATRIX_CASES])
def test_each_matrix_is_transformed_once_in_the_job(main_job, case, model):
    r = main_job[model][case]
    assert r["single_transforms"] == STEPS * r["matrices"]
    if r["row_local"]:  # SinkGD: every rank normalizes its own rows, no whole-matrix transform anywhere
        assert r["transforms"] == [0] * WORLD
        return
    assert sum(r["transforms"]) == r["single_transforms"], r["transforms"]
    assert max(r["transforms"]) == STEPS * math.ceil(r["matrices"] / WORLD), r["transforms"]


@pytest.mark.parametrize("case", CASE_IDS)
def test_dcp_resume_in_new_processes_is_identical(resume_job, case):
    """Save after 3 steps, load in new processes (another init), 2 more steps: bitwise the same."""
    assert resume_job[case]["sharded"] == 0.0


@pytest.mark.parametrize("case", CROSS_CASES)
def test_dcp_two_rank_checkpoint_resumes_in_one_process(main_job, checkpoints, case):
    final = torch.load(checkpoints / case / "final.pt")
    assert max_diff(resume(*_case(case), checkpoints / case / "sharded", sharded=False), final) <= TOL


@pytest.mark.parametrize("case", CROSS_CASES)
def test_dcp_one_process_checkpoint_resumes_on_two_ranks(resume_job, case):
    assert resume_job[case]["from_single"] <= TOL
