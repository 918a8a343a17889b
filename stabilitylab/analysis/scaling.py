"""Scaling-trend fits with bootstrap uncertainty: power laws and log-polynomials.

``fit_scaling(df, x, y, degree)`` fits ``log10(y) = sum_k c_k log10(x)^k`` (``log_y=True``, a power law
``y = A x^alpha`` for degree 1 with ``alpha = c_1``) or ``y = sum_k c_k log10(x)^k`` (``log_y=False``,
for signals that can be zero or negative). Uncertainty is a residual bootstrap (fixed design, residuals
scaled by ``sqrt(n / (n - p))``, ``p = degree + 1``): ``n_boot`` refits give percentile bands of the
fitted curve, of extrapolations and of the x at which the curve crosses a level. Goodness of fit is
``R^2`` in the fitted space. With ``n == p`` points the fit is exact and every interval is NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass
class ScalingFit:
    """A fitted trend ``f(log10 x)`` with bootstrap replicates.

    Attributes:
        x_name, y_name: column names the fit was made on.
        degree: polynomial degree in ``log10(x)``.
        log_y: True if ``log10(y)`` was fitted (power law), False if ``y``.
        coef: polynomial coefficients, highest power first (``numpy.polyval`` order).
        boot: ``(n_boot, degree + 1)`` bootstrap coefficients (empty when the fit is exact).
        r2: coefficient of determination in the fitted space.
        x, y: the data used.
        level: two-sided coverage of the intervals.
    """

    x_name: str
    y_name: str
    degree: int
    log_y: bool
    coef: np.ndarray
    boot: np.ndarray
    r2: float
    x: np.ndarray
    y: np.ndarray
    level: float = 0.95

    @property
    def exponent(self) -> float:
        """``d log10(y) / d log10(x)`` for a degree-1 power law (the exponent alpha)."""
        return float(self.coef[-2])

    @property
    def exponent_interval(self) -> tuple[float, float]:
        """Bootstrap interval of the degree-1 coefficient."""
        return self._interval(self.boot[:, -2]) if self.boot.size else (float("nan"), float("nan"))

    def _interval(self, samples: np.ndarray) -> tuple[float, float]:
        a = (1 - self.level) / 2
        lo, hi = np.nanquantile(samples, [a, 1 - a], axis=0)
        return lo, hi

    def _out(self, t: np.ndarray) -> np.ndarray:
        return 10.0**t if self.log_y else t

    def predict(self, x_new) -> np.ndarray:
        """Fitted value at ``x_new`` (same units as ``y``)."""
        return self._out(np.polyval(self.coef, np.log10(np.asarray(x_new, dtype=float))))

    def extrapolate(self, x_new) -> pd.DataFrame:
        """Value and bootstrap interval at each ``x_new``: columns ``x, value, lo, hi``."""
        xn = np.atleast_1d(np.asarray(x_new, dtype=float))
        if np.any(~(xn > 0)):
            raise ValueError(f"extrapolate(x_new={x_new!r}): x must be > 0 (the fit is in log10 x)")
        lx = np.log10(xn)
        if self.boot.size:
            reps = self.boot @ np.vander(lx, self.degree + 1).T
            lo, hi = self._interval(reps)
        else:
            lo = hi = np.full_like(lx, np.nan)
        return pd.DataFrame({"x": xn, "value": self.predict(xn), "lo": self._out(lo), "hi": self._out(hi)})

    def solve(self, y_target: float, x_range: tuple[float, float] | None = None) -> dict:
        """The x at which the trend reaches ``y_target``, with a bootstrap interval.

        Searches ``log10 x`` on ``x_range`` (default: 10^-3 times the smallest fitted x to 10^6 times the
        largest) for the first crossing in the direction the fitted trend moves over the data (up for a
        growing signal, down for a shrinking one). A curve already past the target at the start of the
        range gives the range start; one that never crosses gives ``inf`` (so an interval end may be
        ``inf``).

        Returns:
            ``{"x": estimate, "lo": ..., "hi": ..., "p_cross": share of replicates that cross}``.
        """
        if self.log_y and not y_target > 0:
            raise ValueError(f"solve(y_target={y_target!r}): a power-law fit needs a positive target")
        t = np.log10(y_target) if self.log_y else float(y_target)
        lo_x, hi_x = x_range if x_range is not None else (self.x.min() * 1e-3, self.x.max() * 1e6)
        grid = np.linspace(np.log10(lo_x), np.log10(hi_x), 2001)
        coefs = np.vstack([self.coef[None, :], self.boot])
        v = coefs @ np.vander(grid, self.degree + 1).T - t  # (1 + n_boot, grid)
        changed = np.sign(v) != np.sign(v[:, :1])
        has = changed.any(axis=1)
        i = np.where(has, changed.argmax(axis=1), 1)
        rows = np.arange(len(v))
        x0, x1, v0, v1 = grid[i - 1], grid[i], v[rows, i - 1], v[rows, i]
        with np.errstate(divide="ignore", invalid="ignore"):
            xs = np.where(has, 10 ** (x0 - v0 * (x1 - x0) / (v1 - v0)), np.inf)
        lx = np.log10(self.x)
        rising = np.polyval(self.coef, lx.max()) >= np.polyval(self.coef, lx.min())
        xs[(v[:, 0] >= 0) if rising else (v[:, 0] <= 0)] = 10 ** grid[0]
        est = float(xs[0])
        if not self.boot.size:
            return {"x": est, "lo": float("nan"), "hi": float("nan"), "p_cross": float("nan")}
        reps = xs[1:]
        a = (1 - self.level) / 2
        lo, hi = np.quantile(reps, [a, 1 - a], method="inverted_cdf")  # inf sorts last: open intervals end at inf
        return {"x": est, "lo": float(lo), "hi": float(hi), "p_cross": float(np.isfinite(reps).mean())}


def fit_scaling(df: pd.DataFrame, x: str = "n_params", y: str = "value", degree: int = 1, log_y: bool = True,
                n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> ScalingFit:
    """Fit a power law / log-polynomial of ``y`` against ``x`` with bootstrap intervals.

    Args:
        df: table with columns ``x`` and ``y`` (rows with non-finite or non-positive values where a log
            is taken are dropped).
        x: column of the scaling variable (model size in parameters, or LR); must be > 0.
        y: column of the signal.
        degree: 1 (power law) or 2 (curvature in log-log).
        log_y: fit ``log10(y)`` (True) or ``y`` (False) against ``log10(x)``.
        n_boot: bootstrap replicates.
        level: two-sided coverage of intervals (0 < level < 1).
        seed: bootstrap RNG seed.

    Returns:
        a ``ScalingFit`` (``.extrapolate(x_new)``, ``.solve(y_target)``, ``.r2``, ``.exponent``).
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"fit_scaling(df=...): expected a pandas DataFrame, got {type(df).__name__}")
    for name, col in (("x", x), ("y", y)):
        if col not in df.columns:
            raise ValueError(f"fit_scaling({name}={col!r}): no such column; columns are {list(df.columns)}")
    if degree not in (1, 2):
        raise ValueError(f"fit_scaling(degree={degree!r}): use 1 (power law) or 2 (quadratic in log x)")
    if not 0 < level < 1:
        raise ValueError(f"fit_scaling(level={level!r}): must be in (0, 1), e.g. 0.95")
    xv = df[x].to_numpy(dtype=float)
    yv = df[y].to_numpy(dtype=float)
    keep = np.isfinite(xv) & np.isfinite(yv) & (xv > 0) & ((yv > 0) if log_y else True)
    xv, yv = xv[keep], yv[keep]
    p = degree + 1
    if np.unique(xv).size < p:
        raise ValueError(f"fit_scaling: {np.unique(xv).size} distinct usable {x} values; a degree-{degree} fit "
                         f"needs at least {p} (finite, > 0{' and y > 0' if log_y else ''})")
    lx = np.log10(xv)
    ly = np.log10(yv) if log_y else yv
    coef = np.polyfit(lx, ly, degree)
    fitted = np.polyval(coef, lx)
    res = ly - fitted
    ss_tot = float(np.sum((ly - ly.mean()) ** 2))
    r2 = 1.0 - float(np.sum(res**2)) / ss_tot if ss_tot > 0 else float("nan")
    n = lx.size
    boot = np.empty((0, p))
    if n > p:
        rng = np.random.default_rng(seed)
        scaled = res * np.sqrt(n / (n - p))
        ys = fitted + scaled[rng.integers(0, n, size=(n_boot, n))]
        boot = np.polyfit(lx, ys.T, degree).T
    return ScalingFit(x, y, degree, log_y, coef, boot, r2, xv, yv, level)
