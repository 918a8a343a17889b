"""Issue 17's complaint, checked on the shipped defaults: a small GPT that is not in the package
(``benchmarks/warnings_external.py``: not the proxy, not Hugging Face), byte-level text from the standard
library, a linear LR ramp of 300 steps to a peak that trains stably. The old detector warned 3 of 4 such runs;
the defaults must warn none, at every=1 and every=10."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

_spec = importlib.util.spec_from_file_location(
    "warnings_external", Path(__file__).parents[2] / "benchmarks" / "warnings_external.py")
ext = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ext)


@pytest.mark.parametrize("model,peak,every", [("gpt", 1e-3, 1), ("gpt", 3e-3, 10), ("llama", 1e-2, 10)])
def test_defaults_do_not_warn_a_stable_lr_ramp_of_a_model_not_written_in_the_package(model, peak, every):
    """Also a Hugging Face Llama (from a config) at the Monitor's default every=10."""
    r = ext.train(peak, every, steps=400, model=model)
    losses = r["losses"]
    assert r["outcome"] == "stable" and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 2.0  # it learned (5.5 nats at init -> ~2.4)
    w = r[every]
    assert w["n_warnings"] == 0, (w["first_warning"], w["metric"], w["module"])


def test_a_pooled_run_reads_back_and_replays_to_the_live_result(tmp_path):
    """``--pool``: the first call trains and saves the run, the second reads it back instead of training; the
    replay of the saved history gives the warnings the live probe gave (peak 1 under warm-up + cosine: warned at every=1)."""
    live = ext._pooled("gpt", "warm50_cos", 1.0, 0, str(tmp_path))
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == ["gpt_warm50_cos_1_0.json", "gpt_warm50_cos_1_0.parquet"]
    again = ext._pooled("gpt", "warm50_cos", 1.0, 0, str(tmp_path))
    assert again["losses"] == live["losses"] and again["outcome"] == live["outcome"]
    assert len(again["history"]) == len(live["history"]) > 0
    assert again[1] == live[1]
    assert live[1]["first_warning"] is not None, "pick a run the defaults warn, so the comparison means something"


@pytest.mark.parametrize("model", ext.HELDOUT_MODELS)
def test_each_held_out_family_trains_on_bytes_and_records_the_watched_signals_per_attention_module(model):
    """Falcon (ALiBi), Phi-3 and Gemma 3 from small configs: 2 attention modules each record max logit and
    entropy, and every watched signal is logged on every step."""
    r = ext.train(3e-3, 1, steps=40, model=model, history=True)
    h = r["history"]
    attn = h[h["metric"] == "attn.max_logit"]
    assert attn["module"].nunique() == 2 and attn["step"].nunique() == 40
    from stabilitylab.detectors import DEFAULT_WATCH

    for metric in DEFAULT_WATCH:
        assert h.loc[h["metric"] == metric, "step"].nunique() == 40, metric
    assert r["losses"][-1] < r["losses"][0] - 0.5  # it learns (5.5 nats at init)


def test_long_runs_pool_under_their_own_name_and_the_old_rule_is_the_nearest_interval(tmp_path):
    r = ext._pooled("gpt", "warm50_cos", 1e-3, 0, str(tmp_path), steps=30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt_warm50_cos_0.001_0_30steps.json",
                                                         "gpt_warm50_cos_0.001_0_30steps.parquet"]
    assert len(r["losses"]) == 30
    from stabilitylab import detectors as D

    old = ext.nearest_interval_rule()
    assert all(c.window == 0 for c in old.values()) and set(old) == set(D.DEFAULT_CALIBRATIONS)
    for every in (4, 5, 8):  # the old rule gave these every=10's thresholds; the window rule every=1's
        w = max(60, 9 * every)
        assert D.pick_calibration(old, every, w).interval == 10
        assert D.pick_calibration(D.DEFAULT_CALIBRATIONS, every, w).interval == 1


def test_variant_rows_are_keyed_by_interval_and_settings():
    """``VARIANTS`` results summarise per model, interval and setting name, counting only their own replays."""
    def res(first, lead):
        return {"first_warning": first, "lead": lead, "metric": "loss", "module": "", "n_warnings": int(first is not None)}

    key = ("variant", 10, "min_metrics=2")
    rows = [{"model": "m", "outcome": "stable", "diverge_step": math.nan, key: res(150, None), 10: res(None, None)},
            {"model": "m", "outcome": "diverged", "diverge_step": 300.0, key: res(200, 100.0), 10: res(290, 10.0)}]
    (got,) = ext.summarise(rows, [key])
    assert got["every"] == 10 and got["settings"] == "min_metrics=2" and "margin" not in got
    assert (got["not_diverged"], got["not_diverged_warned"], got["diverged"], got["warned_before"], got["warned_50"]) \
        == (1, 1, 1, 1, 1) and got["median_lead"] == 100.0
    (plain,) = ext.summarise(rows, [10])
    assert (plain["not_diverged_warned"], plain["warned_50"]) == (0, 0)
    assert set(ext.VARIANTS) >= {"min_metrics=2", "loss_gate=0"} and all(
        set(kw) <= {"min_metrics", "margin", "persist", "loss_gate"} for kw in ext.VARIANTS.values())
