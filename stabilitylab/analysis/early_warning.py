"""Offline evaluation of the early warning: its measured lead time and false-alarm rate, and calibration.

The live probe is ``stabilitylab.probes.early_warning.EarlyWarning`` (re-exported here); the offline
functions replay the same detector (``stabilitylab.detectors``) over logged tables.

``evaluate_warnings(runs, history)`` labels every run from its loss (``detectors.label_outcome``:
diverged / spiked and recovered / stable), replays the detector over what was logged before divergence
and measures lead times and false alarms; ``calibrate_warnings`` fits the detector's thresholds and
forecast constants to your own runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from stabilitylab import detectors as D
from stabilitylab import metrics as M
from stabilitylab._checks import check_every, int_at_least
from stabilitylab.detectors import DEFAULT_WATCH, mann_kendall, robust_z
from stabilitylab.probes.early_warning import EarlyWarning

__all__ = ["DEFAULT_WATCH", "EarlyWarning", "calibrate_warnings", "divergence_step", "evaluate_warnings",
           "mann_kendall", "robust_z", "run_steps"]


def divergence_step(loss: pd.Series, factor: float = 10.0) -> float:
    """First step whose loss is non-finite or above ``factor`` x the running minimum of earlier losses.

    A blow-up criterion for plots; the outcome labels of ``evaluate_warnings`` use
    ``detectors.label_outcome`` instead (it also catches runs that rise and stay up without a 10x blow-up).

    Args:
        loss: logged losses indexed by step.
        factor: blow-up factor over the baseline.
    Returns:
        the step, or NaN if the run never blew up.
    """
    loss = loss.sort_index()
    best = math.inf
    for step, v in loss.items():
        if not math.isfinite(v) or (math.isfinite(best) and v > factor * best):
            return float(step)
        best = min(best, v)
    return math.nan


def evaluate_warnings(runs: pd.DataFrame, history: pd.DataFrame, min_lead: int = 50,
                      outcome: Mapping[str, float] | None = None, **detector) -> tuple[pd.DataFrame, dict]:
    """Lead time and false-alarm rates of ``EarlyWarning(**detector)`` over a sweep.

    Args:
        runs: runs table (``run_id``).
        history: tidy history of those runs (needs the ``loss`` metric).
        min_lead: lead time (steps) counted as "warned in time".
        outcome: ``detectors.label_outcome`` arguments (default: its defaults).
        **detector: ``EarlyWarning`` arguments (``calibration``, ``margin``, ...).

    Returns:
        ``(per_run, summary)``: per run ``run_id, label, diverge_step, first_warning, lead_steps, metric,
        module, steps_left, steps_left_lo, steps_left_hi, n_warnings, alarm_steps, logged_steps, outcome``
        (label: ``diverged``, ``spiked_recovered``, ``stable``; outcome: ``warned``, ``late``, ``missed`` on
        diverged runs, ``false_alarm`` / ``quiet`` on the others); the summary has ``n_diverged``,
        ``n_warned_in_time``, ``n_late``, ``n_missed``, ``median_lead_steps``, ``n_stable`` (stable or
        spiked and recovered), ``false_alarm_run_rate`` (those runs with a warning / those runs),
        ``false_alarm_step_rate`` (alarm steps / logged steps after burn-in on those runs) and
        ``forecast_coverage`` (warned divergences whose true lead is inside the forecast interval).
    """
    from stabilitylab.analysis.tables import check_history, check_runs

    runs = check_runs(runs, "evaluate_warnings")
    history = check_history(history, "evaluate_warnings")
    ew = EarlyWarning(**detector)
    burn = ew.config.burn_in
    rows = []
    by_run = dict(tuple(history.groupby("run_id", sort=False)))
    cols = ["run_id", "label", "diverge_step", "first_warning", "lead_steps", "metric", "module", "steps_left",
            "steps_left_lo", "steps_left_hi", "n_warnings", "alarm_steps", "logged_steps", "judged_steps", "outcome"]
    for r in runs.itertuples(index=False):
        h = by_run.get(r.run_id)
        if h is None or h.empty:
            continue
        loss = h[h["metric"] == M.LOSS].sort_values("step")
        o = D.label_outcome(loss["step"].to_numpy(), loss["value"].to_numpy(dtype=float), **(outcome or {}))
        dstep = o.diverge_step
        if o.label == "diverged":  # the detector only sees what was logged before divergence
            h = h[h["step"] < dstep]
        events = ew.replay(h, r.run_id) if len(h) else []
        e = events[0] if events else None
        first = float(e.step) if e else math.nan
        lead = dstep - first if e and o.label == "diverged" else math.nan
        steps = np.sort(h["step"].unique())
        if o.label == "diverged":
            res = "missed" if e is None else ("warned" if lead >= min_lead else "late")
        else:
            res = "false_alarm" if e else "quiet"
        x = e.extra if e else {}
        rows.append({"run_id": r.run_id, "label": o.label, "diverge_step": dstep, "first_warning": first,
                     "lead_steps": lead, "metric": x.get("metric", ""), "module": x.get("module", ""),
                     "steps_left": x.get("steps_left", math.nan), "steps_left_lo": x.get("steps_left_lo", math.nan),
                     "steps_left_hi": x.get("steps_left_hi", math.nan), "n_warnings": len(events),
                     "alarm_steps": len(ew.alarm_steps), "logged_steps": len(steps),
                     "judged_steps": int((steps - steps[0] >= burn).sum()) if len(steps) else 0, "outcome": res})
    per_run = pd.DataFrame(rows, columns=cols)
    div = per_run[per_run["label"] == "diverged"]
    calm = per_run[per_run["label"] != "diverged"]
    warned = div[div["lead_steps"].notna()]
    judged = calm["judged_steps"].sum()
    inside = (warned["steps_left_lo"] <= warned["lead_steps"]) & (warned["lead_steps"] <= warned["steps_left_hi"])
    summary = {
        "n_runs": len(per_run), "n_diverged": len(div),
        "n_warned_in_time": int((div["outcome"] == "warned").sum()),
        "n_late": int((div["outcome"] == "late").sum()), "n_missed": int((div["outcome"] == "missed").sum()),
        "median_lead_steps": float(warned["lead_steps"].median()) if len(warned) else math.nan,
        "n_stable": len(calm),
        "false_alarm_run_rate": float((calm["outcome"] == "false_alarm").mean()) if len(calm) else math.nan,
        "false_alarm_step_rate": float(calm["alarm_steps"].sum() / judged) if judged else math.nan,
        "forecast_coverage": float(inside.mean()) if len(warned) else math.nan,
    }
    return per_run, summary


def run_steps(history: pd.DataFrame, every: int = 1) -> dict[str, list[tuple[int, dict]]]:
    """run_id -> ``[(step, {(metric, module): value}), ...]`` (what the detector sees), keeping the logged
    steps with ``step % every == 0`` (what a Monitor with that ``every`` would have logged)."""
    h = history[history["step"] % every == 0] if every > 1 else history
    h = h.sort_values(["run_id", "step"], kind="stable")
    out: dict[str, list[tuple[int, dict]]] = {}
    rid, step = h["run_id"].to_numpy(), h["step"].to_numpy()
    keys = list(zip(h["metric"].tolist(), h["module"].fillna("").tolist()))
    vals = h["value"].to_numpy(dtype=float).tolist()
    cut = np.flatnonzero((rid[1:] != rid[:-1]) | (step[1:] != step[:-1])) + 1
    for a, b in zip(np.r_[0, cut], np.r_[cut, len(step)]):
        out.setdefault(str(rid[a]), []).append((int(step[a]), dict(zip(keys[a:b], vals[a:b]))))
    return out


def logged_interval(steps: Mapping[str, Sequence[tuple[int, Any]]]) -> int:
    """The logging interval of ``run_steps`` output: the median gap between consecutive logged steps over all
    runs (1 when no run has two logged steps). A store a Monitor wrote with ``every=10`` subsampled to
    ``every=1`` is still logged every 10 steps, and ``every=15`` keeps its steps 0, 30, 60, ...: 30."""
    gaps = [b[0] - a[0] for run in steps.values() for a, b in zip(run, run[1:])]
    return max(int(np.median(gaps)), 1) if gaps else 1


def calibrate_warnings(runs: pd.DataFrame, history: pd.DataFrame, outcome: Mapping[str, float] | None = None,
                       source: str = "", envelope: int = 50, extend=None, censor: int = 0, every: int = 1,
                       **detector) -> D.Calibration:
    """Calibrate ``EarlyWarning`` on your own runs: thresholds from the runs that did not diverge (ideally
    stable runs with the schedule you will use), forecast constants from those that diverged.

    Args:
        runs: runs table (``run_id``).
        history: their tidy histories (need ``loss`` and the watched metrics).
        outcome: ``detectors.label_outcome`` arguments.
        source: note stored in the calibration.
        envelope: steps per threshold bin (``DetectorConfig.envelope``; 0: one threshold per metric).
        extend: a calibration to keep as a floor (``detectors.extend_calibration``): ``"default"`` (the shipped
            ``DEFAULT_CALIBRATIONS``, the one whose slope window is nearest your runs':
            ``detectors.pick_calibration``), a ``Calibration``, a mapping or a JSON file. Your stable runs then only raise thresholds where your model grows faster
            than the benchmark's stable runs (the warnings benchmark's "own low-LR runs calibrate" split
            measures this), and the result carries that calibration's ``settings``. None: yours alone.
        censor: steps at the end of each run that did not diverge left out of the thresholds (a run that ends
            while heading for divergence is labelled stable; the benchmark uses 100). 0 keeps every step,
            which can only raise the thresholds.
        every: use only logged steps with ``step % every == 0`` (calibrate for a sparser Monitor ``every``).
        **detector: ``EarlyWarning`` detector arguments (``watch``, ``window``, ``burn_in``, ...).

    Returns:
        the ``Calibration`` (``EarlyWarning(calibration=...)``; ``.to_dict()`` is JSON-able).
    """
    if not int_at_least(censor, 0):
        raise ValueError(f"calibrate_warnings(censor={censor!r}): give an int >= 0 (steps left out at the end of "
                         "runs that did not diverge)")
    check_every(every, "calibrate_warnings(every")
    cfg = replace(EarlyWarning(calibration=D.Calibration(thresholds={}), **detector).config, envelope=envelope)
    steps = run_steps(history[history["run_id"].isin(runs["run_id"])], every)
    base = None if extend is None else D.DEFAULT_CALIBRATIONS if isinstance(extend, str) and extend == "default" \
        else D.load_calibration(extend, "calibrate_warnings(extend=...)")
    interval = logged_interval(steps)
    # the calibration extended (else the shipped default) for this interval: its further rules (Calibration.also)
    # are recalibrated here, and it is the floor of both
    picked = D.pick_calibration(base if base is not None else D.DEFAULT_CALIBRATIONS, interval,
                                cfg.window_at(interval))
    rules = picked.also
    cfgs = [cfg, *(replace(cfg, window=a.window, **a.adoptable)
                   for a in rules)]
    neg: list[list] = [[] for _ in cfgs]
    pos: list[list] = [[] for _ in cfgs]
    for st in steps.values():
        loss = [(s, v[(M.LOSS, "")]) for s, v in st if (M.LOSS, "") in v]
        o = D.label_outcome([s for s, _ in loss], [v for _, v in loss], **(outcome or {}))
        for k, c in enumerate(cfgs):
            scored = D.score_run(st, c)
            if o.label == "diverged":
                pos[k].append((scored, o.diverge_step))
            elif scored:
                neg[k].append([x for x in scored if x[0] <= scored[-1][0] - censor])
    if not neg[0]:
        raise ValueError("calibrate_warnings: no run stayed stable; thresholds come from runs that did not "
                         "diverge, so include some (e.g. the same schedule at a lower LR)")
    source = source or f"{len(neg[0])} stable and {len(pos[0])} diverged runs"
    own = D.calibrate(neg[0], pos[0], cfg, source=source)
    subs = [replace(D.calibrate(neg[k], pos[k], cfgs[k], source=f"{source}, {a.window}-step rule"),
                    settings=dict(a.settings)) for k, a in enumerate(rules, 1)]
    if base is None:
        return replace(own, also=tuple(subs))
    return replace(D.extend_calibration(picked, own),
                   also=tuple(D.extend_calibration(a, sub) for a, sub in zip(rules, subs)))
