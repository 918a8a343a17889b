"""Memory and console sinks, and the guard that keeps a failing sink from stopping training."""

from __future__ import annotations

import io
import re
import warnings

import pytest
import torch

from stabilitylab import Monitor, sinks
from stabilitylab import metrics as M
from stabilitylab.sinks.base import Records, Sink


def test_console_prints_one_line_per_logged_step(tiny_model, tiny_batch):
    buf = io.StringIO()
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    with Monitor(tiny_model, optimizer=opt, every=2, sinks=[sinks.Console(buf)]) as mon:
        losses = []
        for _ in range(5):
            _, loss = tiny_model(*tiny_batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            mon.step(loss)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.startswith("step ")]
    assert [int(ln.split()[1]) for ln in lines] == [0, 2, 4]
    for ln, loss in zip(lines, losses[::2]):
        assert f"loss {loss:.4f}" in ln
        gn = float(re.search(r"gnorm (\S+)", ln).group(1))
        hist = mon.history()
        step = int(ln.split()[1])
        ref = hist[(hist.step == step) & (hist.metric == M.GRAD_GLOBAL_NORM)]["value"].item()
        assert gn == pytest.approx(ref, rel=1e-2)


def test_console_prints_events(tiny_model):
    buf = io.StringIO()
    with Monitor(tiny_model, every=1, probes=["health"], sinks=[sinks.Console(buf)]) as mon:
        mon.step(float("inf"))
    assert "nonfinite" in buf.getvalue()


def test_memory_sink_keeps_last_steps_and_validates():
    mem = sinks.Memory(max_steps=2)
    for s in range(4):
        mem.write(Records("r", s, 0.0, [M.LOSS], [""], [float(s)]))
    assert mem.to_frame()["step"].tolist() == [2, 3]
    with pytest.raises(ValueError, match="max_steps"):
        sinks.Memory(max_steps=0)


class _Flaky(Sink):
    """Fails its first ``n_fail`` writes, then works."""

    def __init__(self, n_fail):
        self.n_fail = n_fail
        self.got: list[Records] = []

    def write(self, records):
        if self.n_fail > 0:
            self.n_fail -= 1
            raise OSError("disk full")
        self.got.append(records)


class _Broken(Sink):
    def open(self, run_id, config):
        raise RuntimeError("cannot open")

    def write(self, records):
        raise RuntimeError("down")

    def close(self):
        raise RuntimeError("down")


def test_a_failing_sink_never_stops_training_and_loses_nothing(tiny_model, tiny_batch):
    flaky, broken, mem = _Flaky(2), _Broken(), sinks.Memory()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        mon = Monitor(tiny_model, every=1, probes=["logits"], sinks=[broken, flaky, mem])
        for _ in range(4):
            _, loss = tiny_model(*tiny_batch)
            mon.step(loss)
        mon.close()
    steps = [0, 1, 2, 3]
    assert sorted(mon.history()["step"].unique()) == steps
    assert [r.step for r in flaky.got] == steps  # retried in order once the sink recovered
    assert [r.step for r in mem.batches] == steps
    msgs = [str(x.message) for x in w if "_Broken" in str(x.message) and "failed" in str(x.message)]
    assert len(msgs) == 1, "a failing sink warns once, not per step"


def test_null_sink_accepts_everything(tiny_model):
    with Monitor(tiny_model, every=1, probes=[], sinks=[sinks.Null()]) as mon:
        mon.step(1.0)
    assert len(mon.history()) == 1
