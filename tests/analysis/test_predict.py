"""run_signals and predict_instability against closed-form answers on synthetic sweeps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stabilitylab.analysis import predict_instability, run_signals


def test_run_signals_hand_computed():
    runs = pd.DataFrame({"run_id": ["a"], "lr": [0.1], "final_loss": [np.nan], "init_loss": [5.0], "steps": [100]})
    rows = [("a", 0, "attn.max_logit", "l0", 3.0), ("a", 0, "attn.max_logit", "l1", 4.0),
            ("a", 20, "attn.max_logit", "l1", 9.0), ("a", 40, "attn.max_logit", "l0", 99.0),  # 40 > 25: late
            ("a", 0, "logits.lse_mean", "", 5.0), ("a", 10, "logits.lse_mean", "", 4.0),
            ("a", 20, "logits.lse_mean", "", 4.5),
            ("a", 80, "grad.rms", "w1", 1.0), ("a", 80, "grad.rms", "w2", 3.0), ("a", 80, "grad.rms", "w3", 2.0),
            ("a", 0, "sharpness.preconditioned", "", 10.0), ("a", 0, "sharpness.threshold", "", 40.0),
            ("a", 50, "sharpness.preconditioned", "", 30.0), ("a", 50, "sharpness.threshold", "", 40.0),
            ("a", 90, "loss", "", np.nan)]
    h = pd.DataFrame(rows, columns=["run_id", "step", "metric", "module", "value"])
    s = run_signals(runs, h).iloc[0]
    assert s["attn_logit"] == 9.0
    assert s["lse_drift"] == pytest.approx(1.0 / 20)  # max |lse - 5| = 1, over steps 0..20
    assert s["grad_rms"] == 2.0
    assert s["sharpness_ratio"] == pytest.approx(0.75)


def _sweep(sizes=(1e5, 2e5, 4e5, 8e5), lrs=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1), level=5000.0, noise=0.01, seed=0):
    """Early max attention logit = 2 * N^0.5 * (lr / 1e-3)^0.8; a run diverges when it is >= level."""
    rng = np.random.default_rng(seed)
    runs, hist = [], []
    for i, n in enumerate(sizes):
        for lr in lrs:
            rid = f"{i}-{lr:g}"
            val = 2 * n**0.5 * (lr / 1e-3) ** 0.8 * np.exp(rng.normal(0, noise))
            div = val >= level
            runs.append((rid, f"s{i}", int(n), "base", lr, 0, np.nan if div else 3.0, 5.0, div, 100))
            hist.append((rid, 0, "attn.max_logit", "blocks.0.attn", val))
    runs = pd.DataFrame(runs, columns=["run_id", "size", "n_params", "variant", "lr", "seed", "final_loss",
                                       "init_loss", "diverged", "steps"])
    return runs, pd.DataFrame(hist, columns=["run_id", "step", "metric", "module", "value"])


def test_attention_predictions_match_closed_form_and_held_out_size():
    runs, hist = _sweep()
    p = predict_instability(runs, hist, signals=("attn_logit",), n_boot=500)
    level = runs.merge(run_signals(runs, hist))
    level = level.loc[level["diverged"] & (level["size"] != "s3"), "attn_logit"].min()
    at = p[p["prediction"] == "attn_logit at target"].set_index("lr")
    for lr, r in at.iterrows():
        truth = 2 * 8e5**0.5 * (lr / 1e-3) ** 0.8
        assert r["predicted"] == pytest.approx(truth, rel=0.05)
        assert r["lo"] <= r["observed"] <= r["hi"] or abs(np.log(r["observed"] / r["predicted"])) < 0.04
    size = p[p["prediction"] == "size unstable"].set_index("lr")
    for lr, r in size.iterrows():
        n_star = (level / (2 * (lr / 1e-3) ** 0.8)) ** 2
        if n_star < 1e2:  # below the search range (1e-3 x the smallest size): reported as the range start
            assert r["predicted"] == pytest.approx(1e2)
        else:
            assert r["lo"] <= n_star <= r["hi"] and r["predicted"] == pytest.approx(n_star, rel=0.3)
    crit = p[p["prediction"] == "critical lr at target"].iloc[0]
    lr_star = 1e-3 * (level / (2 * 8e5**0.5)) ** (1 / 0.8)
    assert crit["predicted"] == pytest.approx(lr_star, rel=0.1)
    assert crit["lo"] <= crit["predicted"] <= crit["hi"]
    assert crit["observed_lo"] < lr_star <= crit["observed_hi"] and crit["consistent"]


def test_holdout_needs_three_sizes_and_target_without_holdout():
    runs, hist = _sweep(sizes=(1e5, 2e5))
    with pytest.raises(ValueError, match=">= 3"):
        predict_instability(runs, hist)
    with pytest.raises(ValueError, match="target_n_params"):
        predict_instability(runs, hist, holdout=None)
    p = predict_instability(runs, hist, holdout=None, target_n_params=1e6, signals=("attn_logit",), n_boot=50)
    at = p[p["prediction"] == "attn_logit at target"]
    assert at["observed"].isna().all() and at["consistent"].isna().all() and len(at) == 5


# ---------------------------------------------------------------------------------------------- predict()
from stabilitylab.analysis import basin_edges, predict  # noqa: E402

GRID = tuple(10 ** np.arange(-3.0, 0.01, 0.25))  # 13 LRs, a quarter decade apart


def _curve_loss(lr, crit, slope=0.6):
    """2.5 up to crit / 10^(0.3 / slope), then rising `slope` nats per decade: crosses 2.5 + 0.1 x (5.5 - 2.5)
    (the basin threshold for init loss 5.5) exactly at lr = crit."""
    opt = np.log10(crit) - 0.3 / slope
    return 2.5 + slope * np.maximum(0.0, np.log10(lr) - opt)


def _crit(n):
    return 10 ** (1.0 - 0.5 * np.log10(n))  # critical LR law: 10 / sqrt(N)


def _ladder(rng, sizes=(4e4, 8e4, 1.3e5, 1.25e6), seeds=(0, 1, 2, 3), held_seeds=(0,), sd=0.05):
    runs, hist = [], []
    for i, n in enumerate(sizes):
        for seed in (held_seeds if i == len(sizes) - 1 else seeds):
            crit = _crit(n) * 10 ** rng.normal(0, sd)
            for lr in GRID:
                rid = f"{i}-{seed}-{lr:.4g}"
                loss = float(_curve_loss(lr, crit))
                runs.append((rid, f"s{i}", int(n), "base", lr, seed, loss, 5.5, False))
                logit = 3 * (n / 1e4) ** 0.4 * (lr / 1e-3) ** 1.5 * 10 ** rng.normal(0, sd)
                hist.append((rid, 10, "attn.max_logit", "blocks.0.attn", logit))
    runs = pd.DataFrame(runs, columns=["run_id", "size", "n_params", "variant", "lr", "seed", "final_loss",
                                       "init_loss", "diverged"])
    return runs, pd.DataFrame(hist, columns=["run_id", "step", "metric", "module", "value"])


def test_basin_edges_hand_computed():
    lrs = [1e-3, 1e-2, 1e-1, 1.0]
    runs = pd.DataFrame({"run_id": list("abcdefgh"), "lr": lrs * 2, "variant": "v", "size": ["x"] * 4 + ["y"] * 4,
                         "n_params": [10] * 4 + [20] * 4, "seed": 0,
                         "final_loss": [3.0, 2.0, 2.1, 4.0, 3.0, 2.0, 2.1, np.nan],
                         "init_loss": [6.0] * 8, "diverged": [False, False, False, False, False, False, True, True]})
    e = basin_edges(runs, tol=0.1).set_index("size")
    # x: L* = 2.0 at 1e-2, threshold 2.0 + 0.1 * (6 - 2) = 2.4; 1e-1 (2.1) stable, 1.0 (4.0) not.
    assert e.loc["x", "threshold"] == pytest.approx(2.4)
    assert e.loc["x", "largest_stable_lr"] == 1e-1 and e.loc["x", "first_unstable_lr"] == 1.0
    assert e.loc["x", "critical_lr"] == pytest.approx(10 ** (-1 + (2.4 - 2.1) / (4.0 - 2.1)))
    # y: the run at 1e-1 diverged (counts as the init loss 6.0) although its final loss is low.
    assert e.loc["y", "largest_stable_lr"] == 1e-2
    assert e.loc["y", "critical_lr"] == pytest.approx(10 ** (-2 + (2.4 - 2.0) / (6.0 - 2.0)))
    censored = basin_edges(runs[runs["lr"] < 1.0].assign(diverged=False), tol=0.1).set_index("size")
    assert censored.loc["x", "censored"] and np.isnan(censored.loc["x", "critical_lr"])
    with pytest.raises(ValueError, match="tol"):
        basin_edges(runs, tol=0.0)


def test_predict_recovers_the_critical_lr_law_and_the_grid_lr_below_it():
    runs, hist = _ladder(np.random.default_rng(0), sd=0.0)
    p = predict(runs, hist, n_boot=200)
    c = p.critical_lr.iloc[0]
    assert c["predicted"] == pytest.approx(_crit(1.25e6), rel=1e-6)
    assert c["observed_critical_lr"] == pytest.approx(_crit(1.25e6), rel=1e-6)
    below = max(g for g in GRID if g <= _crit(1.25e6))
    assert c["observed_largest_stable_lr"] == pytest.approx(below)
    assert c["stable_lo"] == pytest.approx(below) and c["stable_hi"] == pytest.approx(below)
    assert c["critical_inside"] and c["stable_inside"] and c["width_steps"] == pytest.approx(0.0, abs=1e-6)
    assert c["stable_width_steps"] == 0.0
    a = p.attn_logit.set_index("lr")
    for lr, r in a.iterrows():
        assert r["predicted"] == pytest.approx(3 * (1.25e6 / 1e4) ** 0.4 * (lr / 1e-3) ** 1.5, rel=1e-6)
    assert p.fit_sizes == ["s0", "s1", "s2"] and p.heldout == "s3"


@pytest.mark.slow  # 200 end-to-end predictions (~10 s on an idle core)
def test_predicted_critical_lr_interval_covers_the_held_out_run_at_the_stated_rate():
    rng = np.random.default_rng(11)
    hits = attn_hits = attn_total = 0
    draws = 200
    for i in range(draws):
        runs, hist = _ladder(rng, sd=0.05)
        p = predict(runs, hist, n_boot=400, level=0.9, seed=i)
        hits += bool(p.critical_lr["critical_inside"].iloc[0])
        attn_hits += int(p.attn_logit["inside"].sum())
        attn_total += len(p.attn_logit)
    assert 0.80 <= hits / draws <= 0.97
    assert 0.80 <= attn_hits / attn_total <= 0.97


def test_predict_reports_censored_curves_and_bad_arguments():
    runs, hist = _ladder(np.random.default_rng(0), sd=0.0)
    low = runs[runs["lr"] <= 1e-2]  # every curve still in its basin at the top of this grid
    p = predict(low, hist, n_boot=200)
    c = p.critical_lr.iloc[0]
    assert np.isnan(c["predicted"]) and "stays in the basin" in c["note"]
    with pytest.raises(ValueError, match="holdout"):
        predict(runs, hist, holdout="smallest")
    with pytest.raises(ValueError, match="target_n_params"):
        predict(runs, hist, holdout=None)
    p = predict(runs, hist, holdout=None, target_n_params=1e7, n_boot=200)
    assert p.heldout is None and p.critical_lr["critical_inside"].isna().all()
    assert p.critical_lr["predicted"].iloc[0] == pytest.approx(_crit(1e7), rel=1e-6)
