"""The warnings benchmark: its definition, a mini build (real proxy and Hugging Face runs), evaluate, CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
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
    with pytest.raises(ValueError, match="censor"):  # 100-step runs: nothing judged with the default censor
        W.evaluate(out, everys=(1,), grid=())
    res = W.evaluate(out, grid=W.GRID[:2], censor=20)
    s = res["summary"]
    assert set(s["every"]) == {1, 10}
    assert set(s["split"]) == {"each seed held out", "held-out attn_logit_growth", "held-out hf_gpt2",
                               "all mechanisms held out", "gradual mechanisms held out",
                               "each mechanism held out, its own low-LR runs calibrate"}
    pr = res["per_run"]
    d = pr[pr["lead_steps"].notna()]
    assert (d["lead_steps"] == d["diverge_step"] - d["first_warning"]).all()
    assert (d["first_warning"] < d["diverge_step"]).all()
    ten = pr[(pr["every"] == 10) & pr["first_warning"].notna()]
    assert (ten["first_warning"] % 10 == 0).all()
    # both mini mechanisms are gradual (slow ramps), so the gradual pool is the whole pool
    assert not W.SCALES["quick"].mechanisms[0].abrupt and {m.name for m in W.SCALES["quick"].mechanisms if m.abrupt} \
        == {"adam_stale", "lr_stepup", "lr_spike"}
    grad = s[(s["split"] == "gradual mechanisms held out") & (s["every"] == 1)].iloc[0]
    pooled = s[(s["split"] == "all mechanisms held out") & (s["every"] == 1)].iloc[0]
    assert grad.drop(["split"]).equals(pooled.drop(["split"]))
    held = pr[(pr["every"] == 1) & pr["split"].isin(["held-out attn_logit_growth", "held-out hf_gpt2"])]
    assert pooled["n_runs"] == len(held) == 8
    assert pooled["n_diverged"] == (held["outcome"] == "diverged").sum()
    # the own-runs pool: each (mechanism, seed) held out once, so every run is tested once in it
    own = pr[(pr["every"] == 1) & (pr["kind"] == "own")]
    assert sorted(own["run_id"]) == sorted(held["run_id"])
    own_row = s[(s["split"] == "each mechanism held out, its own low-LR runs calibrate") & (s["every"] == 1)].iloc[0]
    assert own_row["n_runs"] == 8 and own_row["n_diverged"] == (own["outcome"] == "diverged").sum()
    # slow ramps: no abrupt change, so every divergence is reachable
    assert pooled["reachable_share"] == 1.0 and pooled["warned_50_reachable_share"] == pooled["warned_50_share"]
    assert set(res["tradeoff"]["margin"]) == set(W.TRADEOFF_MARGINS)
    # the calibration on every run carries the settings chosen on every run (two mechanisms: LOMO possible)
    for cal in res["calibrations"].values():
        assert set(cal.settings) == set(D.ADOPTABLE) and dict(cal.settings) in [dict(g) for g in W.GRID[:2]]
    assert res["calibration"].thresholds and "every=1" in res["calibration"].source
    # each seed held out: every run tested once, with the runs of the other seed calibrating
    seeds = pr[(pr["every"] == 1) & (pr["kind"] == "seed")]
    assert sorted(seeds["run_id"]) == sorted(held["run_id"]) and set(seeds["split"]) == {"held-out seed 0",
                                                                                         "held-out seed 1"}
    assert set(res["tradeoff"]["split"]) == {"each seed held out"} and (res["tradeoff"]["n_runs"] == 8).all()
    # one trade-off curve per logging interval; at margin 1 (what GRID[:2] chooses) it is the seed split itself
    t = res["tradeoff"]
    assert sorted(set(t["every"])) == sorted(W.EVERIES)
    for every in W.EVERIES:
        assert sorted(t.loc[t["every"] == every, "margin"]) == sorted(W.TRADEOFF_MARGINS)
        at1 = t[(t["every"] == every) & (t["margin"] == 1.0)].iloc[0]
        seed_row = s[(s["split"] == "each seed held out") & (s["every"] == every)].iloc[0]
        for k in ("n_runs", "warned_50_share", "stable_warned_share", "fa_steps_stable", "median_lead"):
            assert at1[k] == seed_row[k] or (pd.isna(at1[k]) and pd.isna(seed_row[k])), (every, k)
    # any single sweep store works too: here one mechanism, so only the seed splits exist
    one = W.evaluate(out / "proxy", everys=(1,), grid=(), censor=20)
    assert set(one["summary"]["split"]) == {"each seed held out"}
    assert W.markdown(one).startswith("# Early warning on a sweep store\n")


def test_cli_help_and_evaluate_on_a_tiny_store(mini, tmp_path, capsys):
    out, _ = mini
    with pytest.raises(SystemExit) as e:
        main(["warnings", "--help"])
    assert e.value.code == 0 and "evaluate" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["warnings", "build", "--help"])
    assert e.value.code == 0 and "--scale" in capsys.readouterr().out
    j, md, cal = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "cal.json"
    assert main(["warnings", "evaluate", str(out), "--every", "1", "--censor", "20", "--json", str(j), "--md", str(md),
                 "--calibration-out", str(cal), "--report", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    assert "Held-out results" in printed and md.read_text().strip() == printed.strip().split("\nreport: ")[0].strip()
    data = json.loads(j.read_text())
    assert {r["split"] for r in data["summary"]} >= {"each seed held out", "all mechanisms held out"}
    assert D.load_calibration(cal)[1].thresholds
    assert (tmp_path / "rep" / "report.html").exists() and (tmp_path / "rep" / "warning_timelines.png").exists()
    assert main(["warnings", "evaluate", str(tmp_path / "nope")]) == 2


def _hand_run(n=400, hot=(), score=5.0, every=1):
    """A scored run by hand: one series, score 0 except ``score`` on the steps in ``hot``."""
    return [(s, [(("m", ""), score if s in hot else 0.0, 0.01, 1.0)]) for s in range(0, n, every)]


def _hand_outcomes(rows):
    return pd.DataFrame([{"run_id": rid, "mechanism": "m", "role": "", "lr": 0.1, "seed": 0, "outcome": out,
                          "diverge_step": d} for rid, out, d in rows])


def test_horizon_censors_the_last_patience_steps_of_runs_that_did_not_diverge():
    assert W.CENSOR == W.OUTCOME_DEFINITION["patience"] == 100
    assert W.horizon(_hand_run(400)) == 399 - 100 + 1
    assert W.horizon(_hand_run(400), math.nan) == 300
    assert W.horizon(_hand_run(450, every=10)) == 440 - 100 + 1
    assert W.horizon(_hand_run(400), 250.0) == 250.0
    assert W.horizon([]) == math.inf


def test_measure_does_not_judge_the_censored_end_of_stable_runs():
    cfg = D.DetectorConfig(watch={"m": "log"}, min_metrics=1, burn_in=10, window=60)
    cal = D.Calibration(thresholds={"m": 1.0})
    scored = {"late": _hand_run(hot=range(320, 400)), "edge": _hand_run(hot={300}), "last": _hand_run(hot={299}),
              "early": _hand_run(hot=range(200, 210)), "div": _hand_run(hot=range(150, 400))}
    outcomes = _hand_outcomes([("late", "stable", math.nan), ("edge", "stable", math.nan),
                               ("last", "stable", math.nan), ("early", "stable", math.nan),
                               ("div", "diverged", 250.0)])
    # without the censoring every run would warn
    assert all(D.decide_run(r, cfg, cal).warnings for r in scored.values())
    s, rows = W._measure(list(scored), outcomes, scored, cfg, cal)
    r = {row["run_id"]: row for row in rows}
    assert math.isnan(r["late"]["first_warning"]) and r["late"]["alarm_steps"] == 0
    assert math.isnan(r["edge"]["first_warning"]) and r["edge"]["alarm_steps"] == 0  # step 300 is not judged
    assert r["last"]["first_warning"] == 299 and r["last"]["alarm_steps"] == 1  # step 299 is
    assert r["early"]["first_warning"] == 200 and r["early"]["alarm_steps"] == 10
    assert r["div"]["first_warning"] == 150 and r["div"]["lead_steps"] == 100
    judged = len(range(10, 300))  # after burn-in, before the horizon
    assert all(r[k]["judged_steps"] == judged for k in ("late", "edge", "last", "early"))
    assert r["div"]["judged_steps"] == len(range(10, 250))
    assert s["stable_warned_share"] == pytest.approx(2 / 4)
    assert s["fa_steps_stable"] == pytest.approx(11 / (4 * judged))
    assert s["warned_50_share"] == 1.0 and s["median_lead"] == 100


def test_calibrate_leaves_the_censored_end_of_stable_runs_out_of_the_thresholds():
    rng = np.random.default_rng(0)
    cfg = D.DetectorConfig(watch={"m": "log"}, min_metrics=1, burn_in=10, envelope=0)
    scored, want = {}, 0.0
    for i in range(3):
        sc = rng.uniform(0, 1, 400)
        sc[380] = 1000.0  # a huge score in the last CENSOR steps of a stable run
        scored[f"s{i}"] = [(s, [(("m", ""), float(sc[s]), 0.01, 1.0)]) for s in range(400)]
        want = max(want, sc[10:300].max())
    scored["d"] = _hand_run(hot=range(100, 200), score=50.0)
    outcomes = _hand_outcomes([("s0", "stable", math.nan), ("s1", "spiked_recovered", math.nan),
                               ("s2", "stable", math.nan), ("d", "diverged", 200.0)])
    cal = W._calibrate(list(scored), outcomes, scored, cfg, "t")
    assert cal.thresholds["m"] == pytest.approx(want) and want < 1
    assert D.calibrate([scored["s0"]], config=cfg).thresholds["m"] == 1000.0  # what the censoring removes
    env = W._calibrate(list(scored), outcomes, scored, replace(cfg, envelope=50), "t").thresholds["m"]
    assert max(env) == pytest.approx(want)


def _res(w50=0.5, lead=100.0, stable=0.0, fa=0.0, fa_sp=0.0):
    return {"warned_50_share": w50, "median_lead": lead, "stable_warned_share": stable, "fa_steps_stable": fa,
            "fa_steps_spiked": fa_sp}


def test_objective_is_youdens_j_then_lead():
    # J = warned >= 50 share - stable warned share, computed independently here
    cands = [_res(w50=0.9, lead=60, stable=0.3), _res(w50=0.5, lead=300, stable=0.0), _res(w50=0.7, lead=100, stable=0.1)]
    j = [c["warned_50_share"] - c["stable_warned_share"] for c in cands]
    assert max(cands, key=W._objective) is cands[int(np.argmax(j))]
    assert W._objective(_res(lead=120)) > W._objective(_res(lead=80))  # ties broken by lead
    assert W._objective(_res(stable=math.nan, w50=0.6)) == W._objective(_res(w50=0.6, stable=0.0))  # no stable runs


def test_build_rejects_bad_seeds_before_training(tmp_path):
    for bad in ((), (-1,), (True,), (1.5,)):
        out = tmp_path / "x"
        with pytest.raises(ValueError, match="seeds"):
            W.build("quick", out=out, executor="local", progress=False, seeds=bad)
        assert not out.exists()


def test_cli_build_passes_seeds(monkeypatch, tmp_path, capsys):
    got = []

    def fake(scale, **kw):
        got.append((scale, kw))
        return {"composition": [{"mechanism": "all", "stable": 1}], "n_runs": 1, "n_diverged_after_150": 0,
                "build_wall_s": 0.0}

    monkeypatch.setattr(W, "build", fake)
    assert main(["warnings", "build", "--out", str(tmp_path), "--seeds", "3", "4", "--no-progress"]) == 0
    assert main(["warnings", "build", "--out", str(tmp_path)]) == 0
    assert got[0][0] == "quick" and got[0][1]["seeds"] == (3, 4) and got[0][1]["out"] == str(tmp_path)
    assert got[1][1]["seeds"] is None
    assert "1 runs" in capsys.readouterr().out


@pytest.fixture(scope="module")
def reseeded(tmp_path_factory):
    """A proxy-only benchmark long enough to be judged past the censoring (250 steps), built on seeds 3 and
    4 instead of its scale's seed 0."""
    mech = {m.name: m for m in W.SCALES["quick"].mechanisms}["attn_logit_growth"]
    sc = W.BenchScale(name="reseeded", size={"name": "t", "d_model": 16, "n_layers": 1, "head_dim": 8}, steps=250,
                      batch_size=4, seq_len=16, seeds=(0,),
                      mechanisms=(replace(mech, unstable_lrs=(3.0,), control_lrs=(0.05,),
                                          overrides={"lr_schedule": W.ramp(250)}),))
    out = tmp_path_factory.mktemp("wb") / "reseeded"
    return out, W.build(sc, out=out, executor="local", progress=False, seeds=(3, 4))


