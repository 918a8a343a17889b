"""Online early warning of divergence with a forecast, and its measured lead time and false-alarm rate.

``EarlyWarning`` is a probe that only uses ``on_host``: attach it to a Monitor next to the default probes
(``Monitor(model, opt, probes=[*DEFAULT, EarlyWarning()])``) and on each logged step it feeds the logged
values to ``stabilitylab.detectors.RunawayDetector``, the same code the offline evaluation
(``evaluate_warnings``, ``stabilitylab warnings evaluate``) replays. The detector warns when a watched
signal (max attention logit, attention entropy, log Z, max output logit, grad norm, update ratio, loss;
each per module) grows *and accelerates* in log space faster than it ever did on calibration runs that
stayed stable; the warning names the leading signal and module and forecasts the steps left to
divergence with an interval (see ``stabilitylab.detectors`` for the formulas).

The default calibration (``detectors.DEFAULT_CALIBRATION``) comes from the warnings benchmark
(``stabilitylab warnings build --scale quick``: tiny proxies and a tiny GPT-2, LR ramps and step-ups);
recalibrate on your own stable runs with ``stabilitylab warnings evaluate STORE --calibration-out cal.json``
and ``EarlyWarning(calibration="cal.json")``.

On a warning it can write a flight-recorder snapshot (``snapshot_dir``): the last ``snapshot_steps``
logged steps of every signal (``signals.parquet``), the step's batch indices given to ``note_batch``,
and the RNG states (``rng.pt``: torch CPU/CUDA, numpy, python), plus ``event.json``.

``evaluate_warnings(runs, history)`` labels every run from its loss (``detectors.label_outcome``:
diverged / spiked and recovered / stable), replays the detector over what was logged before divergence
and measures lead times and false alarms.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stabilitylab import detectors as D
from stabilitylab import metrics as M
from stabilitylab._checks import int_at_least
from stabilitylab.detectors import DEFAULT_WATCH, mann_kendall, robust_z
from stabilitylab.probes.base import Event, Probe
from stabilitylab.sinks.parquet import atomic_write_parquet

__all__ = ["DEFAULT_WATCH", "EarlyWarning", "calibrate_warnings", "divergence_step", "evaluate_warnings",
           "mann_kendall", "robust_z", "run_steps"]


def _calibration(calibration) -> D.Calibration:
    if calibration is None:
        return D.DEFAULT_CALIBRATION
    if isinstance(calibration, D.Calibration):
        return calibration
    if isinstance(calibration, Mapping):
        return D.Calibration.from_dict(calibration)
    if isinstance(calibration, (str, Path)):
        p = Path(calibration)
        if not p.is_file():
            raise FileNotFoundError(f"EarlyWarning(calibration={str(p)!r}): no such file; write one with "
                                    "`stabilitylab warnings evaluate STORE --calibration-out FILE`")
        return D.Calibration.from_dict(json.loads(p.read_text()))
    raise TypeError(f"EarlyWarning(calibration={calibration!r}): pass None (the defaults), a Calibration, "
                    "a dict or the path of a calibration JSON file")


class EarlyWarning(Probe):
    """Online divergence early warning with a forecast, on the Monitor's logged values.

    Args:
        watch: metric -> transform (``"log"``, ``"neglog"``, ``"identity"``); default ``DEFAULT_WATCH``.
        calibration: thresholds and forecast constants: None (``detectors.DEFAULT_CALIBRATION``), a
            ``Calibration``, its dict, or the path of its JSON file.
        window: steps in each slope fit (and the acceleration lag).
        persist: steps a series must stay above its threshold before it counts.
        burn_in: steps from the first logged step before any warning.
        min_metrics: distinct metrics that must be hot together for a warning.
        margin: multiplier on the calibrated thresholds (> 1: fewer, later warnings).
        cooldown: steps after a warning before the next one.
        callback: ``fn(event)`` called on every warning event.
        snapshot_dir: folder for flight-recorder snapshots (None: off).
        snapshot_steps: logged steps of history kept for a snapshot.
        max_snapshots: snapshots written per run at most.
    """

    name = "early_warning"
    metrics = ()

    def __init__(self, watch: dict[str, str] | None = None, calibration=None, window: int = 60, persist: int = 0,
                 burn_in: int = 60, min_metrics: int = 2, margin: float = 1.0, cooldown: int = 50,
                 callback: Callable[[Event], None] | None = None, snapshot_dir: str | Path | None = None,
                 snapshot_steps: int = 50, max_snapshots: int = 1):
        super().__init__()
        self.config = D.DetectorConfig(watch=dict(DEFAULT_WATCH if watch is None else watch), window=window,
                                       persist=persist, burn_in=burn_in, min_metrics=min_metrics, margin=margin,
                                       cooldown=cooldown)
        self.calibration = _calibration(calibration)
        for name, v in (("snapshot_steps", snapshot_steps), ("max_snapshots", max_snapshots)):
            if not int_at_least(v, 1 if name == "snapshot_steps" else 0):
                raise ValueError(f"EarlyWarning({name}={v!r}): must be a positive int")
        if callback is not None and not callable(callback):
            raise TypeError(f"EarlyWarning(callback={callback!r}): pass a callable fn(event)")
        self.callback = callback
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else None
        self.max_snapshots = max_snapshots
        self._recent: deque[tuple[int, dict]] = deque(maxlen=snapshot_steps)
        self.reset()

    @property
    def watch(self) -> dict[str, str]:
        """Watched metric -> transform."""
        return dict(self.config.watch)

    def reset(self) -> None:
        """Forget all detector state (a new run)."""
        self.detector = D.RunawayDetector(self.config, self.calibration)
        self._batch = None
        self._snapshots = 0
        self._python_warned = False
        self._recent.clear()

    @property
    def alarm_steps(self) -> list[int]:
        """Logged steps on which enough series were hot (warnings are the first of each cooldown)."""
        return self.detector.alarm_steps

    def note_batch(self, indices) -> None:
        """Remember the current step's batch indices (any JSON-able value) for flight-recorder snapshots."""
        self._batch = indices.tolist() if hasattr(indices, "tolist") else indices

    def on_host(self, step: int, values: dict[tuple[str, str], float]):
        self._recent.append((step, dict(values)))
        w = self.detector.update(step, values)
        if w is None:
            return [], []
        where = f"{w.metric}[{w.module}]" if w.module else w.metric
        ev = Event(self.run_id, step, "early_warning", w.module, w.score,
                   f"{where} is running away ({w.score:.2g}x its calibrated growth limit); forecast: divergence "
                   f"in ~{w.steps_left:.0f} steps ({w.steps_left_lo:.0f}-{w.steps_left_hi:.0f}); "
                   f"{len(w.hot)} series hot",
                   {"metric": w.metric, "module": w.module, "steps_left": w.steps_left,
                    "steps_left_lo": w.steps_left_lo, "steps_left_hi": w.steps_left_hi,
                    "predicted_step": step + w.steps_left,
                    "series": [{"metric": m, "module": mod} for m, mod in w.hot]})
        if not self._python_warned:
            self._python_warned = True
            warnings.warn(f"stabilitylab early warning at step {step} (run {self.run_id}): {ev.message}",
                          RuntimeWarning, stacklevel=2)
        if self.snapshot_dir is not None and self._snapshots < self.max_snapshots:
            self._snapshots += 1
            ev.extra["snapshot"] = str(self.write_snapshot(ev))
        if self.callback is not None:
            self.callback(ev)
        return [], [ev]

    # ------------------------------------------------------------------ flight recorder
    def write_snapshot(self, event: Event) -> Path:
        """Write the flight-recorder snapshot for ``event``; returns its folder."""
        out = self.snapshot_dir / (self.run_id or "run") / f"step_{event.step:09d}"
        out.mkdir(parents=True, exist_ok=True)
        rows = [(self.run_id, s, m, mod, float(v)) for s, vals in self._recent for (m, mod), v in vals.items()]
        atomic_write_parquet(pd.DataFrame(rows, columns=list(M.RECORD_COLUMNS)), out / "signals.parquet")
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, out / "rng.pt")
        meta = {**asdict(event), "batch_indices": self._batch}
        (out / "event.json").write_text(json.dumps(meta, indent=1, default=str))
        return out

    # ------------------------------------------------------------------ offline replay
    def replay(self, history: pd.DataFrame, run_id: str | None = None) -> list[Event]:
        """Run the detector over one run's tidy history (as if live, without Python warnings); returns the events."""
        self.reset()
        self._python_warned = True
        self.run_id = run_id or (str(history["run_id"].iloc[0]) if len(history) else "")
        events: list[Event] = []
        h = history.sort_values("step", kind="stable")
        steps = h["step"].to_numpy()
        keys = list(zip(h["metric"].tolist(), h["module"].fillna("").tolist()))
        vals = h["value"].to_numpy(dtype=float).tolist()
        bounds = np.flatnonzero(np.diff(steps)) + 1
        for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(steps)]):
            events.extend(self.on_host(int(steps[a]), dict(zip(keys[a:b], vals[a:b])))[1])
        return events


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


