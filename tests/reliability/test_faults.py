"""Faults: NaN/Inf in parameters, gradients, activations and logits; probes and sinks that raise;
a process killed mid-write. Training never sees an exception it did not cause; nothing collected is lost."""

from __future__ import annotations

import errno
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pandas as pd
import pytest
import torch

import stabilitylab as sl
from stabilitylab import metrics as M
from stabilitylab.probes.base import Probe
from stabilitylab.sinks.base import Records, Sink
from stabilitylab.sinks.parquet import read_history


def _events(mon, kind):
    return [e for e in mon.events if e.kind == kind]


def test_nan_parameters_are_counted_exactly_and_raise_an_event(tiny_model, tiny_batch, train_loop):
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.0)  # lr 0: the injected NaNs stay as they are
    mon = sl.Monitor(tiny_model, optimizer=opt, every=1)
    w = tiny_model.blocks[0].mlp.c_fc.weight

    def poison(i):
        if i == 1:
            with torch.no_grad():
                w[:3, :2] = float("nan")

    vals = train_loop(tiny_model, opt, tiny_batch, 2, mon, before_opt_step=poison)
    assert vals[0][(M.HEALTH_NONFINITE, "param")] == 0
    assert vals[1][(M.HEALTH_NONFINITE, "param")] == 6
    assert math.isnan(vals[1][(M.PARAM_RMS, "blocks.0.mlp.c_fc.weight")])
    assert [e.step for e in _events(mon, "nonfinite") if e.module == "param"] == [1]


def test_inf_gradients_are_counted_before_the_optimizer_step(tiny_model, tiny_batch, train_loop):
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    mon = sl.Monitor(tiny_model, optimizer=opt, every=1)
    p = tiny_model.blocks[1].attn.c_proj.weight
    h = p.register_hook(lambda g: g.index_fill(0, torch.tensor([0, 5]), float("inf")))  # 2 rows
    vals = train_loop(tiny_model, opt, tiny_batch, 1, mon)
    h.remove()
    assert vals[0][(M.HEALTH_NONFINITE, "grad")] == 2 * p.shape[1]
    assert vals[0][(M.GRAD_GLOBAL_NORM, "")] == math.inf
    assert any(e.module == "grad" for e in _events(mon, "nonfinite"))


@pytest.mark.parametrize("where", ["activations", "logits"])
def test_nonfinite_activations_and_logits_are_recorded_not_raised(tiny_model, tiny_batch, train_loop, where):
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    mon = sl.Monitor(tiny_model, optimizer=opt, every=1)
    target = tiny_model.blocks[0].attn.c_attn if where == "activations" else tiny_model.lm_head
    h = target.register_forward_hook(lambda m, a, out: out * float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NaN data is not a warning either
        vals = train_loop(tiny_model, opt, tiny_batch, 1, mon)[0]
    h.remove()
    assert math.isnan(vals[(M.LOSS, "")])
    assert vals[(M.HEALTH_NONFINITE, "loss")] == 1
    assert vals[(M.HEALTH_NONFINITE, "metrics")] > 0
    if where == "activations":
        assert math.isnan(vals[(M.ATTN_MAX_LOGIT, "blocks.0.attn")])
        assert math.isnan(vals[(M.ACT_RMS, "blocks.0")])
    else:
        assert math.isnan(vals[(M.LOGITS_LSE_MEAN, "")]) and math.isnan(vals[(M.LOGITS_MAX, "")])
    assert {e.module for e in _events(mon, "nonfinite")} >= {"loss", "metrics"}
    assert mon.history()["step"].eq(0).all()


class _Exploding(Probe):
    """A probe whose forward hook (or host step) raises."""

    name = "exploding"
    metrics = (M.ACT_RMS,)

    def __init__(self, on_host=False):
        super().__init__()
        self.fail_on_host = on_host

    def _attach(self):
        self._hook(self.model.blocks[0].register_forward_hook(self._boom))

    def _boom(self, module, args, out):
        if self.armed and not self.fail_on_host:
            raise RuntimeError("probe bug")

    def on_host(self, step, values):
        if self.fail_on_host:
            raise ZeroDivisionError("host bug")
        return [], []


@pytest.mark.parametrize("on_host", [False, True])
def test_an_exception_inside_a_probe_is_one_warning_and_an_event(tiny_model, tiny_batch, train_loop, on_host):
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match="probe bug|host bug") as rec:
        mon = sl.Monitor(tiny_model, optimizer=opt, every=1, probes=["optimizer", "health", _Exploding(on_host)])
        vals = train_loop(tiny_model, opt, tiny_batch, 3, mon)
    assert len([w for w in rec if "bug" in str(w.message)]) == 1
    errors = _events(mon, "probe_error")
    assert [e.step for e in errors] == [0, 1, 2] and all(e.module == "exploding" for e in errors)
    assert all(math.isfinite(v[(M.GRAD_GLOBAL_NORM, "")]) for v in vals)  # other probes unaffected


