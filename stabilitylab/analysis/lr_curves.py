"""LR-curve analysis per (size, variant): optimal LR with an interval, critical LR as an interval.

Optimal LR. With ``x = log10(lr)`` and the run-level final losses of the runs that did not diverge, take
the grid LR with the lowest mean loss and the ``half_window`` grid LRs on each side of it, fit
``L(x) = a + b x + c x^2`` by least squares and report ``x* = argmin of the fit over the window``
(the vertex when ``c > 0`` and inside the window, else the better window edge). The interval is a
percentile bootstrap of ``x*`` (``n_boot`` replicates): runs are resampled within each LR when some LR
has repeat seeds, otherwise the fit's residuals (scaled by ``sqrt(n / (n - 3))``) are resampled. With
fewer than 3 LRs in the window, or an exact fit with no repeat seeds (no noise estimate), the optimum
is the best grid LR and the interval spans its grid neighbours (``opt_method = "grid"``).

Critical LR. The divergence boundary is fractal (Sohl-Dickstein, 2024), so it is an interval:
``critical_lr_hi`` = the smallest LR at which any run diverged, ``critical_lr_lo`` = the largest LR
below it at which no run diverged. A finer grid near the boundary refines the interval by itself.
``critical_lr_hi`` is NaN when nothing diverged (the boundary is above the grid), ``critical_lr_lo`` is
NaN when the smallest LR diverged.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from stabilitylab.analysis.tables import check_runs


def _quad_argmin(x: np.ndarray, y: np.ndarray, lo: float, hi: float) -> float:
    c2, c1, c0 = np.polyfit(x, y, 2)
    cands = [lo, hi]
    if c2 > 0 and lo < -c1 / (2 * c2) < hi:
        cands.append(-c1 / (2 * c2))
    cands = np.asarray(cands)
    return float(cands[np.argmin(c0 + c1 * cands + c2 * cands**2)])


def optimal_lr(lr, loss, half_window: int = 2, n_boot: int = 1000, level: float = 0.95,
               seed: int = 0) -> dict:
    """Optimal LR of one LR curve (see module docstring).

    Args:
        lr: learning rates of the runs that did not diverge (repeats = seeds).
        loss: their final losses (finite).
        half_window: grid LRs on each side of the best one used in the fit.
        n_boot: bootstrap replicates for the interval.
        level: two-sided coverage of the interval.
        seed: bootstrap RNG seed.

    Returns:
        ``{"opt_lr", "opt_lr_lo", "opt_lr_hi", "opt_loss", "opt_method", "opt_at_edge"}``.
    """
    x = np.log10(np.asarray(lr, dtype=float))
    y = np.asarray(loss, dtype=float)
    if x.size == 0:
        nan = float("nan")
        return {"opt_lr": nan, "opt_lr_lo": nan, "opt_lr_hi": nan, "opt_loss": nan, "opt_method": "none",
                "opt_at_edge": False}
    grid = np.unique(x)
    means = np.array([y[x == g].mean() for g in grid])
    b = int(np.argmin(means))
    win = grid[max(0, b - half_window): b + half_window + 1]
    sel = np.isin(x, win)
    xs, ys = x[sel], y[sel]
    repeats = any((xs == g).sum() > 1 for g in win)
    n = xs.size
    resid_ok = n > 3
    out = {"opt_loss": float(means[b]), "opt_at_edge": bool(b in (0, grid.size - 1))}
    if win.size < 3 or not (repeats or resid_ok):
        out.update(opt_lr=10 ** grid[b], opt_lr_lo=10 ** grid[max(0, b - 1)],
                   opt_lr_hi=10 ** grid[min(grid.size - 1, b + 1)], opt_method="grid")
        return out
    lo, hi = win[0], win[-1]
    xstar = _quad_argmin(xs, ys, lo, hi)
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)
    if repeats:
        groups = [np.flatnonzero(xs == g) for g in win]
        for i in range(n_boot):
            idx = np.concatenate([rng.choice(g, g.size) for g in groups])
            boot[i] = _quad_argmin(xs[idx], ys[idx], lo, hi)
    else:
        fitted = np.polyval(np.polyfit(xs, ys, 2), xs)
        res = (ys - fitted) * np.sqrt(n / (n - 3))
        for i in range(n_boot):
            boot[i] = _quad_argmin(xs, fitted + rng.choice(res, n), lo, hi)
    a = (1 - level) / 2
    q_lo, q_hi = np.quantile(boot, [a, 1 - a])
    out.update(opt_lr=10**xstar, opt_lr_lo=10 ** min(q_lo, xstar), opt_lr_hi=10 ** max(q_hi, xstar),
               opt_method="quadratic-bootstrap-seeds" if repeats else "quadratic-bootstrap-residuals")
    return out


def critical_lr(lr, diverged) -> tuple[float, float]:
    """``(lo, hi)``: the largest LR that did not diverge below the smallest LR that diverged (any seed)."""
    lr = np.asarray(lr, dtype=float)
    div = np.asarray(diverged, dtype=bool)
    if not div.any():
        return float(lr.max()) if lr.size else float("nan"), float("nan")
    hi = float(lr[div].min())
    ok = lr[lr < hi]
    return (float(ok.max()) if ok.size else float("nan")), hi


def lr_curves(runs: pd.DataFrame, by: list[str] | None = None, half_window: int = 2, n_boot: int = 1000,
              level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Optimal and critical LR per group of a runs table (see module docstring).

    Args:
        runs: runs table (``lr``, ``final_loss``, ``init_loss``, ``diverged`` and the group columns).
        by: grouping columns (default: ``size``, ``n_params``, ``variant`` when present).
        half_window, n_boot, level, seed: see ``optimal_lr``.

    Returns:
        one row per group: group columns, ``opt_lr, opt_lr_lo, opt_lr_hi, opt_loss, opt_method,
        opt_at_edge, critical_lr_lo, critical_lr_hi, n_runs, n_diverged``.
    """
    runs = check_runs(runs, "lr_curves")
    by = [c for c in ("size", "n_params", "variant") if c in runs.columns] if by is None else list(by)
    rows = []
    for key, g in (runs.groupby(by, dropna=False, sort=True) if by else [((), runs)]):
        key = key if isinstance(key, tuple) else (key,)
        ok = g[~g["diverged"]]
        opt = optimal_lr(ok["lr"], ok["final_loss"], half_window, n_boot, level, seed)
        lo, hi = critical_lr(g["lr"], g["diverged"])
        rows.append({**dict(zip(by, key)), **opt, "critical_lr_lo": lo, "critical_lr_hi": hi,
                     "n_runs": len(g), "n_diverged": int(g["diverged"].sum())})
    return pd.DataFrame(rows)
