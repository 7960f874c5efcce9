"""HSDP: ``fully_shard`` over a 2-D ``(replicate, shard)`` mesh (4 gloo ranks as 2 x 2) against one process.

Parameters are DTensors placed ``(Replicate(), Shard(0))``. One spawned job (``_dist_worker.job_hsdp``,
a module fixture) runs every case; the tests below only read its results:

* every registered optimizer (and the extra settings of ``tests/test_distributed.py``) on TinyLM, the
  matrix optimizers also on the uneven model, to the tolerance of the 1-D FSDP2 parity tests;
* the owner-based whole-matrix transforms (``optimzoo.distributed.owner``) run once per replica group:
  each matrix is transformed twice across the 4 ranks, once in each replica group;
* the owner's transforms chunked by ``batch_budget`` (a 1-byte budget: one matrix a call) give the
  unchunked result bitwise;
* ``optimzoo.ops.reduce`` reduces over the sharding mesh dims only (not over the replicate dim);
* placements the owner exchange cannot handle raise ``NotImplementedError`` naming them;
* DCP save/load on the 2 x 2 mesh, and the 2 x 2 checkpoint resumed in one process.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _dist_worker import CASES, HSDP_DCP_CASES, HSDP_MESH, MATRIX_CASES, STEPS, launch, max_diff, resume
from _tolerance import check
from test_distributed import TOL  # the 1-D FSDP2 parity tests' tolerance (fp32, 5 steps)

pytestmark = [pytest.mark.distributed, pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]

REPLICAS, SHARDS = HSDP_MESH
WORLD = REPLICAS * SHARDS
CASE_IDS = [c[0] for c in CASES]
MATRIX_IDS = [c[0] for c in MATRIX_CASES]


def _case(case_id: str) -> tuple[str, dict]:
    _, name, hp = next(c for c in CASES if c[0] == case_id)
    return name, hp


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tmp_path_factory.mktemp("hsdp_dcp")


@pytest.fixture(scope="module")
def hsdp_job(checkpoints) -> dict:
    return launch("hsdp", world=WORLD, root=str(checkpoints))


def test_parameters_are_placed_replicate_shard(hsdp_job):
    assert hsdp_job["tiny_lm"]["adamw"]["placements"] == ["(Replicate(), Shard(dim=0))"]


@pytest.mark.parametrize("case", CASE_IDS)
def test_hsdp_matches_one_process(hsdp_job, case):
    check(hsdp_job["tiny_lm"][case]["max_diff"], TOL, f"{case}: max |HSDP 2x2 - one process|")


@pytest.mark.parametrize("case", MATRIX_IDS)
def test_hsdp_uneven_rows_match_one_process(hsdp_job, case):
    """45-, 3- and 1-row matrices over the 2-rank shard dim (a rank of each replica group holds no row)."""
    check(hsdp_job["uneven"][case]["max_diff"], TOL, f"{case}: max |HSDP 2x2 - one process|")


def _per_replica(ranks: list[dict], key: str) -> list[int]:
    totals = [0] * REPLICAS
    for r in ranks:
        totals[r["coord"][0]] += r[key]
    return totals


@pytest.mark.parametrize("model", ["tiny_lm", "uneven"])
@pytest.mark.parametrize("case", MATRIX_IDS)
def test_each_matrix_is_transformed_once_per_replica_group(hsdp_job, case, model):
    r = hsdp_job[model][case]
    assert r["single_transforms"] == STEPS * r["matrices"]
    assert sorted(tuple(x["coord"]) for x in r["ranks"]) == [(i, j) for i in range(REPLICAS) for j in range(SHARDS)]
    counts = [x["transforms"] for x in r["ranks"]]
    if r["row_local"]:  # SinkGD: every rank normalizes its own rows, no whole-matrix transform anywhere
        assert counts == [0] * WORLD
        return
    assert _per_replica(r["ranks"], "transforms") == [r["single_transforms"]] * REPLICAS, r["ranks"]
    assert sum(counts) == REPLICAS * r["single_transforms"]
    assert max(counts) == STEPS * math.ceil(r["matrices"] / SHARDS), r["ranks"]  # spread over the shard ranks


@pytest.mark.parametrize("case", MATRIX_IDS)
def test_owner_transforms_in_budget_chunks(hsdp_job, case):
    """``batch_budget=1``: every owner call holds one matrix; the weights equal the unchunked run's
    bitwise, and match one process."""
    r = hsdp_job["budget"][case]
    if not r["row_local"]:
        assert [x["calls"] for x in r["ranks"]] == [x["transforms"] for x in r["ranks"]], r["ranks"]
        unchunked = hsdp_job["tiny_lm"][case]["ranks"]
        assert [x["transforms"] for x in r["ranks"]] == [x["transforms"] for x in unchunked]
        assert sum(x["calls"] for x in unchunked) < sum(x["calls"] for x in r["ranks"])  # the budget did split
    assert r["unchunked_max_diff"] == 0.0
    check(r["max_diff"], TOL, f"{case}, budget chunks: max |HSDP 2x2 - one process|")


@pytest.mark.parametrize("placements", ["(Replicate(), Shard(dim=0))", "(Shard(dim=0), Replicate())",
                                        "(Shard(dim=0), Shard(dim=0))"])
def test_whole_tensor_reductions_reduce_over_sharding_dims_only(hsdp_job, placements):
    """Integers: exact. Summing over the replicate dim too would double the sums."""
    r = hsdp_job["reductions"][placements]
    assert r["sum"][0] == r["sum"][1]
    assert r["amax"][0] == r["amax"][1]
    assert r["many"][0] == r["many"][1]


@pytest.mark.parametrize("placements", ["(Shard(dim=0), Shard(dim=0))", "(Replicate(), Shard(dim=1))"])
def test_matrix_optimizer_refuses_unsupported_placements(hsdp_job, placements):
    err = hsdp_job["unsupported"][placements]
    assert err is not None, f"{placements}: stepped without an error"
    assert err.startswith("NotImplementedError") and placements in err and "replicate=2, shard=2" in err, err


@pytest.mark.parametrize("case", HSDP_DCP_CASES)
def test_dcp_round_trip_on_the_2x2_mesh_is_identical(hsdp_job, case):
    """Save after 3 steps, load into another model and optimizer on the same mesh, 2 more steps."""
    assert hsdp_job["dcp"][case] == 0.0


@pytest.mark.parametrize("case", HSDP_DCP_CASES)
def test_dcp_2x2_checkpoint_resumes_in_one_process(hsdp_job, checkpoints, case):
    final = torch.load(checkpoints / case / "final.pt")
    check(max_diff(resume(*_case(case), checkpoints / case / "sharded", sharded=False), final), TOL,
          f"{case}: max |one-process resume - 2x2 run|")


@pytest.mark.slow
@pytest.mark.distributed
def test_recipe_runs_hsdp_on_a_2x2_mesh(tmp_path):
    """``--fsdp2 --replicate 2`` on 4 gloo processes: transformers' DistributedConfig(dp_replicate_size=2)
    builds the (replicate, shard) mesh, the run line says so, and the run trains and evaluates."""
    from test_hf import run_recipe

    proc = run_recipe(tmp_path, "--fsdp2", "--replicate", "2", "--optim", "normuon", "--max_steps", "3",
                      "--report_to", "none", "--run_name", "hsdp", nproc=4, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    described = [line for line in proc.stdout.splitlines() if line.startswith("optimzoo: run ")]
    assert len(described) == 1 and "FSDP2 (mesh dp_replicate=2 x fsdp=2)" in described[0], proc.stdout[-2000:]
    summary = json.loads((tmp_path / "runs" / "hsdp" / "run_summary.json").read_text())
    assert summary["world_size"] == 4 and summary["steps"] == 3 and math.isfinite(summary["eval_loss"])


def test_recipe_refuses_a_replicate_that_does_not_divide_the_world():
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "pretrain_llama.py"
    proc = subprocess.run([sys.executable, str(recipe), "--fsdp2", "--replicate", "2", "--report_to", "none"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--replicate 2 must be >= 1 and divide the world size 1" in proc.stderr
