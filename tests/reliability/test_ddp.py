"""DDP (gloo, 2 CPU processes): the Monitor reports the single-process numbers of the global batch."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from _dist_workers import CFG, GLOBAL_BATCH, STEPS, batches, ddp_worker, make_model, reference, spawn

from stabilitylab import functional as F
from stabilitylab import metrics as M

pytestmark = pytest.mark.distributed

# Statistics that are per-forward (not decomposable over the batch): token-weighted mean over ranks.
PER_FORWARD = {M.LOGITS_LSE_STD, M.ACT_BATCH_ENTROPY}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return out, spawn(ddp_worker, out), reference(out)


def _per_forward_reference(step: int, world: int = 2) -> dict[tuple[str, str], float]:
    """Token-weighted mean over the ranks' shares of the per-forward statistics (float64, by hand)."""
    model = make_model().double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    acts: dict[str, torch.Tensor] = {}
    hooks = [b.register_forward_hook(lambda m, a, o, n=f"blocks.{i}": acts.__setitem__(n, o))
             for i, b in enumerate(model.blocks)]
    out = {}
    for i, (x, y) in enumerate(batches()[: step + 1]):
        parts = []
        for xs, ys in zip(x.chunk(world), y.chunk(world)):
            logits, loss = model(xs, ys)
            parts.append((logits.detach(), {k: v.detach() for k, v in acts.items()}, loss))
        if i == step:
            n = [lg[..., 0].numel() for lg, _, _ in parts]
            stds = [F.lse_stats(lg)[1].item() for lg, _, _ in parts]
            out[(M.LOGITS_LSE_STD, "")] = sum(s * k for s, k in zip(stds, n)) / sum(n)
            for name in acts:
                out[(M.ACT_BATCH_ENTROPY, name)] = sum(
                    F.batch_entropy(a[name]).item() * k for (_, a, _), k in zip(parts, n)) / sum(n)
            break
        # Same update as DDP: mean of the ranks' losses = global mean loss (equal token counts).
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    for h in hooks:
        h.remove()
    return out


def test_every_rank_reports_the_single_process_values_of_the_global_batch(runs):
    _, ranks, ref = runs
    for r, res in enumerate(ranks):
        for step in range(STEPS):
            got, want = res["steps"][step], ref["steps"][step]
            assert set(got) == set(want), f"rank {r} step {step}: keys differ"
            for key, v in want.items():
                if key[0] in PER_FORWARD:
                    continue
                assert got[key] == pytest.approx(v, rel=2e-4, abs=1e-6), (r, step, key)


def test_grad_global_norm_matches_an_independent_float64_norm(runs):
    _, ranks, ref = runs
    for res in ranks:
        for step in range(STEPS):
            norm = res["steps"][step][(M.GRAD_GLOBAL_NORM, "")]
            assert norm == pytest.approx(ref["norms"][step], rel=1e-4)
            assert norm == pytest.approx(res["norms"][step], rel=1e-4)


def test_per_forward_statistics_are_token_weighted_means_over_ranks(runs):
    _, ranks, _ = runs
    want = _per_forward_reference(step=1)
    for res in ranks:
        for key, v in want.items():
            assert res["steps"][1][key] == pytest.approx(v, rel=1e-4), key


def test_only_rank_zero_writes_by_default_and_per_rank_files_on_request(runs):
    out, ranks, _ = runs
    from stabilitylab.sinks.parquet import read_history

    df = read_history(out / "rank0only")
    assert set(df["run_id"]) == {"ddp"}
    assert sorted(df["step"].unique()) == list(range(STEPS + 5))
    loss0 = df[(df.metric == M.LOSS) & (df.step == 0)]["value"]
    assert loss0.tolist() == pytest.approx([ranks[0]["steps"][0][(M.LOSS, "")]])
    dbg = read_history(out / "perrank")
    assert set(dbg["run_id"]) == {"dbg-rank0", "dbg-rank1"}
    assert [r["run_ids"] for r in ranks] == [("ddp", "dbg-rank0"), ("ddp", "dbg-rank1")]
    a, b = (dbg[dbg.run_id == f"dbg-rank{r}"].set_index(["step", "metric", "module"])["value"] for r in (0, 1))
    pd.testing.assert_series_equal(a, b)


def test_spike_and_nonfinite_events_name_the_rank_where_they_appeared(runs):
    _, ranks, _ = runs
    for res in ranks:
        ev = {(step, kind, module): (msg, extra) for step, kind, module, msg, extra in res["events"]}
        spike = ev[(STEPS + 3, "loss_spike", "")]
        assert spike[1]["ranks"] == [1] and "ranks [1]" in spike[0]
        nan_loss = ev[(STEPS + 4, "nonfinite", "loss")]
        assert nan_loss[1]["ranks"] == [1] and "ranks [1]" in nan_loss[0]
        assert (STEPS + 4, "nonfinite", "metrics") in ev  # act.rms etc. of the poisoned forward
        assert math.isnan(res["more"][4][(M.ACT_RMS, "blocks.1")])  # blocks.0 hook ran before the NaN
        assert not any(k[0] == "probe_error" for k in ev)


def test_config_of_the_workers_is_tiny():
    assert CFG["d_model"] <= 64 and GLOBAL_BATCH <= 8
