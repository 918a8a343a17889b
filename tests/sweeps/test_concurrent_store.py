"""Two sweep processes on one store (file locks from ``filelock``): every point trained to completion
exactly once, none lost, including when one process is SIGKILLed mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from stabilitylab.sweeps import SweepSpec, load_sweep

WORKER = str(Path(__file__).with_name("_concurrent_sweep.py"))
LRS_A = [1e-3, 2e-3, 3e-3, 4e-3, 5e-3]
LRS_B = [3e-3, 4e-3, 5e-3, 6e-3, 7e-3]

pytestmark = pytest.mark.distributed


def _start(store: Path, log: Path, lrs: list[float], sleep: float = 0.4) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, WORKER, str(store), str(log), str(sleep), *map(str, lrs)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out


def _ids(lrs: list[float]) -> set[str]:
    spec = SweepSpec(name="x", lrs=lrs, steps=2, every=1)
    return {p.run_id for p in spec.points()}


def _lines(log: Path) -> list[tuple[str, str, int]]:
    return [(k, rid, int(pid)) for k, rid, pid in (ln.split() for ln in log.read_text().splitlines())]


def _check_store(store: Path, expected: set[str]) -> pd.DataFrame:
    table = pd.read_parquet(store / "runs.parquet")
    assert table["run_id"].is_unique
    assert set(table["run_id"]) == expected
    assert (table["status"] == "ok").all()
    runs, _ = load_sweep(store)
    assert set(runs["run_id"]) == expected
    return table


def test_two_overlapping_sweeps_train_every_point_exactly_once(tmp_path):
    store, log = tmp_path / "store", tmp_path / "log"
    a, b = _start(store, log, LRS_A), _start(store, log, LRS_B)
    _finish(a)
    _finish(b)
    union = _ids(LRS_A) | _ids(LRS_B)
    lines = _lines(log)
    starts = Counter(rid for k, rid, _ in lines if k == "start")
    ends = Counter(rid for k, rid, _ in lines if k == "end")
    assert set(ends) == union and set(ends.values()) == {1}, ends  # none lost, none trained twice
    assert starts == ends
    assert len({pid for _, _, pid in lines}) == 2  # both processes trained points
    _check_store(store, union)


def test_a_sigkilled_sweeps_in_flight_run_is_redone_once_by_the_survivor_or_a_rerun(tmp_path):
    store, log = tmp_path / "store", tmp_path / "log"
    a = _start(store, log, LRS_A, sleep=1.0)
    b = _start(store, log, LRS_B, sleep=1.0)
    in_flight = None
    deadline = time.monotonic() + 180
    while in_flight is None and time.monotonic() < deadline:
        time.sleep(0.05)
        lines = _lines(log) if log.exists() else []
        ended = {rid for k, rid, pid in lines if k == "end" and pid == a.pid}
        open_a = [rid for k, rid, pid in lines if k == "start" and pid == a.pid and rid not in ended]
        b_started = any(pid == b.pid for _, _, pid in lines)
        if open_a and b_started and ended:  # A has finished a point and is training another
            in_flight = open_a[0]
    assert in_flight is not None, "sweep A never had a run in flight"
    os.kill(a.pid, signal.SIGKILL)
    a.wait()
    assert a.returncode == -signal.SIGKILL
    _finish(b)
    rerun = _start(store, log, LRS_A, sleep=0.1)  # picks up what A left and B did not need
    _finish(rerun)
    union = _ids(LRS_A) | _ids(LRS_B)
    lines = _lines(log)
    ends = Counter(rid for k, rid, _ in lines if k == "end")
    starts = Counter(rid for k, rid, _ in lines if k == "start")
    assert set(ends) == union and set(ends.values()) == {1}, ends
    assert starts[in_flight] == 2  # killed mid-run, then trained once more to completion
    assert {rid for rid, n in starts.items() if n > 1} == {in_flight}
    redone_by = {pid for k, rid, pid in lines if k == "end" and rid == in_flight}
    assert redone_by <= {b.pid, rerun.pid}
    _check_store(store, union)
