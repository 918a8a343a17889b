"""The run files of a sweep store, read without the spec or the trainer: what ``load_sweep`` (and so
``stabilitylab.analysis.load_store``) needs, so reading a sweep's tables never loads the proxy.

``runs/<run_id>.parquet`` holds one result row per finished (or failed) run, ``history/<run_id>.parquet``
its tidy records; ``stabilitylab.sweeps.store.SweepStore`` adds the spec, the locks and the writes.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from stabilitylab.metrics import RECORD_COLUMNS

#: Result columns of every row, after the point's labels and config columns.
RESULT_COLUMNS = ("final_loss", "init_loss", "diverged", "steps_done", "status", "error", "wall_time")
LEAD_COLUMNS = ("run_id", "lr", "size", "n_params", "variant", "seed")
_RUN_FILE = re.compile(r"[0-9a-f]{16}\.parquet")


def order_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Labels first, then config columns, then results, then any extra result keys of a ``train_fn``."""
    lead = [c for c in LEAD_COLUMNS if c in df.columns]
    tail = [c for c in RESULT_COLUMNS if c in df.columns]
    return df[lead + [c for c in df.columns if c not in lead and c not in tail] + tail] \
        if df.columns.size else pd.DataFrame(columns=[*LEAD_COLUMNS, *RESULT_COLUMNS])


class StoreFiles:
    """The ``runs/`` and ``history/`` files of one sweep directory, read only."""

    def __init__(self, path: str | os.PathLike):
        if not isinstance(path, (str, os.PathLike)) or str(path) == "":
            raise ValueError(f"store={path!r}: pass a directory path (str or Path)")
        self.path = Path(path)
        self.runs_dir = self.path / "runs"
        self.history_dir = self.path / "history"
        self.spec_file = self.path / "spec.json"

    def rows(self) -> dict[str, dict[str, Any]]:
        """Every readable run row by run id; unreadable or foreign files are reported (one warning) and skipped."""
        out, bad = {}, []
        if self.runs_dir.is_dir():
            for f in sorted(self.runs_dir.iterdir()):
                if f.name.startswith("."):  # temp files of an interrupted atomic write
                    continue
                try:
                    if not _RUN_FILE.fullmatch(f.name):
                        raise ValueError("not a run file")
                    recs = pd.read_parquet(f).to_dict("records")
                    if len(recs) != 1 or recs[0].get("run_id") != f.stem or "status" not in recs[0]:
                        raise ValueError("not a result row of this run id")
                except (OSError, ValueError, ImportError) as e:  # pyarrow raises ArrowInvalid (a ValueError)
                    bad.append(f"{f.name} ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})")
                    continue
                out[f.stem] = recs[0]
        if bad:
            warnings.warn(f"stabilitylab sweep store {str(self.path)!r}: skipped {len(bad)} file(s) in runs/ "
                          f"that are not run results: {'; '.join(bad)}", stacklevel=3)
        return out

    def history(self, run_ids) -> pd.DataFrame:
        """Tidy history of ``run_ids`` (runs without a readable history file contribute nothing)."""
        frames, bad = [], []
        for rid in run_ids:
            f = self.history_dir / f"{rid}.parquet"
            if not f.exists():
                continue
            try:
                frames.append(pd.read_parquet(f))
            except (OSError, ValueError) as e:
                bad.append(f"{f.name} ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})")
        if bad:
            warnings.warn(f"stabilitylab sweep store {str(self.path)!r}: skipped {len(bad)} unreadable file(s) "
                          f"in history/: {'; '.join(bad)}", stacklevel=3)
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(
            (*RECORD_COLUMNS, "wall_time"), ("object", "int64", "object", "object", "float64", "float64"))})


def runs_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows (dicts) -> runs DataFrame with dtypes inferred across all rows and the standard column order."""
    return order_columns(pd.DataFrame.from_records(rows) if rows else pd.DataFrame())


def open_store_files(path: str | os.PathLike) -> StoreFiles:
    """The run files of the existing sweep store at ``path``; raises when it is not one."""
    store = StoreFiles(path)
    if not store.path.is_dir():
        raise FileNotFoundError(f"no sweep store at {str(store.path)!r} (directory does not exist)")
    if not store.spec_file.exists() and not store.runs_dir.is_dir():
        raise ValueError(f"{str(store.path)!r} is not a sweep store (no spec.json or runs/); pass the "
                         "directory given to sweep(store=...)")
    return store


def load_sweep(path: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read a sweep store: ``(runs, history)`` DataFrames rebuilt from the per-run files.

    ``runs`` has one row per recorded run (status ``ok``, ``diverged`` or ``failed``; filter out
    ``failed`` before analysis): run_id, lr, size, n_params, variant, seed, the config columns,
    final_loss, init_loss, diverged, steps_done, status, error, wall_time (seconds), plus any extra
    keys a ``train_fn`` returned. ``history`` holds the tidy monitor records of those runs.
    """
    store = open_store_files(path)
    rows = store.rows()
    return runs_frame(list(rows.values())), store.history(rows)


__all__ = ["LEAD_COLUMNS", "RESULT_COLUMNS", "StoreFiles", "load_sweep", "open_store_files", "order_columns",
           "runs_frame"]
