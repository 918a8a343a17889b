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