def test_build_seeds_replace_the_scale_seeds(reseeded):
    out, meta = reseeded
    assert tuple(meta["scale"]["seeds"]) == (3, 4)
    assert json.loads((out / "benchmark.json").read_text())["scale"]["seeds"] == [3, 4]
    outcomes = pd.read_parquet(out / "outcomes.parquet")
    assert sorted(outcomes["seed"]) == [3, 3, 4, 4] and meta["n_runs"] == 4


def test_evaluate_returns_one_calibration_per_every_and_the_cli_writes_them(reseeded, tmp_path, monkeypatch):
    out, _ = reseeded
    res = W.evaluate(out, grid=())
    cals = res["calibrations"]
    assert set(cals) == {1, 10} and res["calibration"] is cals[1]
    for every, cal in cals.items():
        assert cal.interval == every and f"every={every}" in cal.source
        assert cal.thresholds, every  # the controls are judged up to step 150 (250 - CENSOR)
    # every=10 is every=1's history subsampled: its thresholds come from fewer, wider-window slopes
    assert cals[1].thresholds != cals[10].thresholds
    real = W.evaluate
    monkeypatch.setattr(W, "evaluate", lambda store, everys, censor, settings_from, rules, base: real(
        store, everys=everys, grid=(), censor=censor, rules=rules, base=base))
    path = tmp_path / "cal.json"
    assert main(["warnings", "evaluate", str(out), "--every", "1", "10", "--calibration-out", str(path)]) == 0
    on_disk = json.loads(path.read_text())
    assert set(on_disk) == {"1", "10"}
    loaded = D.load_calibration(path)
    assert loaded == cals


