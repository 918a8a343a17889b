"""Parquet sink: a run's history as part files, each written to a temp file and renamed into place.

Layout of ``path``::

    history/part-<run_id>-000000.parquet   tidy records (run_id, step, metric, module, value, wall_time)
    events/part-<run_id>-000000.parquet    events (run_id, step, kind, module, value, message)

A crash loses at most the records not yet flushed (``flush_records`` rows or ``flush_seconds``).
``pandas.read_parquet(path + "/history")`` reads it back with pandas alone; so does ``read_history``.
"""

from __future__ import annotations

import os
import re
import time
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from stabilitylab.metrics import RECORD_COLUMNS
from stabilitylab.probes.base import Event
from stabilitylab.sinks.base import Records, Sink, records_to_frame


def atomic_write_parquet(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write ``df`` to ``path`` via a temp file in the same directory and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", name) or "run"


class Parquet(Sink):
    """Writes tidy records as parquet part files under ``path``.

    Args:
        path: directory (created if missing; must be writable).
        flush_records: write a part file once this many rows are buffered.
        flush_seconds: ... or once this many seconds passed since the last part.
    """

    def __init__(self, path: str | os.PathLike, flush_records: int = 5000, flush_seconds: float = 30.0):
        if not isinstance(path, (str, os.PathLike)) or str(path) == "":
            raise ValueError(f"Parquet(path={path!r}): pass a directory path (str or Path)")
        if flush_records < 1:
            raise ValueError(f"Parquet(flush_records={flush_records!r}): must be >= 1")
        self.path = Path(path)
        try:
            (self.path / "history").mkdir(parents=True, exist_ok=True)
            (self.path / "events").mkdir(parents=True, exist_ok=True)
            probe = self.path / "history" / f".write-test-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ValueError(
                f"Parquet(path={str(path)!r}): directory is not writable ({e.strerror or e}); "
                "pass a directory you can write to") from None
        self.flush_records = flush_records
        self.flush_seconds = flush_seconds
        self._buf: list[Records] = []
        self._rows = 0
        self._last = time.monotonic()
        self._part = 0
        self._event_part = 0
        self._run = "run"
        self._closed = False

    def open(self, run_id: str, config: dict) -> None:
        self._run = _safe(run_id)
        existing = list((self.path / "history").glob(f"part-{self._run}-*.parquet"))
        self._part = len(existing)
        self._event_part = len(list((self.path / "events").glob(f"part-{self._run}-*.parquet")))

    def write(self, records: Records) -> None:
        """Buffer ``records``; write a part when due. If that write fails, ``records`` is not taken (the
        exception propagates, the Monitor retries it later) and the earlier buffer is kept."""
        self._buf.append(records)
        self._rows += len(records)
        if self._rows >= self.flush_records or time.monotonic() - self._last >= self.flush_seconds:
            try:
                self.flush()
            except Exception:
                self._buf.pop()
                self._rows -= len(records)
                raise

    def write_events(self, events: Sequence[Event]) -> None:
        if not events:
            return
        df = pd.DataFrame([{k: v for k, v in e.__dict__.items() if k != "extra"} for e in events])
        atomic_write_parquet(df, self.path / "events" / f"part-{self._run}-{self._event_part:06d}.parquet")
        self._event_part += 1

    def flush(self) -> None:
        if not self._buf:
            return
        df = records_to_frame(self._buf)
        atomic_write_parquet(df, self.path / "history" / f"part-{self._run}-{self._part:06d}.parquet")
        self._part += 1
        self._buf.clear()
        self._rows = 0
        self._last = time.monotonic()

    def close(self) -> None:
        if not self._closed:
            self.flush()
            self._closed = True

    def read(self) -> pd.DataFrame:
        """This sink's history so far (flushed parts plus the buffer)."""
        return pd.concat([read_history(self.path), records_to_frame(self._buf)], ignore_index=True)


def read_history(path: str | os.PathLike) -> pd.DataFrame:
    """Read every history part under ``path`` (a Parquet sink directory) into one tidy DataFrame."""
    p = Path(path)
    d = p / "history" if (p / "history").is_dir() else p
    frames = []
    for f in sorted(d.glob("part-*.parquet")):
        try:
            df = pd.read_parquet(f)
        except Exception as e:  # noqa: BLE001 - a corrupt part is reported and skipped, never fatal
            warnings.warn(f"read_history: skipping unreadable part {f} ({type(e).__name__}: {e})", stacklevel=2)
            continue
        if not set(RECORD_COLUMNS) <= set(df.columns):
            warnings.warn(f"read_history: skipping {f}: not a stabilitylab history part (columns "
                          f"{list(df.columns)}, need {list(RECORD_COLUMNS)})", stacklevel=2)
            continue
        frames.append(df)
    if not frames:
        return records_to_frame([])
    return pd.concat(frames, ignore_index=True)
