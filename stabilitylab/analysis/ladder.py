"""Trend fits across a ladder of model sizes with repeat seeds, and their extrapolation intervals.

``fit_ladder(df, x="n_params", y=...)`` fits ``log10(y) = poly(log10 x)`` (degree 1: a power law) to the
per-size means of ``log10 y`` over seeds (weighted by the number of seeds) and bootstraps it at two
levels, so an interval reflects both kinds of error the data show:

1. seed noise: the within-size deviations ``log10 y_is - mean_i``, scaled by ``sqrt(S_i / (S_i - 1))``
   and pooled over sizes (variance ``sigma^2``), are resampled and added to the fitted values;
2. lack of fit: the weighted residual variance of the size means around the trend beyond what seed
   noise explains, ``tau^2 = max(0, sum_i S_i d_i^2 / (n - p) - sigma^2) / mean(S)``, enters as a
   Gaussian per-size term.

Without repeat seeds (every size once) ``sigma = 0`` and every residual counts as lack of fit (a plain
residual bootstrap). Resampled noise is inflated by ``t_{df}(q) / z(q)`` (``q`` the upper quantile of
the interval, ``df`` the degrees of freedom behind ``sigma`` and ``tau``), the small-sample correction
for estimating the noise from a handful of runs. ``extrapolate(x, kind="trend")`` is the interval of the
trend itself; ``kind="run"`` adds one run's own noise at the new size (one seed, and that size's lack of
fit): the interval a single held-out run should fall in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats


@dataclass
class LadderFit:
    """A trend ``log10 y = poly(log10 x)`` fitted to per-size means, with bootstrap replicates.

    Attributes:
        x: distinct sizes, ascending.
        means: per-size mean of ``log10 y`` over seeds.
        counts: seeds per size.
        coef: polynomial coefficients (``numpy.polyval`` order) in log10-log10 space.
        sigma: pooled within-size standard deviation of ``log10 y`` (seed noise; 0 without repeats).
        tau: lack-of-fit standard deviation of a size mean beyond seed noise.
        inflate: small-sample factor applied to the resampled noise.
        boot: ``(n_boot, degree + 1)`` bootstrap coefficients.
        run_noise: ``(n_boot,)`` draws of one run's own deviation at a new size (log10 units).
        level: two-sided coverage of the intervals.
        degree: polynomial degree.
        dof: degrees of freedom behind the noise estimates (0: no repeats and no residual freedom, so the
            intervals have zero width and say nothing).
    """

    x: np.ndarray
    means: np.ndarray
    counts: np.ndarray
    coef: np.ndarray
    sigma: float
    tau: float
    inflate: float
    boot: np.ndarray
    run_noise: np.ndarray
    level: float
    degree: int
    dof: int

    def predict(self, x_new) -> np.ndarray:
        """Fitted trend at ``x_new`` (units of ``y``)."""
        return 10.0 ** np.polyval(self.coef, np.log10(np.asarray(x_new, dtype=float)))

    def extrapolate(self, x_new, kind: str = "run") -> pd.DataFrame:
        """Value and interval at each ``x_new``: columns ``x, value, lo, hi`` (units of ``y``).

        Args:
            x_new: sizes (> 0).
            kind: ``"trend"`` (interval of the fitted trend) or ``"run"`` (adds one run's noise).
        """
        if kind not in ("trend", "run"):
            raise ValueError(f"extrapolate(kind={kind!r}): use 'trend' or 'run'")
        xn = np.atleast_1d(np.asarray(x_new, dtype=float))
        if np.any(~(xn > 0)):
            raise ValueError(f"extrapolate(x_new={x_new!r}): sizes must be > 0 (the fit is in log10 x)")
        reps = self.boot @ np.vander(np.log10(xn), self.degree + 1).T  # (n_boot, len(xn))
        if kind == "run":
            reps = reps + self.run_noise[:, None]
        a = (1 - self.level) / 2
        lo, hi = np.quantile(reps, [a, 1 - a], axis=0)
        return pd.DataFrame({"x": xn, "value": self.predict(xn), "lo": 10.0**lo, "hi": 10.0**hi})


def fit_ladder(df: pd.DataFrame, x: str = "n_params", y: str = "value", seed_col: str | None = "seed",
               degree: int = 1, n_boot: int = 2000, level: float = 0.9, seed: int = 0) -> LadderFit:
    """Fit a power law (or log-quadratic) of ``y`` against ``x`` over a size ladder; see the module docstring.

    Args:
        df: one row per run with columns ``x``, ``y`` (and ``seed_col``; rows whose ``x`` or ``y`` is
            not finite and > 0 are dropped).
        x: size column (parameters).
        y: signal column (> 0; fitted in log10).
        seed_col: column telling repeat runs apart (only used to count them; None: any rows that share
            an ``x`` are repeats).
        degree: 1 (power law) or 2 (quadratic in log10 x).
        n_boot: bootstrap replicates.
        level: two-sided coverage of the intervals, in (0, 1).
        seed: RNG seed of the bootstrap.

    Returns:
        a ``LadderFit``.
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"fit_ladder(df=...): expected a pandas DataFrame, got {type(df).__name__}")
    for name, col in (("x", x), ("y", y)):
        if col not in df.columns:
            raise ValueError(f"fit_ladder({name}={col!r}): no such column; columns are {list(df.columns)}")
    if seed_col is not None and seed_col not in df.columns:
        raise ValueError(f"fit_ladder(seed_col={seed_col!r}): no such column; pass seed_col=None if runs "
                         "have no seed column")
    if degree not in (1, 2):
        raise ValueError(f"fit_ladder(degree={degree!r}): use 1 (power law) or 2 (quadratic in log x)")
    if not 0 < level < 1:
        raise ValueError(f"fit_ladder(level={level!r}): must be in (0, 1), e.g. 0.9")
    if not (isinstance(n_boot, int) and n_boot >= 100):
        raise ValueError(f"fit_ladder(n_boot={n_boot!r}): use an int >= 100 for stable interval ends")
    xv = df[x].to_numpy(dtype=float)
    yv = df[y].to_numpy(dtype=float)
    keep = np.isfinite(xv) & np.isfinite(yv) & (xv > 0) & (yv > 0)
    lx_all, ly_all = np.log10(xv[keep]), np.log10(yv[keep])
    sizes = np.unique(xv[keep])
    p = degree + 1
    if sizes.size < p:
        raise ValueError(f"fit_ladder: {sizes.size} distinct usable sizes in {x!r}; a degree-{degree} fit needs "
                         f"at least {p} (with finite {y} > 0)")
    lx = np.log10(sizes)
    groups = [ly_all[lx_all == v] for v in lx]
    counts = np.array([g.size for g in groups], dtype=float)
    means = np.array([g.mean() for g in groups])
    dev = [g - g.mean() for g in groups]
    df_sigma = int(sum(g.size - 1 for g in groups))
    sigma = float(np.sqrt(sum(float(np.sum(d**2)) for d in dev) / df_sigma)) if df_sigma else 0.0
    pool = np.concatenate([d * np.sqrt(g.size / (g.size - 1)) for d, g in zip(dev, groups) if g.size > 1]) \
        if df_sigma else np.zeros(1)
    w = np.sqrt(counts)
    coef = np.polyfit(lx, means, degree, w=w)
    fitted = np.polyval(coef, lx)
    n = sizes.size
    df_fit = n - p
    s2 = float(np.sum(counts * (means - fitted) ** 2) / df_fit) if df_fit else 0.0
    tau = float(np.sqrt(max(0.0, s2 - sigma**2) / counts.mean())) if df_fit else 0.0
    dof = df_sigma + (df_fit if tau > 0 else 0)
    q = 1 - (1 - level) / 2
    inflate = float(stats.t.ppf(q, dof) / stats.norm.ppf(q)) if dof else 1.0
    rng = np.random.default_rng(seed)
    m = np.repeat(fitted[None, :], n_boot, axis=0)
    for i, c in enumerate(counts.astype(int)):
        m[:, i] += inflate * rng.choice(pool, size=(n_boot, c)).mean(axis=1)
    m += inflate * tau * rng.standard_normal((n_boot, n))
    boot = np.polyfit(lx, m.T, degree, w=w).T
    run_noise = inflate * (rng.choice(pool, size=n_boot) + tau * rng.standard_normal(n_boot))
    return LadderFit(sizes, means, counts, coef, sigma, tau, inflate, boot, run_noise, level, degree, dof)
