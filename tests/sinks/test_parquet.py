"""Parquet sink: part files during the run, atomic renames, readable with pandas alone, equal to history."""

from __future__ import annotations

import os

import pandas as pd
import pytest
import torch

from stabilitylab import Monitor, sinks
from stabilitylab.sinks import parquet as pq_mod


def test_parts_appear_during_the_run_atomically_and_equal_history(tiny_model, tiny_batch, train_loop, tmp_path, monkeypatch):
    renames = []
    real_replace = os.replace

    def replace(src, dst):
        assert os.path.exists(src) and not os.path.exists(dst), "a part is written once, via a temp file"
        assert os.path.dirname(os.fspath(src)) == os.path.dirname(os.fspath(dst))
        renames.append((os.fspath(src), os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(pq_mod.os, "replace", replace)
    path = tmp_path / "run"
    sink = sinks.Parquet(path, flush_records=1)
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    mon = Monitor(tiny_model, optimizer=opt, every=2, sinks=[sink], run_id="exp/1")
    parts_seen = []
    train_loop(tiny_model, opt, tiny_batch, 6, mon,
               after=lambda i: parts_seen.append(len(list((path / "history").glob("*.parquet")))))
    assert parts_seen == [1, 1, 2, 2, 3, 3]  # a part per logged step, before close
    mon.close()
    files = sorted(os.listdir(path / "history"))
    assert len(files) == 3 and all(f.startswith("part-exp_1-") and f.endswith(".parquet") for f in files)
    assert not [f for d in ("history", "events") for f in os.listdir(path / d) if not f.endswith(".parquet")]
    assert sorted(os.path.basename(d) for _, d in renames if "/history/" in d) == files
    df = pd.read_parquet(path / "history")  # pandas alone
    hist = mon.history()
    key = ["step", "metric", "module"]
    a = df.sort_values(key).reset_index(drop=True)
    b = hist.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a[list(b.columns)], b, check_dtype=False)
    assert set(df["run_id"]) == {"exp/1"}
    pd.testing.assert_frame_equal(sinks.read_history(path).sort_values(key).reset_index(drop=True)[b.columns], b,
                                  check_dtype=False)


def test_buffered_records_are_flushed_on_close_and_history_from_parquet(tiny_model, tiny_batch, train_loop, tmp_path):
    sink = sinks.Parquet(tmp_path / "p", flush_records=10**9, flush_every_s=None)
    opt = torch.optim.SGD(tiny_model.parameters(), lr=1e-3)
    mon = Monitor(tiny_model, optimizer=opt, every=1, sinks=[sink], keep_history=False, run_id="r")
    train_loop(tiny_model, mon.optimizer, tiny_batch, 3, mon)
    assert list((tmp_path / "p" / "history").glob("*.parquet")) == []
    assert len(sink.read()) > 0  # buffered rows are visible through the sink
    mon.close()
    df = pd.read_parquet(tmp_path / "p" / "history")
    assert sorted(df["step"].unique()) == [0, 1, 2]
    assert len(mon.history()) == len(df)


def test_events_are_written_as_parquet(tiny_model, tmp_path):
    sink = sinks.Parquet(tmp_path / "e", flush_records=1)
    with Monitor(tiny_model, every=1, probes=["health"], sinks=[sink]) as mon:
        mon.step(float("nan"))
    ev = pd.read_parquet(tmp_path / "e" / "events")
    assert (ev["kind"] == "nonfinite").any() and (ev["module"] == "loss").any()


def test_second_run_in_same_directory_adds_parts_without_overwriting(tiny_model, tmp_path):
    for run in ("a", "a"):
        with Monitor(tiny_model, every=1, probes=[], sinks=[sinks.Parquet(tmp_path, flush_records=1)],
                     run_id=run) as mon:
            mon.step(1.0)
            mon.step(2.0)
    df = pd.read_parquet(tmp_path / "history")
    assert len(df) == 4


@pytest.mark.parametrize("kwargs, match", [({"path": ""}, "path"), ({"path": 3}, "path"),
                                           ({"path": "x", "flush_records": 0}, "flush_records")])
def test_bad_arguments_are_named(tmp_path, kwargs, match, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=match):
        sinks.Parquet(**kwargs)


def test_unwritable_directory_error_names_the_path(tmp_path):
    f = tmp_path / "not_a_dir"
    f.write_text("")
    with pytest.raises(ValueError, match="not_a_dir"):
        sinks.Parquet(f)