def test_abrupt_changes_find_lr_jumps_unfreezing_and_data_switches_but_not_warm_ups():
    steps = list(range(400))
    warm = [min(1.0, (s + 1) / 100) for s in steps]  # doubles at step 1, x1.5 at step 2: a ramp, not a jump
    assert W.abrupt_changes(steps, warm) == []
    assert W.abrupt_changes(steps, [0.0] + [s / 100 for s in steps[1:]]) == []  # warm-up from exactly 0
    stepup = [1.0 if s < 150 else 2.0 if s < 250 else 8.0 for s in steps]
    assert W.abrupt_changes(steps, stepup) == [150, 250]
    spike = [18.0 if 200 <= s < 210 else 1.0 for s in steps]  # the drop back is not a change that breaks runs
    assert W.abrupt_changes(steps, spike) == [200]
    assert W.abrupt_changes(steps, [1.0 if s < 150 else 1.4 for s in steps]) == []  # below the 1.5x factor
    assert W.abrupt_changes(steps, warm, {"freeze_until": 150, "data_switch_step": 0}) == [150]
    assert W.abrupt_changes([], [], {"data_switch_step": 300, "freeze_until": float("nan")}) == [300]
    assert W.abrupt_changes(steps[::10], stepup[::10]) == [150, 250]  # sparse logging finds them too


