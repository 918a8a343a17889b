"""Log a finished sweep to Weights & Biases: its runs table, LR-sensitivity table and standard figures.

A study-level helper (it combines analysis with the W&B sink's ``log_table`` / ``log_figures``), so the
sink itself never depends on analysis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from stabilitylab.analysis import lr_sensitivity
from stabilitylab.sinks.wandb import log_figures, log_table, require_wandb, target_run

__all__ = ["log_sweep_summary"]


def log_sweep_summary(runs: pd.DataFrame, figures: Mapping[str, Any] | None = None, run: Any = None, *,
                      by: Sequence[str] | None = None, project: str | None = None, group: str | None = None,
                      name: str | None = None) -> dict[str, Any]:
    """Log a finished sweep: the runs table, the LR-sensitivity table and the standard figures.

    Keys: ``sweep/runs`` (one row per run), ``sweep/lr_sensitivity`` (``analysis.lr_sensitivity(runs,
    by=by)``: mean over the LR grid of ``min(L(lr), L0) - L*``, in nats) and
    ``sweep/figures/<name>`` (images).

    Args:
        runs: the sweep's runs table (``lr``, ``final_loss``, ``init_loss`` and grouping columns).
        figures: name -> matplotlib ``Figure`` or image path (e.g. from ``stabilitylab.plots``).
        run: the W&B run to log into (default: the active ``wandb.run``, else a new run of job type
            ``sweep-summary`` in ``project`` / ``group``, finished before returning).
        by: grouping columns of the LR sensitivity (default: ``size``, ``n_params``, ``variant`` present).
        project, group, name: of the run started when there is none.

    Returns:
        ``{"lr_sensitivity": DataFrame, "keys": [logged keys]}``.
    """
    require_wandb("log_sweep_summary")
    if not isinstance(runs, pd.DataFrame) or runs.empty:
        raise ValueError("log_sweep_summary(runs=...): pass the sweep's non-empty runs DataFrame")
    sens = lr_sensitivity(runs, by=by)
    target, owned = target_run(run, {"project": project, "group": group, "name": name or (
        f"{group}-summary" if group else None), "job_type": "sweep-summary"})
    try:
        log_table(runs, "sweep/runs", target)
        log_table(sens, "sweep/lr_sensitivity", target)
        keys = ["sweep/runs", "sweep/lr_sensitivity"]
        if figures:
            keys += log_figures(figures, target, prefix="sweep/figures")
    finally:
        if owned:
            target.finish()
    return {"lr_sensitivity": sens, "keys": keys}
