"""Sinks receive the same tidy records; heavy imports live inside each sink."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from stabilitylab.metrics import RECORD_COLUMNS, Event


@dataclass
class Records:
    """One logged step's tidy rows, column-wise: ``run_id, step, metric, module, value`` (+ wall_time)."""

    run_id: str
    step: int
    wall_time: float
    metric: list[str]
    module: list[str]
    value: np.ndarray

    def __len__(self) -> int:
        return len(self.metric)

    def to_frame(self) -> pd.DataFrame:
        n = len(self)
        return pd.DataFrame({
            "run_id": [self.run_id] * n,
            "step": np.full(n, self.step, dtype=np.int64),
            "metric": self.metric,
            "module": self.module,
            "value": np.asarray(self.value, dtype=np.float64),
            "wall_time": np.full(n, self.wall_time, dtype=np.float64),
        })

    def as_dict(self) -> dict[tuple[str, str], float]:
        return {(m, mod): float(v) for m, mod, v in zip(self.metric, self.module, self.value)}


def records_to_frame(batches: Sequence[Records]) -> pd.DataFrame:
    """Concatenate record batches into one tidy DataFrame (empty frame with the schema if none)."""
    if not batches:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(
            (*RECORD_COLUMNS, "wall_time"), ("object", "int64", "object", "object", "float64", "float64"))})
    run_ids, steps, metrics, modules, values, walls = [], [], [], [], [], []
    for r in batches:
        n = len(r)
        run_ids.extend([r.run_id] * n)
        steps.append(np.full(n, r.step, dtype=np.int64))
        metrics.extend(r.metric)
        modules.extend(r.module)
        values.append(np.asarray(r.value, dtype=np.float64))
        walls.append(np.full(n, r.wall_time))
    return pd.DataFrame({
        "run_id": run_ids, "step": np.concatenate(steps), "metric": metrics, "module": modules,
        "value": np.concatenate(values), "wall_time": np.concatenate(walls),
    })


class Sink:
    """Base sink: ``write(records)``, optional ``write_events(events)``, ``set_config``, ``close()``."""

    def open(self, run_id: str, config: dict[str, Any]) -> None:
        """Called once by the Monitor before the first write with its settings."""

    def write(self, records: Records) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def write_events(self, events: Sequence[Event]) -> None:
        """Discrete events (spikes, non-finite values, warnings); default: ignored."""

    def flush(self) -> None:
        """Push buffered records to storage."""

    def close(self) -> None:
        """Flush and release resources; closing twice is a no-op."""


class Null(Sink):
    """Does nothing (for benchmarks and for disabling output)."""

    def write(self, records: Records) -> None:
        pass


class GuardedSink:
    """Wraps a sink so that its failures never reach training; failed writes are retried later."""

    def __init__(self, sink: Sink, max_buffer: int = 100_000):
        self.sink = sink
        self.pending: list[Records] = []
        self.pending_events: list[Event] = []
        self.failed = False
        self.warned = False
        self.max_buffer = max_buffer
        self.dropped = 0
        self.dropped_events = 0

    def _call(self, fn, *args) -> bool:
        try:
            fn(*args)
            if self.failed:
                self.failed = False
            return True
        except Exception as e:  # noqa: BLE001 - a sink must never stop training
            self.failed = True
            if not self.warned:
                self.warned = True
                warnings.warn(
                    f"stabilitylab: sink {type(self.sink).__name__} failed ({type(e).__name__}: {e}); "
                    "training continues, its records are buffered and retried (the Monitor's history "
                    "and other sinks keep them)", stacklevel=4)
            return False

    def write(self, records: Records) -> None:
        self.pending.append(records)
        while self.pending:
            if not self._call(self.sink.write, self.pending[0]):
                break
            self.pending.pop(0)
        if len(self.pending) > self.max_buffer:
            self.dropped += len(self.pending) - self.max_buffer
            del self.pending[: len(self.pending) - self.max_buffer]

    def write_events(self, events: Sequence[Event]) -> None:
        self.pending_events.extend(events)
        if self._call(self.sink.write_events, list(self.pending_events)):
            self.pending_events.clear()
        elif len(self.pending_events) > self.max_buffer:  # a sink down for good: keep the newest
            self.dropped_events += len(self.pending_events) - self.max_buffer
            del self.pending_events[: len(self.pending_events) - self.max_buffer]

    def flush(self) -> None:
        self.write_events([]) if self.pending_events else None
        while self.pending and self._call(self.sink.write, self.pending[0]):
            self.pending.pop(0)
        self._call(self.sink.flush)

    def close(self) -> None:
        self.flush()
        self._call(self.sink.close)
        if self.pending or self.dropped or self.pending_events or self.dropped_events:
            # The failure itself already warned once; the summary goes to the log, not a second warning.
            logging.getLogger("stabilitylab").warning(
                f"stabilitylab: sink {type(self.sink).__name__} could not write {len(self.pending)} "
                f"logged steps and {len(self.pending_events)} events before closing ({self.dropped} steps and "
                f"{self.dropped_events} events more were dropped beyond max_buffer={self.max_buffer}); the "
                "steps remain in Monitor.history() if keep_history")
