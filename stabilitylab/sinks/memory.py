"""In-memory sink: keeps every record; ``Monitor.history()`` reads it."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import pandas as pd

from stabilitylab.metrics import Event
from stabilitylab.sinks.base import Records, Sink, records_to_frame


class Memory(Sink):
    """Keeps records (and events) in memory.

    Args:
        max_steps: keep at most this many logged steps (oldest dropped first); None keeps all.
        max_events: keep at most this many events (oldest dropped first); None keeps all.
    """

    def __init__(self, max_steps: int | None = None, max_events: int | None = None):
        if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"Memory(max_steps={max_steps!r}): must be a positive int or None")
        self.max_steps = max_steps
        self.batches: list[Records] = []
        if max_events is not None and (not isinstance(max_events, int) or max_events < 1):
            raise ValueError(f"Memory(max_events={max_events!r}): must be a positive int or None")
        self.events: deque[Event] = deque(maxlen=max_events)

    def write(self, records: Records) -> None:
        self.batches.append(records)
        if self.max_steps is not None and len(self.batches) > self.max_steps:
            del self.batches[: len(self.batches) - self.max_steps]

    def write_events(self, events: Sequence[Event]) -> None:
        self.events.extend(events)

    def to_frame(self) -> pd.DataFrame:
        return records_to_frame(self.batches)

    def events_frame(self) -> pd.DataFrame:
        return pd.DataFrame([e.__dict__ for e in self.events],
                            columns=["run_id", "step", "kind", "module", "value", "message", "extra"])
