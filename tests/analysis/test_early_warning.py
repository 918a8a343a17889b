"""Early-warning detectors vs hand computations; fires before divergence, stays quiet on stable noise."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from stabilitylab import Monitor
from stabilitylab import detectors as D
from stabilitylab.analysis import EarlyWarning, divergence_step, evaluate_warnings
from stabilitylab.analysis.early_warning import calibrate_warnings, mann_kendall, robust_z
from stabilitylab.proxy import ProxyConfig, TrainConfig, train_one


def _mk_reference(y):
    n = len(y)
    s = sum(np.sign(y[j] - y[i]) for i, j in itertools.combinations(range(n), 2))
    counts = pd.Series(y).value_counts().to_numpy()
    var = (n * (n - 1) * (2 * n + 5) - sum(t * (t - 1) * (2 * t + 5) for t in counts)) / 18
    return 0.0 if s == 0 else (s - np.sign(s)) / math.sqrt(var)


def test_mann_kendall_matches_reference_including_ties():
    assert mann_kendall([1, 2, 3, 4, 5]) == pytest.approx(9 / math.sqrt(5 * 4 * 15 / 18))
    assert mann_kendall([1, 1, 2]) == pytest.approx(1 / math.sqrt((66 - 18) / 18))
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 5, size=12).astype(float)
        assert mann_kendall(y) == pytest.approx(_mk_reference(y))


def test_robust_z_uses_median_and_mad_of_baseline_only():
    assert robust_z([1, 2, 3, 4, 100], 10.0) == pytest.approx(7 / 1.4826)
    assert robust_z([5, 5, 5], 6.0, floor=0.5) == pytest.approx(2.0)


def test_divergence_step_nonfinite_or_tenfold_running_min():
    loss = pd.Series([5.0, 3.0, 2.0, 19.0, 21.0, 1.0], index=[0, 10, 20, 30, 40, 50])
    assert divergence_step(loss) == 40
    assert divergence_step(pd.Series([5.0, np.nan], index=[0, 10])) == 10
    assert np.isnan(divergence_step(pd.Series([5.0, 4.0], index=[0, 10])))


def _history(run_id, n, every=10, blow_at=None, seed=0):
    """Synthetic logged signals: AR(1) noise in log space; from blow_at, block 1's attention logit grows
    8% per logged step, 5 logged steps later the grad norm grows too, and the loss explodes 30 logged
    steps after the onset."""
    rng = np.random.default_rng(seed)
    rows = []
    noise = {}
    for t in range(n):
        step = t * every
        for key in ("a0", "a1", "g", "k0", "k1", "loss", "lse"):
            noise[key] = 0.5 * noise.get(key, 0.0) + rng.normal(0, 0.05)
        grow = max(0, t - blow_at) if blow_at is not None else 0
        a1 = 8 * math.exp(noise["a1"] + 0.08 * grow)
        loss = 3 * math.exp(noise["loss"]) * (1 + (math.exp(0.3 * (grow - 30)) if grow > 30 else 0))
        rows += [(run_id, step, "attn.max_logit", "blocks.0.attn", 8 * math.exp(noise["a0"])),
                 (run_id, step, "attn.max_logit", "blocks.1.attn", a1),
                 (run_id, step, "grad.global_norm", "", 0.5 * math.exp(noise["g"] + 0.08 * max(0, grow - 5))),
                 (run_id, step, "act.kurtosis", "blocks.0", 3 * math.exp(noise["k0"])),
                 (run_id, step, "act.kurtosis", "blocks.1", 3 * math.exp(noise["k1"])),
                 (run_id, step, "logits.lse_mean", "", 5 + noise["lse"]),
                 (run_id, step, "loss", "", loss)]
    return pd.DataFrame(rows, columns=["run_id", "step", "metric", "module", "value"])


def _stable_calibration(seeds=range(20, 24), **detector):
    """Calibrate on stable synthetic runs that share the logging schedule (the detector's design: thresholds
    come from healthy runs, not from each run's own first values)."""
    hist = pd.concat([_history(f"c{i}", 2000, seed=i) for i in seeds], ignore_index=True)
    runs = pd.DataFrame({"run_id": [f"c{i}" for i in seeds]})
    return calibrate_warnings(runs, hist, envelope=0, **detector)  # a flat schedule: one threshold per metric


def test_fires_before_divergence_and_names_the_drifting_module():
    cal = _stable_calibration(window=100)
    h = _history("div", 200, blow_at=100)
    dstep = divergence_step(h[h.metric == "loss"].set_index("step")["value"])
    events = EarlyWarning(calibration=cal, window=100).replay(h[h.step < dstep])
    assert events, "no warning before divergence"
    first = events[0]
    assert first.kind == "early_warning" and first.module == "blocks.1.attn"
    assert first.extra["metric"] == "attn.max_logit"
    assert 100 * 10 < first.step < dstep - 50
    assert first.extra["steps_left_lo"] <= first.extra["steps_left"] <= first.extra["steps_left_hi"]


def test_quiet_on_long_stable_noisy_series_and_evaluate_summary():
    cal = _stable_calibration(window=100)
    hist = [_history(f"s{i}", 2000, seed=i) for i in range(4)] + [_history("d", 200, blow_at=100, seed=9)]
    history = pd.concat(hist, ignore_index=True)
    runs = pd.DataFrame({"run_id": [f"s{i}" for i in range(4)] + ["d"], "lr": 1e-2, "final_loss": 3.0,
                         "init_loss": 5.5, "diverged": [False] * 4 + [True]})
    per_run, summary = evaluate_warnings(runs, history, calibration=cal, window=100)
    assert summary["n_diverged"] == 1 and summary["n_warned_in_time"] == 1
    assert summary["median_lead_steps"] >= 50
    assert summary["false_alarm_step_rate"] < 5e-4
    d = per_run.set_index("run_id").loc["d"]
    assert d["label"] == "diverged" and d["lead_steps"] == d["diverge_step"] - d["first_warning"]
    assert (per_run.set_index("run_id").loc[[f"s{i}" for i in range(4)], "label"] == "stable").all()


def test_live_probe_and_offline_replay_raise_the_same_warnings():
    cal = {"thresholds": {m: 0.05 for m in ("attn.max_logit", "attn.entropy", "update.ratio", "loss")}}
    live = []
    # no loss gate: the 80-step run warns on its signals before its loss rises (the gate: its own tests)
    ew = EarlyWarning(calibration=cal, burn_in=10, window=20, persist=2, cooldown=15, callback=live.append,
                      loss_gate=0.0)
    cfg = TrainConfig(model=ProxyConfig(d_model=16, n_layers=1, head_dim=8, seq_len=16), steps=80, batch_size=4,
                      lr=0.3, lr_schedule="0:0.05,80:1", eval_batches=1)
    with pytest.warns(RuntimeWarning, match="early warning"):
        res = train_one(cfg, monitor=lambda m, o: Monitor(m, optimizer=o, every=1, run_id="live",
                                                          probes=["attention", "optimizer", ew]))
    offline = EarlyWarning(calibration=cal, burn_in=10, window=20, persist=2, cooldown=15,
                           loss_gate=0.0).replay(res.history)
    assert len(offline) >= 2
    assert [(e.step, e.extra["metric"], e.module, e.extra["steps_left"]) for e in live] == \
        [(e.step, e.extra["metric"], e.module, e.extra["steps_left"]) for e in offline]
    assert ew.alarm_steps and ew.alarm_steps[0] == offline[0].step


def test_monitor_integration_emits_event_warning_callback_and_snapshot(tmp_path):
    model = torch.nn.Linear(2, 2)
    got = []
    ew = EarlyWarning(watch={"loss": "log"}, min_metrics=1, calibration={"thresholds": {"loss": 5.0}}, burn_in=5, window=6,
                      persist=0, snapshot_dir=tmp_path, snapshot_steps=7, callback=got.append)
    mon = Monitor(model, probes=[ew], every=1, run_id="r1")
    rng = np.random.default_rng(0)
    with pytest.warns(RuntimeWarning, match="early warning"):
        for t in range(40):
            ew.note_batch(np.arange(t, t + 3))
            mon.step(2.0 * math.exp(rng.normal(0, 0.01) + (0.3 * (t - 25) if t > 25 else 0)))
    mon.close()
    assert got and got[0].step > 25 and [e for e in mon.events if e.kind == "early_warning"] == got
    snap = tmp_path / "r1" / f"step_{got[0].step:09d}"
    sig = pd.read_parquet(snap / "signals.parquet")
    assert sorted(sig["step"].unique()) == list(range(got[0].step - 6, got[0].step + 1))
    meta = json.loads((snap / "event.json").read_text())
    assert meta["batch_indices"] == list(range(got[0].step, got[0].step + 3)) and meta["step"] == got[0].step
    rng_state = torch.load(snap / "rng.pt", weights_only=False)
    assert set(rng_state) >= {"torch", "numpy", "python"}
    assert len(list(tmp_path.rglob("event.json"))) == 1  # max_snapshots=1


def test_bad_arguments_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="margin"):
        EarlyWarning(margin=0)
    with pytest.raises(ValueError, match="watch"):
        EarlyWarning(watch={"loss": "sqrt"})
    with pytest.raises(ValueError, match="min_metrics"):
        EarlyWarning(watch={"loss": "log"}, min_metrics=2)
    with pytest.raises(TypeError, match="callback"):
        EarlyWarning(callback=3)
    with pytest.raises(ValueError, match="lag_points"):
        EarlyWarning(lag_points=1)
    assert EarlyWarning(lag_points=7).detector.config.lag_points == 7
    assert EarlyWarning().detector.config.lag_points == D.DetectorConfig().lag_points == 5
    with pytest.raises(FileNotFoundError, match="calibration-out"):
        EarlyWarning(calibration=tmp_path / "missing.json")
    with pytest.raises(ValueError, match="no run stayed stable"):
        calibrate_warnings(pd.DataFrame({"run_id": ["d"]}), _history("d", 200, blow_at=100))