def test_summarise_counts_a_divergence_reachable_only_if_no_abrupt_change_in_the_50_steps_before_it():
    rows = [  # diverge_step, last_change, lead_steps
        (300.0, math.nan, 120.0),  # gradual, warned 120 ahead
        (300.0, 200.0, 60.0),  # change 100 steps before: reachable, warned 60 ahead
        (300.0, 250.0, math.nan),  # change exactly 50 before: reachable, not warned
        (300.0, 260.0, 20.0),  # change 40 before: not reachable
        (210.0, 200.0, math.nan),  # a spike 10 steps before: not reachable
    ]
    pr = pd.DataFrame([{"outcome": "diverged", "diverge_step": d, "last_change": c, "lead_steps": lead,
                        "first_warning": d - lead, "alarm_steps": 0, "judged_steps": 1, "covered": False,
                        "steps_left_lo": 0.0, "steps_left_hi": 1.0} for d, c, lead in rows])
    s = W.summarise(pr)
    assert s["reachable_share"] == pytest.approx(3 / 5)
    assert s["warned_50_reachable_share"] == pytest.approx(2 / 3)
    assert s["warned_50_share"] == pytest.approx(2 / 5)
    assert W.summarise(pr.drop(columns="last_change"))["reachable_share"] == 1.0  # a store without the column


def test_own_splits_add_only_the_held_out_mechanisms_low_lr_runs_of_other_seeds():
    rows = [(f"{m}{lr}{seed}", m, lr, seed, "diverged" if lr == 1.0 or (m == "b" and seed == 1) else "stable")
            for m in "ab" for lr in (0.1, 0.3, 1.0) for seed in (0, 1, 2)]
    o = pd.DataFrame([{"run_id": r, "mechanism": m, "lr": lr, "seed": seed, "outcome": out}
                      for r, m, lr, seed, out in rows])
    own = [s for s in W.splits(o) if s[1] == "own"]
    assert len(own) == 6
    for name, _, cal, test in own:
        m, seed = name.split(" ")[1], int(name.split(" seed ")[1].split(",")[0])
        assert sorted(test) == sorted(o.loc[(o.mechanism == m) & (o.seed == seed), "run_id"])
        extra = set(cal) - set(o.loc[o.mechanism != m, "run_id"])
        want = o[(o.mechanism == m) & (o.lr == 0.1) & (o.seed != seed) & (o.outcome != "diverged")]
        assert extra == set(want["run_id"]) and not extra & set(test)
    assert {s[1] for s in W.splits(o)} == {"seed", "mechanism", "own"}
    assert {s[1] for s in W.splits(o[o.seed == 0])} == {"mechanism"}  # one seed: no seed or own splits


