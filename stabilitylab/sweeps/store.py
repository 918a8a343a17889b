"""The sweep store: a directory that a sweep writes and resumes from, readable with pandas alone.

Layout of ``path``::

    spec.json                  the spec(s) that wrote it and the trainer's name
    runs/<run_id>.parquet      one row per finished run (written last: its presence means "finished")
    history/<run_id>.parquet   that run's tidy monitor records (run_id, step, metric, module, value, wall_time)
    runs.parquet               every row in one table, rebuilt from runs/ (during and at the end of a sweep)
    .lock                      store lock (``filelock``): spec.json updates and runs.parquet rebuilds
    claims/<run_id>.lock       held (``filelock``) by the one process that trains that point right now

Each file is written to a temp file and renamed into place (``atomic_write_parquet``), history before the
row, so a killed sweep loses at most the runs in flight and never leaves a half-written file under its
final name. Files in ``runs/`` or ``history/`` that are not readable results of this store are reported
by name (one warning) and skipped.

Several sweeps may run on one store at once (other processes, other machines on a shared filesystem
with working ``flock``): each point is trained by the process that holds its claim; the others wait
for that claim and then take the finished row, or re-train the point when its holder died mid-run
(the operating system releases a killed process's locks). So every point is trained to completion
once and ``runs.parquet``, rebuilt from ``runs/`` under the store lock, has one row per run.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock, Timeout

from stabilitylab.sinks.base import records_to_frame
from stabilitylab.sinks.parquet import atomic_write_parquet
from stabilitylab.sweeps.spec import SweepSpec

FORMAT = "stabilitylab.sweep/1"
#: Result columns of every row, after the point's labels and config columns.
RESULT_COLUMNS = ("final_loss", "init_loss", "diverged", "steps_done", "status", "error", "wall_time")
LEAD_COLUMNS = ("run_id", "lr", "size", "n_params", "variant", "seed")
FINISHED = ("ok", "diverged")
_RUN_FILE = re.compile(r"[0-9a-f]{16}\.parquet")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def order_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Labels first, then config columns, then results, then any extra result keys of a ``train_fn``."""
    lead = [c for c in LEAD_COLUMNS if c in df.columns]
    tail = [c for c in RESULT_COLUMNS if c in df.columns]
    return df[lead + [c for c in df.columns if c not in lead and c not in tail] + tail] \
        if df.columns.size else pd.DataFrame(columns=[*LEAD_COLUMNS, *RESULT_COLUMNS])