def test_probe_defaults_to_the_shipped_calibrations_and_loads_a_mapping_file(tmp_path):

    ew = EarlyWarning()
    assert ew.calibrations is D.DEFAULT_CALIBRATIONS and ew.detector.calibrations is D.DEFAULT_CALIBRATIONS
    watched = ("attn.max_logit", "grad.global_norm")
    quiet = D.Calibration(thresholds={m: 1e6 for m in watched}, source="quiet", interval=1)
    loud = D.Calibration(thresholds={m: 0.05 for m in watched}, source="loud", interval=10)
    h = _history("d", 200, every=10, blow_at=100)
    dstep = divergence_step(h[h.metric == "loss"].set_index("step")["value"])
    h = h[h.step < dstep]
    for name, mapping, warns in (("a.json", {"1": quiet.to_dict(), "10": loud.to_dict()}, True),
                                 ("b.json", {"1": loud.to_dict(), "10": quiet.to_dict()}, False)):
        p = tmp_path / name
        p.write_text(json.dumps(mapping))
        for path in (p, str(p)):
            ew = EarlyWarning(calibration=path, watch={m: "log" for m in watched}, window=100)
            assert ew.calibrations == {int(k): D.Calibration.from_dict(v) for k, v in mapping.items()}
            events = ew.replay(h)
            assert ew.detector.calibration == ew.calibrations[10]  # the history is logged every 10 steps
            assert bool(events) is warns, name
    with pytest.raises(FileNotFoundError, match="calibration-out"):
        EarlyWarning(calibration=str(tmp_path / "nope" / "cal.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"every10": loud.to_dict()}))
    with pytest.raises(ValueError, match="EarlyWarning\\(calibration\\)"):
        EarlyWarning(calibration=bad)


def _feed(ew: EarlyWarning, every: int, n: int = 4) -> list[str]:
    """Feed ``n`` logged steps ``every`` apart to the live path; the Python warnings it raised."""
    import warnings

    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        for i in range(n):
            ew.on_host(i * every, {("loss", ""): 3.0, ("grad.global_norm", ""): 1.0})
    return [str(w.message) for w in got if issubclass(w.category, RuntimeWarning)]


def test_probe_says_once_when_its_slope_window_is_far_from_its_calibrations():
    """Shipped calibrations: every=1 with 60-step windows, every=10 with 90. Runs logged every 1-8 steps have
    60-72 step windows (max(60, 9 * every)) and take every=1's, 9-12 take every=10's: no notice. every=20 (180
    steps) and 50 (450) are told once, with the command that fixes it."""
    for every in (1, 2, 5, 8, 9, 10, 12):
        ew = EarlyWarning()
        assert _feed(ew, every) == [], every
        assert ew.detector.calibration is D.DEFAULT_CALIBRATIONS[1 if every <= 8 else 10], every
    for every in (20, 50):
        msgs = _feed(EarlyWarning(), every)
        assert len(msgs) == 1, every
        assert f"logs every {every} steps" in msgs[0] and f"this run's is {9 * every}" in msgs[0]
        assert "windows of 90 steps" in msgs[0] and f"--every {every} --extend default" in msgs[0]
    own = D.Calibration(thresholds={"loss": 1.0}, interval=1, window=60)  # your own, made at every=1 only
    msgs = _feed(EarlyWarning(calibration=own), 10)
    assert len(msgs) == 1 and "windows of 60 steps; this run's is 90" in msgs[0]
    old = D.Calibration(thresholds={"loss": 1.0}, interval=1)  # a file from before windows were recorded
    assert _feed(EarlyWarning(calibration=old), 2) == []
    msgs = _feed(EarlyWarning(calibration=old), 10)
    assert len(msgs) == 1 and "runs logged every 1 steps" in msgs[0]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # offline replays stay silent, as for the warnings
        EarlyWarning().replay(_history("r", 20, every=50))


def test_probe_adopts_calibration_settings_it_was_not_given():

    cal = D.Calibration(thresholds={"attn.max_logit": 1.0}, settings={"margin": 2.5, "min_metrics": 1, "persist": 7})
    ew = EarlyWarning(calibration=cal)
    assert (ew.detector.config.margin, ew.detector.config.min_metrics, ew.detector.config.persist) == (2.5, 1, 7)
    ew = EarlyWarning(calibration=cal, margin=1.0, persist=0)  # given explicitly: kept
    assert (ew.detector.config.margin, ew.detector.config.min_metrics, ew.detector.config.persist) == (1.0, 1, 0)
    ew = EarlyWarning(calibration=D.Calibration(thresholds={}))  # nothing carried: DetectorConfig's defaults
    d = D.DetectorConfig()
    assert (ew.detector.config.margin, ew.detector.config.min_metrics, ew.detector.config.persist) == \
        (d.margin, d.min_metrics, d.persist)


def test_extend_calibration_takes_the_larger_finite_threshold_per_metric_and_bin():
    inf = math.inf
    base = D.Calibration(thresholds={"a": [1.0, 5.0, 2.0], "b": 3.0, "c": inf, "only_base": [4.0]}, bin_steps=50,
                         level_at_divergence={"a": 9.0, "b": 1.0}, ratio_lo=0.2, ratio_hi=4.0, fallback_lead=80,
                         settings={"margin": 1.0, "min_metrics": 2, "persist": 0}, source="bench", interval=1)
    own = D.Calibration(thresholds={"a": [2.0, 1.0, 1.0, 7.0], "b": [1.0, 6.0], "c": 0.5, "only_own": inf},
                        bin_steps=50, interval=10, source="mine")
    got = D.extend_calibration(base, own)
    # by hand: pad the shorter list with its last value, broadcast numbers, ignore inf unless both are inf
    assert got.thresholds == {"a": [2.0, 5.0, 2.0, 7.0], "b": [3.0, 6.0], "c": 0.5, "only_base": [4.0],
                              "only_own": inf}
    assert got.interval == 10 and got.bin_steps == 50 and dict(got.settings) == dict(base.settings)
    # own saw no divergence: base's forecast constants
    assert (got.ratio_lo, got.ratio_hi, got.fallback_lead) == (0.2, 4.0, 80)
    assert dict(got.level_at_divergence) == {"a": 9.0, "b": 1.0} and got.source == "mine, extending bench"
    seen = replace(own, level_at_divergence={"a": 7.0}, ratio_lo=0.5, ratio_hi=2.0, fallback_lead=40)
    got = D.extend_calibration(base, seen)
    assert (got.ratio_lo, got.ratio_hi, got.fallback_lead) == (0.5, 2.0, 40)
    assert dict(got.level_at_divergence) == {"a": 7.0, "b": 1.0}
    with pytest.raises(ValueError, match="envelope=50"):
        D.extend_calibration(base, replace(own, bin_steps=20))


def test_calibrate_warnings_extends_the_defaults_and_censors_the_end_of_stable_runs():
    seeds = range(30, 33)
    hist = pd.concat([_history(f"c{i}", 60, every=10, seed=i) for i in seeds], ignore_index=True)
    runs = pd.DataFrame({"run_id": [f"c{i}" for i in seeds]})
    own = calibrate_warnings(runs, hist, every=10)
    ext = calibrate_warnings(runs, hist, every=10, extend="default")
    base = D.DEFAULT_CALIBRATIONS[10]  # the runs log every 10 steps: the every=10 default is the floor
    assert ext.interval == own.interval == 10 and dict(ext.settings) == dict(base.settings)
    assert ext.thresholds == D.extend_calibration(base, own).thresholds
    for m, t in ext.thresholds.items():
        for i, v in enumerate(t):
            floor = base.thresholds.get(m, [math.inf])
            assert v >= min(floor[min(i, len(floor) - 1)], v)  # never below the default where it is finite
    # censor: a stable run whose last logged steps grow fast (cut before it could diverge) raises the
    # thresholds unless its last steps are left out
    tail = _history("t", 60, every=10, blow_at=48, seed=40)
    tail = tail[tail["step"] < 580]  # ends before the loss explodes: labelled stable
    both = pd.concat([hist, tail], ignore_index=True)
    runs2 = pd.DataFrame({"run_id": [*runs["run_id"], "t"]})
    loose = calibrate_warnings(runs2, both, every=10, envelope=0)
    cut = calibrate_warnings(runs2, both, every=10, envelope=0, censor=120)
    # by hand: drop each run's steps after (its last step - 120); a score only looks back, so nothing else changes
    last = both.groupby("run_id")["step"].transform("max")
    by_hand = calibrate_warnings(runs2, both[both["step"] <= last - 120], every=10, envelope=0)
    assert cut.thresholds == by_hand.thresholds
    assert loose.thresholds["attn.max_logit"] > cut.thresholds["attn.max_logit"]
    with pytest.raises(ValueError, match="censor"):
        calibrate_warnings(runs, hist, censor=-1)
    with pytest.raises(ValueError, match="every"):
        calibrate_warnings(runs, hist, every=0)


def test_loss_gate_through_the_monitor_reports_the_gap_and_delays_no_gated_warning():
    """Live through a Monitor: with ``loss_gate`` the first warning is the first ungated alarm step on which the
    loss EMA (span 20, pandas ``ewm``) is >= the gate above its running best, and the event carries that gap."""
    rng = np.random.default_rng(1)
    losses = [2.0 * math.exp(rng.normal(0, 0.01) + (0.05 * (t - 25) if t > 25 else 0)) for t in range(60)]

    def run(gate):
        got = []
        ew = EarlyWarning(watch={"loss": "log"}, min_metrics=1, calibration={"thresholds": {"loss": 2.0}}, burn_in=5,
                          window=6, persist=0, loss_gate=gate, callback=got.append)
        mon = Monitor(torch.nn.Linear(2, 2), probes=[ew], every=1, run_id=f"g{gate}")
        with pytest.warns(RuntimeWarning, match="early warning"):
            for v in losses:
                mon.step(v)
        mon.close()
        return got, ew.alarm_steps

    open_events, open_alarms = run(0.0)
    ema = pd.Series(losses).ewm(alpha=2 / 21, adjust=False).mean()
    gap = ema - ema.cummin()
    gated, alarms = run(0.3)
    assert open_events[0].extra["loss_gap"] is None and "nats above" not in open_events[0].message
    want = [s for s in open_alarms if gap[s] >= 0.3]
    assert alarms == want and gated[0].step == want[0] > open_events[0].step
    assert gated[0].extra["loss_gap"] == pytest.approx(gap[want[0]], rel=1e-6)
    assert "nats above its best" in gated[0].message
