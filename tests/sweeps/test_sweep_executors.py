"""Executors give the same results as ``local``; the train_fn contract; clear errors for missing extras."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
import torch

from stabilitylab.proxy import RunResult, train_one
from stabilitylab.sweeps import SweepSpec, load_sweep, sweep


def _same_results(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a["run_id"]) == list(b["run_id"])
    np.testing.assert_allclose(a["final_loss"], b["final_loss"], rtol=1e-6)
    np.testing.assert_allclose(a["init_loss"], b["init_loss"], rtol=1e-6)
    assert list(a["status"]) == list(b["status"]) and list(a["n_params"]) == list(b["n_params"])


@pytest.fixture
def grid(tiny):
    return SweepSpec(name="ex", lrs=[3e-3, 3e-1], seeds=[0, 1], **tiny)


@pytest.fixture
def local_runs(grid, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each of 2 workers gets on a 2-core machine
    try:
        return sweep(grid, store=tmp_path / "local", progress=False)
    finally:
        torch.set_num_threads(threads)


def test_processes_match_local(grid, local_runs, tmp_path):
    runs = sweep(grid, executor="processes", workers=2, store=tmp_path / "proc", progress=False)
    _same_results(runs, local_runs)
    assert len(set(runs["seed"])) == 2 and runs["final_loss"].nunique() == 4
    hist = load_sweep(tmp_path / "proc")[1]
    ref = load_sweep(tmp_path / "local")[1]
    cols = ["run_id", "step", "metric", "module"]
    m = hist.merge(ref, on=cols, suffixes=("", "_ref"))
    assert len(m) == len(ref) == len(hist)
    np.testing.assert_allclose(m["value"], m["value_ref"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ray_matches_local(grid, local_runs, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        runs = sweep(grid, executor="ray", store=tmp_path / "ray", progress=False)
    finally:
        ray.shutdown()
    _same_results(runs, local_runs)


def test_processes_need_a_picklable_train_fn(grid, tmp_path):
    with pytest.raises(TypeError, match="must be picklable"):
        sweep(grid, executor="processes", workers=2, store=tmp_path, train_fn=lambda c, m: 0.0, progress=False)


def test_missing_ray_says_how_to_install(grid, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'stabilitylab\[ray\]'"):
        sweep(grid, executor="ray", store=tmp_path, progress=False)


def test_unknown_executor_and_bad_workers(grid, tmp_path):
    with pytest.raises(ValueError, match="executor='dask'"):
        sweep(grid, executor="dask", store=tmp_path)
    with pytest.raises(ValueError, match="workers=0"):
        sweep(grid, executor="processes", workers=0, store=tmp_path)


def test_vectorized_matches_local(grid, local_runs, tmp_path):
    runs = sweep(grid, executor="vectorized", store=tmp_path / "vec", progress=False)
    _same_results(runs, local_runs)
    hist = load_sweep(tmp_path / "vec")[1]
    assert set(hist["run_id"]) == set(runs["run_id"])
    assert {"loss", "grad.global_norm", "attn.max_logit"} <= set(hist["metric"])


def test_vectorized_groups_points_by_compatible_config(tiny, tmp_path, monkeypatch):
    import stabilitylab.proxy.vectorized as vec

    calls = []
    real = vec.train_many

    def train_many(configs, **kw):
        calls.append([c.model.to_dict() for c in configs])
        return real(configs, **kw)

    monkeypatch.setattr(vec, "train_many", train_many)
    spec = SweepSpec(name="vec", lrs=[1e-2, 1e-1], variants=["baseline", "qk_layernorm"], **tiny)
    runs = sweep(spec, executor="vectorized", store=tmp_path, progress=False)
    assert len(calls) == 2 and all(len(c) == 2 and c[0] == c[1] for c in calls)
    for p, row in zip(spec.points(), runs.itertuples()):
        assert row.final_loss == pytest.approx(train_one(p.config).final_loss, rel=1e-5)


class _Regressor(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))

    def forward(self, x):
        return self.net(x)


def test_train_fn_contract_dict_float_runresult_and_bad_returns(tiny, tmp_path):
    seen = {}

    def train_fn(config, monitor):
        torch.manual_seed(config.seed)
        model = _Regressor(config.model.d_model)
        opt = torch.optim.SGD(model.parameters(), lr=config.lr)
        mon = monitor(model, opt)
        x = torch.randn(32, 4)
        y = x.sum(1, keepdim=True)
        init = float(torch.nn.functional.mse_loss(model(x), y).detach())
        for _ in range(config.steps):
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            mon.step(loss)
        seen[config.lr] = sum(p.numel() for p in model.parameters())
        if config.lr == 0.03:
            return float(loss.detach())
        if config.lr == 0.04:
            return train_one(config.__class__(**{**config.__dict__, "lr": 0.01}))
        if config.lr == 0.05:
            return [1.0]
        return {"final_loss": float(loss.detach()), "init_loss": init, "accuracy": 0.5, "note": "x"}

    spec = SweepSpec(name="fn", lrs=[0.01, 0.03, 0.04, 0.05], probes=["optimizer", "health"], **tiny)
    with pytest.warns(UserWarning, match="1 of 4 runs failed"):
        runs = sweep(spec, store=tmp_path, train_fn=train_fn, progress=False)
    r = runs.set_index("lr")
    width = spec.points()[0].config.model.d_model
    assert r.loc[0.01, "n_params"] == seen[0.01] == 4 * width + width + width + 1
    assert r.loc[0.01, "accuracy"] == 0.5 and r.loc[0.01, "note"] == "x" and r.loc[0.01, "status"] == "ok"
    assert r.loc[0.01, "steps_done"] == spec.steps and not r.loc[0.01, "diverged"]
    assert np.isnan(r.loc[0.03, "init_loss"]) and np.isfinite(r.loc[0.03, "final_loss"])
    assert r.loc[0.04, "status"] in ("ok", "diverged") and r.loc[0.04, "steps_done"] == spec.steps
    assert r.loc[0.05, "status"] == "failed" and "TypeError: train_fn returned list" in r.loc[0.05, "error"]
    history = load_sweep(tmp_path)[1]
    h = history[history["run_id"] == r.loc[0.01, "run_id"]]
    steps = sorted(set(h["step"]))
    assert steps == list(range(0, spec.steps, spec.every))
    assert {"loss", "grad.global_norm"} <= set(h["metric"])


def test_train_fn_diverged_rule_and_runresult(tiny, tmp_path):
    def train_fn(config, monitor):
        if config.lr > 0.5:
            return {"final_loss": float("nan"), "init_loss": 5.0, "steps_done": 3}
        if config.lr > 0.05:
            return {"final_loss": 6.0, "init_loss": 5.0}
        return RunResult(final_loss=1.0, init_loss=5.0, diverged=False, steps_done=7, status="ok", n_params=11,
                         wall_time=0.0)

    spec = SweepSpec(name="div", lrs=[0.01, 0.1, 1.0], **tiny)
    r = sweep(spec, store=tmp_path, train_fn=train_fn, progress=False).set_index("lr")
    assert r["status"].tolist() == ["ok", "diverged", "diverged"]
    assert r["steps_done"].tolist() == [7, spec.steps, 3] and r.loc[0.01, "n_params"] == 11
