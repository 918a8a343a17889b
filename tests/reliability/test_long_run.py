"""Long runs: the Monitor's host-side buffers stay bounded at every=1 (the 10k-step figures are in
benchmarks/long_run_memory.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from long_run_memory import run  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("keep_history", [False, 20])
def test_buffers_do_not_grow_beyond_what_sinks_flush(tmp_path, keep_history):
    steps = 600
    r = run(keep_history, steps, sample=50, store=tmp_path)
    rows_per_step = r["rows_on_disk"] // steps
    assert r["rows_on_disk"] == rows_per_step * steps  # every logged record reached the Parquet store
    # Bounded: the Parquet buffer (< flush_records=2000 rows + one step) plus the kept history window.
    bound = 2000 + rows_per_step + (keep_history or 0) * rows_per_step
    assert r["max_buffered_records"] <= bound
    late = [s["buffered_records"] for s in r["samples"] if s["step"] > steps // 2]
    assert max(late) <= bound
    assert r["heap_growth_mib"] < 1.0  # no per-step Python allocation that survives


def test_events_stay_within_max_events_and_the_dropped_ones_are_counted(tmp_path):
    steps, fault_every, max_events = 300, 10, 12
    r = run(False, steps, sample=50, store=tmp_path, fault_every=fault_every, max_events=max_events, heap=False)
    faults = steps // fault_every
    assert r["faults"] == faults == 30
    assert max(s["events_held"] for s in r["samples"]) <= max_events
    assert r["events_held"] == max_events
    # Every fault was one probe_error event; the final events_dropped event joins the bounded buffer too.
    assert r["events_dropped"] == faults + 1 - max_events
    assert r["probe_errors_on_disk"] == faults  # the sinks got every event
    assert r["events_dropped_events"] == 1
