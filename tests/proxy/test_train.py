"""train_one: init loss, steps, determinism, divergence marking, monitors, config validation."""

from __future__ import annotations

import math

import pytest
import torch

from stabilitylab.proxy import ByteData, ProxyConfig, ProxyTransformer, TrainConfig, evaluate, train_one

TINY = dict(d_model=16, n_layers=1, head_dim=8, seq_len=8)


def _cfg(**kw):
    base = dict(model=ProxyConfig(**TINY), lr=1e-2, steps=12, batch_size=4, eval_batches=2, warmup_steps=2,
                check_every=1)
    return TrainConfig(**{**base, **kw})


def test_ok_run_reports_init_loss_steps_and_is_deterministic():
    cfg = _cfg()
    r = train_one(cfg)
    torch.manual_seed(cfg.seed)
    fresh = ProxyTransformer(cfg.model)
    assert r.init_loss == pytest.approx(evaluate(fresh, ByteData(cfg.model.seq_len), cfg), rel=1e-6)
    assert abs(r.init_loss - math.log(256)) < 1.5
    assert (r.steps_done, r.diverged, r.status) == (12, False, "ok")
    assert math.isfinite(r.final_loss) and r.final_loss < r.init_loss
    assert len(r.train_loss) == 12 and r.n_params == fresh.n_params()
    assert train_one(cfg).final_loss == r.final_loss
    row = r.to_row()
    assert set(row) >= {"final_loss", "init_loss", "diverged", "steps_done", "status", "n_params"}


def test_non_finite_loss_stops_the_run_and_marks_divergence():
    r = train_one(_cfg(lr=1e30, clip=None, warmup_steps=0, steps=20))
    assert r.diverged and r.status == "diverged"
    assert r.steps_done < 20
    assert math.isnan(r.final_loss) and math.isfinite(r.init_loss)
    assert not math.isfinite(r.train_loss[-1])


def test_finite_loss_above_init_loss_is_divergence():
    r = train_one(_cfg(lr=50.0, warmup_steps=0))
    assert r.steps_done == 12
    assert math.isfinite(r.final_loss) and r.final_loss > r.init_loss
    assert r.diverged and r.status == "diverged"


def test_monitor_as_dict_or_factory_records_history_and_is_closed():
    r = train_one(_cfg(steps=6), monitor={"every": 2, "run_id": "t"})
    assert sorted(r.history["step"].unique()) == [0, 2, 4]
    assert set(r.history["run_id"]) == {"t"}
    made = []

    def factory(model, opt):
        from stabilitylab import Monitor

        made.append(Monitor(model, optimizer=opt, every=3, probes=["optimizer"]))
        return made[0]

    r = train_one(_cfg(steps=6), monitor=factory)
    assert made[0]._closed and sorted(r.history["step"].unique()) == [0, 3]
    with pytest.raises(TypeError, match="monitor"):
        train_one(_cfg(steps=1), monitor=42)


@pytest.mark.parametrize("field, value", [
    ("lr", 0.0), ("lr", float("nan")), ("lr", -1e-3), ("steps", 0), ("batch_size", 1.5), ("eval_batches", 0),
    ("check_every", 0), ("warmup_steps", -1), ("weight_decay", -0.1), ("eps", -1e-8), ("min_lr", -1.0),
    ("beta1", 1.0), ("beta2", 1.5), ("clip", 0.0), ("optimizer", "sgd")])
def test_bad_train_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_model_as_dict_and_bad_model_or_config_type():
    assert TrainConfig(model=dict(TINY)).model == ProxyConfig(**TINY)
    with pytest.raises(TypeError, match="model"):
        TrainConfig(model="xxs")
    with pytest.raises(TypeError, match="TrainConfig"):
        train_one({"lr": 1e-2})
