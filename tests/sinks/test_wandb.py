"""W&B sink: what an offline run file holds equals the Monitor's own history (read back, CRC-checked)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import stabilitylab as sl
from stabilitylab import metrics as M
from stabilitylab.probes.base import Event
from stabilitylab.sinks.wandb import WandB
from stabilitylab.studies.sweep_summary import log_sweep_summary

STEP = "stabilitylab/step"




def _expected_rows(history: pd.DataFrame, max_modules: int | None) -> dict[int, dict[str, float]]:
    """Independent construction of the W&B rows from the tidy history (the documented key scheme)."""
    rows: dict[int, dict[str, float]] = {}
    for (step, metric), g in history.groupby(["step", "metric"]):
        row = rows.setdefault(int(step), {STEP: int(step)})
        named = g[g["module"] != ""]
        for v in g.loc[g["module"] == "", "value"]:
            row[f"{metric}/model"] = v
        if max_modules is None or len(named) <= max_modules:
            row.update({f"{metric}/{m}": v for m, v in zip(named["module"], named["value"])})
        if len(named):
            how = M.METRICS[metric].summary
            row[f"{metric}/{how}"] = float(getattr(named["value"], how)(skipna=True))
    return rows


def _ours(row: dict) -> dict:
    """The keys of a W&B row that the sink wrote: ``<metric>/...`` and the step metric."""
    return {k: v for k, v in row.items() if k.split("/")[0] in M.METRICS or k == STEP}


def _assert_rows_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))
    for k, v in want.items():
        g = got[k]
        if isinstance(v, float) and math.isnan(v):
            assert isinstance(g, float) and math.isnan(g), k
        else:
            assert g == pytest.approx(v, rel=1e-12, abs=0), k


def test_offline_run_holds_monitor_history_keys_steps_config_events(train_monitored, wandb_offline, tiny_model, tiny_batch):
    sink = WandB(project="t", group="sweep-a", max_modules=3)
    mon = train_monitored(tiny_model, tiny_batch, 5, every=2, sinks=[sink], run_id="r-1", config={"lr": 1e-3, "size": "xs"})
    events = [Event("r-1", 4, "loss_spike", "", 9.0, "spike one"), Event("r-1", 4, "nonfinite", "grad", 3.0, "3 nan"),
              Event("r-1", 4, "loss_spike", "", 11.0, "spike two")]
    mon.emit(events)
    hist = mon.history()
    mon.close()

    (run,) = wandb_offline()
    assert run["run"].run_group == "sweep-a" and run["run"].display_name == "r-1"
    cfg = run["config"]["stabilitylab"]
    assert (cfg["every"], cfg["run_id"], cfg["lr"], cfg["size"]) == (2, "r-1", 1e-3, "xs")
    assert cfg["n_params"] == sum(p.numel() for p in tiny_model.parameters())

    want = _expected_rows(hist, max_modules=3)
    got = [_ours(r) for r in run["history"] if STEP in r]
    assert [r[STEP] for r in got] == [0, 2, 4] == sorted(want)
    for row in got:
        _assert_rows_equal(row, want[row[STEP]])
    # per-tensor metrics of this model have > 3 modules: summary only; 2 attention layers: both series
    assert "grad.rms/max" in got[0] and not any(k.startswith("grad.rms/wte") for k in got[0])
    assert {"attn.max_logit/blocks.0.attn", "attn.max_logit/blocks.1.attn", "attn.entropy/min"} <= set(got[0])

    defined = {m.get("glob_name") or m.get("name"): m for m in run["metrics"]}
    assert defined[STEP]["options"].get("hidden") is True
    for metric in hist["metric"].unique():
        assert defined[f"{metric}/*"]["step_metric"] == STEP, metric
    # run summary (runs table, parallel coordinates): the peak as the metric declares it, and the last value
    assert defined["attn.max_logit/*"]["summary"] == {"max": True, "last": True}
    assert defined["attn.entropy/*"]["summary"] == {"min": True, "last": True}
    assert "summary" not in defined["loss/*"]

    assert [(a["title"], a["level"]) for a in run["alerts"]] == [
        ("stabilitylab: loss_spike", "WARN"), ("stabilitylab: nonfinite", "ERROR")]
    table = json.load(open(f"{run['run_dir']}/files/{run['summary']['stabilitylab/events/path']}"))
    assert table["columns"] == ["run_id", "step", "kind", "module", "value", "message"]
    assert table["data"] == [[e.run_id, e.step, e.kind, e.module, e.value, e.message] for e in events]


def test_reuses_active_run_and_coexists_with_user_logging(wandb_offline, tiny_model, tiny_batch):
    import wandb

    user_run = wandb.init(project="t", name="user", config={"batch_size": 4})
    x, y = tiny_batch
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    mon = sl.Monitor(tiny_model, optimizer=opt, every=3, probes=["optimizer"], sinks=[WandB(project="ignored")])
    for s in range(7):
        _, loss = tiny_model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        wandb.log({"train/loss": loss.item()}, step=s)  # the user's own explicit steps
        mon.step(loss)
    hist = mon.history()
    mon.close()
    assert wandb.run is user_run  # the sink did not finish a run it did not start
    user_run.finish()

    (run,) = wandb_offline()
    assert run["run"].display_name == "user"
    assert run["config"]["batch_size"] == 4 and run["config"]["stabilitylab"]["every"] == 3
    assert [r["_step"] for r in run["history"] if "train/loss" in r] == list(range(7))  # none dropped
    want = _expected_rows(hist, max_modules=128)
    got = [_ours(r) for r in run["history"] if STEP in r and "grad.global_norm/model" in r]
    assert [r[STEP] for r in got] == [0, 3, 6]
    for row in got:
        _assert_rows_equal(row, want[row[STEP]])


def test_wandb_init_failure_warns_once_and_parquet_keeps_everything(train_monitored, wandb_offline, monkeypatch, tmp_path,
                                                                     tiny_model, tiny_batch):
    import wandb

    def refuse(*args, **kwargs):
        raise wandb.errors.CommError("W&B is unreachable")

    monkeypatch.setattr(wandb, "init", refuse)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = train_monitored(tiny_model, tiny_batch, 4, every=1, sinks=[sl.sinks.Parquet(tmp_path / "pq"), WandB()])
        mon.emit([Event(mon.run_id, 3, "loss_spike", "", 1.0, "x")])
        mon.close()
    ours = [w for w in caught if "stabilitylab" in str(w.message)]
    assert len(ours) == 1 and "WandB" in str(ours[0].message) and "unreachable" in str(ours[0].message)
    assert mon.step_count == 4
    cols = ["step", "metric", "module", "value"]
    key = ["step", "metric", "module"]
    pq = sl.sinks.read_history(tmp_path / "pq")[cols].sort_values(key).reset_index(drop=True)
    mem = mon.history()[cols].sort_values(key).reset_index(drop=True)
    assert len(mem) > 0 and sorted(mem["step"].unique()) == [0, 1, 2, 3]
    pd.testing.assert_frame_equal(pq, mem)
    assert wandb_offline() == []


def test_log_sweep_summary_logs_runs_sensitivity_tables_and_figures(wandb_offline, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = [1e-3, 3e-3, 1e-2]
    runs = pd.DataFrame({"lr": lrs * 2, "size": ["xs"] * 3 + ["s"] * 3,
                         "final_loss": [3.0, 2.5, np.nan, 2.8, 2.2, 4.0], "init_loss": [5.5] * 6,
                         "diverged": [False, False, True, False, False, False]})
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    path = tmp_path / "curve.png"
    fig.savefig(path)
    out = log_sweep_summary(runs, {"lr_vs_loss": fig, "curve": path}, group="sweep-b")
    plt.close(fig)

    (run,) = wandb_offline()
    assert run["run"].run_group == "sweep-b" and run["run"].display_name == "sweep-b-summary"
    assert set(out["keys"]) == {"sweep/runs", "sweep/lr_sensitivity", "sweep/figures/lr_vs_loss",
                                "sweep/figures/curve"}
    summary = run["summary"]
    assert summary["sweep/figures/lr_vs_loss/_type"] == "image-file"
    assert summary["sweep/figures/curve/_type"] == "image-file"
    table = json.load(open(f"{run['run_dir']}/files/{summary['sweep/lr_sensitivity/path']}"))
    # independent: mean over the LR grid of min(L, L0) - min; NaN/diverged count as L0
    by_size = {row[table["columns"].index("size")]: row[table["columns"].index("lr_sensitivity")]
               for row in table["data"]}
    assert by_size["xs"] == pytest.approx(np.mean([3.0 - 2.5, 0.0, 5.5 - 2.5]))
    assert by_size["s"] == pytest.approx(np.mean([2.8 - 2.2, 0.0, 4.0 - 2.2]))
    assert out["lr_sensitivity"].shape[0] == 2


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="max_modules"):
        WandB(max_modules=-1)
    with pytest.raises(TypeError, match="run"):
        WandB(run=object())
    with pytest.raises(ValueError, match="no such image file"):
        from stabilitylab.sinks.wandb import log_figures

        log_figures({"x": "/nonexistent.png"}, run=_FakeRun())


class _FakeRun:
    def log(self, data):  # pragma: no cover - never reached: the path check fails first
        raise AssertionError
