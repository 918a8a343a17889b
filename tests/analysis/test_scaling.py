"""fit_scaling recovers known exponents within its intervals; extrapolation and solve are consistent."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from stabilitylab.analysis import fit_scaling


def _power_law(alpha=-0.35, a=3.0, sigma=0.05, n=10, seed=0):
    rng = np.random.default_rng(seed)
    x = np.logspace(5, 8, n)
    return pd.DataFrame({"n_params": x, "value": a * x**alpha * np.exp(rng.normal(0, sigma, n))})


def test_power_law_exponent_within_interval_and_matches_linregress():
    df = _power_law()
    fit = fit_scaling(df, "n_params", "value", n_boot=3000)
    lo, hi = fit.exponent_interval
    assert lo < -0.35 < hi
    ref = stats.linregress(np.log10(df["n_params"]), np.log10(df["value"]))
    assert fit.exponent == pytest.approx(ref.slope, rel=1e-10)
    assert fit.r2 == pytest.approx(ref.rvalue**2, rel=1e-10)
    # residual-bootstrap interval ~ the OLS t-interval (same residual variance)
    half = stats.t.ppf(0.975, len(df) - 2) * ref.stderr
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.3)


def test_interval_coverage_over_repeated_experiments():
    hits = 0
    for seed in range(40):
        lo, hi = fit_scaling(_power_law(seed=seed, n=8), n_boot=400, seed=seed).exponent_interval
        hits += lo < -0.35 < hi
    assert hits >= 32  # nominal 95%; allow finite-sample undercoverage of the percentile bootstrap


def test_degree_two_recovers_curvature_and_extrapolates_with_band():
    x = np.logspace(4, 7, 12)
    lx = np.log10(x)
    rng = np.random.default_rng(3)
    y = 10 ** (0.05 * lx**2 - 0.2 * lx + 1 + rng.normal(0, 0.01, x.size))
    fit = fit_scaling(pd.DataFrame({"x": x, "y": y}), "x", "y", degree=2, n_boot=2000)
    assert fit.coef[0] == pytest.approx(0.05, abs=0.01)
    e = fit.extrapolate([1e8])
    truth = 10 ** (0.05 * 64 - 0.2 * 8 + 1)
    assert e["lo"].iloc[0] < truth < e["hi"].iloc[0]
    assert e["lo"].iloc[0] < e["value"].iloc[0] < e["hi"].iloc[0]


def test_solve_finds_crossing_and_bootstrap_interval():
    df = _power_law(alpha=0.5, a=1.0, sigma=0.02)  # y = sqrt(x)
    fit = fit_scaling(df, n_boot=1000)
    s = fit.solve(1e5)  # sqrt(x) = 1e5 at x = 1e10 (beyond the data)
    assert s["x"] == pytest.approx(1e10, rel=0.3)
    assert s["lo"] < 1e10 < s["hi"] and s["p_cross"] == 1.0
    assert fit.solve(1e30)["x"] == np.inf  # never reached on the search range (up to 1e6 x the data)
    assert fit.solve(1e-9)["x"] == pytest.approx(df["n_params"].min() * 1e-3)  # already past at the range start


def test_linear_y_fit_and_nan_rows_dropped():
    x = np.array([1e3, 1e4, 1e5, 1e6, np.nan, 1e7])
    y = np.array([1.0, 2.0, 3.0, 4.0, 9.0, np.nan])
    fit = fit_scaling(pd.DataFrame({"x": x, "y": y}), "x", "y", log_y=False)
    assert fit.coef == pytest.approx([1.0, -2.0]) and len(fit.x) == 4
    assert fit.predict([1e8])[0] == pytest.approx(6.0)


def test_exact_fit_has_nan_interval_and_bad_args_are_named():
    fit = fit_scaling(pd.DataFrame({"x": [1.0, 10.0], "y": [1.0, 2.0]}), "x", "y")
    assert np.isnan(fit.extrapolate(100.0)["lo"].iloc[0])
    with pytest.raises(ValueError, match="degree"):
        fit_scaling(pd.DataFrame({"x": [1.0, 10.0], "y": [1.0, 2.0]}), "x", "y", degree=3)
    with pytest.raises(ValueError, match="y='nope'"):
        fit_scaling(pd.DataFrame({"x": [1.0]}), "x", "nope")
    with pytest.raises(ValueError, match="distinct"):
        fit_scaling(pd.DataFrame({"x": [1.0, 1.0], "y": [1.0, 2.0]}), "x", "y")
    with pytest.raises(ValueError, match="x_new"):
        fit.extrapolate(-1.0)
