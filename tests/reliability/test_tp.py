"""Tensor parallel (TP=2) and FSDP2 x TP (2 x 2) on gloo CPU processes: every metric of every module
equals the single-process value of the same model on the same global batches.

The model is a tiny Llama (``_tp_workers.Llama``) parallelised with torchtitan's plan: q/k/v/w1/w3
column-wise, o/w2 row-wise (heads and MLP units split across ranks), a row-wise embedding, and either a
replicated output (``use_local_output``) or sequence-parallel norms with a vocabulary-parallel output
under ``loss_parallel``. Run with ``-s`` to print the max relative error per metric family.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict

import pytest
from _dist_workers import free_port
from _tp_workers import STEPS, WATCHED, reference, tp_worker

from stabilitylab import metrics as M

pytestmark = pytest.mark.distributed

#: Max relative error allowed against the single-process run (float32 training on both sides).
REL = 1e-5
PER_FORWARD = {M.LOGITS_LSE_STD, M.ACT_BATCH_ENTROPY}

CONFIGS = {  # name: (world, dp, sequence_parallel, loss_parallel)
    "tp2": (2, 1, False, False),
    "tp2-sp-vocab": (2, 1, True, True),
    "fsdp2xtp2-sp-vocab": (4, 2, True, True),
    "fsdp2xtp2": (4, 2, False, False),
}


def _run(name, tmp_path_factory):
    """Spawn the ranks of one configuration; their results and the single-process reference."""
    import pickle

    import torch.multiprocessing as mp

    world, dp, sp, lp = CONFIGS[name]
    out = tmp_path_factory.mktemp(name)
    try:
        mp.spawn(tp_worker, args=(world, free_port(), str(out), dp, sp, lp), nprocs=world, join=True)
    except mp.ProcessExitedException as e:
        # A worker killed by a signal (seen once in CI: "malloc(): unaligned tcache chunk detected" inside a
        # gloo worker, not reproduced in later runs) is retried once, loudly; an exception raised by our
        # code (exit code 1, with a traceback) or a second crash fails the test.
        if not e.signal_name:
            raise
        warnings.warn(f"{name}: {e} (native crash of a gloo worker); retrying once", stacklevel=1)
        out = tmp_path_factory.mktemp(f"{name}-retry")
        mp.spawn(tp_worker, args=(world, free_port(), str(out), dp, sp, lp), nprocs=world, join=True)
    ranks = [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(world)]
    for r, res in enumerate(ranks):
        assert "error" not in res, f"{name} rank {r}: {res['error']}"
    return ranks, reference(dp, world // dp if sp else 1)


def _rel(got: float, want: float) -> float:
    if not math.isfinite(want):
        return 0.0 if got == want else math.inf
    return abs(got - want) / max(abs(want), 1e-6)


def max_errors(ranks, ref) -> dict[str, float]:
    """Max relative error per metric family over ranks, steps and modules (asserting the keys match)."""
    steps, per_forward = ref
    worst: dict[str, float] = defaultdict(float)
    for r, res in enumerate(ranks):
        for step in range(STEPS):
            got, want = res["steps"][step], {**steps[step], **per_forward[step]}
            assert set(got) == set(steps[step]), (r, step, set(got) ^ set(steps[step]))
            for key, v in want.items():
                worst[key[0]] = max(worst[key[0]], _rel(got[key], v))
    return dict(worst)


@pytest.fixture(scope="module", params=[
    "tp2", "tp2-sp-vocab", "fsdp2xtp2-sp-vocab", pytest.param("fsdp2xtp2", marks=pytest.mark.slow)])
def run(request, tmp_path_factory):
    return request.param, *_run(request.param, tmp_path_factory)


def test_every_metric_of_every_module_equals_the_single_process_value(run):
    name, ranks, ref = run
    worst = max_errors(ranks, ref)
    print(f"\n{name}: max relative error vs one process")
    for metric, err in sorted(worst.items()):
        print(f"  {metric:22s} {err:.2e}")
    families = {M.GRAD_RMS, M.PARAM_RMS, M.UPDATE_RMS, M.UPDATE_RATIO, M.GRAD_GLOBAL_NORM, M.ADAM_V_RMS,
                M.ADAM_EPS_DOMINANCE, M.ACT_RMS, M.ACT_KURTOSIS, M.ATTN_MAX_LOGIT, M.ATTN_ENTROPY,
                M.LOGITS_LSE_MEAN, M.LOGITS_MAX, M.LOSS, *PER_FORWARD}
    assert families <= set(worst)
    bad = {m: e for m, e in worst.items() if e > REL}
    assert not bad, f"{name}: relative errors above {REL}: {bad}"


def test_the_model_really_is_split_and_per_module_rows_cover_it(run):
    name, ranks, _ = run
    world, dp, sp, _ = CONFIGS[name]
    tp_dim = 1 if dp > 1 else 0  # placements follow the mesh order (dp, tp); FSDP adds the dp one
    for res in ranks:
        pl = res["placements"]
        assert pl["layers.0.attention.wq.weight"][tp_dim] == "S(0)"  # heads split
        assert pl["layers.0.attention.wo.weight"][tp_dim] == "S(1)"
        assert pl["tok_embeddings.weight"][tp_dim] == "S(0)"
        if sp:  # a replicated parameter, counted once (without SP the norms are FSDP-only or plain)
            assert pl["layers.0.ffn_norm.weight"][tp_dim] == "R"
        step0 = res["steps"][0]
        assert all((M.ACT_RMS, n) in step0 for n in WATCHED)
        assert (M.ATTN_ENTROPY, "layers.1.attention") in step0
        assert not [e for e in res["events"] if e[0] in ("probe_error", "rank_partial", "rank_desync")]


def test_a_partial_parameter_is_refused_naming_it(run):
    _, ranks, _ = run
    for res in ranks:
        kind, message = res["partial_error"]
        assert kind == "UnsupportedParallelismError"
        assert "'weight'" in message and "Partial" in message
