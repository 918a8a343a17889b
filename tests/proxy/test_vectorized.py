"""train_many: K proxies as one batched model must reproduce train_one member by member."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from stabilitylab.proxy import ProxyConfig, TrainConfig, train_one
from stabilitylab.proxy.vectorized import group_compatible, train_many

TINY = dict(d_model=32, n_layers=2, head_dim=16, seq_len=16)
MONITORED = ["loss", "lr", "grad.global_norm", "logits.lse_mean", "logits.lse_std", "logits.max",
             "attn.max_logit", "attn.entropy"]


def _cfg(lr: float, seed: int = 0, steps: int = 30, model: dict | None = None, **kw) -> TrainConfig:
    return TrainConfig(model=ProxyConfig(**{**TINY, **(model or {})}), lr=lr, seed=seed, steps=steps,
                       batch_size=4, eval_batches=2, warmup_steps=5, check_every=5, **kw)


def _assert_same_run(vec, seq):
    assert vec.diverged == seq.diverged and vec.status == seq.status
    assert vec.steps_done == seq.steps_done
    assert vec.n_params == seq.n_params
    assert vec.init_loss == pytest.approx(seq.init_loss, rel=1e-6)
    v, s = np.array(vec.train_loss), np.array(seq.train_loss)
    assert v.shape == s.shape
    np.testing.assert_array_equal(np.isfinite(v), np.isfinite(s))
    if not seq.diverged:
        assert vec.final_loss == pytest.approx(seq.final_loss, rel=1e-5)
        np.testing.assert_allclose(v, s, rtol=1e-5)
    else:
        assert math.isnan(vec.final_loss) == math.isnan(seq.final_loss)


def test_members_match_sequential_runs_and_a_diverging_member_is_masked():
    # lr 1e6 turns the loss non-finite within a few steps; the others must not notice.
    configs = [_cfg(1e-3), _cfg(3e-2), _cfg(1e6), _cfg(1e-2, seed=1)]
    results = train_many(configs, monitor_every=5, run_ids=["a", "b", "c", "d"])
    for cfg, vec, rid in zip(configs, results, "abcd"):
        seq = train_one(cfg, monitor={"every": 5, "run_id": rid})
        _assert_same_run(vec, seq)
        if seq.diverged:
            continue
        h = vec.history
        assert list(h.columns) == list(seq.history.columns)
        assert set(h["run_id"]) == {rid}
        assert sorted(h["step"].unique()) == list(range(0, cfg.steps, 5))
        assert set(h["metric"]) == set(MONITORED)
        assert set(h.loc[h["metric"] == "attn.max_logit", "module"]) == {"blocks.0.attn", "blocks.1.attn"}
        both = h.merge(seq.history, on=["step", "metric", "module"], suffixes=("_vec", "_seq"))
        assert len(both) == len(h)  # every record has its Monitor twin
        np.testing.assert_allclose(both["value_vec"], both["value_seq"], rtol=1e-4, atol=1e-6)
    diverged = results[2]
    assert diverged.diverged and diverged.steps_done < configs[2].steps
    assert diverged.history["step"].max() < diverged.steps_done


def test_diverging_member_leaves_the_others_bit_for_bit_close():
    healthy = [_cfg(1e-3, steps=12), _cfg(1e-2, steps=12)]
    alone = train_many(healthy, monitor_every=None)
    mixed = train_many([healthy[0], _cfg(1e9, steps=12), healthy[1]], monitor_every=None)
    assert mixed[1].diverged and not math.isfinite(mixed[1].train_loss[-1])
    for a, m in zip(alone, [mixed[0], mixed[2]]):
        assert m.history is None
        assert not m.diverged
        assert m.final_loss == pytest.approx(a.final_loss, rel=1e-6)
        np.testing.assert_allclose(m.train_loss, a.train_loss, rtol=1e-6)


@pytest.mark.parametrize("model,train", [
    (dict(qk_layernorm=True, z_loss=1e-3, tie_embeddings=True, mup=True, attn_scale="linear"),
     dict(mup_lr_scaling=True, weight_decay=0.1)),
    (dict(attn_softcap=5.0, logit_softcap=3.0, use_sdpa=False),
     dict(independent_wd=False, weight_decay=0.1, clip=None, eps=1e-6, beta1=0.8, beta2=0.99, min_lr=1e-4)),
])
def test_mitigation_switches_and_optimizer_settings_match_sequential(model, train):
    configs = [_cfg(lr, steps=10, model=model, **train) for lr in (3e-3, 3e-2)]
    for cfg, vec in zip(configs, train_many(configs, monitor_every=None)):
        _assert_same_run(vec, train_one(cfg))


def test_group_compatible_splits_on_every_field_but_lr_and_seed():
    configs = [_cfg(1e-3), _cfg(1e-2, seed=3), _cfg(1e-3, steps=20), _cfg(1e-3, model={"qk_layernorm": True}),
               _cfg(5e-3, seed=1, steps=20), _cfg(1e-1, model={"qk_layernorm": True})]
    assert group_compatible(configs) == [[0, 1], [2, 4], [3, 5]]
    assert group_compatible([]) == []


def test_incompatible_configs_raise_naming_the_field():
    with pytest.raises(ValueError, match=r"configs\[1\]\.steps=20"):
        train_many([_cfg(1e-3), _cfg(1e-2, steps=20)])
    with pytest.raises(ValueError, match=r"configs\[1\]\.model\.qk_layernorm=True"):
        train_many([_cfg(1e-3), _cfg(1e-2, model={"qk_layernorm": True})])
    with pytest.raises(ValueError, match="optimizer='adam_atan2'"):
        train_many([_cfg(1e-3, optimizer="adam_atan2")])
    with pytest.raises(ValueError, match="monitor_every=0"):
        train_many([_cfg(1e-3)], monitor_every=0)
    with pytest.raises(ValueError, match="run_ids"):
        train_many([_cfg(1e-3), _cfg(1e-2)], run_ids=["only-one"])
    with pytest.raises(ValueError, match="non-empty"):
        train_many([])
    with pytest.raises(TypeError, match=r"configs\[0\]"):
        train_many([{"lr": 1e-3}])


def test_history_default_run_id_is_empty_and_frames_concatenate():
    res = train_many([_cfg(1e-3, steps=4), _cfg(2e-3, steps=4)], monitor_every=2)
    frames = pd.concat([r.history for r in res], ignore_index=True)
    assert set(frames["run_id"]) == {""}
    assert sorted(frames["step"].unique()) == [0, 2]
    assert frames["value"].notna().all()


@pytest.mark.parametrize("field, value", [("lr_schedule", "0:1,10:2"), ("data_switch_step", 5),
                                          ("freeze_until", 5), ("optimizer", "adam_atan2")])
def test_train_many_refuses_what_it_does_not_implement_naming_the_field(field, value):
    cfg = _cfg(1e-3, steps=4, **{field: value})
    with pytest.raises(ValueError, match=f"{field}=.*use train_one"):
        train_many([cfg])


def test_vectorized_sweep_trains_a_scheduled_point_one_at_a_time_like_local(tmp_path):
    from stabilitylab.sweeps import SweepSpec, sweep

    spec = SweepSpec(name="sched", sizes=["xs"], lrs=[1e-3, 3e-3], steps=6, batch_size=2, seq_len=8,
                     every=3, train={"lr_schedule": "0:0.5,3:1"})
    vec = sweep(spec, executor="vectorized", store=tmp_path / "vec", progress=False)
    loc = sweep(spec, executor="local", store=tmp_path / "loc", progress=False)
    a = vec.set_index("run_id")["final_loss"].sort_index()
    b = loc.set_index("run_id")["final_loss"].sort_index()
    pd.testing.assert_series_equal(a, b)