def test_settings_from_fixes_the_settings_of_every_split(mini, tmp_path):
    out, _ = mini
    fixed = {"margin": 1.5, "min_metrics": 1, "persist": 10}
    cals = {1: D.Calibration(thresholds={}, settings=fixed), 10: D.Calibration(thresholds={}, interval=10,
                                                                               settings={**fixed, "margin": 2.0})}
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(D.calibrations_to_dict(cals)))
    res = W.evaluate(out, censor=20, settings_from=path)
    s = res["summary"]
    for every, margin in ((1, 1.5), (10, 2.0)):
        rows = s[s["every"] == every]
        assert (rows["margin"] == margin).all() and (rows["min_metrics"] == 1).all() and (rows["persist"] == 10).all()
        assert dict(res["calibrations"][every].settings) == {**fixed, "margin": margin}
    assert res["meta"]["settings"] == "fixed" and "fixed for every split" in W.markdown(res)
    with pytest.raises(ValueError, match="settings_from.*carries no settings"):
        W.evaluate(out, everys=(1,), censor=20, settings_from=D.Calibration(thresholds={}))
    with pytest.raises(FileNotFoundError, match="settings_from"):
        W.evaluate(out, everys=(1,), censor=20, settings_from=tmp_path / "missing.json")


def test_evaluate_calibrates_the_sustained_rule_per_split_and_it_only_adds_warnings(mini):
    """``evaluate`` carries the shipped every=1 further rule (``Calibration.also``), calibrated on each split's runs:
    a run's first warning can only come earlier with it and its alarm steps are a superset; ``rules=()`` (the CLI's
    ``--no-rules``) leaves it out; a rule given explicitly is calibrated at its own window and settings."""
    out, _ = mini
    fixed = {1: D.Calibration(thresholds={}, settings={"margin": 1.0, "min_metrics": 2, "persist": 0})}
    kw = {"everys": (1,), "censor": 20, "settings_from": fixed}
    with_rule, without = W.evaluate(out, **kw), W.evaluate(out, rules=(), **kw)
    (shipped,) = D.DEFAULT_CALIBRATIONS[1].also
    assert with_rule["meta"]["rules"] == {1: [{"window": shipped.window, **shipped.settings}]}
    assert without["meta"]["rules"] == {1: []} and not without["calibrations"][1].also
    (rule,) = with_rule["calibrations"][1].also
    assert (rule.window, dict(rule.settings)) == (shipped.window, dict(shipped.settings))
    key = ["run_id", "split"]
    a = with_rule["per_run"].set_index(key).sort_index()
    b = without["per_run"].set_index(key).sort_index().reindex(a.index)
    assert ((a["first_warning"] <= b["first_warning"]) | b["first_warning"].isna()).all()
    assert (a["alarm_steps"] >= b["alarm_steps"]).all()
    assert set(a["window"].dropna()) <= {60, shipped.window} and set(b["window"].dropna()) <= {60}
    mine = W.evaluate(out, rules=((120, {"margin": 1.0, "min_metrics": 1, "persist": 0}),), **kw)
    assert [(x.window, x.settings["margin"]) for x in mine["calibrations"][1].also] == [(120, 1.0)]
    # a rule below every stable run's envelope (half of it, one metric) must add alarms somewhere
    loud = W.evaluate(out, rules=((60, {"margin": 0.5, "min_metrics": 1, "persist": 0}),), **kw)
    c = loud["per_run"].set_index(key).sort_index().reindex(a.index)
    assert (c["alarm_steps"] >= b["alarm_steps"]).all() and (c["alarm_steps"] > b["alarm_steps"]).any()


