"""Outcome labels and the runaway-growth detector against independent computations and known answers."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stabilitylab import detectors as D


def _reference_label(loss, span=20, rise=0.5, recover=0.25, patience=100):
    """Independent re-statement of the outcome definition with pandas' EWM (steps = 0..n-1, all finite)."""
    ema = pd.Series(loss, dtype="float64").ewm(alpha=2 / (span + 1), adjust=False).mean().to_numpy()
    best = np.minimum.accumulate(ema)
    spikes, t = [], 0
    while t < len(ema):
        if t > 0 and ema[t] > best[t - 1] + rise:
            base = best[t - 1]
            back = np.flatnonzero(ema[t + 1:t + patience + 1] <= base + recover)
            if not len(back):
                return "diverged", t, spikes
            spikes.append(t)
            t = t + 1 + int(back[0]) + 1
            continue
        t += 1
    return ("spiked_recovered" if spikes else "stable"), None, spikes


def _loss(n=600, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return 2.5 + 3.0 * np.exp(-t / 40) + rng.normal(0, 0.08, n)


def test_label_stable_spiked_and_diverged_match_an_ewm_reference():
    steps = np.arange(600)
    stable = _loss(seed=1)
    spiked = _loss(seed=2)
    spiked[300:320] += 1.5
    diverged = _loss(seed=3)
    diverged[350:] += np.linspace(0, 3, 250)
    for loss, want in ((stable, "stable"), (spiked, "spiked_recovered"), (diverged, "diverged")):
        got = D.label_outcome(steps, loss)
        label, dstep, spikes = _reference_label(loss)
        assert got.label == label == want
        assert list(got.spike_steps) == spikes
        if want == "diverged":
            assert got.diverge_step == dstep and 350 < dstep < 450
        else:
            assert math.isnan(got.diverge_step)
    assert 300 <= D.label_outcome(steps, spiked).spike_steps[0] <= 305


def test_label_nonfinite_loss_and_unrecovered_rise_at_the_end():
    steps = np.arange(300)
    loss = _loss(300)
    loss[200] = np.nan
    assert D.label_outcome(steps, loss) == D.Outcome("diverged", 200.0, ())
    loss = _loss(300)
    loss[250:] += 2.0  # rises 50 steps before the end, never comes back: diverged although patience is 100
    got = D.label_outcome(steps, loss)
    assert got.label == "diverged" and 250 <= got.diverge_step <= 256
    # a rise that starts right after an inf keeps the excursion's start as the divergence step
    loss[270] = np.inf
    assert D.label_outcome(steps, loss).diverge_step == got.diverge_step


def test_label_bad_arguments_name_them():
    with pytest.raises(ValueError, match="recover"):
        D.label_outcome([0, 1], [1.0, 1.0], rise=0.5, recover=0.5)
    with pytest.raises(ValueError, match="patience"):
        D.label_outcome([0, 1], [1.0, 1.0], patience=0)
    with pytest.raises(ValueError, match="2 steps but 1 losses"):
        D.label_outcome([0, 1], [1.0])


def test_rolling_slope_matches_polyfit_in_float64():
    rng = np.random.default_rng(0)
    steps = np.cumsum(rng.integers(1, 4, 200))
    x = np.cumsum(rng.normal(0, 1, 200))
    fit = D._Slope(window=25)
    for i, (s, v) in enumerate(zip(steps, x)):
        got = fit.add(int(s), float(v))
        sel = (steps[: i + 1] > s - 25)
        if sel.sum() >= 2:
            assert got == pytest.approx(np.polyfit(steps[: i + 1][sel], x[: i + 1][sel], 1)[0], rel=1e-9, abs=1e-12)


def _signal_run(n, every=1, runaway_at=None, decel=False, seed=0, module="blocks.1.attn"):
    """One run's logged steps: an attention logit with AR(1) noise in log space; optional exp-of-exp
    runaway from ``runaway_at`` or a fast but decelerating healthy rise (log growth)."""
    rng = np.random.default_rng(seed)
    out, eps = [], 0.0
    for s in range(0, n, every):
        eps = 0.5 * eps + rng.normal(0, 0.02)
        lv = math.log(5.0) + eps
        if decel:
            lv += 4.0 * math.log1p(s / 30)
        if runaway_at is not None and s > runaway_at:
            lv += 0.002 * (s - runaway_at) ** 1.6
        out.append((s, {("attn.max_logit", module): math.exp(lv), ("attn.max_logit", "blocks.0.attn"):
                        math.exp(math.log(5.0) + rng.normal(0, 0.02))}))
    return out


def _cal(every=1, cfg=None, seeds=range(4)):
    cfg = cfg or D.DetectorConfig(watch={"attn.max_logit": "log"}, min_metrics=1, margin=1.5)
    neg = [D.score_run(_signal_run(600, every, seed=s), cfg) for s in seeds]
    return cfg, D.calibrate(neg, config=cfg)


def test_detector_warns_on_accelerating_growth_not_on_noise_or_decelerating_growth():
    cfg, cal = _cal()
    assert set(cal.thresholds) == {"attn.max_logit"} and cal.bin_steps == cfg.envelope == 50
    assert all(t > 0 for t in cal.thresholds["attn.max_logit"])
    for s in range(10, 14):  # fresh noise seeds
        assert not D.decide_run(D.score_run(_signal_run(600, seed=s), cfg), cfg, cal).warnings
    # a healthy rise much steeper than the noise, but decelerating: the acceleration gate keeps it quiet
    healthy = D.score_run(_signal_run(600, decel=True, seed=20), cfg)
    thr = max(cal.thresholds["attn.max_logit"])
    late = [(100 * g, sc) for step, row in healthy if step >= cfg.burn_in for _, sc, g, _ in row if g == g]
    assert max(g for g, _ in late) > 3 * thr  # its slope alone would fire...
    assert max(sc for _, sc in late) < thr  # ...but it is scored only while accelerating
    assert not D.decide_run(healthy, cfg, cal).warnings
    det = D.decide_run(D.score_run(_signal_run(600, runaway_at=250, seed=21), cfg), cfg, cal)
    w = det.warnings[0]
    assert (w.metric, w.module) == ("attn.max_logit", "blocks.1.attn")
    assert 250 < w.step < 400 and w.score > 1


def test_warning_steps_agree_at_every_1_and_every_10():
    hits, early = {}, {}
    for every in (1, 10):
        # 8 noise runs: at every=10 a run logs 6 points per window, so 4 runs under-sample the envelope
        cfg, cal = _cal(every, seeds=range(8))
        hits[every], early[every] = [], 0
        for seed in range(21, 26):
            ws = D.decide_run(D.score_run(_signal_run(600, every, runaway_at=250, seed=seed), cfg), cfg, cal).warnings
            early[every] += any(w.step <= 250 for w in ws)
            hits[every].append(next(w.step for w in ws if w.step > 250))
    assert all(250 < h < 400 for e in hits for h in hits[e])
    assert np.median(np.abs(np.subtract(hits[1], hits[10]))) <= 40
    # a half window holds 3 points at every=10, so its thresholds are the max of few samples: a noise
    # excursion can exceed them on a fresh run, but rarely
    assert early[1] == 0 and early[10] <= 1


def test_margin_and_calibration_thresholds_bound_false_alarms_on_the_calibration_runs():
    cfg = D.DetectorConfig(watch={"attn.max_logit": "log"}, persist=0, min_metrics=1)
    neg = [D.score_run(_signal_run(600, seed=s), cfg) for s in range(4)]
    cal = D.calibrate(neg, config=cfg)
    assert all(not D.decide_run(r, cfg, cal).alarm_steps for r in neg)  # max score is never exceeded
    low = D.DetectorConfig(watch={"attn.max_logit": "log"}, persist=0, margin=0.5, min_metrics=1)
    assert any(D.decide_run(r, low, cal).alarm_steps for r in neg)


def test_forecast_extrapolates_to_the_calibrated_level_with_ratio_interval():
    cal = D.Calibration(thresholds={"m": 1.0}, level_at_divergence={"m": 7.0}, ratio_lo=0.5, ratio_hi=2.0,
                        fallback_lead=80.0)
    det = D.RunawayDetector(D.DetectorConfig(watch={"m": "log"}, min_metrics=1), cal)
    assert det.forecast("m", 5.0, 0.01) == pytest.approx((200.0, 100.0, 400.0))
    assert det.forecast("m", 8.0, 0.01) == pytest.approx((80.0, 40.0, 160.0))  # already past: fallback
    assert det.forecast("other", 1.0, 0.01) == pytest.approx((80.0, 40.0, 160.0))


def test_calibrate_forecast_constants_from_diverged_runs():
    cfg, cal0 = _cal()
    neg = [D.score_run(_signal_run(600, seed=s), cfg) for s in range(4)]
    pos = []
    for s in range(30, 36):
        run = _signal_run(700, runaway_at=250, seed=s)
        dstep = next(step for step, v in run if v[("attn.max_logit", "blocks.1.attn")] > 5 * math.e ** 2)
        pos.append((D.score_run(run, cfg), float(dstep)))
    cal = D.calibrate(neg, pos, cfg)
    assert cal.thresholds == cal0.thresholds
    # level at divergence: the largest log logit at the last step before divergence, median over runs
    want = np.median([max(x for (_, sc) in [r[[i for i, (st, _) in enumerate(r) if st < d][-1]]]
                          for _, _, _, x in sc) for r, d in pos])
    assert cal.level_at_divergence["attn.max_logit"] == pytest.approx(want)
    assert 0 < cal.ratio_lo <= cal.ratio_hi
    covered = 0
    for r, d in pos:
        w = D.decide_run(r, cfg, cal, before=d).warnings[0]
        covered += w.steps_left_lo <= d - w.step <= w.steps_left_hi
    assert covered >= 4  # the 10%-90% ratio interval covers most of its own calibration runs


def test_detector_config_errors_name_the_field():
    with pytest.raises(ValueError, match="watch"):
        D.DetectorConfig(watch={"loss": "sqrt"})
    with pytest.raises(ValueError, match="window"):
        D.DetectorConfig(window=1)
    with pytest.raises(ValueError, match="min_metrics"):
        D.DetectorConfig(watch={"loss": "log"}, min_metrics=2)
    with pytest.raises(ValueError, match="margin"):
        D.DetectorConfig(margin=0)
    with pytest.raises(ValueError, match="sustain"):
        D.DetectorConfig(sustain=1.5)
    for bad in (-0.1, 1.5, "x"):
        with pytest.raises(ValueError, match="floor"):
            D.DetectorConfig(floor=bad)


def test_envelope_thresholds_are_the_max_over_each_bin_and_its_neighbours():
    cfg = D.DetectorConfig(watch={"attn.max_logit": "log"}, min_metrics=1, envelope=100, burn_in=50, floor=0.0)
    runs = [D.score_run(_signal_run(600, seed=s), cfg) for s in range(3)]
    cal = D.calibrate(runs, config=cfg)
    peak = np.zeros(6)
    for run in runs:
        for step, row in run:
            if step >= 50:
                peak[step // 100] = max(peak[step // 100], *(sc for _, sc, _, _ in row))
    want = [max(peak[max(0, b - 1):b + 2].max(), 1e-6) for b in range(6)]  # bin 0 holds steps 50-99 only
    assert cal.thresholds["attn.max_logit"] == pytest.approx(want)
    # the floor: no bin below floor x the largest bin (default 0.25)
    floored = D.calibrate(runs, config=replace(cfg, floor=0.9)).thresholds["attn.max_logit"]
    assert floored == pytest.approx([max(w, 0.9 * max(want)) for w in want]) and D.DetectorConfig().floor == 0.25
    assert min(want) < 0.9 * max(want)  # so the floor changed something here
    flat = D.calibrate(runs, config=D.DetectorConfig(watch={"attn.max_logit": "log"}, min_metrics=1, envelope=0,
                                                   burn_in=50))
    assert flat.bin_steps == 0 and flat.thresholds["attn.max_logit"] == pytest.approx(peak.max())
    late = D.calibrate(runs, config=D.DetectorConfig(watch={"attn.max_logit": "log"}, min_metrics=1,
                                                   envelope=100, burn_in=250, floor=0.0)).thresholds["attn.max_logit"]
    p250 = np.zeros(6)
    for run in runs:
        for step, row in run:
            if step >= 250:
                p250[step // 100] = max(p250[step // 100], *(sc for _, sc, _, _ in row))
    assert late[0] == late[1] == late[2] == pytest.approx(max(p250[2:4].max(), 1e-6))  # no zero bins
    # the live detector picks the bin of the current step
    det = D.RunawayDetector(D.DetectorConfig(watch={"attn.max_logit": "log"}, min_metrics=1, burn_in=0), cal)
    det.decide(0, [])
    key = ("attn.max_logit", "m")
    assert det.decide(250, [(key, want[2] * 1.01, 0.01, 1.0)]) is not None
    det2 = D.RunawayDetector(D.DetectorConfig(watch={"attn.max_logit": "log"}, min_metrics=1, burn_in=0), cal)
    det2.decide(0, [])
    assert det2.decide(250, [(key, want[2] * 0.99, 0.01, 1.0)]) is None


def test_a_level_shift_is_not_scored_as_sustained_growth():
    cfg = D.DetectorConfig(watch={"m": "log"}, min_metrics=1, window=60)
    rng = np.random.default_rng(3)
    lv = [0.01 * rng.normal() + (math.log(18.0) if s >= 200 else 0.0) for s in range(400)]
    scored = D.score_run([(s, {("m", ""): math.exp(v)}) for s, v in enumerate(lv)], cfg)
    jump = []
    for step, row in scored:
        (_, score, g, _), = row
        if 200 <= step < 259:
            ref = np.polyfit(np.arange(step - 59, step + 1), lv[step - 59:step + 1], 1)[0]  # float64 reference
            assert g == pytest.approx(ref, rel=1e-6)
            jump.append((step, 100 * g, score))
    assert min(g for s, g, _ in jump if s >= 205) > 0.2  # the full-window slope climbs for a whole window...
    # ...but the jump is never scored as growth: while it is in the recent half, the older half is flat
    # (the score is at most its noise slope); once it is in the older half, the recent half is flat
    older = {s: 100 * np.polyfit(np.arange(s - 59, s - 29), lv[s - 59:s - 29], 1)[0] for s, _, _ in jump}
    assert all(sc <= max(older[s], 0.0) / cfg.sustain + 1e-9 for s, _, sc in jump if s < 230)
    assert all(sc == 0.0 for s, _, sc in jump if s >= 231)
    assert max(sc for _, _, sc in jump) < 0.05 * max(g for _, g, _ in jump)


def test_runaway_growth_is_scored_as_the_slope_sustained_over_both_halves_of_the_window():
    cfg = D.DetectorConfig(watch={"m": "log"}, min_metrics=1, window=60)
    lv = [0.0 if s < 100 else 1e-4 * (s - 100) ** 2 for s in range(300)]  # convex in log space from step 100
    scored = D.score_run([(s, {("m", ""): math.exp(v)}) for s, v in enumerate(lv)], cfg)
    checked = 0
    for step, row in scored:
        (_, score, _, _), = row
        if step >= 220:  # accelerating, and both halves of the window rise
            full = np.polyfit(np.arange(step - 59, step + 1), lv[step - 59:step + 1], 1)[0]
            older = np.polyfit(np.arange(step - 59, step - 29), lv[step - 59:step - 29], 1)[0]
            if full > 1.5 * np.polyfit(np.arange(step - 119, step - 59), lv[step - 119:step - 59], 1)[0]:
                assert score == pytest.approx(100 * min(full, older / cfg.sustain), rel=1e-6)
                checked += 1
    assert checked >= 10


def _ref_slope(steps, x, lo, hi):
    """float64 least-squares slope of the points with lo < step <= hi (NaN with fewer than 2)."""
    sel = (steps > lo) & (steps <= hi)
    return np.polyfit(steps[sel], x[sel], 1)[0] if sel.sum() >= 2 else math.nan


@pytest.mark.parametrize("lag_points", [2, 5, 8])
def test_min_points_widens_the_window_at_coarse_logging_and_scores_match_polyfit(lag_points):
    cfg = D.DetectorConfig(watch={"m": "log"}, min_metrics=1, window=60, lag_points=lag_points)
    assert cfg.min_points == 9 and D.DetectorConfig().lag_points == 5
    for every, want in ((1, 60), (3, 60), (7, 63), (10, 90)):
        det = D.RunawayDetector(cfg)
        det.score(0, {("m", ""): 1.0})
        det.score(every, {("m", ""): 1.0})
        assert det.window == want, every
    det = D.RunawayDetector(replace(cfg, min_points=12))
    det.score(5, {("m", ""): 1.0})
    det.score(15, {("m", ""): 1.0})
    assert det.window == 120
    # every=10: g over the last 90 steps (9 points), h over the last 45, lags of 90 and 45 steps
    rng = np.random.default_rng(7)
    steps = np.arange(0, 800, 10)
    lv = np.where(steps < 200, 0.0, 2e-5 * (steps - 200.0) ** 2) + rng.normal(0, 0.003, len(steps))
    scored = D.score_run([(int(s), {("m", ""): math.exp(v)}) for s, v in zip(steps, lv)], cfg)
    w, half = 90, 45
    checked = positive = 0
    for i, (step, row) in enumerate(scored):
        (_, score, g, x), = row
        assert x == pytest.approx(lv[i], rel=1e-12, abs=1e-15)
        ref_g = _ref_slope(steps, lv, step - w, step)
        if i >= 2:
            assert g == pytest.approx(ref_g, rel=1e-6, abs=1e-12)
        past = steps[steps <= step - w]
        # the gate's lagged slope counts only if fit on >= lag_points logged steps (the window's first slopes)
        lag_n = int(((steps > past[-1] - w) & (steps <= past[-1])).sum()) if len(past) else 0
        old = _ref_slope(steps, lv, past[-1] - w, past[-1]) if lag_n >= lag_points else math.nan
        past_h = steps[steps <= step - half]
        h_old = _ref_slope(steps, lv, past_h[-1] - half, past_h[-1]) if len(past_h) else math.nan
        h = _ref_slope(steps, lv, step - half, step)
        ok = ref_g > 0 and not math.isnan(old) and ref_g > cfg.accel * max(old, 0.0) and h >= ref_g and h_old > 0
        want = 100 * min(ref_g, h_old / cfg.sustain) if ok else 0.0
        assert score == pytest.approx(want, rel=1e-6, abs=1e-9), step
        checked += 1
        positive += want > 0
    assert checked == len(steps) and positive >= 5


@pytest.mark.parametrize("lag_points", [2, 5, 7])
def test_a_series_scores_once_its_lagged_slope_is_fit_on_lag_points_logged_steps(lag_points):
    # runaway growth from the first logged step, at every=10 (window 90): the slope lagged 90 steps behind
    # step t was fit on the points of steps 0..t-90, so it counts from t = 10 * (lag_points - 1) + 90
    cfg = D.DetectorConfig(watch={"m": "log"}, min_metrics=1, window=60, lag_points=lag_points)
    steps = range(0, 400, 10)
    scored = D.score_run([(s, {("m", ""): math.exp(1e-4 * s * s)}) for s in steps], cfg)
    first = min(step for step, row in scored if row[0][1] > 0)
    assert first == 10 * (lag_points - 1) + 90


def test_lag_points_below_2_is_rejected_naming_it():
    for bad in (1, 0, 2.5):
        with pytest.raises(ValueError, match="lag_points"):
            D.DetectorConfig(lag_points=bad)


def test_min_points_below_3_is_rejected_naming_it():
    for bad in (2, 0, -1, 9.5, True):
        with pytest.raises(ValueError, match="min_points"):
            D.DetectorConfig(min_points=bad)
    assert D.DetectorConfig(min_points=3).min_points == 3


def test_calibration_interval_round_trips_and_calibrate_sets_it():
    assert D.Calibration(thresholds={"m": 1.0}).interval == 1
    cal = D.Calibration(thresholds={"m": [1.0, 2.5]}, bin_steps=50, level_at_divergence={"m": 3.0}, interval=10,
                        source="x")
    d = cal.to_dict()
    assert d["interval"] == 10
    assert D.Calibration.from_dict(d) == cal
    assert D.Calibration.from_dict(json.loads(json.dumps(d))) == cal
    for every in (1, 10):
        assert _cal(every)[1].interval == every
    # the median of the runs' first gaps
    cfg = D.DetectorConfig(watch={"attn.max_logit": "log"}, min_metrics=1)
    runs = [D.score_run(_signal_run(300, e, seed=s), cfg) for s, e in enumerate((5, 10, 10))]
    assert D.calibrate(runs, config=cfg).interval == 10


def _two_cals():
    a = D.Calibration(thresholds={"m": 1e6}, source="a", interval=1)
    b = D.Calibration(thresholds={"m": 1e-3}, source="b", interval=10)
    return a, b


def test_load_calibration_accepts_every_form_and_rejects_bad_input(tmp_path):
    a, b = _two_cals()
    assert D.load_calibration(None) is None
    assert D.load_calibration(a) is a
    assert D.load_calibration(a.to_dict()) == a
    got = D.load_calibration({"1": a.to_dict(), "10": b.to_dict()})
    assert got == {1: a, 10: b} and all(type(k) is int for k in got)
    same = D.load_calibration({1: a, 10: b})
    assert same[1] is a and same[10] is b
    one, many = tmp_path / "one.json", tmp_path / "many.json"
    one.write_text(json.dumps(a.to_dict()))
    many.write_text(json.dumps({"1": a.to_dict(), "10": b.to_dict()}))
    assert D.calibrations_to_dict({1: a, 10: b}) == json.loads(many.read_text())
    assert D.load_calibration(one) == a and D.load_calibration(str(one)) == a
    assert D.load_calibration(many) == {1: a, 10: b}
    with pytest.raises(FileNotFoundError, match="calibration-out"):
        D.load_calibration(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="calibration-out"):
        D.load_calibration(tmp_path)  # a folder is no calibration file
    for bad in ({"every": a.to_dict()}, {}, {"0": a.to_dict()}, {"1": {"bogus": 1}}):
        with pytest.raises(ValueError, match="calibration"):
            D.load_calibration(bad)
    with pytest.raises(TypeError, match="calibration"):
        D.load_calibration(3)


def test_pick_calibration_takes_the_nearest_interval_in_log_scale():
    a, b = _two_cals()
    c = D.Calibration(thresholds={"m": 1.0}, source="c", interval=100)
    assert D.pick_calibration(None, 10) is None and D.pick_calibration(a, 10) is a
    cals = {1: a, 10: b}
    assert [D.pick_calibration(cals, i).source for i in (1, 2, 3, 4, 10, 30, 1000)] == list("aaabbbb")
    three = {1: a, 10: b, 100: c}
    keys = np.array(sorted(three))
    for i in range(1, 400):
        want = keys[np.argmin(np.abs(np.log(keys) - np.log(i)))]
        assert D.pick_calibration(three, i) is three[int(want)], i


def test_pick_calibration_takes_the_nearest_window_when_every_calibration_recorded_one():
    """Windows recorded: the nearest window in log scale wins (ties: the nearest interval); one calibration
    without a window, or no window asked for, falls back to the nearest interval."""
    a, b = _two_cals()
    a, b = replace(a, window=60), replace(b, window=90)
    cals = {1: a, 10: b}
    cfg = D.DetectorConfig()
    for every in range(1, 60):
        w = max(cfg.window, cfg.min_points * every)
        want = min((1, 10), key=lambda k: (abs(math.log(cals[k].window / w)), abs(math.log(k / every))))
        assert D.pick_calibration(cals, every, w) is cals[want], every
    assert [D.pick_calibration(cals, e, max(60, 9 * e)).source for e in (1, 5, 8, 9, 10, 50)] == list("aaabbb")
    assert D.pick_calibration(cals, 5).source == "b"  # no window asked for: nearest interval
    assert D.pick_calibration({1: a, 10: replace(b, window=0)}, 5, 60).source == "b"  # one without: intervals
    tie = {1: a, 10: replace(b, window=60)}
    assert D.pick_calibration(tie, 2, 60).source == "a" and D.pick_calibration(tie, 6, 60).source == "b"


def test_calibrate_records_its_slope_window_and_it_round_trips():
    run = [(s, {("m", ""): 1.0 + 0.01 * (s % 7)}) for s in range(0, 400, 10)]
    cfg = D.DetectorConfig(watch={"m": "log"}, min_points=9, min_metrics=1)
    cal = D.calibrate([D.score_run(run, cfg)], config=cfg)
    assert (cal.interval, cal.window) == (10, 90)
    assert D.Calibration.from_dict(cal.to_dict()) == cal
    one = [(s, v) for s, v in ((s, {("m", ""): 1.0 + 0.01 * (s % 7)}) for s in range(300))]
    assert D.calibrate([D.score_run(one, cfg)], config=cfg).window == 60  # every=1: the 60-step window
    for k, c in D.DEFAULT_CALIBRATIONS.items():
        assert c.window == max(cfg.window, cfg.min_points * c.interval) == max(60, 9 * k)


def _runaway_run(every, n=600, onset=150):
    return [(s, {("m", ""): math.exp(2e-5 * max(s - onset, 0) ** 2)}) for s in range(0, n, every)]


def test_detector_takes_the_thresholds_of_its_logging_interval():
    a, b = _two_cals()
    cfg = D.DetectorConfig(watch={"m": "log"}, min_metrics=1)
    for every, cals, want, warns in ((10, {1: a, 10: b}, b, True), (10, {1: b, 10: a}, a, False),
                                     (1, {1: a, 10: b}, a, False), (1, {1: b, 10: a}, b, True)):
        run = _runaway_run(every)
        det = D.RunawayDetector(cfg, cals)
        det.update(*run[0])
        det.update(*run[1])
        assert det.calibration is want, (every, want.source)
        for step, values in run[2:]:
            det.update(step, values)
        assert bool(det.warnings) is warns, (every, want.source)
        assert [w.step for w in D.decide_run(D.score_run(run, cfg), cfg, cals).warnings] == \
            [w.step for w in det.warnings]
    # the run does grow faster than b allows: a single calibration b warns at every=10 as well
    assert D.decide_run(D.score_run(_runaway_run(10), cfg), cfg, b).warnings


def test_default_calibrations_are_keyed_by_logging_interval():
    assert isinstance(D.DEFAULT_CALIBRATIONS, dict) and 1 in D.DEFAULT_CALIBRATIONS
    assert D.DEFAULT_CALIBRATION is D.DEFAULT_CALIBRATIONS[1]
    for every, cal in D.DEFAULT_CALIBRATIONS.items():
        assert isinstance(cal, D.Calibration) and cal.interval == every
        assert set(cal.thresholds) <= set(D.DEFAULT_WATCH)


def test_calibration_settings_are_adopted_only_where_asked():
    base = D.DetectorConfig(window=10, burn_in=0, min_metrics=2, margin=1.0)
    plain = D.Calibration(thresholds={"attn.max_logit": 2.0}, interval=1)
    carried = D.Calibration(thresholds={"attn.max_logit": 2.0}, interval=10,
                            settings={"margin": 3.0, "min_metrics": 1, "persist": 20})
    assert D.Calibration.from_dict(carried.to_dict()) == carried
    det = D.RunawayDetector(base, carried, adopt=("margin", "min_metrics"))
    assert det.config.margin == 3.0 and det.config.min_metrics == 1 and det.config.persist == 0
    assert det._thresholds["attn.max_logit"] == 6.0  # margin x threshold
    det = D.RunawayDetector(base, carried)  # nothing adopted: the config as given
    assert det.config == base and det._thresholds["attn.max_logit"] == 2.0
    # per logging interval: the settings switch with the calibration picked at the second logged step
    det = D.RunawayDetector(base, {1: plain, 10: carried}, adopt=D.ADOPTABLE)
    assert det.config == base
    det.update(0, {})
    det.update(10, {})
    assert det.calibration is carried and (det.config.margin, det.config.min_metrics, det.config.persist) == (3.0, 1, 20)
    with pytest.raises(ValueError, match="settings"):
        D.Calibration(thresholds={}, settings={"window": 5})
    with pytest.raises(ValueError, match="adopt"):
        D.RunawayDetector(base, plain, adopt=("window",))


def test_shipped_every10_margin_is_the_smallest_that_warns_at_most_5pct_of_the_external_runs_that_did_not_diverge():
    """The every=10 default's margin follows a rule stated in the README, from the committed external results
    (``benchmarks/warnings_external.py`` on its eight families, retrained on one machine): the smallest of its
    ``MARGINS`` at which at most 5% of the runs that did not diverge get any warning; the development settings
    file that ``warnings evaluate --settings-from`` reads carries the same settings as the defaults."""
    results = Path(__file__).parents[1] / "benchmarks" / "results"
    rows = [r for f in ("warnings_external_rerun.json", "warnings_external_heldout_rerun.json")
            for r in json.loads((results / f).read_text())["tradeoff"] if r["every"] == 10]
    margins = sorted({r["margin"] for r in rows})
    share = {m: sum(r["not_diverged_warned"] for r in rows if r["margin"] == m)
             / sum(r["not_diverged"] for r in rows if r["margin"] == m) for m in margins}
    assert len({r["model"] for r in rows}) == 8 and sum(r["not_diverged"] for r in rows if r["margin"] == 2.0) > 100
    assert D.DEFAULT_CALIBRATIONS[10].settings["margin"] == min(m for m in margins if share[m] <= 0.05)
    dev = D.load_calibration(results / "warnings_calibration_dev.json")
    for every, cal in D.DEFAULT_CALIBRATIONS.items():
        assert dict(dev[every].settings) == dict(cal.settings), every


# ---------------------------------------------------------------------------------------------- further rules
def _rule_cals(main_thr=3.0, rule_thr=1.0, every=1):
    rule = D.Calibration(thresholds={"m": rule_thr, "g": rule_thr}, interval=every, window=90,
                         settings={"margin": 1.0, "min_metrics": 1, "persist": 0}, source="rule")
    main = D.Calibration(thresholds={"m": main_thr, "g": main_thr}, interval=every, window=60, also=(rule,),
                         settings={"margin": 1.0}, source="main")
    return main, rule


def _two_signal_run(every=1, n=600, onset=150, seed=0):
    rng = np.random.default_rng(seed)
    return [(s, {("m", ""): math.exp(2e-5 * max(s - onset, 0) ** 2 + rng.normal(0, 0.02)),
                 ("g", ""): math.exp(1.5e-5 * max(s - onset - 40, 0) ** 2 + rng.normal(0, 0.02))})
            for s in range(0, n, every)]


@pytest.mark.parametrize("every", [1, 10])
def test_further_rule_warns_as_the_union_of_two_independent_detectors(every):
    """A detector whose calibration carries a further rule warns on the first step either rule warns, and its alarm
    steps are the union of both rules' (each rule replayed alone as an independent detector); live and offline agree."""
    cfg = D.DetectorConfig(watch={"m": "log", "g": "log"}, min_metrics=2)
    for main_thr, rule_thr in ((5.0, 0.4), (0.3, 5.0), (0.35, 0.5)):
        main, rule = _rule_cals(main_thr, rule_thr, every)
        run = _two_signal_run(every)
        live = D.RunawayDetector(cfg, main, adopt=D.ADOPTABLE)
        for step, values in run:
            live.update(step, values)
        alone_main = D.RunawayDetector(cfg, replace(main, also=()), adopt=D.ADOPTABLE)
        alone_rule = D.RunawayDetector(replace(cfg, window=90), rule, adopt=D.ADOPTABLE)
        for step, values in run:
            alone_main.update(step, values)
            alone_rule.update(step, values)
        firsts = [d.warnings[0].step for d in (alone_main, alone_rule) if d.warnings]
        assert firsts, (main_thr, rule_thr)
        assert live.warnings[0].step == min(firsts)
        assert live.alarm_steps == sorted(set(alone_main.alarm_steps) | set(alone_rule.alarm_steps))
        off = D.decide_run(D.score_run(run, cfg), cfg, main, also=D.score_rules(run, cfg, main))
        assert [w.step for w in off.warnings] == [w.step for w in live.warnings]
        assert off.alarm_steps == live.alarm_steps
        # without the rule's scores decide_run replays the main rule alone
        assert [w.step for w in D.decide_run(D.score_run(run, cfg), cfg, main).warnings] == \
            [w.step for w in D.decide_run(D.score_run(run, cfg), cfg, replace(main, also=())).warnings]


def test_further_rule_sees_the_first_step_when_picked_at_the_second_and_scales_with_the_margin():
    cfg = D.DetectorConfig(watch={"m": "log", "g": "log"}, min_metrics=2)
    main, rule = _rule_cals(50.0, 0.5, every=10)
    plain = replace(main, interval=1, also=())
    run = _two_signal_run(10)
    det = D.RunawayDetector(cfg, {1: plain, 10: main}, adopt=D.ADOPTABLE)
    for step, values in run:
        det.update(step, values)
    alone = D.RunawayDetector(replace(cfg, window=90), rule, adopt=D.ADOPTABLE)
    for step, values in run:
        alone.update(step, values)
    assert det.calibration is main and det._children[0]._first == run[0][0]
    assert [w.step for w in det.warnings] == [w.step for w in alone.warnings] and det.warnings
    off = D.decide_run(D.score_run(run, cfg), cfg, {1: plain, 10: main}, also=D.score_rules(run, cfg, main))
    assert [w.step for w in off.warnings] == [w.step for w in det.warnings]
    # a margin set apart from the calibration's (1 here) scales the rule's thresholds alike
    det = D.RunawayDetector(replace(cfg, margin=4.0), main, adopt=("min_metrics", "persist"))
    assert det._children[0].config.margin == 4.0 and det._children[0]._thresholds["m"] == 2.0
    with pytest.raises(ValueError, match="scored with the 90-step window"):
        D.decide_run(D.score_run(run, cfg), cfg, main, also={60: D.score_run(run, cfg)})


def test_calibration_with_further_rules_round_trips_and_rejects_bad_rules(tmp_path):
    main, rule = _rule_cals()
    back = D.Calibration.from_dict(json.loads(json.dumps(main.to_dict())))
    assert back == main and isinstance(back.also[0], D.Calibration)
    p = tmp_path / "cal.json"
    p.write_text(json.dumps(D.calibrations_to_dict({1: main})))
    assert D.load_calibration(str(p))[1].also[0] == rule
    assert D.rule_windows({1: main, 10: replace(main, also=())}) == [90]
    with pytest.raises(ValueError, match="slope window"):
        D.Calibration(thresholds={}, also=(replace(rule, window=0),))
    with pytest.raises(ValueError, match="no further rules"):
        D.Calibration(thresholds={}, also=(main,))


def test_shipped_every1_default_carries_the_sustained_rule_of_warnings_rules_json():
    """The rule's margin is the one ``benchmarks/warnings_rules.py`` chose (the smallest of its margins that adds no
    warned stable or spiked run on the benchmark, each seed and each mechanism held out), its thresholds that run's."""
    res = json.loads((Path(__file__).parents[1] / "benchmarks" / "results" / "warnings_rules.json").read_text())
    base = res["rows"][0]["warned_not_diverged"]
    chosen = next(r for r in res["rows"][1:] if not r["alone"] and r["warned_not_diverged"] == base)
    assert res["chosen_margin"] == chosen["margin"]
    (rule,) = D.DEFAULT_CALIBRATIONS[1].also
    want = D.Calibration.from_dict(chosen["calibration"]["also"][0])
    assert rule.settings == {"margin": chosen["margin"], "min_metrics": 1, "persist": 0} == want.settings
    assert rule.window == res["window"] == want.window
    for m, thr in want.thresholds.items():
        assert rule.thresholds[m] == pytest.approx(thr, rel=1e-3)
    assert not D.DEFAULT_CALIBRATIONS[10].also


# ---------------------------------------------------------------------------------------------- loss gate
def _gated_run(every=1, n=600, onset=150, rise_at=330, seed=0, nan_at=()):
    """Two accelerating signals from ``onset`` and a loss that falls, then rises from ``rise_at`` (with noise)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(0, n, every):
        loss = 3.0 * math.exp(-s / 400) + 0.004 * max(s - rise_at, 0) ** 1.2 + rng.normal(0, 0.02)
        row = {("m", "blocks.0"): math.exp(2e-5 * max(s - onset, 0) ** 2 + rng.normal(0, 0.02)),
               ("g", ""): math.exp(1.5e-5 * max(s - onset - 40, 0) ** 2 + rng.normal(0, 0.02)),
               ("loss", ""): math.nan if s in nan_at else loss}
        out.append((s, row))
    return out


def _reference_gap(run, every, span=20):
    """EMA of the finite logged losses (alpha = 2 k / (span + k)) minus its running best, per logged step."""
    loss = pd.Series([v[("loss", "")] for _, v in run], index=[s for s, _ in run])
    fin = loss[np.isfinite(loss)]
    ema = fin.ewm(alpha=2 * every / (span + every), adjust=False).mean()
    return (ema - ema.cummin()).reindex(loss.index).ffill()


@pytest.mark.parametrize("every", [1, 10])
def test_loss_gate_keeps_exactly_the_alarm_steps_where_the_loss_ema_is_above_its_best(every):
    """With ``loss_gate=d`` the alarm steps are the ungated ones on which an independent EMA of the loss (pandas
    ``ewm``) is at least ``d`` above its running minimum; the first warning is the first of them; a non-finite loss
    leaves the gate where it was; live ``update`` and offline ``decide_run`` agree."""
    watch = {"m": "log", "g": "log", "loss": "log"}
    cal = D.Calibration(thresholds={"m": 0.3, "g": 0.3, "loss": math.inf}, interval=every, window=60 if every == 1 else 90)
    run = _gated_run(every, nan_at=(400, 410))
    gap = _reference_gap(run, every)
    open_cfg = D.DetectorConfig(watch=watch, min_metrics=1, loss_gate=0.0)
    base = D.decide_run(D.score_run(run, open_cfg), open_cfg, cal)
    assert base.alarm_steps and base.alarm_steps[0] < 300  # the signals alone warn while the loss still falls
    for d in (0.05, 0.2):
        cfg = replace(open_cfg, loss_gate=d)
        off = D.decide_run(D.score_run(run, cfg), cfg, cal)
        want = [s for s in base.alarm_steps if gap[s] >= d]
        assert want and off.alarm_steps == want
        assert off.warnings[0].step == want[0] > 330
        assert math.isclose(off.gate_gap, gap.iloc[-1], rel_tol=1e-9, abs_tol=1e-12)
        live = D.RunawayDetector(cfg, cal)
        for step, values in run:
            live.update(step, values)
        assert live.alarm_steps == off.alarm_steps and [w.step for w in live.warnings] == [w.step for w in off.warnings]
    # the gate reads the loss also where it is not watched: the same alarms (the loss never scored here)
    unwatched = D.DetectorConfig(watch={"m": "log", "g": "log"}, min_metrics=1, loss_gate=0.05)
    assert D.decide_run(D.score_run(run, unwatched), unwatched, cal).alarm_steps == \
        [s for s in base.alarm_steps if gap[s] >= 0.05]
    # a run that logs no loss is not gated
    no_loss = [(s, {k: v for k, v in vals.items() if k[0] != "loss"}) for s, vals in run]
    cfg = replace(open_cfg, loss_gate=0.2)
    assert D.decide_run(D.score_run(no_loss, cfg), cfg, cal).alarm_steps == \
        D.decide_run(D.score_run(no_loss, open_cfg), open_cfg, cal).alarm_steps


def test_loss_gate_applies_to_every_rule_of_a_calibration():
    """A further rule (``Calibration.also``) is gated as the main rule: its alarms too need the loss above its best."""
    cfg = D.DetectorConfig(watch={"m": "log", "g": "log", "loss": "log"}, min_metrics=2, loss_gate=0.1)
    main, rule = _rule_cals(5.0, 0.4)
    main = replace(main, thresholds={**main.thresholds, "loss": math.inf})
    rule = replace(rule, thresholds={**rule.thresholds, "loss": math.inf})
    main = replace(main, also=(rule,))
    run = _gated_run(1)
    gap = _reference_gap(run, 1)
    ungated = replace(cfg, loss_gate=0.0)
    live_open = D.RunawayDetector(ungated, main, adopt=D.ADOPTABLE)
    live = D.RunawayDetector(cfg, main, adopt=D.ADOPTABLE)
    for step, values in run:
        live_open.update(step, values)
        live.update(step, values)
    assert live_open.alarm_steps and live_open.alarm_steps[0] < 300
    assert live.alarm_steps == [s for s in live_open.alarm_steps if gap[s] >= 0.1]
    off = D.decide_run(D.score_run(run, cfg), cfg, main, also=D.score_rules(run, cfg, main))
    assert off.alarm_steps == live.alarm_steps and [w.step for w in off.warnings] == [w.step for w in live.warnings]


def test_loss_gate_errors_name_the_argument_and_the_fix():
    for bad in (-0.1, math.nan, math.inf, "0.1"):
        with pytest.raises(ValueError, match="loss_gate"):
            D.DetectorConfig(loss_gate=bad)
    with pytest.raises(ValueError, match="gate_span"):
        D.DetectorConfig(gate_span=0)
    from stabilitylab import EarlyWarning

    with pytest.raises(ValueError, match="loss_gate"):
        EarlyWarning(loss_gate=-1.0)
    assert EarlyWarning(loss_gate=0.0).config.loss_gate == 0.0
    assert EarlyWarning().config.loss_gate == D.DetectorConfig().loss_gate


def test_shipped_loss_gate_is_the_one_the_stated_rule_picks_on_the_choice_families():
    """``DetectorConfig.loss_gate``'s default follows the rule of ``benchmarks/warnings_gate.py``, recomputed here
    from its committed per-half rows: the gate with the largest Youden's J (divergences warned >= 50 steps ahead minus
    runs that did not diverge warned), summed over every=1 and every=10 at the shipped margins, on the four choice
    families (ties: the smaller gate); and on the four held-out families it warns no more runs than no gate."""
    res = json.loads((Path(__file__).parents[1] / "benchmarks" / "results" / "warnings_gate.json").read_text())
    shipped = {e: D.DEFAULT_CALIBRATIONS[e].settings["margin"] for e in (1, 10)}
    rows = [r for r in res["halves"] if r["margin"] == shipped[r["every"]]]

    def j(r):
        return r["warned_50"] / r["n_diverged"] - r["not_diverged_warned"] / r["not_diverged"]

    gates = sorted({r["loss_gate"] for r in rows})
    score = {g: sum(j(r) for r in rows if r["half"] == "choose" and r["loss_gate"] == g) for g in gates}
    assert len(gates) >= 4 and {r["every"] for r in rows} == {1, 10}
    best = max(gates, key=lambda g: (round(score[g], 12), -g))
    assert D.DetectorConfig().loss_gate == best == res["chosen_gate"] > 0
    held = {(r["every"], r["loss_gate"]): r for r in rows if r["half"] == "report"}
    for e in (1, 10):
        assert held[(e, best)]["not_diverged_warned"] <= held[(e, 0.0)]["not_diverged_warned"]


def _reference_alarms(scored, thr, window, burn_in, need, solo=()):
    """Alarm steps from the scores alone: a step is an alarm when some series is above its threshold on it and,
    within the last ``window`` steps, series of ``need`` metrics (or one of ``solo``) were."""
    first = scored[0][0]
    hot_at: dict[str, list[int]] = {}
    alarms = []
    for step, row in scored:
        if step - first < burn_in:
            continue
        now = {key[0] for key, score, _, _ in row if score > thr[key[0]]}
        for m in now:
            hot_at.setdefault(m, []).append(step)
        recent = {m for m, at in hot_at.items() if any(step - a < window for a in at)}
        if now and (len(recent) >= need or recent & set(solo)):
            alarms.append(step)
    return alarms


@pytest.mark.parametrize("every", [1, 10])
def test_a_solo_metric_meets_min_metrics_alone_and_the_alarms_match_a_reference(every):
    """``DetectorConfig.solo``: a hot series of a solo metric warns without a second metric; the alarm steps equal
    an independent count over the scores (some series above its threshold now, and two metrics, or a solo one,
    above within the window); ``solo`` of every metric is ``min_metrics=1``; the loss gate still holds; live and
    offline agree."""
    thr = {"m": 0.3, "g": 0.3}
    cal = D.Calibration(thresholds=thr, interval=every, window=60 if every == 1 else 90)
    run = _two_signal_run(every)  # m accelerates from step 150, g from step 190
    cfg = D.DetectorConfig(watch={"m": "log", "g": "log"}, min_metrics=2, loss_gate=0.0)
    scored = D.score_run(run, cfg)
    window = cfg.window_at(every)
    got = {}
    for solo in ((), ("m",), ("g",), ("m", "g")):
        c = replace(cfg, solo=solo)
        off = D.decide_run(scored, c, cal)
        want = _reference_alarms(scored, thr, window, c.burn_in, 2, solo)
        assert want and off.alarm_steps == want, solo
        live = D.RunawayDetector(c, cal)
        for step, values in run:
            live.update(step, values)
        assert live.alarm_steps == off.alarm_steps and [w.step for w in live.warnings] == [w.step for w in off.warnings]
        got[solo] = off
    assert got[("m",)].warnings[0].step < got[()].warnings[0].step  # m alone warns before g joins it
    assert got[("m",)].warnings[0].metric == "m"
    one = replace(cfg, min_metrics=1)
    assert D.decide_run(scored, one, cal).alarm_steps == got[("m", "g")].alarm_steps
    # the gate still holds: a loss at its best keeps a solo metric quiet
    flat = [(s, {**v, ("loss", ""): 3.0 - 1e-3 * s}) for s, v in run]
    gated = replace(cfg, solo=("m",), loss_gate=0.1)
    assert not D.decide_run(D.score_run(flat, gated), gated, cal).alarm_steps


def test_solo_errors_name_the_argument_and_the_fix():
    watch = {"m": "log", "g": "log"}
    with pytest.raises(ValueError, match=r"solo='m'.*add a metric to watch"):
        D.DetectorConfig(watch=watch, solo="m")
    with pytest.raises(ValueError, match=r"solo=\('x',\).*watched: \['g', 'm'\]"):
        D.DetectorConfig(watch=watch, solo=("x",))
    assert D.DetectorConfig(watch=watch, solo=["m"]).solo == ("m",)


def test_shipped_solo_is_the_one_the_stated_rule_picks_on_the_development_build_and_choice_families():
    """``DetectorConfig.solo``'s default follows the rule of ``benchmarks/warnings_solo.py``, recomputed here from
    its committed rows: of no solo metric and each watched metric alone, the largest Youden's J (divergences warned
    >= 50 steps ahead minus stable / not-diverged runs warned) summed over the development build (each mechanism
    held out) and the four choice families at every=1 (the first candidate, none, on a tie), adopted only if on
    the four held-out families it warns no more runs that did not diverge than none."""
    res = json.loads((Path(__file__).parents[1] / "benchmarks" / "results" / "warnings_solo.json").read_text())
    cands = res["candidates"]
    assert cands[0] == "" and set(cands[1:]) == set(D.DEFAULT_WATCH)
    dev = {r["solo"]: r["warned_50_share"] - r["stable_warned_share"]
           for r in res["development"] if r["split"] == "all mechanisms held out"}
    fam = {r["solo"]: r["warned_50"] / r["diverged"] - r["not_diverged_warned"] / r["not_diverged"]
           for r in res["families_by_half"] if r["half"] == "choose"}
    assert set(dev) == set(fam) == set(cands)
    total = {c: dev[c] + fam[c] for c in cands}
    best = max(cands, key=lambda c: round(total[c], 12))  # max keeps the first on a tie
    assert best == res["chosen"]
    # adopted only if it warns no more of the held-out families' runs that did not diverge than none does
    held = {r["solo"]: r["not_diverged_warned"] for r in res["families_by_half"] if r["half"] == "report"}
    adopted = best if held[best] <= held[""] else ""
    assert adopted == res["adopted"] and D.DetectorConfig().solo == (tuple(adopted.split(",")) if adopted else ())
    # every family's runs were replayed for every candidate, the benchmark's for none and the chosen one
    per_run = pd.DataFrame(res["per_run"])
    fams = per_run[per_run["group"] == "families"]
    assert fams.groupby("solo")["run_id"].nunique().to_dict() == {c: fams["run_id"].nunique() for c in cands}
    assert set(per_run[per_run["group"] == "benchmark"]["solo"]) == {"", best}
