"""FSDP2 (fully_shard, gloo, 2 CPU processes): norms over full tensors from local shards; TP accepted."""

from __future__ import annotations

import pytest
from _dist_workers import STEPS, fsdp_worker, reference, spawn

from stabilitylab import metrics as M

pytestmark = pytest.mark.distributed

# Per-forward statistics are token-weighted means over ranks (checked against a reference in test_ddp).
PER_FORWARD = {M.LOGITS_LSE_STD, M.ACT_BATCH_ENTROPY}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    return spawn(fsdp_worker, out), reference(out)


def test_parameters_really_are_sharded(runs):
    ranks, _ = runs
    a, b = (r["local_shapes"]["blocks.0.mlp.c_fc.weight"] for r in ranks)
    assert a[0] + b[0] == 4 * 32 and a[0] < 4 * 32  # dim 0 split between the ranks


def test_norms_are_over_full_tensors_and_equal_the_single_process_values(runs):
    ranks, ref = runs
    for r, res in enumerate(ranks):
        for step in range(STEPS):
            got, want = res["steps"][step], ref["steps"][step]
            assert set(got) == set(want), f"rank {r} step {step}: keys differ"
            for key, v in want.items():
                if key[0] not in PER_FORWARD:
                    assert got[key] == pytest.approx(v, rel=2e-4, abs=1e-6), (r, step, key)
            assert got[(M.GRAD_GLOBAL_NORM, "")] == pytest.approx(res["norms"][step], rel=1e-4)
            assert got[(M.GRAD_GLOBAL_NORM, "")] == pytest.approx(ref["norms"][step], rel=1e-4)


def test_tensor_parallel_is_accepted(runs):
    ranks, _ = runs  # its numbers are checked against one process in test_tp.py
    for res in ranks:
        assert res["tp_error"] is None
