"""One table of every probe and every sink drives the same contract checks (composer style)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from stabilitylab import Monitor, sinks
from stabilitylab import metrics as M
from stabilitylab.probes import REGISTRY, _lazy_registry

_lazy_registry()
PROBES = sorted(REGISTRY)
SINKS = {
    "memory": lambda tmp: sinks.Memory(),
    "parquet": lambda tmp: sinks.Parquet(tmp / "pq", flush_records=1),
    "console": lambda tmp: sinks.Console(io.StringIO()),
    "null": lambda tmp: sinks.Null(),
    "tensorboard": lambda tmp: sinks.TensorBoard(tmp / "tb"),
}


def _hooks(model, opt) -> int:
    n = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    n += sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters())
    return n + len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)


def _train(model, opt, batch, mon, steps=4):
    for _ in range(steps):
        _, loss = model(*batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        mon.step(loss)


def _check_tidy(df, probe_metrics=None):
    assert list(df.columns) == ["run_id", "step", "metric", "module", "value", "wall_time"]
    assert df["step"].dtype == np.int64 and df["value"].dtype == np.float64
    assert set(df["metric"]) <= set(M.METRICS)
    assert all(isinstance(m, str) for m in df["module"])
    assert sorted(df["step"].unique()) == [0, 2]
    if probe_metrics is not None:
        assert set(df["metric"]) - {M.LOSS} <= set(probe_metrics) | {M.HEALTH_NONFINITE, M.HEALTH_SPIKE}
        assert set(df["metric"]) - {M.LOSS}, "the probe recorded nothing"


@pytest.mark.parametrize("name", PROBES)
def test_probe_contract(name, tiny_model, tiny_batch):
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    base = _hooks(tiny_model, opt)
    probe = REGISTRY[name]()
    assert probe.name == name and probe.metrics and set(probe.metrics) <= set(M.METRICS)
    probe.attach(tiny_model, opt)
    n = _hooks(tiny_model, opt)
    probe.attach(tiny_model, opt)  # idempotent
    assert _hooks(tiny_model, opt) == n
    probe.detach()
    probe.detach()
    assert _hooks(tiny_model, opt) == base and not probe.attached
    with torch.no_grad():
        before = [p.clone() for p in tiny_model.parameters()]
    mon = Monitor(tiny_model, optimizer=opt, every=2, probes=[probe])
    _train(tiny_model, opt, tiny_batch, mon)
    mon.close()
    mon.close()
    assert _hooks(tiny_model, opt) == base
    _check_tidy(mon.history(), probe.metrics)
    # probes never change training: same parameters as an unmonitored copy trained identically
    ref = type(tiny_model)(tiny_model.cfg)
    with torch.no_grad():
        for p, b in zip(ref.parameters(), before):
            p.copy_(b)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    for _ in range(4):
        _, loss = ref(*tiny_batch)
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for p, q in zip(tiny_model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(SINKS))
def test_sink_contract(name, tiny_model, tiny_batch, tmp_path):
    sink = SINKS[name](tmp_path)
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    with Monitor(tiny_model, optimizer=opt, every=2, sinks=[sink], run_id="c") as mon:
        _train(tiny_model, opt, tiny_batch, mon)
    sink.close()
    sink.close()
    hist = mon.history()
    _check_tidy(hist)
    if isinstance(sink, sinks.Memory):
        assert len(sink.to_frame()) == len(hist)
    if isinstance(sink, sinks.Parquet):
        assert len(sinks.read_history(sink.path)) == len(hist)
    if isinstance(sink, sinks.Console):
        assert len(sink.stream.getvalue().splitlines()) >= 2