def test_an_exception_in_the_attention_path_does_not_reach_the_forward(tiny_model, tiny_batch, train_loop, monkeypatch):
    from stabilitylab.probes.attention import AttentionProbe

    def broken(self, *a, **k):
        raise IndexError("attention bug")

    monkeypatch.setattr(AttentionProbe, "observe", broken)
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match="attention bug"):
        mon = sl.Monitor(tiny_model, optimizer=opt, every=1)
        vals = train_loop(tiny_model, opt, tiny_batch, 2, mon)
    assert math.isfinite(vals[1][(M.LOSS, "")])
    assert {e.module for e in _events(mon, "probe_error")} == {"attention"}


class _Flaky(Sink):
    """Raises ``exc`` for the first ``fail`` calls of write/flush, then works; keeps what it got."""

    def __init__(self, exc, fail):
        self.exc, self.fail, self.got, self.events = exc, fail, [], []

    def _maybe_fail(self):
        if self.fail > 0:
            self.fail -= 1
            raise self.exc

    def write(self, records: Records) -> None:
        self._maybe_fail()
        self.got.append(records.step)

    def write_events(self, events):
        self._maybe_fail()
        self.events.extend(events)


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"),
                                 PermissionError(errno.EACCES, "Permission denied"),
                                 ConnectionError("wandb: 502 Bad Gateway")])
def test_a_failing_sink_never_stops_training_and_loses_nothing(tiny_model, tiny_batch, train_loop, exc):
    sink = _Flaky(exc, fail=5)
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match="sink _Flaky failed") as rec:
        mon = sl.Monitor(tiny_model, optimizer=opt, every=1, sinks=[sink])
        train_loop(tiny_model, opt, tiny_batch, 8, mon)
        mon.close()
    assert len([w for w in rec if "_Flaky" in str(w.message)]) == 1
    assert sink.got == list(range(8))  # every step, in order, exactly once


def test_parquet_sink_on_a_full_disk_keeps_records_and_writes_them_on_recovery(tiny_model, tiny_batch, train_loop,
                                                                               tmp_path, monkeypatch):
    full = {"on": True}
    real = pd.DataFrame.to_parquet

    def to_parquet(self, path, *a, **k):
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, path, *a, **k)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", to_parquet)
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    sink = sl.sinks.Parquet(tmp_path / "store", flush_records=1)
    with pytest.warns(UserWarning, match="No space left"):
        mon = sl.Monitor(tiny_model, optimizer=opt, every=1, sinks=[sink])
        train_loop(tiny_model, opt, tiny_batch, 4, mon)
        full["on"] = False
        train_loop(tiny_model, opt, tiny_batch, 2, mon)
        mon.close()
    on_disk = read_history(tmp_path / "store")
    mem = mon.history()
    key = ["step", "metric", "module"]
    pd.testing.assert_frame_equal(on_disk.sort_values(key).reset_index(drop=True)[key + ["value"]],
                                  mem.sort_values(key).reset_index(drop=True)[key + ["value"]])
    assert sorted(on_disk["step"].unique()) == list(range(6))
    assert not list((tmp_path / "store" / "history").glob(".*.tmp"))


_KILLED_WRITER = textwrap.dedent("""
    import sys, time, numpy as np, pandas as pd
    import stabilitylab.sinks.parquet as P
    from stabilitylab.sinks.base import Records
    real = pd.DataFrame.to_parquet
    def slow(self, path, *a, **k):
        if P_STATE["n"] == 3:                      # the 4th part: write half a file, then hang
            real(self, path, *a, **k)
            data = open(path, "rb").read()
            open(path, "wb").write(data[: len(data) // 2])
            open(sys.argv[2], "w").write("mid-write")
            time.sleep(600)
        P_STATE["n"] += 1
        return real(self, path, *a, **k)
    P_STATE = {"n": 0}
    pd.DataFrame.to_parquet = slow
    sink = P.Parquet(sys.argv[1], flush_records=2)
    sink.open("killed", {})
    for step in range(100):
        sink.write(Records("killed", step, 0.0, ["loss", "grad.global_norm"], ["", ""],
                           np.array([float(step), 2.0 * step])))
""")


def test_a_process_killed_mid_write_leaves_a_readable_store(tmp_path):
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(tmp_path / "store"), str(marker)])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "writer never reached the 4th part"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    hist = tmp_path / "store" / "history"
    assert list(hist.glob(".part-*.tmp"))  # the half-written temp file is still there ...
    df = read_history(tmp_path / "store")  # ... and invisible: 3 complete parts of one step (2 rows)
    assert sorted(df["step"]) == [0, 0, 1, 1, 2, 2]
    assert (df[df.metric == "grad.global_norm"]["value"] == 2.0 * df[df.metric == "grad.global_norm"]["step"]).all()


def test_corrupt_or_foreign_parts_are_reported_by_name_and_skipped(tmp_path):
    sink = sl.sinks.Parquet(tmp_path, flush_records=1)
    sink.open("r", {})
    import numpy as np

    sink.write(Records("r", 0, 0.0, ["loss"], [""], np.array([1.5])))
    (tmp_path / "history" / "part-bad-000000.parquet").write_bytes(b"PAR1 not really")
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "history" / "part-foreign-000000.parquet")
    with pytest.warns(UserWarning) as rec:
        df = read_history(tmp_path)
    text = " ".join(str(w.message) for w in rec)
    assert "part-bad-000000.parquet" in text and "part-foreign-000000.parquet" in text
    assert df["value"].tolist() == [1.5]
