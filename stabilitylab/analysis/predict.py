"""Predicting instabilities from small models: per-run signals, trend fits across sizes, held-out checks.

``predict(runs, history, holdout="largest")`` is the main entry point: from a sweep over smaller sizes it
predicts, for a held-out (or any) larger size, the critical LR at which its LR-vs-loss curve leaves the
basin, the largest stable grid LR below it, and the peak max attention logit at each LR, each with a
bootstrap interval over seeds and lack of fit (``analysis.ladder.fit_ladder``). "Stable" is defined in
``basin_edges``: not diverged (non-finite, or final loss above the init loss) and final loss within
``tol * (L0 - L*)`` of the curve's best loss ``L*``.

The older ``predict_instability`` extrapolates early-training signals per LR and the size at which they
cross an instability level:

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
from dataclasses import dataclass

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


# ---------------------------------------------------------------------------------------------- predict()
#: Default basin tolerance: a run is stable while its loss has climbed back less than this share of the
#: way from the curve's best loss to the init loss.
BASIN_TOL = 0.1


def curve_loss(runs: pd.DataFrame) -> np.ndarray:
    """Final loss as the LR curves use it: ``min(L, L0)``, with diverged or non-finite runs at ``L0``."""
    fl = runs["final_loss"].to_numpy(dtype=float)
    l0 = runs["init_loss"].to_numpy(dtype=float)
    bad = ~np.isfinite(fl) | runs["diverged"].to_numpy(dtype=bool)
    return np.where(bad, l0, np.minimum(fl, l0))


def basin_edges(runs: pd.DataFrame, tol: float = BASIN_TOL,
                by: tuple[str, ...] = ("variant", "size", "n_params", "seed")) -> pd.DataFrame:
    """Where each LR-vs-loss curve leaves its basin: the largest stable LR and the critical LR.

    Per curve (one group of ``by``; its runs are its LR grid): ``L(eta)`` = ``curve_loss``, ``L*`` =
    min over the grid, ``L0`` = mean init loss, threshold ``L* + tol * (L0 - L*)``. A run is **stable**
    when it did not diverge (the project's definition: non-finite loss, or final held-out loss above the
    init loss) and ``L(eta) <= threshold``. Walking up the grid from the loss-optimal LR:

    - ``largest_stable_lr``: the last grid LR of the unbroken run of stable LRs;
    - ``first_unstable_lr``: the grid LR after it (NaN if every LR above the optimum is stable);
    - ``critical_lr``: the LR where the curve crosses the threshold, linear in ``log10 eta`` between
      those two grid LRs (the LR at which the curve leaves the basin); NaN when censored (no crossing on
      the grid; ``censored`` is True).

    Args:
        runs: runs table (``lr, final_loss, init_loss, diverged`` and the ``by`` columns present).
        tol: basin tolerance as a share of ``L0 - L*`` (> 0).
        by: columns that identify one curve (missing ones are skipped).

    Returns:
        one row per curve: the ``by`` columns, ``opt_lr, best_loss, init_loss, threshold,
        largest_stable_lr, first_unstable_lr, critical_lr, censored, n_lrs``.
    """
    runs = check_runs(runs, "basin_edges")
    if not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"basin_edges(tol={tol!r}): a share of (init loss - best loss) in (0, 1), e.g. 0.1")
    by = [c for c in by if c in runs.columns]
    runs = runs.assign(_L=curve_loss(runs))
    # one (curve, lr) aggregation for all curves, then plain arrays per curve
    cells = runs.groupby([*by, "lr"], sort=True).agg({"_L": "mean", "init_loss": "mean", "diverged": "max"})
    rows = []
    for key, c in (cells.groupby(level=list(range(len(by))), sort=True) if by else [((), cells)]):
        key = key if isinstance(key, tuple) else (key,)
        lrs = c.index.get_level_values("lr").to_numpy(dtype=float)
        L = c["_L"].to_numpy()
        best = int(np.argmin(L))
        l0 = float(c["init_loss"].mean())
        thr = L[best] + tol * (l0 - L[best])
        stable = (L <= thr) & ~c["diverged"].to_numpy(dtype=bool)
        j = best
        while j + 1 < lrs.size and stable[j + 1]:
            j += 1
        row = {**dict(zip(by, key)), "opt_lr": lrs[best], "best_loss": float(L[best]), "init_loss": l0,
               "threshold": float(thr), "largest_stable_lr": lrs[j], "first_unstable_lr": np.nan,
               "critical_lr": np.nan, "censored": True, "n_lrs": int(lrs.size)}
        if j + 1 < lrs.size:
            x0, x1 = np.log10(lrs[j]), np.log10(lrs[j + 1])
            frac = (thr - L[j]) / (L[j + 1] - L[j])
            row.update(first_unstable_lr=lrs[j + 1], critical_lr=float(10 ** (x0 + frac * (x1 - x0))),
                       censored=False)
        rows.append(row)
    return pd.DataFrame(rows)


def peak_attention_logit(history: pd.DataFrame) -> pd.Series:
    """Max attention logit a run reached: max over attention modules and logged steps (finite values), by run_id."""
    history = check_history(history, "peak_attention_logit")
    a = history[(history["metric"] == M.ATTN_MAX_LOGIT) & np.isfinite(history["value"].astype(float))]
    return a.groupby("run_id")["value"].max().rename("peak_attn_logit")


@dataclass
class Prediction:
    """What ``predict`` returns: the held-out size's predicted vs observed numbers and the fits behind them.

    Attributes:
        critical_lr: one row per variant: the critical LR (where the curve leaves the basin) predicted with
            its interval vs observed, and the largest stable grid LR it implies vs observed.
        attn_logit: one row per (variant, LR): the peak max attention logit predicted with its interval
            vs observed.
        edges: ``basin_edges`` of every curve (fitted and held-out sizes).
        fits: ``{(variant, "critical_lr") or (variant, lr): (LadderFit, points)}``; ``points`` has
            ``n_params, value, fitted`` (True for sizes the fit used).
        target_n_params: the predicted size.
        fit_sizes: sizes the fits used.
        heldout: the held-out size label (None without one).
        level: two-sided coverage of the intervals.
        tol: basin tolerance.
    """

    critical_lr: pd.DataFrame
    attn_logit: pd.DataFrame
    edges: pd.DataFrame
    fits: dict
    target_n_params: float
    fit_sizes: list
    heldout: str | None
    level: float
    tol: float

    def summary(self) -> dict:
        """JSON-ready summary: settings, the critical-LR rows and the attention-logit rows."""
        def rows(df: pd.DataFrame) -> list[dict]:
            return [{k: (None if isinstance(v, float) and not np.isfinite(v) else
                         v.item() if isinstance(v, np.generic) else v) for k, v in r.items()}
                    for r in df.to_dict("records")]
        return {"target_n_params": self.target_n_params, "fit_sizes": list(self.fit_sizes),
                "heldout": self.heldout, "level": self.level, "basin_tol": self.tol,
                "critical_lr": rows(self.critical_lr), "attn_logit": rows(self.attn_logit)}


def _grid_floor(grid: np.ndarray, x: float) -> float:
    """Largest grid value <= x; the lowest grid LR below the grid (a curve's best LR is always stable)."""
    if not x > 0:
        return float("nan")
    below = grid[grid <= x * (1 + 1e-9)]
    return float(below.max()) if below.size else float(grid[0])


def predict(runs: pd.DataFrame, history: pd.DataFrame, holdout: str | None = "largest",
            target_n_params: float | None = None, tol: float = BASIN_TOL, level: float = 0.9,
            n_boot: int = 2000, degree: int = 1, seed: int = 0) -> Prediction:
    """Predict a larger size's largest stable LR, critical LR and peak attention logits from smaller sizes.

    Two fits over the size ladder (``fit_ladder``: power law in size, two-level bootstrap over seeds and
    lack of fit), per variant:

    - the critical LR of each (size, seed) curve (``basin_edges``: where the LR-vs-loss curve leaves its
      basin) against ``n_params``; its interval at the target is a prediction interval for one run. The
      **largest stable LR** it implies is the largest grid LR below the critical LR: its predicted
      interval is ``[grid floor of lo, grid floor of hi]`` on the held-out size's own LR grid;
    - the peak max attention logit of each run (``peak_attention_logit``) against ``n_params`` at each LR.

    Args:
        runs, history: a sweep's tables (``n_params``, ``variant``, ``lr``, ``seed``, ``diverged`` per run).
        holdout: ``"largest"`` fits every size but the largest and checks the largest; None fits every
            size and predicts ``target_n_params``.
        target_n_params: the size to predict when ``holdout`` is None.
        tol: basin tolerance of ``basin_edges``.
        level: two-sided coverage of the intervals (default 0.9).
        n_boot, degree, seed: ``fit_ladder`` settings.

    Returns:
        a ``Prediction``. In ``critical_lr``: ``predicted, lo, hi`` (critical LR), ``width_steps``
        (``log(hi / lo)`` in grid steps), ``stable_lo, stable_hi`` (largest stable grid LR) and
        ``stable_width_steps`` (its width in grid steps),
        ``observed_critical_lr``, ``observed_largest_stable_lr``, ``critical_inside``, ``stable_inside``,
        ``note``. In ``attn_logit``: ``lr, predicted, lo, hi, observed, inside``.
    """
    from stabilitylab.analysis.ladder import fit_ladder

    runs = check_runs(runs, "predict")
    history = check_history(history, "predict")
    if holdout not in ("largest", None):
        raise ValueError(f"predict(holdout={holdout!r}): use 'largest' or None")
    if "seed" not in runs.columns:
        runs = runs.assign(seed=0)
    sizes = size_table(runs)
    if holdout == "largest":
        if len(sizes) < 3:
            raise ValueError(f"predict: {len(sizes)} sizes; holding out the largest needs >= 3 (2 to fit a "
                             "trend, 1 to check it); or pass holdout=None, target_n_params=N")
        held, target = str(sizes.iloc[-1]["size"]), float(sizes.iloc[-1]["n_params"])
    else:
        if target_n_params is None or not target_n_params > 0:
            raise ValueError(f"predict(target_n_params={target_n_params!r}): give the size (in parameters) to "
                             "predict when holdout=None")
        held, target = None, float(target_n_params)
    fit_sizes = [s for s in sizes["size"] if s != held]
    edges = basin_edges(runs, tol)
    peak = peak_attention_logit(history)
    runs = runs.assign(peak_attn_logit=runs["run_id"].map(peak))
    crit_rows, attn_rows, fits = [], [], {}
    for variant, v in runs.groupby("variant", sort=True):
        train, test = v[v["size"] != held], v[v["size"] == held]
        grid = np.sort(test["lr"].unique() if len(test) else v["lr"].unique()).astype(float)
        step = float(np.median(np.diff(np.log10(grid)))) if grid.size > 1 else float("nan")
        e = edges[edges["variant"] == variant]
        e_fit, e_test = e[e["size"] != held], e[e["size"] == held]
        row = {"variant": variant, "target_n_params": target, "predicted": np.nan, "lo": np.nan, "hi": np.nan,
               "width_steps": np.nan, "stable_lo": np.nan, "stable_hi": np.nan, "stable_width_steps": np.nan,
               "observed_critical_lr": np.nan, "observed_largest_stable_lr": np.nan,
               "critical_inside": None, "stable_inside": None, "note": ""}
        if len(e_test):
            row["observed_largest_stable_lr"] = float(np.exp(np.log(e_test["largest_stable_lr"]).mean()))
            obs = e_test["critical_lr"]
            row["observed_critical_lr"] = float(np.exp(np.log(obs).mean())) if obs.notna().all() else np.nan
        censored = sorted(e_fit.loc[e_fit["censored"], "size"].unique())
        if censored:
            row["note"] = (f"no fit: the curve of size(s) {', '.join(map(str, censored))} stays in the basin up to "
                           f"the top of the LR grid ({v['lr'].max():.3g}); extend the grid upward")
        else:
            try:
                fit = fit_ladder(e_fit, "n_params", "critical_lr", "seed", degree, n_boot, level, seed)
            except ValueError as err:
                row["note"] = f"no fit: {err}"
            else:
                x = fit.extrapolate(target, kind="run").iloc[0]
                lo, hi = float(x["lo"]), float(x["hi"])
                row.update(predicted=float(x["value"]), lo=lo, hi=hi, width_steps=np.log10(hi / lo) / step,
                           stable_lo=_grid_floor(grid, lo), stable_hi=_grid_floor(grid, hi))
                row["stable_width_steps"] = np.log10(row["stable_hi"] / row["stable_lo"]) / step
                pts = e[["n_params", "critical_lr"]].rename(columns={"critical_lr": "value"})
                fits[(variant, "critical_lr")] = (fit, pts.assign(fitted=e["size"] != held))
                if fit.dof == 0:
                    row["note"] = ("zero-width interval: one seed per size and no residual degrees of freedom; "
                                   "add seeds or sizes")
                if len(e_test):
                    if np.isfinite(row["observed_critical_lr"]):
                        row["critical_inside"] = bool(lo <= row["observed_critical_lr"] <= hi)
                    elif e_test["censored"].any():
                        row["critical_inside"] = bool(hi >= grid[-1])
                        row["note"] = "held-out curve stays in the basin up to the top of the grid"
                    ok = row["stable_lo"] * (1 - 1e-9) <= row["observed_largest_stable_lr"] \
                        <= row["stable_hi"] * (1 + 1e-9)
                    row["stable_inside"] = bool(ok)
        crit_rows.append(row)
        for lr, g in train.groupby("lr", sort=True):
            t = test[np.isclose(test["lr"], lr)]
            obs = float(np.exp(np.log(t["peak_attn_logit"]).mean())) if len(t) else np.nan
            r = {"variant": variant, "lr": float(lr), "target_n_params": target, "predicted": np.nan,
                 "lo": np.nan, "hi": np.nan, "observed": obs, "inside": None}
            try:
                fit = fit_ladder(g, "n_params", "peak_attn_logit", "seed", degree, n_boot, level, seed)
            except ValueError:
                attn_rows.append(r)
                continue
            x = fit.extrapolate(target, kind="run").iloc[0]
            r.update(predicted=float(x["value"]), lo=float(x["lo"]), hi=float(x["hi"]))
            if np.isfinite(obs):
                r["inside"] = bool(r["lo"] <= obs <= r["hi"])
            pts = pd.concat([g, t])[["n_params", "peak_attn_logit"]].rename(columns={"peak_attn_logit": "value"})
            fits[(variant, float(lr))] = (fit, pts.assign(fitted=pts.index.isin(g.index)))
            attn_rows.append(r)
    return Prediction(pd.DataFrame(crit_rows), pd.DataFrame(attn_rows), edges, fits, target, fit_sizes, held,
                      level, tol)