def test_a_rule_keeps_its_margin_at_any_margin_of_the_main_rule():
    """Per-split calibrations record the split's settings, so a detector at those settings runs each further rule at
    the rule's own margin (as the shipped calibrations, which carry their settings, do live), and a margin away
    from them scales every rule alike."""
    rng = np.random.default_rng(0)
    steps = {f"r{i}": [(s, {("attn.max_logit", "a"): float(np.exp(0.002 * s + rng.normal(0, 0.05)))})
                       for s in range(300)] for i in range(3)}
    outcomes = pd.DataFrame({"run_id": list(steps), "outcome": "stable", "diverge_step": math.nan})
    cfg = D.DetectorConfig(margin=2.0, min_metrics=1)
    scored = {k: D.score_run(v, cfg) for k, v in steps.items()}
    also = {k: {90: D.score_run(v, replace(cfg, window=90))} for k, v in steps.items()}
    cal = W._calibrate(list(steps), outcomes, scored, cfg, "t", 0, [(90, {"margin": 1.5, "min_metrics": 1})], also)
    assert cal.settings["margin"] == 2.0 and cal.also[0].settings == {"margin": 1.5, "min_metrics": 1}
    assert D.RunawayDetector(cfg, cal)._children[0].config.margin == 1.5
    assert D.RunawayDetector(replace(cfg, margin=4.0), cal)._children[0].config.margin == 3.0


def test_cli_calibrate_writes_a_calibration_per_every_that_extends_the_defaults(mini, tmp_path, capsys):
    out, _ = mini
    path = tmp_path / "mine.json"
    assert main(["warnings", "calibrate", str(out / "proxy"), "--out", str(path), "--extend", "default"]) == 0
    cals = D.load_calibration(path)
    assert set(cals) == {1, 10} and "EarlyWarning(calibration=" in capsys.readouterr().out
    from stabilitylab.analysis.early_warning import calibrate_warnings

    runs, history = W.load_benchmark(out / "proxy")
    for e in (1, 10):
        want = calibrate_warnings(runs, history, every=e, extend="default")
        assert cals[e].thresholds == want.thresholds and cals[e].interval == e
        assert dict(cals[e].settings) == dict(D.DEFAULT_CALIBRATIONS[e].settings)
        # the further rules of the default are recalibrated on these runs too, with the default's as a floor
        assert [(a.window, dict(a.settings)) for a in cals[e].also] == \
            [(a.window, dict(a.settings)) for a in D.DEFAULT_CALIBRATIONS[e].also]
        for mine, shipped in zip(cals[e].also, D.DEFAULT_CALIBRATIONS[e].also):
            for m, thr in shipped.thresholds.items():
                assert all(a >= b for a, b in zip(mine.thresholds[m], thr)), m
    (rule,) = cals[1].also
    alone = calibrate_warnings(runs, history, every=1)  # yours alone: the rule fit on your runs, no floor
    assert [a.window for a in alone.also] == [rule.window] and alone.also[0].thresholds != rule.thresholds
    stable = W.label_runs(runs, history).query("outcome != 'diverged'")["run_id"]
    from stabilitylab.analysis.early_warning import run_steps

    scored = [D.score_run(st, D.DetectorConfig(window=rule.window))
              for rid, st in run_steps(history[history["run_id"].isin(stable)]).items()]
    top = max((sc for run in scored for step, row in run if step - run[0][0] >= 60
               for (metric, _), sc, _, _ in row if metric == "attn.max_logit"), default=0.0)
    assert max(alone.also[0].thresholds["attn.max_logit"]) == pytest.approx(top)  # its largest bin: their largest score
    with pytest.raises(SystemExit):
        main(["warnings", "calibrate", str(out)])  # --out is required


def test_a_store_logged_every_10_steps_is_measured_and_calibrated_at_10_not_labelled_every_1(reseeded, monkeypatch,
                                                                                             tmp_path, capsys):
    out, _ = reseeded
    runs, history = W.load_benchmark(out)
    full = W.evaluate(out, everys=(10,), grid=())
    # the same runs as a Monitor(every=10) would have written them
    monkeypatch.setattr(W, "load_benchmark", lambda path: (runs, history[history["step"] % 10 == 0]))
    res = W.evaluate(out, everys=(1, 10, 20), grid=())
    assert res["meta"]["intervals"] == {1: 10, 10: 10, 20: 20}
    assert set(res["summary"]["every"]) == {10, 20} and set(res["calibrations"]) == {10, 20}
    assert res["calibrations"][10].interval == 10 and res["calibrations"][20].interval == 20
    cols = ["split", "n_runs", "stable_warned_share", "fa_steps_stable", "warned_50_share"]
    got = res["summary"][res["summary"]["every"] == 10][cols].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, full["summary"][cols].reset_index(drop=True))
    assert res["calibrations"][10].thresholds == full["calibrations"][10].thresholds
    assert "every=1 are logged every 10 steps" in W.markdown(res)
    assert "every=1 are logged" not in W.markdown(full)
    path = tmp_path / "mine.json"
    import stabilitylab.analysis.early_warning as EW

    calls, real_cal = [], EW.calibrate_warnings
    monkeypatch.setattr(EW, "calibrate_warnings", lambda *a, **k: calls.append(k["every"]) or real_cal(*a, **k))
    assert main(["warnings", "calibrate", str(out), "--out", str(path), "--every", "1", "10", "1"]) == 0
    assert set(D.load_calibration(path)) == {10}
    assert calls == [1]  # every=1 and 10 are the same histories here: calibrated once
    assert "every=10:" in capsys.readouterr().out


