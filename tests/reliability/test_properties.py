"""Bad input, property-based: every rejection is a ValueError/TypeError that names the argument."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stabilitylab as sl
from stabilitylab.analysis import lr_sensitivity
from stabilitylab.proxy import ProxyConfig, TrainConfig

ANY = st.one_of(st.none(), st.booleans(), st.integers(-3, 5), st.floats(allow_nan=True, allow_infinity=True),
                st.text(max_size=4), st.lists(st.integers(0, 2), max_size=2))
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))


def _accepts_or_names(fn, arg: str):
    try:
        return fn()
    except (ValueError, TypeError) as e:
        assert arg in str(e), f"error does not name {arg!r}: {e}"
        return None


@FAST
@given(arg=st.sampled_from(["every", "probes", "sinks", "keep_history", "start_step", "run_id",
                            "rank_zero_only", "config"]), value=ANY)
def test_monitor_options_are_accepted_or_rejected_by_name(arg, value):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = _accepts_or_names(lambda: sl.Monitor(model, optimizer=opt, probes=["optimizer", "health"], **{arg: value})
                            if arg != "probes" else sl.Monitor(model, optimizer=opt, probes=value), arg)
    if mon is not None:  # accepted values must also work for a few steps
        for _ in range(3):
            model(torch.ones(2, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
            mon.step(1.0)
        mon.close()


def _fields(cls, skip=()):
    return [f.name for f in dataclasses.fields(cls) if f.name not in skip]


@FAST
@given(data=st.data())
def test_proxy_config_fields_are_validated_by_name(data):
    name = data.draw(st.sampled_from(_fields(ProxyConfig)))
    value = data.draw(ANY)
    cfg = _accepts_or_names(lambda: ProxyConfig(**{name: value, "d_model": 16, "head_dim": 8, "seq_len": 8}
                                                if name not in ("d_model", "head_dim", "seq_len") else {name: value}),
                            name)
    if cfg is not None:  # an accepted config builds a model that runs
        from stabilitylab.proxy import ProxyTransformer

        if cfg.d_model * cfg.vocab_size * cfg.mlp_ratio * cfg.n_layers <= 1 << 20:
            logits, loss = ProxyTransformer(cfg)(torch.zeros(1, min(4, cfg.seq_len), dtype=torch.long),
                                                 torch.zeros(1, min(4, cfg.seq_len), dtype=torch.long))
            assert logits.shape[-1] == cfg.vocab_size


@FAST
@given(data=st.data())
def test_train_config_fields_are_validated_by_name(data):
    name = data.draw(st.sampled_from(_fields(TrainConfig, skip=("model", "data_path", "device"))))
    value = data.draw(ANY)
    _accepts_or_names(lambda: TrainConfig(**{name: value}), name)


_RUNS = st.lists(st.tuples(st.sampled_from([1e-3, 3e-3, 1e-2, float("nan")]),
                           st.floats(allow_nan=True, allow_infinity=True, width=32),
                           st.floats(0.5, 6.0), st.booleans()), max_size=8)


@FAST
@given(rows=_RUNS)
def test_lr_sensitivity_on_nan_empty_and_single_point_tables(rows):
    runs = pd.DataFrame(rows, columns=["lr", "final_loss", "init_loss", "diverged"])
    out = _accepts_or_names(lambda: lr_sensitivity(runs), "runs")
    good = runs[np.isfinite(runs["lr"].astype(float))]
    if good.empty:
        assert out is None  # nothing to measure is an error naming `runs`
        return
    assert out is not None and len(out) == 1
    s = float(out["lr_sensitivity"].iloc[0])
    assert math.isfinite(s) and s >= 0
    if good["lr"].nunique() == 1:
        assert s == 0.0


def test_lr_sensitivity_rejects_a_non_frame_and_bad_lr_range_by_name():
    with pytest.raises(TypeError, match="runs"):
        lr_sensitivity([{"lr": 1e-3, "final_loss": 3.0, "init_loss": 5.0}])
    runs = pd.DataFrame({"lr": [1e-3, 1e-2], "final_loss": [3.0, 4.0], "init_loss": [5.0, 5.0]})
    with pytest.raises(ValueError, match="lr_range"):
        lr_sensitivity(runs, lr_range=(1.0, 2.0))
    with pytest.raises(ValueError, match="lr_range"):
        lr_sensitivity(runs, lr_range=(1e-2, 1e-3))
