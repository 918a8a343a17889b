"""fit_ladder: the fit against numpy on exact data, its noise estimates by hand, and interval coverage over
many synthetic ladders drawn from a known power law."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stabilitylab.analysis import fit_ladder

SIZES = (4.2e4, 8.2e4, 1.3e5)  # the quick reproduction's fitted ladder
TARGET = 1.25e6  # its held-out size (9.4x)


def _law(n):
    return 10 ** (0.5 - 0.4 * np.log10(n))


def _draw(rng, sizes=SIZES, seeds=2, sd=0.05, tau=0.0):
    rows = []
    for n in sizes:
        shift = rng.normal(0, tau)
        rows += [(n, s, _law(n) * 10 ** (shift + rng.normal(0, sd))) for s in range(seeds)]
    return pd.DataFrame(rows, columns=["n_params", "seed", "value"])


def test_exact_power_law_is_recovered_with_a_zero_width_interval():
    df = pd.DataFrame({"n_params": np.repeat(SIZES, 2), "seed": [0, 1] * 3, "value": _law(np.repeat(SIZES, 2))})
    f = fit_ladder(df, n_boot=200)
    assert f.coef == pytest.approx([-0.4, 0.5], abs=1e-9)
    assert f.sigma == pytest.approx(0.0, abs=1e-12) and f.tau == pytest.approx(0.0, abs=1e-9)
    e = f.extrapolate(TARGET).iloc[0]
    assert e["value"] == pytest.approx(_law(TARGET), rel=1e-9)
    assert e["lo"] == pytest.approx(_law(TARGET), rel=1e-6) and e["hi"] == pytest.approx(_law(TARGET), rel=1e-6)


def test_noise_estimates_match_hand_computation():
    ly = {1e4: [0.0, 0.2], 1e5: [-0.3, -0.5, -0.4], 1e6: [-1.1, -0.7]}
    df = pd.DataFrame([(n, i, 10**v) for n, vs in ly.items() for i, v in enumerate(vs)],
                      columns=["n_params", "seed", "value"])
    f = fit_ladder(df, n_boot=200)
    means = np.array([np.mean(v) for v in ly.values()])
    counts = np.array([len(v) for v in ly.values()], dtype=float)
    ss_within = sum(float(np.sum((np.array(v) - np.mean(v)) ** 2)) for v in ly.values())
    sigma = np.sqrt(ss_within / (7 - 3))
    x = np.log10(list(ly))
    coef = np.polyfit(x, means, 1, w=np.sqrt(counts))
    s2 = np.sum(counts * (means - np.polyval(coef, x)) ** 2) / (3 - 2)
    tau = np.sqrt(max(0.0, s2 - sigma**2) / counts.mean())
    assert f.means == pytest.approx(means) and list(f.counts) == [2, 3, 2]
    assert f.sigma == pytest.approx(sigma, rel=1e-12)
    assert f.coef == pytest.approx(coef, rel=1e-12)
    assert f.tau == pytest.approx(tau, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("kw", [{}, {"seeds": 8}, {"tau": 0.03}, {"seeds": 1}],
                         ids=["2-seeds", "8-seeds", "lack-of-fit", "1-seed"])
def test_90_percent_intervals_cover_the_truth_and_a_new_run_at_the_stated_rate(kw):
    rng = np.random.default_rng(7)
    truth = _law(TARGET)
    trend = run = 0
    draws = 200
    for i in range(draws):
        f = fit_ladder(_draw(rng, **kw), n_boot=400, level=0.9, seed=i)
        t = f.extrapolate(TARGET, kind="trend").iloc[0]
        r = f.extrapolate(TARGET, kind="run").iloc[0]
        new_run = truth * 10 ** (rng.normal(0, kw.get("tau", 0.0)) + rng.normal(0, 0.05))
        trend += t["lo"] <= truth <= t["hi"]
        run += r["lo"] <= new_run <= r["hi"]
    assert 0.80 <= trend / draws <= 0.97
    assert 0.80 <= run / draws <= 0.97


def test_run_interval_is_wider_than_trend_interval_and_shrinks_with_seeds():
    rng = np.random.default_rng(3)
    few, many = fit_ladder(_draw(rng, seeds=2)), fit_ladder(_draw(rng, seeds=32))
    for f in (few, many):
        t, r = f.extrapolate(TARGET, "trend").iloc[0], f.extrapolate(TARGET, "run").iloc[0]
        assert r["hi"] / r["lo"] > t["hi"] / t["lo"]
    w = [float(np.log10(f.extrapolate(TARGET, "trend").eval("hi / lo").iloc[0])) for f in (few, many)]
    assert w[1] < w[0] / 2


@pytest.mark.parametrize("kwargs, word", [({"x": "nope"}, "x="), ({"degree": 3}, "degree"), ({"level": 1.0}, "level"),
                                          ({"n_boot": 5}, "n_boot"), ({"seed_col": "s"}, "seed_col")])
def test_bad_arguments_name_the_argument(kwargs, word):
    df = _draw(np.random.default_rng(0))
    with pytest.raises(ValueError, match=word):
        fit_ladder(df, **{"y": "value", **kwargs})


def test_too_few_sizes_says_how_many_are_needed():
    df = _draw(np.random.default_rng(0), sizes=(1e4,))
    with pytest.raises(ValueError, match="at least 2"):
        fit_ladder(df)
