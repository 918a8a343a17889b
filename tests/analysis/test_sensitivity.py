"""LR sensitivity (Wortsman et al. 2023) against hand computation on synthetic run tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from stabilitylab.analysis import lr_sensitivity, lr_sensitivity_curve


def _by_hand(rows, lrs):
    """mean over eta of min(L(eta), L0) - min over eta; seeds averaged, NaN/diverged -> L0."""
    per_lr = []
    for lr in lrs:
        vals, inits = [], []
        for r in rows:
            if r["lr"] != lr:
                continue
            bad = r["diverged"] or not math.isfinite(r["final_loss"])
            vals.append(r["init_loss"] if bad else min(r["final_loss"], r["init_loss"]))
            inits.append(r["init_loss"])
        per_lr.append(min(sum(vals) / len(vals), sum(inits) / len(inits)))
    best = min(per_lr)
    return sum(v - best for v in per_lr) / len(per_lr), best, lrs[per_lr.index(best)]


@pytest.fixture
def runs():
    rows = []
    table = {  # (size, variant) -> lr -> [(final, diverged) per seed]
        ("s", "baseline"): {1e-3: [(4.0, False), (4.2, False)], 1e-2: [(3.0, False), (3.4, False)],
                            1e-1: [(float("nan"), True), (3.9, False)], 1.0: [(9.0, False), (float("inf"), True)]},
        ("s", "qk"): {1e-3: [(4.1, False), (4.1, False)], 1e-2: [(3.1, False), (3.3, False)],
                      1e-1: [(3.2, False), (3.0, False)], 1.0: [(3.5, False), (5.9, True)]},
        ("m", "baseline"): {1e-3: [(3.8, False), (3.6, False)], 1e-2: [(2.9, False), (2.7, False)],
                            1e-1: [(7.0, False), (6.5, False)], 1.0: [(float("nan"), True)] * 2},
    }
    for (size, variant), per in table.items():
        for lr, seeds in per.items():
            for seed, (final, div) in enumerate(seeds):
                rows.append(dict(size=size, variant=variant, lr=lr, seed=seed, final_loss=final,
                                 init_loss=5.5 + 0.1 * seed, diverged=div))
    return rows


def test_matches_hand_computation_with_nan_diverged_and_seeds(runs):
    out = lr_sensitivity(pd.DataFrame(runs), by=["size", "variant"])
    assert len(out) == 3
    for _, row in out.iterrows():
        sub = [r for r in runs if (r["size"], r["variant"]) == (row["size"], row["variant"])]
        lrs = sorted({r["lr"] for r in sub})
        sens, best, best_lr = _by_hand(sub, lrs)
        assert row["lr_sensitivity"] == pytest.approx(sens, rel=1e-12)
        assert row["best_loss"] == pytest.approx(best, rel=1e-12)
        assert row["best_lr"] == best_lr
        assert (row["lr_min"], row["lr_max"], row["n_lrs"]) == (min(lrs), max(lrs), len(lrs))
        assert row["n_diverged"] == sum(r["diverged"] or not math.isfinite(r["final_loss"]) for r in sub)


def test_lr_range_restricts_the_grid(runs):
    out = lr_sensitivity(pd.DataFrame(runs), by=["size", "variant"], lr_range=(1e-3, 1e-1))
    for _, row in out.iterrows():
        sub = [r for r in runs if (r["size"], r["variant"]) == (row["size"], row["variant"]) and r["lr"] <= 0.1]
        assert row["lr_sensitivity"] == pytest.approx(_by_hand(sub, [1e-3, 1e-2, 1e-1])[0], rel=1e-12)
        assert row["n_lrs"] == 3 and row["lr_max"] == 0.1
    with pytest.raises(ValueError, match="lr_range"):
        lr_sensitivity(pd.DataFrame(runs), lr_range=(10.0, 20.0))


def test_default_grouping_and_missing_columns(runs):
    df = pd.DataFrame(runs)
    out = lr_sensitivity(df)
    assert list(out.columns[:2]) == ["size", "variant"] and len(out) == 3
    with pytest.raises(ValueError, match="final_loss"):
        lr_sensitivity(df.drop(columns=["final_loss"]))


def test_without_diverged_column_non_finite_counts_as_init_loss():
    df = pd.DataFrame({"lr": [0.1, 0.2, 0.3], "final_loss": [3.0, np.nan, 7.0], "init_loss": [5.0] * 3})
    out = lr_sensitivity(df, by=[])
    # clipped: [3, 5, 5] -> mean(0, 2, 2)
    assert out["lr_sensitivity"].item() == pytest.approx(4 / 3)
    assert out["n_diverged"].item() == 1
    assert lr_sensitivity_curve([3.0, np.nan, 7.0], 5.0) == pytest.approx(4 / 3)
    with pytest.raises(ValueError, match="empty"):
        lr_sensitivity_curve([], 5.0)
