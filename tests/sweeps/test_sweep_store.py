"""The store: resume after SIGKILL, failures recorded, different specs refused, corrupt files skipped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stabilitylab.cli import main
from stabilitylab.sweeps import SweepSpec, load_sweep, sweep, sweep_status
from stabilitylab.sweeps.cli import format_status


def _row_files(store: Path) -> dict[str, int]:
    """Run id -> mtime of each finished-run file (empty before the store exists)."""
    return {f.stem: f.stat().st_mtime_ns for f in (store / "runs").glob("*.parquet")} if store.is_dir() else {}


def test_resume_after_sigkill_runs_every_point_exactly_once(tmp_path, tiny):
    spec = SweepSpec(name="kill", lrs=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1], **{**tiny, "steps": 60})
    store = tmp_path / "store"
    code = ("import json, sys; from stabilitylab.sweeps import SweepSpec, sweep; "
            "sweep(SweepSpec.from_dict(json.loads(sys.argv[1])), store=sys.argv[2], progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(spec.to_dict()), str(store)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while len(_row_files(store)) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the sweep subprocess made no progress"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _row_files(store)
    assert 2 <= len(before) < len(spec), "the kill must land mid-sweep"
    status = sweep_status(store)
    assert (status["status"] == "missing").sum() == len(spec) - len(before)

    runs = sweep(spec, store=store, progress=False)
    after = _row_files(store)
    assert {k: after[k] for k in before} == before  # finished runs were skipped, not redone
    ids = [p.run_id for p in spec.points()]
    assert list(runs["run_id"]) == ids and set(after) == set(ids)
    assert (runs["status"] != "failed").all() and (runs["steps_done"] >= 1).all()
    all_runs, history = load_sweep(store)
    assert sorted(all_runs["run_id"]) == sorted(ids)
    assert set(history["run_id"]) == set(ids)
    assert not history.duplicated(["run_id", "step", "metric", "module"]).any()
    table = pd.read_parquet(store / "runs.parquet")
    assert sorted(table["run_id"]) == sorted(ids)


def test_failing_run_is_recorded_and_others_continue(tmp_path, tiny):
    calls = []

    def train_fn(config, monitor):
        calls.append(config.lr)
        if config.lr == 0.1:
            raise RuntimeError("boom at lr 0.1")
        return {"final_loss": 1.0 / config.lr, "init_loss": 200.0}

    spec = SweepSpec(name="fail", lrs=[0.01, 0.1, 1.0], **tiny)
    with pytest.warns(UserWarning, match="1 of 3 runs failed"):
        runs = sweep(spec, store=tmp_path, train_fn=train_fn, progress=False)
    assert calls == [0.01, 0.1, 1.0]
    bad = runs.set_index("lr").loc[0.1]
    assert bad["status"] == "failed" and "RuntimeError: boom at lr 0.1" in bad["error"]
    assert np.isnan(bad["final_loss"])
    ok = runs[runs["lr"] != 0.1]
    assert list(ok["status"]) == ["ok", "ok"] and np.allclose(ok["final_loss"], 1.0 / ok["lr"])
    assert list(ok["error"]) == ["", ""]
    text = format_status(sweep_status(tmp_path), str(tmp_path))
    assert "2 ok, 0 diverged, 1 failed, 0 missing" in text and "RuntimeError: boom at lr 0.1" in text

    sweep(spec, store=tmp_path, train_fn=train_fn, progress=False, retry_failed=False)
    assert calls == [0.01, 0.1, 1.0]  # nothing re-run
    with pytest.warns(UserWarning, match="1 of 1 runs failed"):
        sweep(spec, store=tmp_path, train_fn=train_fn, progress=False)
    assert calls == [0.01, 0.1, 1.0, 0.1]  # only the failed point is retried


def test_different_spec_refused_unless_extend(tmp_path, tiny):
    def train_fn(config, monitor):
        return float(config.lr)

    a = SweepSpec(name="a", lrs=[0.01, 0.1], **tiny)
    b = SweepSpec(name="a", lrs=[0.01, 0.2], **tiny)
    sweep(a, store=tmp_path, train_fn=train_fn, progress=False)
    with pytest.raises(ValueError, match=r"different spec.*differs in lrs.*extend=True"):
        sweep(b, store=tmp_path, train_fn=train_fn, progress=False)
    assert len(load_sweep(tmp_path)[0]) == 2

    def other_fn(config, monitor):
        return 0.0

    with pytest.raises(ValueError, match="train_fn"):
        sweep(a, store=tmp_path, train_fn=other_fn, progress=False)
    runs = sweep(b, store=tmp_path, train_fn=train_fn, extend=True, progress=False)
    assert sorted(runs["lr"]) == [0.01, 0.2]
    all_runs = load_sweep(tmp_path)[0]
    assert sorted(all_runs["lr"]) == [0.01, 0.1, 0.2]  # the shared point (lr 0.01) exists once
    assert len(json.loads((tmp_path / "spec.json").read_text())["specs"]) == 2
    assert sweep_status(tmp_path)["status"].tolist() == ["ok"] * 3


def test_corrupt_and_foreign_files_are_reported_and_skipped(tmp_path, tiny):
    spec = SweepSpec(name="c", lrs=[0.01, 0.1], **tiny)
    runs = sweep(spec, store=tmp_path, progress=False)
    victim = runs["run_id"][0]
    (tmp_path / "runs" / f"{victim}.parquet").write_bytes(b"not parquet")
    (tmp_path / "runs" / "notes.txt").write_text("hello")
    (tmp_path / "history" / f"{runs['run_id'][1]}.parquet").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match=r"skipped 2 file\(s\) in runs/.*" + victim + r"\.parquet.*notes\.txt"):
        with pytest.warns(UserWarning, match=r"history/.*" + runs["run_id"][1]):
            got, history = load_sweep(tmp_path)
    assert list(got["run_id"]) == [runs["run_id"][1]] and len(history) == 0
    with pytest.warns(UserWarning, match="notes.txt"):
        again = sweep(spec, store=tmp_path, progress=False)  # redoes only the unreadable point
    assert again["final_loss"].tolist() == pytest.approx(runs["final_loss"].tolist(), rel=1e-6)
    with pytest.warns(UserWarning, match="notes.txt"), pytest.warns(UserWarning, match="history/"):
        assert len(load_sweep(tmp_path)[0]) == 2


def test_not_a_store_and_corrupt_spec_file(tmp_path, tiny):
    with pytest.raises(FileNotFoundError):
        load_sweep(tmp_path / "nope")
    with pytest.raises(ValueError, match="not a sweep store"):
        load_sweep(tmp_path)
    (tmp_path / "spec.json").write_text("{not json")
    with pytest.raises(ValueError, match="spec.json is not a sweep spec file"):
        sweep(SweepSpec(lrs=[0.01], **tiny), store=tmp_path, progress=False)


def test_cli_round_trip(tmp_path, tiny, capsys):
    spec = SweepSpec(name="cli", lrs=[0.003, 0.03], variants=["baseline", "qk_layernorm"], **tiny)
    path = tmp_path / "spec.toml"
    spec.to_toml(path)
    store = tmp_path / "store"
    assert main(["sweep", str(path), "--store", str(store), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "4 points: 4 ok, 0 diverged, 0 failed" in out
    runs, history = load_sweep(store)
    assert sorted(runs["run_id"]) == sorted(p.run_id for p in spec.points())
    assert np.isfinite(runs["final_loss"]).all() and set(history["run_id"]) == set(runs["run_id"])
    direct = sweep(spec, store=tmp_path / "direct", progress=False)  # same numbers as the Python API
    merged = direct.merge(runs, on="run_id", suffixes=("", "_cli"))
    np.testing.assert_allclose(merged["final_loss"], merged["final_loss_cli"], rtol=1e-6)
    assert main(["status", str(store)]) == 0
    assert "4 points: 4 ok, 0 diverged, 0 failed, 0 missing" in capsys.readouterr().out
    assert main(["sweep", str(tmp_path / "missing.toml")]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    helptext = capsys.readouterr().out
    for opt in ("--executor", "--workers", "--address", "--store", "--extend", "--train-fn"):
        assert opt in helptext