def test_check_measures_a_calibration_as_the_live_probe_replays_it(mini, tmp_path, capsys):
    """``warnings check`` scores a calibration as it is (default: the shipped ones) on every run of a store: its
    counts equal ``EarlyWarning()`` replayed run by run (``analysis.evaluate_warnings``, the live probe's code
    path), a larger margin never warns more, a calibration of yours is taken from its file, and the JSON names
    the CPU (which the build records too)."""
    from stabilitylab.analysis.early_warning import evaluate_warnings

    out, meta = mini
    assert isinstance(meta["cpu"], str) and meta["cpu"]
    res = W.check(out, everys=(1,), margins=(1.0, 3.0), censor=0)
    s = res["summary"]
    assert list(zip(s["every"], s["settings"], s["margin"])) == [(1, "calibration's", 1.0), (1, "margin=1", 1.0),
                                                                (1, "margin=3", 3.0)]
    runs, history = W.load_benchmark(out)
    per_run, _ = evaluate_warnings(runs, history)
    stable, div = per_run[per_run["label"] == "stable"], per_run[per_run["label"] == "diverged"]
    own = s.iloc[0]
    assert (own["n_stable"], own["n_diverged"]) == (len(stable), len(div)) and len(div) > 0
    assert own["stable_warned_share"] == pytest.approx(stable["first_warning"].notna().mean())
    assert own["warned_any_share"] == pytest.approx(div["lead_steps"].notna().mean())
    assert own["warned_50_share"] == pytest.approx((div["lead_steps"] >= 50).mean())
    mine = res["per_run"].set_index("run_id")["first_warning"]
    theirs = per_run.set_index("run_id")["first_warning"]
    pd.testing.assert_series_equal(mine.sort_index(), theirs.sort_index(), check_names=False)
    assert s.iloc[1].drop("settings").equals(own.drop("settings"))
    assert s.iloc[2]["warned_any_share"] <= own["warned_any_share"]
    assert s.iloc[2]["stable_warned_share"] <= own["stable_warned_share"]
    # a calibration that no growth can pass: nothing is warned
    deaf = {1: replace(D.DEFAULT_CALIBRATIONS[1], thresholds={m: 1e9 for m in D.DEFAULT_CALIBRATIONS[1].thresholds},
                       also=())}
    path = tmp_path / "deaf.json"
    path.write_text(json.dumps(D.calibrations_to_dict(deaf)))
    assert main(["warnings", "check", str(out), "--calibration", str(path), "--every", "1", "--censor", "0",
                 "--json", str(tmp_path / "c.json"), "--md", str(tmp_path / "c.md")]) == 0
    got = json.loads((tmp_path / "c.json").read_text())
    assert got["cpu"] == meta["cpu"] and got["meta"]["calibration"] == str(path)
    assert [r["warned_any_share"] for r in got["summary"]] == [0.0]
    assert all(r["first_warning"] is None for r in got["per_run"])
    assert "Diverged runs" in capsys.readouterr().out and (tmp_path / "c.md").read_text().startswith("# Early warning")
    twice = W.check(out, everys=(1, 1), censor=0)
    assert list(twice["meta"]["intervals"].items()) == [(1, 1)] and len(twice["summary"]) == 1
    with pytest.raises(ValueError, match="margins"):
        W.check(out, margins=(0,))
    with pytest.raises(FileNotFoundError, match="calibration="):
        W.check(out, calibration=tmp_path / "missing.json")


