"""Monitor: schedule, host transfers, history schema, lifecycle, bad input, micro-batch reduction."""

from __future__ import annotations

import copy
import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from stabilitylab import Monitor, sinks
from stabilitylab import metrics as M


def test_every_k_logs_steps_0_k_2k_and_returns_values_only_then(tiny_model, tiny_batch):
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    mon = Monitor(tiny_model, optimizer=opt, every=3)
    x, y = tiny_batch
    returned = []
    for _ in range(10):
        _, loss = tiny_model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        returned.append(mon.step(loss) is not None)
    mon.close()
    assert returned == [i % 3 == 0 for i in range(10)]
    assert sorted(mon.history()["step"].unique().tolist()) == [0, 3, 6, 9]


def test_start_step_offsets_the_schedule(tiny_model, tiny_batch):
    mon = Monitor(tiny_model, every=4, start_step=6, probes=["logits"])
    x, y = tiny_batch
    for _ in range(8):
        _, loss = tiny_model(x, y)
        mon.step(loss)
    mon.close()
    assert sorted(mon.history()["step"].unique().tolist()) == [8, 12]


_SYNC_METHODS = ("cpu", "item", "tolist", "numpy", "__float__", "__int__", "__bool__")


def _count_syncs(monkeypatch) -> Counter:
    counts: Counter = Counter()
    for name in _SYNC_METHODS:
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, _real=real, _name=name, **k):
            counts[_name] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return counts


def test_host_syncs_none_on_non_logged_steps_and_exactly_one_cpu_on_logged_steps(tiny_model, tiny_batch, train_loop,
                                                                                  monkeypatch):
    """Same loop with and without a Monitor: the Monitor's extra device->host calls are counted per step."""
    every, steps = 3, 7
    per_step: dict[str, list[Counter]] = {}
    for label in ("plain", "monitored"):
        model = copy.deepcopy(tiny_model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        mon = Monitor(model, optimizer=opt, every=every) if label == "monitored" else None
        with monkeypatch.context() as mp:
            counts = _count_syncs(mp)
            snaps: list[Counter] = []

            def on_step(i, where, counts=counts, snaps=snaps):
                if where == "start":
                    snaps.append(Counter(counts))
                else:
                    snaps[-1] = counts - snaps[-1]

            train_loop(model, opt, tiny_batch, steps, mon, before=lambda i: on_step(i, "start"),
                       after=lambda i: on_step(i, "end"))
        per_step[label] = snaps
        if mon is not None:
            mon.close()
    for i, (plain, monitored) in enumerate(zip(per_step["plain"], per_step["monitored"])):
        extra = monitored - plain
        if i % every:
            assert extra == Counter(), f"step {i}: host syncs on a non-logged step: {extra}"
        else:
            extra.pop("numpy", None)  # .cpu().numpy() of the transferred host tensor is no extra sync
            assert extra == Counter({"cpu": 1}), f"step {i}: expected one .cpu() transfer, got {extra}"


def test_non_logged_steps_never_collect(tiny_model, tiny_batch, train_loop, monkeypatch):
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    mon = Monitor(tiny_model, optimizer=opt, every=4)
    calls = []
    real = Monitor._log_step
    monkeypatch.setattr(Monitor, "_log_step", lambda self, *a: calls.append(a[0]) or real(self, *a))
    collects = []
    for p in mon.probes:
        real_collect = p.collect
        p.collect = lambda real_collect=real_collect, p=p: collects.append(p.name) or real_collect()
    train_loop(tiny_model, opt, tiny_batch, 9, mon)
    mon.close()
    assert calls == [0, 4, 8]
    assert len(collects) == 3 * len(mon.probes)


def test_history_is_tidy(tiny_model, tiny_batch, train_loop):
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    with Monitor(tiny_model, optimizer=opt, every=2, run_id="r1") as mon:
        train_loop(tiny_model, opt, tiny_batch, 4, mon)
    df = mon.history()
    assert list(df.columns) == ["run_id", "step", "metric", "module", "value", "wall_time"]
    assert (df["run_id"] == "r1").all()
    assert df["step"].dtype == np.int64 and df["value"].dtype == np.float64
    assert set(df["metric"]) <= set(M.METRICS)
    assert not df.duplicated(["step", "metric", "module"]).any()
    whole = df[df["metric"].isin([M.LOSS, M.GRAD_GLOBAL_NORM, M.LOGITS_LSE_MEAN, M.LR])]
    assert (whole["module"] == "").all() and len(whole) == 2 * 4
    per_block = df[df["metric"] == M.ACT_RMS]["module"]
    assert set(per_block) == {"blocks.0", "blocks.1"}
    assert set(df[df["metric"] == M.ATTN_MAX_LOGIT]["module"]) == {"blocks.0.attn", "blocks.1.attn"}
    assert np.isfinite(df["value"]).all()


def _hook_count(model, opt) -> int:
    n = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    n += sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters())
    return n + len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)


def test_context_manager_closes_detaches_and_close_twice_is_a_noop(tiny_model, tiny_batch, train_loop):
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    base = _hook_count(tiny_model, opt)
    with Monitor(tiny_model, optimizer=opt, every=1) as mon:
        assert _hook_count(tiny_model, opt) > base
        train_loop(tiny_model, opt, tiny_batch, 2, mon)
    assert _hook_count(tiny_model, opt) == base
    mon.close()
    mon.close()
    with pytest.raises(RuntimeError, match="closed"):
        mon.step(1.0)
    assert sorted(mon.history()["step"].unique()) == [0, 1]


