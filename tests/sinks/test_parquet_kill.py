"""What a kill -9 loses from the Parquet sink: never more than ``flush_every_steps`` logged steps, and
the store stays readable (measured over many random kill points)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from stabilitylab.sinks.base import Records
from stabilitylab.sinks.parquet import Parquet

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from parquet_kill import kill_loop  # noqa: E402


@pytest.mark.parametrize("every", [1, 7])
def test_a_kill_at_random_points_loses_at_most_flush_every_steps_steps(tmp_path, every):
    kills = kill_loop(tmp_path, kills=10, every=every, seed=every)
    assert all(k["readable"] for k in kills)  # no part skipped as corrupt
    assert all(k["prefix"] and k["full_steps"] for k in kills)  # whole steps, no holes
    lost = [k["lost"] for k in kills]
    assert max(lost) <= every, lost
    assert min(k["parts"] for k in kills) > 0  # every kill came after parts were written


def test_the_time_bound_writes_a_part_once_flush_every_s_passed(tmp_path, monkeypatch):
    import stabilitylab.sinks.parquet as P

    now = [0.0]
    monkeypatch.setattr(P.time, "monotonic", lambda: now[0])
    sink = Parquet(tmp_path, flush_records=10**9, flush_every_s=5.0)
    sink.open("t", {})
    parts = []
    for step in range(12):
        now[0] = float(step)
        sink.write(Records("t", step, 0.0, ["loss"], [""], np.array([1.0])))
        parts.append(len(list((tmp_path / "history").glob("part-*.parquet"))))
    assert parts == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2]  # parts at t = 5 and t = 10 s


@pytest.mark.parametrize("kwargs, match", [({"flush_every_steps": 0}, "flush_every_steps"),
                                           ({"flush_every_s": -1}, "flush_every_s"),
                                           ({"flush_every_steps": 2.5}, "flush_every_steps")])
def test_bad_flush_bounds_are_named(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Parquet(tmp_path, **kwargs)