def test_check_loss_gates_match_the_live_probe_and_only_remove_warnings(mini, capsys):
    """``check(loss_gates=...)`` rows equal ``EarlyWarning(loss_gate=g)`` replayed run by run, and a gate only
    removes alarms: no run is warned with a gate that is not warned without it, and no lead grows (a calibration
    with low thresholds, so that these short runs warn at all)."""
    from stabilitylab.analysis.early_warning import evaluate_warnings

    out, _ = mini
    shipped = D.DEFAULT_CALIBRATIONS[1]
    loud = {1: replace(shipped, thresholds={m: 0.05 for m in shipped.thresholds}, also=())}
    gates = (0.0, 0.1, 0.5)
    res = W.check(out, calibration=loud, everys=(1,), censor=0, loss_gates=gates)
    s = res["summary"].set_index("settings")
    assert list(s.index) == ["calibration's", "loss_gate=0", "loss_gate=0.1", "loss_gate=0.5"]
    assert list(s["loss_gate"]) == [D.DetectorConfig().loss_gate, *gates]
    runs, history = W.load_benchmark(out)
    first = {}
    for g in gates:
        per_run, _ = evaluate_warnings(runs, history, calibration=loud, loss_gate=g)
        first[g] = per_run.set_index("run_id")["first_warning"].sort_index()
        div, calm = per_run[per_run["label"] == "diverged"], per_run[per_run["label"] == "stable"]
        row = s.loc[f"loss_gate={g:g}"]
        assert len(div) and len(calm)
        assert row["warned_any_share"] == pytest.approx(div["lead_steps"].notna().mean())
        assert row["warned_50_share"] == pytest.approx((div["lead_steps"] >= 50).mean())
        assert row["stable_warned_share"] == pytest.approx(calm["first_warning"].notna().mean())
    # thresholds of 0.05 are passed by the growing signals of a model that learns: the stable runs warn without a
    # gate. (Whether these 100-step runs' divergences come after the 60-step burn-in depends on the CPU's kernels:
    # on some machines all four diverge at steps 51-64 and none can be warned, so no share of them is asserted.)
    assert s.loc["loss_gate=0", "stable_warned_share"] > 0
    for a, b in zip(gates, gates[1:]):  # run by run: a larger gate warns no run earlier, and no run it did not
        later = first[b].dropna()
        assert (later >= first[a].reindex(later.index)).all(), (a, b)
    for a, b in (("loss_gate=0", "loss_gate=0.1"), ("loss_gate=0.1", "loss_gate=0.5")):
        assert s.loc[b, "warned_any_share"] <= s.loc[a, "warned_any_share"]
        assert s.loc[b, "stable_warned_share"] <= s.loc[a, "stable_warned_share"]
        assert s.loc[b, "fa_steps_stable"] < s.loc[a, "fa_steps_stable"]
    with pytest.raises(ValueError, match="loss_gates"):
        W.check(out, loss_gates=(-0.1,))
    assert main(["warnings", "evaluate", str(out), "--loss-gate", "-1"]) == 2
    assert "loss_gate=-1" in capsys.readouterr().err


def test_check_with_a_solo_metric_matches_the_live_probe_and_warns_where_one_metric_alone_is_hot(mini, capsys):
    """``check(base=DetectorConfig(solo=...))`` (``warnings check --solo``) equals ``EarlyWarning(solo=...)`` replayed
    run by run. With a calibration under which only the attention entropy can be hot, the default (two metrics)
    never warns and ``solo=("attn.entropy",)`` does; a solo metric only adds alarms; bad metrics are named."""
    from stabilitylab.analysis.early_warning import evaluate_warnings

    out, _ = mini
    shipped = D.DEFAULT_CALIBRATIONS[1]
    one = {1: replace(shipped, thresholds={m: 0.05 if m == "attn.entropy" else 1e9 for m in shipped.thresholds},
                      also=())}
    runs, history = W.load_benchmark(out)
    got = {}
    for solo in ((), ("attn.entropy",), ("attn.entropy", "grad.global_norm"), ("attn.max_logit",)):
        res = W.check(out, calibration=one, everys=(1,), censor=0, base=D.DetectorConfig(solo=solo))
        assert res["summary"]["solo"].tolist() == [" ".join(solo)]
        per_run, _ = evaluate_warnings(runs, history, calibration=one, solo=solo)
        mine = res["per_run"].set_index("run_id")[["first_warning", "alarm_steps", "metric"]].sort_index()
        theirs = per_run.set_index("run_id")[["first_warning", "alarm_steps", "metric"]].sort_index()
        pd.testing.assert_frame_equal(mine, theirs, check_dtype=False)
        got[solo] = mine
    assert got[()]["alarm_steps"].sum() == 0 == got[("attn.max_logit",)]["alarm_steps"].sum()
    alone = got[("attn.entropy",)]
    assert alone["alarm_steps"].sum() > 0 and set(alone["metric"]) - {""} == {"attn.entropy"}
    pd.testing.assert_frame_equal(got[("attn.entropy", "grad.global_norm")], alone)
    assert main(["warnings", "check", str(out), "--every", "1", "--solo", "nope"]) == 2
    assert "solo=('nope',)" in capsys.readouterr().err
    assert main(["warnings", "check", str(out), "--every", "1", "--censor", "0", "--solo"]) == 0
