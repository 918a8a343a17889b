"""LR sensitivity, optimal LR and critical LR against hand-computed values on synthetic tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stabilitylab.analysis import critical_lr, lr_curves, lr_sensitivity, optimal_lr


def _runs(rows):
    return pd.DataFrame(rows, columns=["run_id", "size", "n_params", "variant", "lr", "seed", "final_loss",
                                       "init_loss", "diverged"])


def test_lr_sensitivity_hand_computed_with_nan_and_diverged_runs():
    lrs = [1e-3, 1e-2, 1e-1, 1.0]
    losses = [3.0, 2.5, np.nan, 4.0]  # NaN -> init 5.0; the 1.0 run flagged diverged -> 5.0
    runs = _runs([(f"r{i}", "s", 100, "base", lr, 0, fl, 5.0, i == 3) for i, (lr, fl) in enumerate(zip(lrs, losses))])
    out = lr_sensitivity(runs)
    clipped = np.array([3.0, 2.5, 5.0, 5.0])
    assert out["lr_sensitivity"].iloc[0] == pytest.approx(np.mean(clipped - 2.5))
    assert out["best_lr"].iloc[0] == 1e-2 and out["n_diverged"].iloc[0] == 2
    ranged = lr_sensitivity(runs, lr_range=(1e-3, 1e-1))
    assert ranged["lr_sensitivity"].iloc[0] == pytest.approx(np.mean([0.5, 0.0, 2.5]))
    assert (ranged["lr_min"].iloc[0], ranged["lr_max"].iloc[0]) == (1e-3, 1e-1)


def test_critical_lr_is_interval_between_last_stable_and_first_diverged():
    lr = [1e-3, 3e-3, 1e-2, 1e-2, 3e-2, 1e-1]
    div = [False, False, False, True, False, True]  # one seed at 1e-2 diverged: boundary is below it
    assert critical_lr(lr, div) == (3e-3, 1e-2)
    lo, hi = critical_lr([1e-3, 1e-2], [False, False])
    assert lo == 1e-2 and np.isnan(hi)
    lo, hi = critical_lr([1e-3, 1e-2], [True, True])
    assert np.isnan(lo) and hi == 1e-3


def test_optimal_lr_noise_free_parabola_is_exact_vertex():
    x = np.linspace(-4, 0, 9)
    x0 = -2.3
    lr = 10**x
    loss = 2.0 + 0.7 * (x - x0) ** 2
    out = optimal_lr(lr, loss, n_boot=200)
    assert out["opt_lr"] == pytest.approx(10**x0, rel=1e-8)
    assert out["opt_lr_lo"] == pytest.approx(10**x0, rel=1e-6) and out["opt_lr_hi"] == pytest.approx(10**x0, rel=1e-6)
    assert out["opt_method"] == "quadratic-bootstrap-residuals" and not out["opt_at_edge"]


def test_optimal_lr_interval_covers_truth_with_seed_noise():
    rng = np.random.default_rng(1)
    x0 = -1.7
    xs = np.repeat(np.linspace(-3, -0.5, 6), 4)
    loss = 2.0 + 0.5 * (xs - x0) ** 2 + rng.normal(0, 0.02, xs.size)
    out = optimal_lr(10**xs, loss, n_boot=500)
    assert out["opt_method"] == "quadratic-bootstrap-seeds"
    assert out["opt_lr_lo"] < 10**x0 < out["opt_lr_hi"]
    assert out["opt_lr_hi"] / out["opt_lr_lo"] < 10**0.6  # informative: narrower than a grid step or so


def test_optimal_lr_falls_back_to_grid_neighbours_with_two_points():
    out = optimal_lr([1e-3, 1e-2], [3.0, 2.0])
    assert out["opt_method"] == "grid" and out["opt_lr"] == 1e-2
    assert (out["opt_lr_lo"], out["opt_lr_hi"]) == (1e-3, 1e-2) and out["opt_at_edge"]


def test_lr_curves_groups_by_size_and_variant_and_skips_diverged_points():
    rows = []
    for size, n, x0 in (("a", 100, -2.0), ("b", 400, -2.5)):
        for i, x in enumerate(np.linspace(-4, 0, 9)):
            div = x > -1
            rows.append((f"{size}{i}", size, n, "v", 10**x, 0, np.nan if div else 2 + (x - x0) ** 2, 6.0, div))
    out = lr_curves(_runs(rows), n_boot=100).set_index("size")
    assert out.loc["a", "opt_lr"] == pytest.approx(1e-2) and out.loc["b", "opt_lr"] == pytest.approx(10**-2.5)
    assert out.loc["a", "critical_lr_lo"] == pytest.approx(10**-1) and out.loc["a", "critical_lr_hi"] == pytest.approx(10**-0.5)
    assert out.loc["a", "n_diverged"] == 2


def test_lr_curves_rejects_table_without_loss_columns():
    with pytest.raises(ValueError, match="final_loss"):
        lr_curves(pd.DataFrame({"run_id": ["a"], "lr": [1.0]}))
