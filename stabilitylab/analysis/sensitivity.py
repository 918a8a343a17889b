"""LR sensitivity exactly as Wortsman et al. (2023) define it.

    LR sensitivity = mean over eta in the grid of ( min(L(eta), L0) - L* ),   L* = min over the grid of L(eta)

where L(eta) is the final loss at peak LR eta and L0 the loss at initialisation; a non-finite (NaN/Inf)
or diverged final loss counts as L0.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def lr_sensitivity_curve(final_loss, init_loss) -> float:
    """Sensitivity of one LR curve: arrays of final losses and init losses over the LR grid."""
    L = np.asarray(final_loss, dtype=float)
    L0 = np.broadcast_to(np.asarray(init_loss, dtype=float), L.shape)
    if L.size == 0:
        raise ValueError("lr_sensitivity: empty LR grid")
    clipped = np.where(np.isfinite(L), np.minimum(L, L0), L0)
    return float(np.mean(clipped - clipped.min()))


def lr_sensitivity(runs: pd.DataFrame, by: tuple[str, ...] | list[str] | None = None,
                   lr_range: tuple[float, float] | None = None, lr_col: str = "lr") -> pd.DataFrame:
    """LR sensitivity per group of a runs table.

    Args:
        runs: one row per run with columns ``lr``, ``final_loss``, ``init_loss`` and the grouping columns.
            Seeds of the same (group, lr) are averaged first (non-finite counted as init loss).
        by: grouping columns (default: those of ``size``, ``n_params``, ``variant`` present).
        lr_range: only use LRs in ``[a, b]`` (inclusive); default: every LR in the table.

    Returns:
        one row per group: the group columns, ``lr_sensitivity``, ``best_loss``, ``best_lr``,
        ``lr_min``, ``lr_max``, ``n_lrs``, ``n_diverged``.
    """
    if not isinstance(runs, pd.DataFrame):
        raise TypeError(f"lr_sensitivity(runs=...): expected a pandas DataFrame, got {type(runs).__name__}")
    need = {lr_col, "final_loss", "init_loss"}
    missing = need - set(runs.columns)
    if missing:
        raise ValueError(f"lr_sensitivity(runs): missing columns {sorted(missing)}; need {sorted(need)}")
    if by is None:
        by = [c for c in ("size", "n_params", "variant") if c in runs.columns]
    by = list(by)
    df = runs[np.isfinite(pd.to_numeric(runs[lr_col], errors="coerce").astype(float))].copy()
    if df.empty:
        raise ValueError(f"lr_sensitivity(runs=...): no run with a finite {lr_col!r}; pass at least one run")
    if lr_range is not None:
        try:
            a, b = (float(v) for v in lr_range)
        except (TypeError, ValueError):
            raise TypeError(f"lr_sensitivity(lr_range={lr_range!r}): pass a pair (low, high)") from None
        if not 0 <= a <= b:
            raise ValueError(f"lr_sensitivity(lr_range={lr_range!r}): need 0 <= low <= high")
        df = df[(df[lr_col] >= a * (1 - 1e-9)) & (df[lr_col] <= b * (1 + 1e-9))]
    if df.empty:
        raise ValueError(f"lr_sensitivity: no runs in lr_range={lr_range}")
    fl = df["final_loss"].astype(float)
    L0 = df["init_loss"].astype(float)
    diverged = ~np.isfinite(fl) | (df["diverged"].astype(bool) if "diverged" in df else False)
    df = df.assign(_L=np.where(diverged | ~np.isfinite(fl), L0, np.minimum(fl, L0)),
                   _div=diverged.astype(int))
    rows = []
    groups = df.groupby(by, dropna=False, sort=True) if by else [((), df)]
    for key, g in groups:
        per_lr = g.groupby(lr_col).agg(L=("_L", "mean"), L0=("init_loss", "mean"), div=("_div", "sum"))
        Lc = np.minimum(per_lr["L"].to_numpy(), per_lr["L0"].to_numpy())
        best = int(np.argmin(Lc))
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, key)),
                     "lr_sensitivity": lr_sensitivity_curve(Lc, per_lr["L0"].to_numpy()),
                     "best_loss": float(Lc[best]), "best_lr": float(per_lr.index[best]),
                     "lr_min": float(per_lr.index.min()), "lr_max": float(per_lr.index.max()),
                     "n_lrs": len(per_lr), "n_diverged": int(per_lr["div"].sum())})
    return pd.DataFrame(rows)