@pytest.mark.parametrize("every", [0, -1, 1.5, True, "10"])
def test_bad_every_names_the_argument(tiny_model, every):
    with pytest.raises(ValueError, match="every"):
        Monitor(tiny_model, every=every)


def test_unknown_probe_name_is_named(tiny_model):
    with pytest.raises(ValueError, match="'nope'"):
        Monitor(tiny_model, probes=["logits", "nope"])
    with pytest.raises(ValueError, match="probes"):
        Monitor(tiny_model, probes="everything")


def test_optimizer_probe_without_optimizer_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="optimizer"):
        Monitor(tiny_model, probes=["optimizer"])


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)


def test_explicit_attention_probe_on_model_without_attention_names_record_qk():
    model = _MLP()
    with pytest.raises(ValueError, match="record_qk"):
        Monitor(model, probes=["activations", "attention"])
    # a failed construction leaves no hooks behind
    assert all(not m._forward_hooks for m in model.modules())


def test_default_probes_on_model_without_attention_warn_once_and_still_log():
    model = _MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="record_qk"):
        mon = Monitor(model, optimizer=opt, every=1)
    assert "attention" not in [p.name for p in mon.probes]
    x = torch.randn(5, 4)
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    vals = mon.step(loss)
    mon.close()
    assert vals[(M.LOSS, "")] == pytest.approx(loss.item())


def test_unwritable_parquet_path_is_a_value_error_naming_the_path(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    bad = blocker / "sub"
    with pytest.raises(ValueError, match="a_file"):
        sinks.Parquet(bad)


@pytest.mark.parametrize("bad", [object(), "runs/x", [sinks.Memory(), 3]])
def test_sinks_of_the_wrong_type_are_a_type_error(tiny_model, bad):
    with pytest.raises(TypeError, match="sinks"):
        Monitor(tiny_model, sinks=bad)


def test_model_of_the_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match="model"):
        Monitor(lambda x: x)


def test_microbatches_reduce_max_as_max_and_means_token_weighted(tiny_model, tiny_cfg):
    """Two forwards of different sizes within one logged step vs statistics over all tokens."""
    g = torch.Generator().manual_seed(3)
    xs = [torch.randint(0, 256, (b, t), generator=g) for b, t in ((1, 5), (3, tiny_cfg.seq_len))]
    blocks_out: dict[str, list[torch.Tensor]] = {"blocks.0": [], "blocks.1": []}
    hooks = [tiny_model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: blocks_out[n].append(o.detach().double())) for n in blocks_out]
    mon = Monitor(tiny_model, every=1, probes=["logits", "activations"])
    logits = [tiny_model(x)[0].detach().double() for x in xs]
    vals = mon.step(None)
    mon.close()
    for h in hooks:
        h.remove()
    lse = torch.cat([torch.logsumexp(z, -1).reshape(-1) for z in logits])
    assert vals[(M.LOGITS_LSE_MEAN, "")] == pytest.approx(lse.mean().item(), rel=1e-5)
    assert vals[(M.LOGITS_MAX, "")] == pytest.approx(max(z.max().item() for z in logits), rel=1e-6)
    stds = [torch.logsumexp(z, -1).reshape(-1).std().item() for z in logits]
    ntok = [z[..., 0].numel() for z in logits]
    assert vals[(M.LOGITS_LSE_STD, "")] == pytest.approx(np.average(stds, weights=ntok), rel=1e-4)
    for name, outs in blocks_out.items():
        flat = torch.cat([o.reshape(-1) for o in outs])
        assert vals[(M.ACT_RMS, name)] == pytest.approx(flat.pow(2).mean().sqrt().item(), rel=1e-5)


def test_loss_is_recorded_as_given(tiny_model):
    mon = Monitor(tiny_model, every=1, probes=[])
    assert mon.step(torch.tensor(2.5))[(M.LOSS, "")] == 2.5
    assert mon.step(3.25)[(M.LOSS, "")] == 3.25
    assert math.isnan(mon.step(float("nan"))[(M.LOSS, "")])
    mon.close()
    assert isinstance(mon.history(), pd.DataFrame) and len(mon.history()) == 3


def test_keep_history_int_keeps_last_steps_and_false_reads_parquet(tiny_model, tmp_path):
    mon = Monitor(tiny_model, every=1, probes=[], keep_history=2)
    for i in range(5):
        mon.step(float(i))
    assert mon.history()["step"].tolist() == [3, 4]
    mon.close()
    pq = sinks.Parquet(tmp_path / "h")
    mon = Monitor(tiny_model, every=1, probes=[], keep_history=False, sinks=[pq], run_id="only")
    for i in range(3):
        mon.step(float(i))
    mon.close()
    assert mon.history()["value"].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(RuntimeError, match="keep_history"):
        Monitor(tiny_model, every=1, probes=[], keep_history=False).history()


def test_set_step_arms_exactly_the_logged_steps_and_the_next_step_logs_that_number():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    mon = Monitor(model, every=3, probes=["activations"], start_step=1)
    assert all(not p.armed for p in mon.probes)  # step 1 is not logged
    assert mon.set_step(6) is True and all(p.armed for p in mon.probes)
    model(torch.randn(2, 4))
    vals = mon.step(1.5)
    assert vals is not None and mon.history()["step"].unique().tolist() == [6]
    assert mon.step_count == 7 and all(not p.armed for p in mon.probes)
    assert mon.set_step(8) is False and all(not p.armed for p in mon.probes)
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="set_step"):
            mon.set_step(bad)
    mon.close()
    with pytest.raises(RuntimeError, match="closed"):
        mon.set_step(9)
