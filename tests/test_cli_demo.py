"""``stabilitylab demo`` end to end on a tiny grid."""

from __future__ import annotations

import pandas as pd

from stabilitylab.analysis import lr_sensitivity
from stabilitylab.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def test_demo_writes_tables_figures_and_prints_sensitivity(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--sizes", "xxs", "--lrs", "0.01,0.3", "--steps", "20", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    runs = pd.read_parquet(out / "runs.parquet")
    history = pd.read_parquet(out / "history.parquet")
    assert len(runs) == 4 and set(runs["lr"]) == {0.01, 0.3} and set(runs["size"]) == {"xxs"}
    assert set(history["run_id"]) == set(runs["run_id"])
    assert {"attn.max_logit", "loss", "grad.global_norm"} <= set(history["metric"])
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2 and all(p.read_bytes()[:8] == PNG for p in pngs)
    for p in pngs:
        assert str(p) in printed
    assert "LR sensitivity" in printed
    from stabilitylab.diagnosis import diagnose

    assert printed.rstrip().split("Findings (the report opens with these):\n", 1)[1].startswith(
        diagnose(runs, history).text())  # the report's findings end the demo's output
    sens = lr_sensitivity(runs, by=["size", "n_params", "variant"])
    for v in sens["lr_sensitivity"].round(4):
        assert f"{v:.4f}".rstrip("0").rstrip(".") in printed


def test_demo_bad_arguments_exit_with_an_error(tmp_path, capsys):
    rc = main(["demo", "--sizes", "nope", "--lrs", "0.01", "--steps", "2", "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "nope" in capsys.readouterr().err


def test_old_demo_module_forwards_its_names_with_a_deprecation_warning():
    import pytest

    import stabilitylab.demo as old
    from stabilitylab.studies import demo

    for name in demo.__all__:
        with pytest.warns(DeprecationWarning, match=f"stabilitylab.studies.demo.{name}"):
            assert getattr(old, name) is getattr(demo, name)
    with pytest.raises(AttributeError, match="nope"):
        old.nope  # noqa: B018
