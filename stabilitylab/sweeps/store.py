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
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock, Timeout

from stabilitylab._io import atomic_write_parquet
from stabilitylab.sweeps.files import (  # noqa: F401 - load_sweep, order_columns re-exported
    LEAD_COLUMNS,
    RESULT_COLUMNS,
    StoreFiles,
    load_sweep,
    open_store_files,
    order_columns,
    runs_frame,
)
from stabilitylab.sweeps.spec import SweepSpec

FORMAT = "stabilitylab.sweep/1"
FINISHED = ("ok", "diverged")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class SweepStore(StoreFiles):
    """Reads and writes one sweep directory (see the module docstring). Only sweep drivers write it; several
    may at once (claims and the store lock keep them apart)."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
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

    def copy_finished(self, sources: list[str | os.PathLike], run_ids) -> list[str]:
        """Copy the finished runs (row + history) among ``run_ids`` that this store lacks from other stores.

        The first source holding a run wins; sources without a ``runs/`` folder are skipped, and their
        unreadable files are that store's business (no warning here).

        Args:
            sources: other sweep stores, in order of preference.
            run_ids: the run ids wanted (e.g. a spec's points).

        Returns:
            the run ids copied.
        """
        have = self.rows()
        todo = {r for r in run_ids if have.get(r, {}).get("status") not in FINISHED}
        copied: list[str] = []
        for path in sources:
            src = SweepStore(path)
            if not todo or not src.runs_dir.is_dir():
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rows = {k: r for k, r in src.rows().items() if k in todo and r["status"] in FINISHED}
            for rid, row in rows.items():
                hist = src.history([rid])
                self.write(row, hist if len(hist) else None)
                todo.discard(rid)
                copied.append(rid)
        return copied

    def write_runs_table(self) -> pd.DataFrame:
        """Rebuild ``runs.parquet`` from the per-run files, under the store lock; returns the table."""
        with self.lock():
            df = runs_frame(list(self.rows().values()))
            atomic_write_parquet(df, self.path / "runs.parquet")
        return df


def sweep_status(path: str | os.PathLike) -> pd.DataFrame:
    """One row per grid point of every spec in the store: labels and ``status`` (ok / diverged / failed / missing).

    Also lists recorded runs that belong to no stored spec (``in_spec`` False).
    """
    store = SweepStore(open_store_files(path).path)
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
