"""The warnings benchmark: its definition, a mini build (real proxy and Hugging Face runs), evaluate, CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pandas as pd
import pytest

from stabilitylab import detectors as D
from stabilitylab.cli import main
from stabilitylab.studies import warnings_bench as W

pytest.importorskip("transformers")


def test_quick_definition_has_four_proxy_mechanisms_a_hf_model_and_controls_below_the_unstable_lrs():
    sc = W.SCALES["quick"]
    assert len([m for m in sc.mechanisms if m.trainer == "proxy"]) >= 4
    assert any(m.trainer == "hf_gpt2" for m in sc.mechanisms)
    for m in sc.mechanisms:
        assert m.control_lrs and max(m.control_lrs) < min(m.unstable_lrs)
    specs = W.benchmark_specs(sc)
    points = [p for _, _, s in specs for p in s.points()]
    assert len(points) >= 30 and len({p.run_id for p in points}) == len(points)
    assert all(p.every == 1 and set(W.PROBES) <= set(p.probes) for p in points)
    assert all(f"-v{W.BENCHMARK_VERSION}-" in s.name for _, _, s in specs)
    # the schedules cross the critical LR late: the ramp reaches half its peak only at half the run
    knots = dict(tuple(map(float, k.split(":"))) for k in W.ramp(sc.steps).split(","))
    assert knots[30] < 0.05 and knots[sc.steps] == 1.0


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    mechs = {m.name: m for m in W.SCALES["quick"].mechanisms}
    sc = W.BenchScale(name="mini", size={"name": "t", "d_model": 16, "n_layers": 1, "head_dim": 8}, steps=100,
                      batch_size=4, seq_len=16, seeds=(0, 1),
                      mechanisms=(replace(mechs["attn_logit_growth"], unstable_lrs=(3.0,), control_lrs=(0.05,),
                                          overrides={"lr_schedule": W.ramp(100)}),
                                  replace(mechs["hf_gpt2"], unstable_lrs=(3.0,), control_lrs=(0.05,),
                                          overrides={"lr_schedule": W.ramp(100)})))
    out = tmp_path_factory.mktemp("wb") / "mini"
    meta = W.build(sc, out=out, executor="local", progress=False)
    return out, meta


def test_build_writes_versioned_stores_and_labels_from_the_loss_alone(mini):
    out, meta = mini
    assert (out / "proxy" / "spec.json").exists() and (out / "hf_gpt2" / "spec.json").exists()
    on_disk = json.loads((out / "benchmark.json").read_text())
    assert on_disk["benchmark_version"] == W.BENCHMARK_VERSION and on_disk["n_runs"] == 8 == meta["n_runs"]
    outcomes = pd.read_parquet(out / "outcomes.parquet")
    assert len(outcomes) == 8 and set(outcomes["mechanism"]) == {"attn_logit_growth", "hf_gpt2"}
    hist = pd.concat([pd.read_parquet(f) for f in out.glob("*/history/*.parquet")])
    for r in outcomes.itertuples():
        loss = hist[(hist.run_id == r.run_id) & (hist.metric == "loss")].sort_values("step")
        assert loss["step"].tolist() == list(range(len(loss)))  # every=1: every step logged
        o = D.label_outcome(loss["step"], loss["value"], **W.OUTCOME_DEFINITION)
        assert o.label == r.outcome and (o.diverge_step == r.diverge_step or math.isnan(r.diverge_step))
    comp = pd.DataFrame(meta["composition"]).set_index("mechanism")
    assert comp.loc["all", list(D.OUTCOMES)].sum() == 8
    assert (outcomes.loc[outcomes.role == "control", "outcome"] != "diverged").all()
    assert (outcomes.loc[outcomes.role == "unstable", "outcome"] == "diverged").all()
    # resuming trains nothing
    assert W.build(W.BenchScale(**{**meta["scale"], "mechanisms": tuple(W.Mechanism(**m) for m in
                                                                       meta["scale"]["mechanisms"])}),
                   out=out, executor="local", progress=False)["trained_now"] == 0


def test_evaluate_reports_every_split_at_every_1_and_10(mini):
    out, _ = mini
    res = W.evaluate(out, grid=W.GRID[:2])
    s = res["summary"]
    assert set(s["every"]) == {1, 10}
    assert set(s["split"]) == {"held-out seed", "held-out attn_logit_growth", "held-out hf_gpt2",
                               "all mechanisms held out"}
    pr = res["per_run"]
    d = pr[pr["lead_steps"].notna()]
    assert (d["lead_steps"] == d["diverge_step"] - d["first_warning"]).all()
    assert (d["first_warning"] < d["diverge_step"]).all()
    ten = pr[(pr["every"] == 10) & pr["first_warning"].notna()]
    assert (ten["first_warning"] % 10 == 0).all()
    pooled = s[(s["split"] == "all mechanisms held out") & (s["every"] == 1)].iloc[0]
    held = pr[(pr["every"] == 1) & pr["split"].isin(["held-out attn_logit_growth", "held-out hf_gpt2"])]
    assert pooled["n_runs"] == len(held) == 8
    assert pooled["n_diverged"] == (held["outcome"] == "diverged").sum()
    assert set(res["tradeoff"]["margin"]) == set(W.TRADEOFF_MARGINS)
    assert res["calibration"].thresholds and "every=1" in res["calibration"].source
    # any single sweep store works too: here one mechanism, so only the held-out seed split exists
    one = W.evaluate(out / "proxy", everys=(1,), grid=())
    assert set(one["summary"]["split"]) == {"held-out seed"}


def test_cli_help_and_evaluate_on_a_tiny_store(mini, tmp_path, capsys):
    out, _ = mini
    with pytest.raises(SystemExit) as e:
        main(["warnings", "--help"])
    assert e.value.code == 0 and "evaluate" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["warnings", "build", "--help"])
    assert e.value.code == 0 and "--scale" in capsys.readouterr().out
    j, md, cal = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "cal.json"
    assert main(["warnings", "evaluate", str(out), "--every", "1", "--json", str(j), "--md", str(md),
                 "--calibration-out", str(cal), "--report", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    assert "Held-out results" in printed and md.read_text().strip() == printed.strip().split("\nreport: ")[0].strip()
    data = json.loads(j.read_text())
    assert {r["split"] for r in data["summary"]} >= {"held-out seed", "all mechanisms held out"}
    assert D.Calibration.from_dict(json.loads(cal.read_text())).thresholds
    assert (tmp_path / "rep" / "report.html").exists() and (tmp_path / "rep" / "warning_timelines.png").exists()
    assert main(["warnings", "evaluate", str(tmp_path / "nope")]) == 2
