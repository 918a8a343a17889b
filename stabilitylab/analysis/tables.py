"""Reading and checking the two tidy tables every analysis works on.

``runs``: one row per run (``run_id, lr, size, n_params, variant, seed, final_loss, init_loss, diverged,
steps_done, status``); ``history``: one row per record (``run_id, step, metric, module, value``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

RUN_COLUMNS = ("run_id", "lr", "final_loss", "init_loss")
HISTORY_COLUMNS = ("run_id", "step", "metric", "module", "value")


def load_store(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(runs, history)`` of a sweep store or a demo directory.

    Uses ``stabilitylab.sweeps.load_sweep`` when it exists, else reads ``runs.parquet`` and
    ``history.parquet`` (what ``stabilitylab demo`` writes) from ``path``.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"store path {str(path)!r} is not a directory; pass the folder of a sweep "
                                "(e.g. runs/demo written by `stabilitylab demo`)")
    try:
        from stabilitylab.sweeps.files import load_sweep
    except ImportError:
        load_sweep = None
    runs = history = None
    if load_sweep is not None:
        try:
            runs, history = load_sweep(path)
        except (FileNotFoundError, ValueError) as e:
            if not (path / "runs.parquet").exists():
                raise FileNotFoundError(f"{path}: neither a sweep store ({e}) nor a folder with runs.parquet "
                                        "(what `stabilitylab demo --out DIR` writes)") from e
    if runs is None:
        if not (path / "runs.parquet").exists():
            raise FileNotFoundError(f"{path}: no runs.parquet; run a sweep or `stabilitylab demo --out {path}`")
        runs = pd.read_parquet(path / "runs.parquet")
        hist_path = path / "history.parquet"
        history = (pd.read_parquet(hist_path) if hist_path.exists()
                   else pd.DataFrame(columns=list(HISTORY_COLUMNS)))
    return check_runs(runs, "load_store"), check_history(history, "load_store")


def check_runs(runs: pd.DataFrame, where: str) -> pd.DataFrame:
    """Validate a runs table, drop ``status == "failed"`` runs (crashes are not divergences) and fill
    optional columns (``diverged`` also when the final loss is non-finite; ``variant``, ``size``)."""
    if not isinstance(runs, pd.DataFrame):
        raise TypeError(f"{where}(runs=...): expected a pandas DataFrame, got {type(runs).__name__}")
    missing = [c for c in RUN_COLUMNS if c not in runs.columns]
    if missing:
        raise ValueError(f"{where}(runs=...): missing columns {missing}; a runs table needs {list(RUN_COLUMNS)}")
    runs = runs[runs["status"] != "failed"].copy() if "status" in runs.columns else runs.copy()
    fl = runs["final_loss"].astype(float)
    div = runs["diverged"].fillna(True).astype(bool) if "diverged" in runs.columns else False
    runs["diverged"] = ~np.isfinite(fl) | div
    if "variant" not in runs.columns:
        runs["variant"] = "default"
    if "size" not in runs.columns:
        runs["size"] = runs["n_params"].astype(str) if "n_params" in runs.columns else "default"
    return runs


def check_history(history: pd.DataFrame, where: str) -> pd.DataFrame:
    """Validate a tidy history table."""
    if not isinstance(history, pd.DataFrame):
        raise TypeError(f"{where}(history=...): expected a pandas DataFrame, got {type(history).__name__}")
    missing = [c for c in HISTORY_COLUMNS if c not in history.columns]
    if missing:
        raise ValueError(f"{where}(history=...): missing columns {missing}; tidy records need "
                         f"{list(HISTORY_COLUMNS)}")
    return history


def size_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per size, ordered by ``n_params``: columns ``size, n_params``."""
    if "n_params" not in runs.columns:
        raise ValueError("runs table has no n_params column; scaling analyses need model sizes in parameters")
    return (runs.groupby("size", as_index=False)["n_params"].median().sort_values("n_params")
            .reset_index(drop=True))
