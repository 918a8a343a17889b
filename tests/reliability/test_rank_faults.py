"""A fault on one rank only (gloo, 2 CPU processes): no hang, no desynchronised collectives, and an
event that names the rank. The faults and the worker are in benchmarks/fault_injection.py."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from fault_injection import FAULT_AT, FLAKY, STEPS, run_fault  # noqa: E402

pytestmark = pytest.mark.distributed

EXPECTED_EVENT = {"probe_raises": "probe_error", "nonfinite": "nonfinite", "skip_data": "rank_partial",
                  "skip_call": "rank_skipped"}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in a)


@pytest.fixture(scope="module", params=sorted(EXPECTED_EVENT) + ["rank_dies"])
def faulted(request, tmp_path_factory):
    fault = request.param
    return fault, run_fault(fault, tmp_path_factory.mktemp(fault), timeout_s=30.0)  # TimeoutError = a hang


def test_no_rank_hangs_and_both_ranks_log_the_same_values(faulted):
    fault, run = faulted
    r0, r1 = run["ranks"]
    assert "error" not in r0, r0["error"]
    assert r0["history_steps"] == list(range(STEPS))
    if fault == "rank_dies":
        assert run["exitcodes"] == [0, 3]
        return
    assert run["exitcodes"] == [0, 0]
    assert "error" not in r1, r1["error"]
    shared = min(len(r0["values"]), len(r1["values"]))
    assert shared == (STEPS - 1 if fault == "skip_call" else STEPS)
    for step in range(shared):
        assert _same(r0["values"][step], r1["values"][step]), f"ranks disagree on step {step}"


def test_the_fault_is_an_event_naming_rank_one(faulted):
    fault, run = faulted
    events = run["ranks"][0]["events"]
    if fault == "rank_dies":
        failed = [e for e in events if e[1] == "collective_failed"]
        assert [e[0] for e in failed] == [FAULT_AT]
        return
    kind = EXPECTED_EVENT[fault]
    at = STEPS - 1 if fault == "skip_call" else FAULT_AT  # skip_call: rank 1 is one logged step short
    named = [e for e in events if e[1] == kind and e[4].get("ranks") == [1]]
    assert named and {e[0] for e in named} >= {at}, events
    assert not any(e[1] == "rank_desync" for e in events)


def test_values_on_the_faulted_step_reduce_over_the_ranks_that_had_them(faulted):
    fault, run = faulted
    r0 = run["ranks"][0]
    if fault == "probe_raises":  # mean of rank + 1: 1.5 with both ranks, 1.0 with rank 0 alone
        got = [v[(FLAKY, "")] for v in r0["values"]]
        assert got == [1.0 if s == FAULT_AT else 1.5 for s in range(STEPS)]
    elif fault == "skip_data":  # rank 1 passed no loss: the loss is rank 0's own
        assert r0["values"][FAULT_AT][("loss", "")] == pytest.approx(r0["local_loss"][FAULT_AT], rel=1e-12)
        assert r0["values"][FAULT_AT - 1][("loss", "")] != pytest.approx(r0["local_loss"][FAULT_AT - 1])
    elif fault == "nonfinite":
        assert math.isnan(r0["values"][FAULT_AT][("loss", "")])
        assert math.isfinite(r0["values"][FAULT_AT - 1][("loss", "")])
    elif fault == "skip_call":  # rank 0's last step was answered by rank 1's close(): its own loss
        assert r0["values"][-1][("loss", "")] == pytest.approx(r0["local_loss"][-1], rel=1e-12)
