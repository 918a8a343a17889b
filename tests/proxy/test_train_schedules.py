"""TrainConfig's benchmark knobs: piecewise-linear LR schedules, a data switch, freeze-then-unfreeze."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stabilitylab import Monitor
from stabilitylab.proxy import ProxyConfig, TrainConfig, train_one
from stabilitylab.proxy.model import ProxyTransformer
from stabilitylab.proxy.train import build_optimizer, build_scheduler, lr_knots, lr_knots_factor

TINY = dict(d_model=16, n_layers=1, head_dim=8, seq_len=16)


def test_lr_schedule_matches_numpy_interp_and_holds_outside_the_knots():
    text = "10:0.1,40:1,41:4,100:2"
    knots = lr_knots(text)
    xs, ys = zip(*knots)
    for s in range(0, 130):
        assert lr_knots_factor(s, knots) == pytest.approx(np.interp(s, xs, ys))
    cfg = TrainConfig(model=ProxyConfig(**TINY), lr=0.05, lr_schedule=text, steps=120)
    model = ProxyTransformer(cfg.model)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    for s in range(60):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * np.interp(s, xs, ys))
        opt.step()
        sched.step()


@pytest.mark.parametrize("bad", ["0:1,0:2", "5:1,2:1", "0:-1", "0-1", "a:b", "0:1,"])
def test_bad_lr_schedule_names_the_field(bad):
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule=bad)


def test_switch_and_freeze_fields_are_checked():
    with pytest.raises(ValueError, match="data_switch_step"):
        TrainConfig(data_switch_step=-1)
    with pytest.raises(ValueError, match="freeze_until"):
        TrainConfig(freeze_until=1.5)


def _run(**kw):
    seen = {}

    def factory(model, opt):
        seen["model"] = model
        return Monitor(model, optimizer=opt, every=1000, probes=[])

    res = train_one(TrainConfig(model=ProxyConfig(**TINY), batch_size=4, eval_batches=1, **kw), monitor=factory)
    return res, seen["model"]


def test_frozen_parameters_do_not_move_until_unfrozen():
    torch.manual_seed(3)
    init = ProxyTransformer(ProxyConfig(**TINY)).state_dict()
    _, frozen = _run(steps=30, seed=3, lr=1e-2, weight_decay=0.0, freeze_until=30, freeze_prefix="blocks.0.mlp")
    sd = frozen.state_dict()
    moved = {k for k in sd if not torch.equal(sd[k], init[k])}
    assert moved and not any(k.startswith("blocks.0.mlp") for k in moved)
    _, thawed = _run(steps=30, seed=3, lr=1e-2, weight_decay=0.0, freeze_until=20, freeze_prefix="blocks.0.mlp")
    assert not torch.equal(thawed.state_dict()["blocks.0.mlp.c_fc.weight"], init["blocks.0.mlp.c_fc.weight"])


def test_data_switch_remaps_bytes_from_the_switch_step_on():
    base, _ = _run(steps=80, seed=1, lr=1e-2)
    switched, _ = _run(steps=80, seed=1, lr=1e-2, data_switch_step=60)
    assert switched.train_loss[:60] == base.train_loss[:60]
    assert np.mean(switched.train_loss[60:70]) > np.mean(base.train_loss[60:70]) + 0.5
