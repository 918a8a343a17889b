"""``run_demo`` trains its grid through ``sweep``: same outputs, resumable, this invocation's runs only."""

from __future__ import annotations

import pandas as pd

from stabilitylab.studies.demo import run_demo


def test_run_demo_writes_its_tables_and_reuses_finished_points(tmp_path):
    runs, history = run_demo(tmp_path, sizes=("xxs",), lrs=(1e-2, 1e-1), steps=4, every=2, progress=False)
    assert sorted(zip(runs["variant"], runs["lr"])) == [("baseline", 0.01), ("baseline", 0.1),
                                                        ("qk_layernorm", 0.01), ("qk_layernorm", 0.1)]
    assert (runs["size"] == "xxs").all() and (runs["steps"] == 4).all() and (runs["status"] != "failed").all()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "runs.parquet"), runs)
    assert set(pd.read_parquet(tmp_path / "history.parquet")["run_id"]) == set(runs["run_id"])
    assert set(history["step"]) == {0, 2}
    stamp = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "sweep" / "runs").iterdir()}

    again, history2 = run_demo(tmp_path, sizes=("xxs",), lrs=(1e-2,), steps=4, every=2, progress=False)
    assert sorted(again["run_id"]) == sorted(runs.loc[runs["lr"] == 1e-2, "run_id"])
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "sweep" / "runs").iterdir()} == stamp
    assert len(pd.read_parquet(tmp_path / "runs.parquet")) == 2
    assert set(history2["run_id"]) == set(again["run_id"])
