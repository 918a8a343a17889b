"""Predicting instabilities from small models: per-run signals, trend fits across sizes, held-out checks.

``run_signals(runs, history)`` reduces each run's history to the numbers the predictions use:

- ``attn_logit``: early-training max attention logit = max over modules and over logged steps
  ``<= early_frac * steps`` of ``attn.max_logit``;
- ``lse_drift``: early output-logit drift rate (nats/step) = ``max |lse_mean(s) - lse_mean(s0)| / (s_e - s0)``
  over logged steps ``s0 <= s <= s_e`` of the same early window (``s0`` the first logged step, ``s_e``
  the last one in the window);
- ``grad_rms``: median over tensors of ``grad.rms``, median over the last quarter of the logged steps;
- ``sharpness_ratio``: max over logged steps of ``sharpness.preconditioned / sharpness.threshold``.

``predict_instability(runs, history)`` fits each signal against ``n_params`` at every LR on the small
sizes (``fit_scaling``, degree 1 in log-log, bootstrap intervals) and predicts, for a target size (by
default the largest size of the sweep, which is then held out and its observed values reported):

- ``<signal> at target``: the extrapolated signal with its interval, vs the observed value;
- ``size unstable`` (attn_logit, lse_drift): the ``n_params`` at which the trend crosses the instability
  level (the smallest signal among the small runs that diverged, unless ``levels`` gives one), vs
  whether the held-out size diverged at that LR;
- ``critical lr at target`` (attn_logit, lse_drift): the smallest LR whose extrapolated signal reaches
  the level (log-log interpolation between grid LRs; interval from the extrapolation interval's ends),
  vs the held-out size's observed critical-LR interval;
- ``size eps-dominated``: the ``n_params`` at which grad RMS falls to Adam's ``eps``;
- ``size at edge``: the ``n_params`` at which the sharpness ratio reaches 1.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from stabilitylab import metrics as M
from stabilitylab.analysis.lr_curves import critical_lr
from stabilitylab.analysis.scaling import fit_scaling
from stabilitylab.analysis.tables import check_history, check_runs, size_table

SIGNALS = ("attn_logit", "lse_drift", "grad_rms", "sharpness_ratio")
PRED_COLUMNS = ["prediction", "signal", "variant", "lr", "target_n_params", "predicted", "lo", "hi", "observed",
                "observed_lo", "observed_hi", "consistent"]


def run_signals(runs: pd.DataFrame, history: pd.DataFrame, early_frac: float = 0.25) -> pd.DataFrame:
    """One row per run: ``run_id`` and the signals ``attn_logit, lse_drift, grad_rms, sharpness_ratio``.

    Args:
        runs: runs table (``steps`` gives each run's planned length; default: the largest logged step).
        history: tidy history.
        early_frac: the early window is logged steps ``<= early_frac * steps``.
    """
    runs = check_runs(runs, "run_signals")
    history = check_history(history, "run_signals")
    if not 0 < early_frac <= 1:
        raise ValueError(f"run_signals(early_frac={early_frac!r}): must be in (0, 1]")
    total = runs.set_index("run_id")["steps"] if "steps" in runs.columns else None
    default_total = float(history["step"].max()) if len(history) else 0.0
    out = pd.DataFrame({"run_id": runs["run_id"].to_numpy()})
    for c in SIGNALS:
        out[c] = np.nan
    out = out.set_index("run_id")
    by_run = dict(tuple(history.groupby("run_id", sort=False)))
    for rid in out.index:
        h = by_run.get(rid)
        if h is None:
            continue
        end = early_frac * (float(total[rid]) if total is not None else default_total)
        early = h[h["step"] <= end]
        a = early.loc[early["metric"] == M.ATTN_MAX_LOGIT, "value"]
        out.loc[rid, "attn_logit"] = a.max() if len(a) else np.nan
        lse = early[early["metric"] == M.LOGITS_LSE_MEAN].groupby("step")["value"].mean().sort_index()
        if len(lse) >= 2:
            out.loc[rid, "lse_drift"] = (lse - lse.iloc[0]).abs().max() / (lse.index[-1] - lse.index[0])
        g = h[h["metric"] == M.GRAD_RMS].groupby("step")["value"].median().sort_index()
        if len(g):
            out.loc[rid, "grad_rms"] = g.iloc[-max(1, len(g) // 4):].median()
        sh = h[h["metric"].isin([M.SHARPNESS_PRECONDITIONED, M.SHARPNESS_THRESHOLD])]
        if len(sh):
            w = sh.pivot_table(index="step", columns="metric", values="value", aggfunc="max")
            if {M.SHARPNESS_PRECONDITIONED, M.SHARPNESS_THRESHOLD} <= set(w.columns):
                out.loc[rid, "sharpness_ratio"] = (w[M.SHARPNESS_PRECONDITIONED] / w[M.SHARPNESS_THRESHOLD]).max()
    return out.reset_index()


def _crossing_lr(lrs: np.ndarray, vals: np.ndarray, level: float) -> float:
    """Smallest LR where vals reaches level, log-log interpolated; inf if never, lrs[0] if already."""
    ok = np.isfinite(vals) & (vals > 0)
    lrs, vals = lrs[ok], vals[ok]
    above = np.flatnonzero(vals >= level)
    if above.size == 0:
        return math.inf
    i = above[0]
    if i == 0:
        return float(lrs[0])
    x0, x1 = np.log10(lrs[i - 1]), np.log10(lrs[i])
    y0, y1 = np.log10(vals[i - 1]), np.log10(vals[i])
    return float(10 ** (x0 + (np.log10(level) - y0) * (x1 - x0) / (y1 - y0)))


def _row(prediction, signal, variant, lr, target, pred, lo, hi, obs=np.nan, obs_lo=np.nan, obs_hi=np.nan,
         consistent=None) -> dict:
    return dict(zip(PRED_COLUMNS, (prediction, signal, variant, lr, target, pred, lo, hi, obs, obs_lo, obs_hi,
                                   consistent)))


def predict_instability(runs: pd.DataFrame, history: pd.DataFrame, holdout: str | None = "largest",
                        target_n_params: float | None = None, signals: tuple[str, ...] = SIGNALS,
                        levels: dict[str, float] | None = None, eps: float = 1e-8, degree: int = 1,
                        early_frac: float = 0.25, n_boot: int = 2000, level: float = 0.95,
                        seed: int = 0) -> pd.DataFrame:
    """Predictions with intervals for a larger size, checked against a held-out size when there is one.

    Args:
        runs, history: the sweep's tables (``n_params``, ``variant``, ``lr``, ``diverged`` per run).
        holdout: ``"largest"`` holds out the largest size and predicts it; None predicts
            ``target_n_params`` from every size.
        target_n_params: size to predict when ``holdout`` is None.
        signals: which of ``SIGNALS`` to use (missing ones are skipped).
        levels: instability level per signal (default: the smallest value among diverged small runs).
        eps: Adam epsilon for the eps-dominance prediction.
        degree, n_boot, level, seed: ``fit_scaling`` settings.
        early_frac: early window of ``run_signals``.

    Returns:
        tidy predictions, columns ``PRED_COLUMNS`` (``consistent``: observed inside the interval, the
        divergence outcome matching the prediction, or the intervals overlapping; None without a held-out).
    """
    runs = check_runs(runs, "predict_instability")
    unknown = set(signals) - set(SIGNALS)
    if unknown:
        raise ValueError(f"predict_instability(signals=...): unknown {sorted(unknown)}; choose from {SIGNALS}")
    if holdout not in ("largest", None):
        raise ValueError(f"predict_instability(holdout={holdout!r}): use 'largest' or None")
    sizes = size_table(runs)
    if holdout == "largest":
        if len(sizes) < 3:
            raise ValueError(f"predict_instability: {len(sizes)} sizes; holding out the largest needs >= 3 "
                             "(2 to fit a trend, 1 to check it); or pass holdout=None, target_n_params=N")
        held = sizes.iloc[-1]["size"]
        target = float(sizes.iloc[-1]["n_params"])
    else:
        if target_n_params is None or not target_n_params > 0:
            raise ValueError(f"predict_instability(target_n_params={target_n_params!r}): give the size (in "
                             "parameters) to predict when holdout=None")
        held, target = None, float(target_n_params)
    sig = run_signals(runs, history, early_frac).merge(
        runs[["run_id", "size", "n_params", "variant", "lr", "diverged"]], on="run_id")
    levels = dict(levels or {})
    rows = []
    for variant, v in sig.groupby("variant", sort=True):
        train = v[v["size"] != held]
        test = v[v["size"] == held]
        for name in signals:
            if v[name].notna().sum() == 0:
                continue
            crit = name in ("attn_logit", "lse_drift")
            lvl = levels.get(name)
            if lvl is None and crit:
                d = train.loc[train["diverged"], name].dropna()
                lvl = float(d.min()) if len(d) else None
            ext = []
            for lr, g in train.groupby("lr", sort=True):
                if not crit:  # late-training signals of diverged runs say nothing about the trend
                    g = g[~g["diverged"]]
                pts = g[["n_params", name]].groupby("n_params", as_index=False).median()
                try:
                    fit = fit_scaling(pts, "n_params", name, degree, n_boot=n_boot, level=level, seed=seed)
                except ValueError:
                    continue
                e = fit.extrapolate(target).iloc[0]
                t = test[test["lr"] == lr]
                obs = float(t[name].median()) if len(t) else np.nan
                ok = bool(e["lo"] <= obs <= e["hi"]) if held is not None and np.isfinite(obs) else None
                rows.append(_row(f"{name} at target", name, variant, lr, target, e["value"], e["lo"], e["hi"],
                                 obs, consistent=ok))
                ext.append((lr, e["value"], e["lo"], e["hi"]))
                goal = {"grad_rms": eps, "sharpness_ratio": 1.0}.get(name, lvl)
                if goal is None:
                    continue
                s = fit.solve(goal)
                label = {"grad_rms": "size eps-dominated", "sharpness_ratio": "size at edge"}.get(name,
                                                                                                  "size unstable")
                ok = None
                obs = np.nan
                if crit and len(t):
                    obs = float(t["diverged"].any())
                    ok = bool((s["x"] <= target) == bool(obs))
                rows.append(_row(label, name, variant, lr, target, s["x"], s["lo"], s["hi"], obs, consistent=ok))
            if crit and lvl is not None and ext:
                lrs, val, lo, hi = (np.asarray(c, dtype=float) for c in zip(*ext))
                pred = _crossing_lr(lrs, val, lvl)
                p_lo, p_hi = _crossing_lr(lrs, hi, lvl), _crossing_lr(lrs, lo, lvl)
                o_lo = o_hi = np.nan
                ok = None
                if len(test):
                    o_lo, o_hi = critical_lr(test["lr"], test["diverged"])
                    o_hi_eff = o_hi if np.isfinite(o_hi) else math.inf
                    o_lo_eff = o_lo if np.isfinite(o_lo) else 0.0
                    ok = bool(p_lo <= o_hi_eff and o_lo_eff <= p_hi)
                rows.append(_row("critical lr at target", name, variant, np.nan, target, pred, p_lo, p_hi,
                                 np.nan, o_lo, o_hi, ok))
    return pd.DataFrame(rows, columns=PRED_COLUMNS)
