"""Monitor.events is a bounded buffer: the newest ``max_events`` are kept, the rest counted and reported."""

from __future__ import annotations

import pytest

import stabilitylab as sl
from stabilitylab.probes.base import Event


def test_events_keep_the_newest_max_events_and_count_the_dropped(tiny_model):
    sink = sl.sinks.Memory()
    mon = sl.Monitor(tiny_model, every=1, probes=[], sinks=[sink], max_events=3, run_id="r")
    mon.emit([Event("r", i, "early_warning", message=f"e{i}") for i in range(5)])
    assert [e.message for e in mon.events] == ["e2", "e3", "e4"]
    assert mon.events_dropped == 2
    assert len(mon._memory.events) == 3  # the in-memory history's events are bounded the same way
    mon.close()
    last = mon.events[-1]
    assert last.kind == "events_dropped" and last.value == 2 and "max_events=3" in last.message
    assert [e.message for e in sink.events][:5] == [f"e{i}" for i in range(5)]  # sinks got every event
    assert sink.events[-1].kind == "events_dropped"


@pytest.mark.parametrize("bad", [0, -1, 2.5, "10"])
def test_bad_max_events_is_named(tiny_model, bad):
    with pytest.raises(ValueError, match="max_events"):
        sl.Monitor(tiny_model, every=1, probes=[], max_events=bad)