def calibrate_warnings(runs: pd.DataFrame, history: pd.DataFrame, outcome: Mapping[str, float] | None = None,
                       source: str = "", envelope: int = 50, **detector) -> D.Calibration:
    """Calibrate ``EarlyWarning`` on your own runs: thresholds from the runs that did not diverge (ideally
    stable runs with the schedule you will use), forecast constants from those that diverged.

    Args:
        runs: runs table (``run_id``).
        history: their tidy histories (need ``loss`` and the watched metrics).
        outcome: ``detectors.label_outcome`` arguments.
        source: note stored in the calibration.
        envelope: steps per threshold bin (``DetectorConfig.envelope``; 0: one threshold per metric).
        **detector: ``EarlyWarning`` detector arguments (``watch``, ``window``, ``burn_in``, ...).

    Returns:
        the ``Calibration`` (``EarlyWarning(calibration=...)``; ``.to_dict()`` is JSON-able).
    """
    cfg = replace(EarlyWarning(calibration=D.Calibration(thresholds={}), **detector).config, envelope=envelope)
    steps = run_steps(history[history["run_id"].isin(runs["run_id"])])
    neg, pos = [], []
    for st in steps.values():
        loss = [(s, v[(M.LOSS, "")]) for s, v in st if (M.LOSS, "") in v]
        o = D.label_outcome([s for s, _ in loss], [v for _, v in loss], **(outcome or {}))
        scored = D.score_run(st, cfg)
        if o.label == "diverged":
            pos.append((scored, o.diverge_step))
        else:
            neg.append(scored)
    if not neg:
        raise ValueError("calibrate_warnings: no run stayed stable; thresholds come from runs that did not "
                         "diverge, so include some (e.g. the same schedule at a lower LR)")
    return D.calibrate(neg, pos, cfg, source=source or f"{len(neg)} stable and {len(pos)} diverged runs")
