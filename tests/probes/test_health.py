"""Health probe: non-finite counts (params, grads, loss) and loss-spike events on synthetic losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stabilitylab import Monitor
from stabilitylab import metrics as M
from stabilitylab.probes.health import HealthProbe


def test_nan_injected_into_params_is_counted_and_emits_an_event(tiny_model):
    with torch.no_grad():
        tiny_model.blocks[0].mlp.c_fc.weight[0, :3] = float("nan")
        tiny_model.wte.weight[5, 0] = float("inf")
    events = []
    mon = Monitor(tiny_model, every=1, probes=["health"], on_event=events.append)
    vals = mon.step(1.0)
    mon.close()
    assert vals[(M.HEALTH_NONFINITE, "param")] == 4
    assert any(e.kind == "nonfinite" and e.module == "param" and e.value == 4 for e in events)


def test_nan_in_gradients_is_counted_before_clipping(tiny_model, tiny_batch):
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.0)
    w = tiny_model.blocks[1].attn.c_proj.weight
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask[:2, :5] = True
    h = w.register_hook(lambda g: g.masked_fill(mask, float("nan")))
    mon = Monitor(tiny_model, optimizer=opt, every=1, probes=["optimizer", "health"])
    _, loss = tiny_model(*tiny_batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(tiny_model.parameters(), 1.0)  # makes every grad NaN
    opt.step()
    vals = mon.step(loss)
    mon.close()
    h.remove()
    assert vals[(M.HEALTH_NONFINITE, "grad")] == 10
    assert math.isnan(vals[(M.GRAD_GLOBAL_NORM, "")])
    assert vals[(M.HEALTH_NONFINITE, "loss")] == 0


def _robust_z(history: list[float], loss: float) -> float:
    base = sorted(history)
    med = float(np.median(base))
    mad = float(np.median([abs(b - med) for b in base])) * 1.4826
    return (loss - med) / max(mad, 1e-3 * max(abs(med), 1e-8))


def test_loss_spike_event_on_a_synthetic_loss_sequence(tiny_model):
    rng = np.random.default_rng(0)
    losses = list(3.0 - 0.01 * np.arange(30) + 0.02 * rng.standard_normal(30))
    spike_at = 20
    losses[spike_at] = 5.0
    losses.append(float("nan"))
    window, thr = 10, 6.0
    events = []
    mon = Monitor(tiny_model, every=1, probes=[HealthProbe(window=window, z_threshold=thr, check_params=False)],
                  on_event=events.append)
    got = [mon.step(v) for v in losses]
    mon.close()
    kept: list[float] = []
    for step, loss in enumerate(losses[:-1]):
        z = _robust_z(kept[-window:], loss) if len(kept) >= 3 else 0.0
        expected = z if z > thr else 0.0
        assert got[step][(M.HEALTH_SPIKE, "")] == pytest.approx(expected, rel=1e-9), step
        kept.append(loss)
    assert got[spike_at][(M.HEALTH_SPIKE, "")] > thr
    spikes = [e for e in events if e.kind == "loss_spike"]
    assert [e.step for e in spikes] == [spike_at]
    nan_step = len(losses) - 1
    assert got[nan_step][(M.HEALTH_NONFINITE, "loss")] == 1
    assert any(e.kind == "nonfinite" and e.module == "loss" and e.step == nan_step for e in events)
    assert mon.events == events


def test_window_too_small_is_named():
    with pytest.raises(ValueError, match="window"):
        HealthProbe(window=2)