class SweepStore:
    """Reads and writes one sweep directory (see the module docstring). Only sweep drivers write it; several
    may at once (claims and the store lock keep them apart)."""

    def __init__(self, path: str | os.PathLike):
        if not isinstance(path, (str, os.PathLike)) or str(path) == "":
            raise ValueError(f"store={path!r}: pass a directory path (str or Path)")
        self.path = Path(path)
        self.runs_dir = self.path / "runs"
        self.history_dir = self.path / "history"
        self.spec_file = self.path / "spec.json"
        self.claims_dir = self.path / "claims"

    # ------------------------------------------------------------------ locks
    def lock(self) -> FileLock:
        """The store-wide lock (``with store.lock(): ...``) around spec.json and runs.parquet updates."""
        self.path.mkdir(parents=True, exist_ok=True)
        return FileLock(self.path / ".lock")

    def claim(self, run_id: str, wait: bool = False) -> FileLock | None:
        """Claim the point ``run_id`` for training in this process: the held lock, or None when another
        process holds it (``wait=True`` blocks until it is released: finished, or its holder died).

        Release it (``.release()``) once the point's row is written.
        """
        self.claims_dir.mkdir(parents=True, exist_ok=True)
        lk = FileLock(self.claims_dir / f"{run_id}.lock", thread_local=False)
        try:
            lk.acquire(timeout=-1 if wait else 0)
        except Timeout:
            return None
        return lk

    def status(self, run_id: str) -> str | None:
        """Status of ``run_id``'s row on disk (``ok``, ``diverged``, ``failed``), None when it has none."""
        f = self.runs_dir / f"{run_id}.parquet"
        try:
            return str(pd.read_parquet(f, columns=["status"])["status"].iloc[0])
        except (OSError, ValueError, KeyError, IndexError):
            return None

    # ------------------------------------------------------------------ spec
    def meta(self) -> dict[str, Any] | None:
        """Contents of ``spec.json`` (None for a new store)."""
        if not self.spec_file.exists():
            return None
        try:
            meta = json.loads(self.spec_file.read_text())
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            meta["specs"] = [SweepSpec.from_dict(d) for d in meta["specs"]]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"store {str(self.path)!r}: {self.spec_file.name} is not a sweep spec file ({e}); "
                             "pick another store directory or remove the file") from None
        return meta

    def open(self, spec: SweepSpec, trainer: str, extend: bool = False) -> None:
        """Create the store for ``spec``, or check that an existing one was written by the same spec.

        Raises:
            ValueError: the store holds a different spec (unless ``extend``) or another trainer's results.
        """
        with self.lock():
            self._open(spec, trainer, extend)

    def _open(self, spec: SweepSpec, trainer: str, extend: bool) -> None:
        meta = self.meta()
        if meta is None:
            meta = {"format": FORMAT, "trainer": trainer, "specs": []}
        elif meta["trainer"] != trainer:
            raise ValueError(f"store {str(self.path)!r} holds runs of train_fn {meta['trainer']!r}, not "
                             f"{trainer!r}; their run ids would collide, so use another store directory")
        if spec not in meta["specs"]:
            if meta["specs"] and not extend:
                old = meta["specs"][-1]
                diff = [k for k, v in spec.to_dict().items() if old.to_dict().get(k) != v]
                raise ValueError(
                    f"store {str(self.path)!r} was written by a different spec (sweep {old.name!r}; differs in "
                    f"{', '.join(diff)}); pass extend=True (CLI: --extend) to add this spec's points to it, "
                    "or choose another store")
            meta["specs"].append(spec)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.history_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps({**meta, "specs": [s.to_dict() for s in meta["specs"]]}, indent=1)
        _atomic_write_text(self.spec_file, text)

    def specs(self) -> list[SweepSpec]:
        meta = self.meta()
        return meta["specs"] if meta else []

    # ------------------------------------------------------------------ results
    def write(self, row: dict[str, Any], history: pd.DataFrame | None) -> None:
        """Store one run: its history, then its row (the row marks the run finished or failed)."""
        rid = row["run_id"]
        if history is not None and len(history):
            atomic_write_parquet(history, self.history_dir / f"{rid}.parquet")
        atomic_write_parquet(pd.DataFrame([row]), self.runs_dir / f"{rid}.parquet")

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
        return pd.concat(frames, ignore_index=True) if frames else records_to_frame([])

    def write_runs_table(self) -> pd.DataFrame:
        """Rebuild ``runs.parquet`` from the per-run files, under the store lock; returns the table."""
        with self.lock():
            df = runs_frame(list(self.rows().values()))
            atomic_write_parquet(df, self.path / "runs.parquet")
        return df


def runs_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows (dicts) -> runs DataFrame with dtypes inferred across all rows and the standard column order."""
    return order_columns(pd.DataFrame.from_records(rows) if rows else pd.DataFrame())


def _store(path: str | os.PathLike) -> SweepStore:
    store = SweepStore(path)
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
    store = _store(path)
    rows = store.rows()
    return runs_frame(list(rows.values())), store.history(rows)


def sweep_status(path: str | os.PathLike) -> pd.DataFrame:
    """One row per grid point of every spec in the store: labels and ``status`` (ok / diverged / failed / missing).

    Also lists recorded runs that belong to no stored spec (``in_spec`` False).
    """
    store = _store(path)
    rows = store.rows()
    table, seen = [], set()
    for spec in store.specs():
        for p in spec.points():
            if p.run_id in seen:
                continue
            seen.add(p.run_id)
            r = rows.get(p.run_id, {})
            table.append({"run_id": p.run_id, "sweep": spec.name, "size": p.size, "variant": p.variant,
                          "lr": p.lr, "seed": p.seed, "status": r.get("status", "missing"),
                          "error": r.get("error", ""), "in_spec": True})
    for rid, r in rows.items():
        if rid not in seen:
            table.append({"run_id": rid, "sweep": "", **{k: r.get(k) for k in ("size", "variant", "lr", "seed")},
                          "status": r["status"], "error": r.get("error", ""), "in_spec": False})
    cols = ["run_id", "sweep", "size", "variant", "lr", "seed", "status", "error", "in_spec"]
    return pd.DataFrame(table, columns=cols)


__all__ = ["FINISHED", "SweepStore", "load_sweep", "runs_frame", "sweep_status"]
