"""Parquet sink: a run's history as part files, each written to a temp file and renamed into place.

Layout of ``path``::

    history/part-<run_id>-000000.parquet   tidy records (run_id, step, metric, module, value, wall_time)
    events/part-<run_id>-000000.parquet    events (run_id, step, kind, module, value, message)

What a crash (``kill -9``, power loss) can lose is the buffer since the last part: records and events
of at most ``flush_every_steps`` logged steps, fewer than ``flush_records`` + one step's rows, and none
written more than ``flush_every_s`` seconds before the last write (measured by
tests/sinks/test_parquet_kill.py). Parts already on disk are never damaged: a part is renamed into place
only once complete. ``pandas.read_parquet(path + "/history")`` reads it back with pandas alone; so do
``read_history`` and ``read_events``.
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

from stabilitylab._checks import int_at_least
from stabilitylab._io import atomic_write_parquet  # noqa: F401 - re-exported (its home before)
from stabilitylab.metrics import RECORD_COLUMNS, Event
from stabilitylab.sinks.base import Records, Sink, records_to_frame


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", name) or "run"


class Parquet(Sink):
    """Writes tidy records as parquet part files under ``path``.

    A part (records and the events since the last part) is written as soon as any bound is reached:

    Args:
        path: directory (created if missing; must be writable).
        flush_records: ... this many rows are buffered;
        flush_every_s: ... this many seconds passed since the last part (checked on each write;
            None: no time bound);
        flush_every_steps: ... this many logged steps are buffered (None: no step bound). A kill loses
            at most this many logged steps; 1 writes a part per logged step.
    """

    def __init__(self, path: str | os.PathLike, flush_records: int = 5000, flush_every_s: float | None = 30.0,
                 flush_every_steps: int | None = None):
        if not isinstance(path, (str, os.PathLike)) or str(path) == "":
            raise ValueError(f"Parquet(path={path!r}): pass a directory path (str or Path)")
        if not int_at_least(flush_records, 1):
            raise ValueError(f"Parquet(flush_records={flush_records!r}): must be an int >= 1")
        if flush_every_steps is not None and not int_at_least(flush_every_steps, 1):
            raise ValueError(f"Parquet(flush_every_steps={flush_every_steps!r}): must be an int >= 1 or None")
        if flush_every_s is not None and not (isinstance(flush_every_s, (int, float)) and flush_every_s > 0):
            raise ValueError(f"Parquet(flush_every_s={flush_every_s!r}): must be a number of seconds > 0 or None")
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
        self.flush_every_s = flush_every_s
        self.flush_every_steps = flush_every_steps
        self._buf: list[Records] = []
        self._ev_buf: list[Event] = []
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
        if self._due():
            try:
                self.flush()
            except Exception:
                self._buf.pop()
                self._rows -= len(records)
                raise

    def _due(self) -> bool:
        return (self._rows >= self.flush_records
                or (self.flush_every_steps is not None and len(self._buf) >= self.flush_every_steps)
                or (self.flush_every_s is not None and time.monotonic() - self._last >= self.flush_every_s))

    def write_events(self, events: Sequence[Event]) -> None:
        """Buffer events; they are written with the next part (same bounds as records)."""
        self._ev_buf.extend(events)
        if self._ev_buf and (len(self._ev_buf) >= self.flush_records or self._due()):
            self.flush()

    def flush(self) -> None:
        """Write the buffered events, then the buffered records, each as one part (temp file + rename)."""
        if self._ev_buf:
            df = pd.DataFrame([{k: v for k, v in e.__dict__.items() if k != "extra"} for e in self._ev_buf])
            atomic_write_parquet(df, self.path / "events" / f"part-{self._run}-{self._event_part:06d}.parquet")
            self._event_part += 1
            self._ev_buf.clear()
        if self._buf:
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


def read_events(path: str | os.PathLike) -> pd.DataFrame:
    """Read every events part under ``path`` (a Parquet sink directory): run_id, step, kind, module, value,
    message (an empty frame with those columns if there are none)."""
    cols = ["run_id", "step", "kind", "module", "value", "message"]
    d = Path(path) / "events"
    frames = []
    for f in sorted(d.glob("part-*.parquet")):
        try:
            frames.append(pd.read_parquet(f))
        except Exception as e:  # noqa: BLE001 - a corrupt part is reported and skipped, never fatal
            warnings.warn(f"read_events: skipping unreadable part {f} ({type(e).__name__}: {e})", stacklevel=2)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)
