"""The standard figures. All matplotlib (Agg-safe), all returning a Figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from stabilitylab import metrics as M  # noqa: E402


def _size_order(runs: pd.DataFrame) -> list:
    if "n_params" in runs.columns and "size" in runs.columns:
        return list(runs.groupby("size")["n_params"].first().sort_values().index)
    return sorted(runs["size"].unique()) if "size" in runs.columns else [None]


def lr_vs_loss(runs: pd.DataFrame, size_col: str = "size", variant_col: str = "variant") -> Figure:
    """Final loss vs peak LR (log x), one line per size, one panel per variant (paper Fig. 1 style).

    Diverged / non-finite runs are drawn at their init loss with an x marker.
    """
    variants = sorted(runs[variant_col].unique()) if variant_col in runs.columns else [None]
    sizes = _size_order(runs)
    fig, axes = plt.subplots(1, len(variants), figsize=(4.2 * len(variants), 3.6), sharey=True, squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, v in zip(axes[0], variants):
        sub = runs if v is None else runs[runs[variant_col] == v]
        for i, s in enumerate(sizes):
            g = sub if s is None else sub[sub[size_col] == s]
            if g.empty:
                continue
            g = g.groupby("lr").agg(final_loss=("final_loss", "mean"), init_loss=("init_loss", "mean"),
                                    diverged=("diverged", "max")).reset_index()
            ok = np.isfinite(g["final_loss"]) & ~g["diverged"].astype(bool)
            y = np.where(ok, np.minimum(g["final_loss"], g["init_loss"]), g["init_loss"])
            color = cmap(i / max(1, len(sizes) - 1))
            label = str(s)
            if s is not None and "n_params" in runs.columns:
                label = f"{s} ({runs.loc[runs[size_col] == s, 'n_params'].iloc[0] / 1e6:.2f}M)"
            ax.plot(g["lr"], y, "-o", color=color, label=label, ms=4)
            ax.plot(g["lr"][~ok], y[~ok], "x", color="red", ms=8, mew=2)
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_title(str(v) if v is not None else "")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final held-out loss (diverged = init loss, x)")
    axes[0][-1].legend(fontsize=8, title="size")
    fig.tight_layout()
    return fig


def max_attention_logit(history: pd.DataFrame, runs: pd.DataFrame | None = None, by: str = "lr",
                        variant_col: str = "variant", size: str | None = None) -> Figure:
    """Max attention logit (max over layers) vs step, one line per LR, one panel per variant.

    Args:
        history: tidy records (run_id, step, metric, module, value).
        runs: the runs table to join config columns (lr, size, variant) by run_id.
        size: restrict to this size (default: the largest in ``runs``).
    """
    h = history[history["metric"] == M.ATTN_MAX_LOGIT]
    h = h.groupby(["run_id", "step"], as_index=False)["value"].max()
    if runs is not None:
        cols = [c for c in ("run_id", by, variant_col, "size", "n_params") if c in runs.columns]
        h = h.merge(runs[cols], on="run_id")
        if "size" in h.columns:
            if size is None and "n_params" in h.columns:
                size = h.sort_values("n_params")["size"].iloc[-1] if not h.empty else None
            if size is not None:
                h = h[h["size"] == size]
    variants = sorted(h[variant_col].unique()) if variant_col in h.columns else [None]
    fig, axes = plt.subplots(1, max(1, len(variants)), figsize=(4.2 * max(1, len(variants)), 3.6),
                             sharey=True, squeeze=False)
    cmap = plt.get_cmap("plasma")
    for ax, v in zip(axes[0], variants):
        sub = h if v is None else h[h[variant_col] == v]
        keys = sorted(sub[by].unique()) if by in sub.columns else sorted(sub["run_id"].unique())
        for i, key in enumerate(keys):
            g = sub[sub[by] == key] if by in sub.columns else sub[sub["run_id"] == key]
            g = g.groupby("step")["value"].max()
            ax.plot(g.index, g.to_numpy(), color=cmap(i / max(1, len(keys) - 1)),
                    label=f"{by}={key:.3g}" if isinstance(key, float) else str(key))
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"{v}" + (f" (size {size})" if size is not None else "") if v is not None else "")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("max attention logit (max over layers)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def save(fig: Figure, path, dpi: int = 110) -> str:
    """Save a figure as PNG and close it; returns the path."""
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return str(path)


def lr_sensitivity_vs_size(runs: pd.DataFrame, lr_range: tuple[float, float] | None = None) -> Figure:
    """LR sensitivity (``analysis.lr_sensitivity``) vs parameters (log x), one line per variant."""
    from stabilitylab.analysis import lr_sensitivity

    sens = lr_sensitivity(runs, by=["size", "n_params", "variant"], lr_range=lr_range)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for v, g in sens.groupby("variant", sort=True):
        g = g.sort_values("n_params")
        ax.plot(g["n_params"], g["lr_sensitivity"], "-o", label=str(v))
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("LR sensitivity (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def attention_logit_heatmap(history: pd.DataFrame, run_id: str, label: str | None = None) -> Figure:
    """Per-layer max attention logit over steps of one run: heatmap (layers x steps), log10 colour.

    Args:
        history: tidy history.
        run_id: the run.
        label: how the title names the run (default: its run_id), e.g. ``diagnosis.run_label(row)``.
    """
    h = history[(history["run_id"] == run_id) & (history["metric"] == M.ATTN_MAX_LOGIT)]
    if h.empty:
        raise ValueError(f"attention_logit_heatmap(run_id={run_id!r}): no {M.ATTN_MAX_LOGIT} records for it")
    w = h.pivot_table(index="module", columns="step", values="value", aggfunc="max")
    w = w.loc[sorted(w.index, key=lambda m: [int(t) if t.isdigit() else t for t in m.split(".")])]
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(w) + 1.6))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.log10(np.abs(w.to_numpy(dtype=float)))
    steps = w.columns.to_numpy(dtype=float)
    im = ax.imshow(z, aspect="auto", interpolation="nearest", cmap="magma",
                   extent=(steps.min(), steps.max(), len(w) - 0.5, -0.5))
    ax.set_yticks(range(len(w)), list(w.index), fontsize=7)
    ax.set_xlabel("step")
    ax.set_title(f"max attention logit per layer ({label or 'run ' + run_id})")
    fig.colorbar(im, ax=ax, label="log10 |max logit|")
    fig.tight_layout()
    return fig


def lse_drift(history: pd.DataFrame, runs: pd.DataFrame | None = None, by: str = "lr",
              variant_col: str = "variant") -> Figure:
    """Output-logit drift ``lse_mean(step) - lse_mean(first step)`` vs step, one line per run (colour by LR)."""
    h = history[history["metric"] == M.LOGITS_LSE_MEAN].groupby(["run_id", "step"], as_index=False)["value"].mean()
    if runs is not None:
        h = h.merge(runs[[c for c in ("run_id", by, variant_col) if c in runs.columns]], on="run_id")
    variants = sorted(h[variant_col].unique()) if variant_col in h.columns else [None]
    fig, axes = plt.subplots(1, max(1, len(variants)), figsize=(4.2 * max(1, len(variants)), 3.6),
                             sharey=True, squeeze=False)
    keys = sorted(h[by].unique()) if by in h.columns else []
    cmap = plt.get_cmap("plasma")
    for ax, v in zip(axes[0], variants):
        sub = h if v is None else h[h[variant_col] == v]
        for rid, g in sub.groupby("run_id", sort=True):
            g = g.sort_values("step")
            c = cmap(keys.index(g[by].iloc[0]) / max(1, len(keys) - 1)) if keys else None
            ax.plot(g["step"], g["value"] - g["value"].iloc[0], color=c, lw=1,
                    label=f"{by}={g[by].iloc[0]:.3g}" if keys else str(rid))
        ax.set_xlabel("step")
        ax.set_title(str(v) if v is not None else "")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("lse_mean - lse_mean(first step)  (nats)")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    axes[0][-1].legend(uniq.values(), uniq.keys(), fontsize=7)
    fig.tight_layout()
    return fig


def scaling_fit(fit, holdout: tuple[float, float] | None = None, x_max: float | None = None,
                title: str = "") -> Figure:
    """A ``ScalingFit``: data, fitted trend, bootstrap band out to ``x_max`` and the held-out point.

    Args:
        fit: ``analysis.ScalingFit``.
        holdout: ``(x, y)`` of an observation not used in the fit (drawn as a red star).
        x_max: extrapolate the band to here (default: the held-out x, else 10x the largest fitted x).
    """
    xs = fit.x
    hi_x = x_max or (holdout[0] if holdout is not None else xs.max() * 10)
    grid = np.logspace(np.log10(xs.min()), np.log10(max(hi_x, xs.max())), 100)
    e = fit.extrapolate(grid)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.fill_between(grid, e["lo"], e["hi"], alpha=0.25, label=f"{int(fit.level * 100)}% bootstrap band")
    ax.plot(grid, e["value"], "-", label=f"fit (degree {fit.degree}, R²={fit.r2:.3f})")
    ax.plot(xs, fit.y, "o", color="k", ms=4, label="fitted points")
    if holdout is not None:
        ax.plot([holdout[0]], [holdout[1]], "*", color="red", ms=12, label="held out")
    ax.set_xscale("log")
    if fit.log_y:
        ax.set_yscale("log")
    ax.set_xlabel(fit.x_name)
    ax.set_ylabel(fit.y_name)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def warning_timeline(history: pd.DataFrame, run_id: str, events=None, factor: float = 10.0,
                     label: str | None = None) -> Figure:
    """One run: loss (top) and the watched signals' max over modules, normalised to their first value
    (bottom, log y), with early-warning events (orange) and the divergence step (red).

    Args:
        history: tidy history.
        run_id: the run.
        events: its warning events (default: replay ``analysis.EarlyWarning()`` over the history).
        factor: blow-up factor of the divergence step.
        label: how the title names the run (default: its run_id).
    """
    from stabilitylab.analysis.early_warning import DEFAULT_WATCH, EarlyWarning, divergence_step

    h = history[history["run_id"] == run_id]
    if h.empty:
        raise ValueError(f"warning_timeline(run_id={run_id!r}): no records for this run")
    loss = h[h["metric"] == M.LOSS].set_index("step")["value"].sort_index()
    dstep = divergence_step(loss, factor) if len(loss) else float("nan")
    if events is None:
        events = EarlyWarning().replay(h[h["step"] < dstep] if np.isfinite(dstep) else h, run_id)
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(6.5, 5), sharex=True)
    a1.plot(loss.index, loss.to_numpy(), "k-", lw=1)
    a1.set_ylabel("loss")
    for metric in DEFAULT_WATCH:
        if metric == M.LOSS:
            continue
        s = h[h["metric"] == metric].groupby("step")["value"].max().sort_index()
        if metric == M.LOGITS_LSE_MEAN:
            s = (s - s.iloc[0]).abs() + 1 if len(s) else s
        if len(s) and s.iloc[0] != 0:
            a2.plot(s.index, np.abs(s / s.iloc[0]), lw=1, label=metric)
    a2.set_yscale("log")
    a2.set_ylabel("signal / first value")
    a2.set_xlabel("step")
    for ax in (a1, a2):
        for e in events:
            ax.axvline(e.step, color="orange", lw=1, alpha=0.8)
        if np.isfinite(dstep):
            ax.axvline(dstep, color="red", lw=1.5)
        ax.grid(alpha=0.3)
    a2.legend(fontsize=7)
    a1.set_title(f"{label or 'run ' + run_id}: warnings (orange), divergence (red)")
    fig.tight_layout()
    return fig


def heldout_prediction(prediction, keys: list | None = None) -> Figure:
    """Fits of ``analysis.predict`` across sizes: the fitted runs, the trend, its band and the held-out runs.

    One log-log panel per key of ``prediction.fits`` (default: each variant's critical LR, then each
    variant's peak attention logit at the grid LR nearest its predicted critical LR). The band is the interval
    for one run (``kind="run"``) from the smallest fitted size to 1.5x the target; the held-out runs are
    red, the predicted interval at the target a black bar.

    Args:
        prediction: a ``stabilitylab.analysis.Prediction``.
        keys: keys of ``prediction.fits`` to draw, e.g. ``[("baseline", "critical_lr"), ("baseline", 0.1)]``.
    """
    fits = prediction.fits
    if keys is None:
        keys = [k for k in fits if k[1] == "critical_lr"]
        crit = prediction.critical_lr.set_index("variant")["predicted"]
        for v in sorted({k[0] for k in fits}):
            lrs = [k for k in fits if k[0] == v and k[1] != "critical_lr"]
            c = float(crit.get(v, np.nan))
            if lrs:
                keys.append(min(lrs, key=lambda k: abs(np.log(k[1] / c)) if np.isfinite(c) else -k[1]))
    missing = [k for k in keys if k not in fits]
    if missing or not keys:
        raise ValueError(f"heldout_prediction(keys={keys!r}): no fit for {missing}; available: {list(fits)}")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    target = prediction.target_n_params
    for ax, key in zip(axes[0], keys):
        fit, pts = fits[key]
        xs = np.geomspace(pts.loc[pts["fitted"], "n_params"].min(), 1.5 * target, 60)
        band = fit.extrapolate(xs, kind="run")
        ax.fill_between(xs, band["lo"], band["hi"], color="C0", alpha=0.2,
                        label=f"{prediction.level:.0%} interval (one run)")
        ax.plot(xs, band["value"], color="C0", label="fit")
        f, h = pts[pts["fitted"]], pts[~pts["fitted"]]
        ax.plot(f["n_params"], f["value"], "o", color="C0", ms=4, alpha=0.7, label="fitted runs")
        p = fit.extrapolate(target, kind="run").iloc[0]
        ax.errorbar([target], [p["value"]], yerr=[[max(0.0, p["value"] - p["lo"])], [max(0.0, p["hi"] - p["value"])]], fmt="s",
                    color="black", capsize=4, label="predicted")
        if len(h):
            ax.plot(h["n_params"], h["value"], "o", color="red", ms=6, label="held-out runs")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        variant, what = key
        ax.set_ylabel("critical LR (leaves the basin)" if what == "critical_lr" else "peak max attention logit")
        ax.set_title(f"{variant}" + ("" if what == "critical_lr" else f", lr={what:.3g}"))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def sweep_figures(runs: pd.DataFrame, history: pd.DataFrame) -> dict[str, Figure]:
    """A sweep's summary figures (for ``studies.sweep_summary.log_sweep_summary``): the per-layer max attention logit
    heatmap of the worst run (highest max attention logit) and final loss vs LR, one line per size.

    Args:
        runs: the sweep's runs table.
        history: its tidy history.

    Returns:
        name -> Figure: ``attn_logit_per_layer`` (only when attention logits were recorded), ``lr_vs_loss``.
    """
    from stabilitylab.diagnosis import run_label

    figs = {}
    attn = history[history["metric"] == M.ATTN_MAX_LOGIT]
    if len(attn):
        worst = attn.groupby("run_id")["value"].max().idxmax()
        label = run_label(runs.set_index("run_id").loc[worst].to_dict()) if worst in set(runs["run_id"]) else None
        figs["attn_logit_per_layer"] = attention_logit_heatmap(history, worst, label=label)
    figs["lr_vs_loss"] = lr_vs_loss(runs)
    return figs


def warning_tradeoff(curve: pd.DataFrame) -> Figure:
    """Early-warning lead time versus false alarms as the threshold margin varies (one point per margin, one
    line per logging interval when ``curve`` has an ``every`` column).

    Args:
        curve: one row per margin (and ``every``) with ``margin``, ``fa_steps_stable`` (false-alarm step rate
            on stable runs), ``stable_warned_share``, ``warned_50_share`` and ``median_lead`` (steps).
    """
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    groups = list(curve.groupby("every")) if "every" in curve else [(None, curve)]
    for (every, c), color in zip(groups, ("tab:blue", "tab:orange", "tab:green", "tab:purple")):
        x = 100 * c["fa_steps_stable"].to_numpy(dtype=float)
        for ax, y in ((a1, c["median_lead"]), (a2, 100 * c["warned_50_share"])):
            ax.plot(x, y.to_numpy(dtype=float), "o-", color=color, label=None if every is None else f"every={every}")
            for xi, yi, m in zip(x, y, c["margin"]):
                ax.annotate(f"{m:g}", (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=7)
    for ax, label in ((a1, "median lead (steps)"), (a2, "divergences warned >= 50 steps ahead (%)")):
        ax.axvline(0.05, color="red", lw=1, ls="--")
        ax.set_xscale("symlog", linthresh=0.01)  # the goal (0.05%) and 0 stay apart from the 10% points
        ax.set_xlim(left=-0.002)
        ax.set_xlabel("false-alarm steps on stable runs (%, symlog)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if groups[0][0] is not None:
        a2.legend(fontsize=8)
    a1.set_title("lead time vs false alarms (labels: threshold margin)", fontsize=9)
    fig.tight_layout()
    return fig


def warning_timelines(history: pd.DataFrame, per_run: pd.DataFrame, watch: dict[str, str] | None = None,
                      ncols: int = 5) -> Figure:
    """One panel per diverged run: its leading signal (transformed as the detector sees it, max over
    modules), the first warning (orange), the forecast interval (orange band) and the divergence (red).

    Args:
        history: tidy history.
        per_run: rows with ``run_id``, ``diverge_step``, ``first_warning``, ``metric``, ``steps_left_lo``,
            ``steps_left_hi`` (and optionally ``mechanism``, ``lr``), one per diverged run.
        watch: metric -> transform (default ``detectors.DEFAULT_WATCH``); the signal of a missed run is
            its loss.
        ncols: panels per row.
    """
    from stabilitylab.detectors import DEFAULT_WATCH, transform

    watch = dict(DEFAULT_WATCH if watch is None else watch)
    n = max(1, len(per_run))
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.0 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, r in zip(axes.flat, per_run.itertuples(index=False)):
        metric = r.metric if isinstance(r.metric, str) and r.metric else M.LOSS
        h = history[(history["run_id"] == r.run_id) & (history["metric"] == metric)]
        s = h.groupby("step")["value"].apply(lambda v, m=metric: max(transform(float(x), watch.get(m, "log"))
                                                                    for x in v)).sort_index()
        ax.plot(s.index, s.to_numpy(), "k-", lw=0.8)
        if np.isfinite(r.first_warning):
            ax.axvline(r.first_warning, color="orange", lw=1.2)
            if np.isfinite(r.steps_left_lo) and np.isfinite(r.steps_left_hi):
                ax.axvspan(r.first_warning + r.steps_left_lo, r.first_warning + r.steps_left_hi, color="orange",
                           alpha=0.2)
        ax.axvline(r.diverge_step, color="red", lw=1.2)
        title = f"{getattr(r, 'mechanism', '')} lr={getattr(r, 'lr', float('nan')):.2g}\n{metric}"
        ax.set_title(title, fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle("diverged runs: leading signal, warning (orange), forecast band, divergence (red)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # keep the suptitle clear of the top row
    return fig
