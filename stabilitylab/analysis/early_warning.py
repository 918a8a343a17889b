"""Online early warning of divergence, and its measured lead time and false-alarm rate.

``EarlyWarning`` is a probe that only uses ``on_host``: attach it to a Monitor next to the default probes
(``Monitor(model, opt, probes=[*DEFAULT, EarlyWarning()])``) and on each logged step it updates, for every
watched (metric, module) series, three detectors on the transformed signal ``s_t``:

- robust z-score against a trailing baseline that excludes the current point:
  ``z_t = (s_t - median(B)) / max(1.4826 * MAD(B), sigma)``, ``B`` = the previous ``window`` values;
- one-sided CUSUM of standardised increments: ``S_t = max(0, S_{t-1} + (s_t - s_{t-1}) / sigma - k)``;
- Mann-Kendall trend test on the last ``window`` values (normal approximation with tie correction).

``sigma`` is the robust standard deviation of the increments during the series' first ``warmup`` logged
values (``1.4826 * MAD(diff)``), so thresholds are relative to each run's own early noise, never absolute.
A series is *in alarm* when at least ``votes`` detectors fire (the CUSUM restarts from 0 after it fires);
when a series is in alarm and series of at least ``min_metrics`` different metrics have been in alarm
within the last ``window`` logged steps, the run gets an ``early_warning`` Event
(to the sinks, the Monitor's ``on_event`` callback, ``callback`` and, once per run, a Python warning)
that names the series whose detectors fired first. Transforms: ``log`` for positive growing signals
(attention logit, grad norm, kurtosis, Adam v RMS, loss), ``|x - x_first|`` for ``logits.lse_mean``.

On a warning it can write a flight-recorder snapshot (``snapshot_dir``): the last ``snapshot_steps``
logged steps of every signal (``signals.parquet``), the step's batch indices given to ``note_batch``,
and the RNG states (``rng.pt``: torch CPU/CUDA, numpy, python), plus ``event.json``.

``evaluate_warnings(runs, history)`` replays logged histories through the detector and measures the
lead time (steps from the first warning to divergence: the first logged step with a non-finite loss or a
loss above ``factor`` times the running minimum of earlier losses) and the false-alarm rates.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stabilitylab import metrics as M
from stabilitylab._checks import int_at_least
from stabilitylab.probes.base import Event, Probe
from stabilitylab.sinks.parquet import atomic_write_parquet

#: watched metric -> transform ("log" or "drift").
DEFAULT_WATCH: dict[str, str] = {
    M.ATTN_MAX_LOGIT: "log",
    M.LOGITS_LSE_MEAN: "drift",
    M.GRAD_GLOBAL_NORM: "log",
    M.ACT_KURTOSIS: "log",
    M.ADAM_V_RMS: "log",
    M.LOSS: "log",
}
DETECTORS = ("robust_z", "cusum", "trend")


def _median(v: Sequence[float]) -> float:
    s = sorted(v)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def robust_z(baseline: Sequence[float], x: float, floor: float = 0.0) -> float:
    """``(x - median(b)) / max(1.4826 * MAD(b), floor)``; 0 when the scale is 0 and x equals the median."""
    med = _median(baseline)
    scale = max(1.4826 * _median([abs(b - med) for b in baseline]), floor)
    if scale == 0:
        return 0.0 if x == med else math.copysign(math.inf, x - med)
    return (x - med) / scale


def mann_kendall(y: Sequence[float]) -> float:
    """Mann-Kendall trend statistic Z (normal approximation, tie-corrected); > 0 for an upward trend.

    ``S = sum_{i<j} sign(y_j - y_i)``, ``Var S = [n(n-1)(2n+5) - sum_t t(t-1)(2t+5)] / 18`` over tie
    groups of size t, ``Z = (S - sign(S)) / sqrt(Var S)``.
    """
    y = [float(v) for v in y]
    n = len(y)
    if n < 3:
        return 0.0
    s = 0
    for i in range(n - 1):
        yi = y[i]
        for yj in y[i + 1:]:
            s += (yj > yi) - (yj < yi)
    ties = Counter(y).values()
    var = (n * (n - 1) * (2 * n + 5) - sum(t * (t - 1) * (2 * t + 5) for t in ties)) / 18.0
    if s == 0 or var <= 0:
        return 0.0
    return (s - math.copysign(1.0, s)) / math.sqrt(var)


class _Series:
    """Detector state of one (metric, module) series."""

    def __init__(self, window: int):
        self.values: deque[float] = deque(maxlen=window + 1)
        self.warm: list[float] = []
        self.sigma = math.nan
        self.cusum = 0.0
        self.first = math.nan
        self.onset: int | None = None
        self.alarm_at = -(10**12)
        self.alarm: tuple = ()


class EarlyWarning(Probe):
    """Online divergence early warning on the Monitor's logged values.

    Args:
        watch: metric -> transform (``"log"`` or ``"drift"``); default ``DEFAULT_WATCH``.
        warmup: logged values per series used to calibrate ``sigma`` (no alarms before).
        window: trailing values in the robust-z baseline and the trend test.
        z_threshold: robust z above which the z detector fires.
        cusum_k, cusum_h: CUSUM slack and decision threshold (in units of sigma).
        trend_z: Mann-Kendall Z above which the trend detector fires (3.09: one-sided p = 0.001).
        votes: detectors that must fire together for a series to be in alarm (1-3).
        min_metrics: distinct metrics that must have had a series in alarm within the last ``window``
            logged steps for a warning (a divergence moves several signal families; a benign drift
            usually moves one).
        cooldown: logged steps after an event before the next one.
        callback: ``fn(event)`` called on every warning event.
        snapshot_dir: folder for flight-recorder snapshots (None: off).
        snapshot_steps: logged steps of history kept for a snapshot.
        max_snapshots: snapshots written per run at most.
    """

    name = "early_warning"
    metrics = ()

    def __init__(self, watch: dict[str, str] | None = None, warmup: int = 8, window: int = 12,
                 z_threshold: float = 6.0, cusum_k: float = 0.5, cusum_h: float = 12.0, trend_z: float = 3.09,
                 votes: int = 2, min_metrics: int = 2, cooldown: int = 10, callback: Callable[[Event], None] | None = None,
                 snapshot_dir: str | Path | None = None, snapshot_steps: int = 50, max_snapshots: int = 1):
        super().__init__()
        self.watch = dict(DEFAULT_WATCH if watch is None else watch)
        bad = {m: t for m, t in self.watch.items() if t not in ("log", "drift")}
        if bad:
            raise ValueError(f"EarlyWarning(watch={bad}): transforms must be 'log' or 'drift'")
        for name, v, lo in (("warmup", warmup, 3), ("window", window, 3), ("votes", votes, 1),
                            ("min_metrics", min_metrics, 1),
                            ("snapshot_steps", snapshot_steps, 1)):
            if not int_at_least(v, lo):
                raise ValueError(f"EarlyWarning({name}={v!r}): must be an int >= {lo}")
        if votes > len(DETECTORS):
            raise ValueError(f"EarlyWarning(votes={votes}): at most {len(DETECTORS)} detectors can vote")
        if min_metrics > len(self.watch):
            raise ValueError(f"EarlyWarning(min_metrics={min_metrics}): only {len(self.watch)} metrics are "
                             "watched; lower min_metrics or watch more metrics")
        if callback is not None and not callable(callback):
            raise TypeError(f"EarlyWarning(callback={callback!r}): pass a callable fn(event)")
        self.warmup, self.window, self.votes, self.cooldown = warmup, window, votes, cooldown
        self.min_metrics = min_metrics
        self.z_threshold, self.cusum_k, self.cusum_h, self.trend_z = z_threshold, cusum_k, cusum_h, trend_z
        self.callback = callback
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else None
        self.max_snapshots = max_snapshots
        self._recent: deque[tuple[int, dict]] = deque(maxlen=snapshot_steps)
        self.reset()

    def reset(self) -> None:
        """Forget all detector state (a new run)."""
        self._series: dict[tuple[str, str], _Series] = {}
        self._last_event = -(10**12)
        self._n_logged = 0
        self._batch = None
        self._snapshots = 0
        self._python_warned = False
        self.alarm_steps: list[int] = []
        self._recent.clear()

    def note_batch(self, indices) -> None:
        """Remember the current step's batch indices (any JSON-able value) for flight-recorder snapshots."""
        self._batch = indices.tolist() if hasattr(indices, "tolist") else indices

    # ------------------------------------------------------------------ detectors
    def _update(self, key: tuple[str, str], raw: float, step: int) -> tuple[list[str], float]:
        """Feed one value; returns (detectors firing, robust z)."""
        st = self._series.get(key)
        if st is None:
            st = self._series[key] = _Series(self.window)
        if not math.isfinite(raw):
            return [], math.nan
        if self.watch[key[0]] == "log":
            if raw <= 0:
                return [], math.nan
            s = math.log(raw)
        else:
            if math.isnan(st.first):
                st.first = raw
            s = abs(raw - st.first)
        if len(st.warm) < self.warmup:
            st.warm.append(s)
            st.values.append(s)
            if len(st.warm) == self.warmup:
                d = np.diff(st.warm)
                st.sigma = max(1.4826 * float(np.median(np.abs(d - np.median(d)))), 1e-3 * float(np.std(st.warm)),
                               1e-12)
            return [], math.nan
        prev = st.values[-1]
        base = list(st.values)
        z = robust_z(base[-self.window:], s, st.sigma)
        st.cusum = max(0.0, st.cusum + (s - prev) / st.sigma - self.cusum_k)
        st.values.append(s)
        fired = []
        if z > self.z_threshold:
            fired.append("robust_z")
        if st.cusum > self.cusum_h:
            fired.append("cusum")
            st.cusum = 0.0
        if len(base) >= self.window and mann_kendall(base[1 - self.window:] + [s]) > self.trend_z:
            fired.append("trend")
        if fired and st.onset is None:
            st.onset = step
        elif not fired:
            st.onset = None
        return fired, z

    def on_host(self, step: int, values: dict[tuple[str, str], float]):
        self._n_logged += 1
        self._recent.append((step, dict(values)))
        now = False
        for key, v in values.items():
            if key[0] not in self.watch:
                continue
            fired, z = self._update(key, float(v), step)
            if len(fired) >= self.votes:
                st = self._series[key]
                st.alarm_at, st.alarm = self._n_logged, (st.onset, -z if math.isfinite(z) else 0.0, key, fired, z)
                now = True
        if not now:
            return [], []
        alarms = [st.alarm for st in self._series.values() if self._n_logged - st.alarm_at < self.window]
        if len({a[2][0] for a in alarms}) < self.min_metrics:
            return [], []
        self.alarm_steps.append(step)
        if self._n_logged - self._last_event <= self.cooldown:
            return [], []
        self._last_event = self._n_logged
        alarms.sort(key=lambda a: (a[0], a[1], a[2]))
        onset, _, (metric, module), fired, z = alarms[0]
        where = f"{metric}[{module}]" if module else metric
        ev = Event(self.run_id, step, "early_warning", module, z,
                   f"{where} is drifting (since step {onset}; detectors: {', '.join(fired)}); "
                   f"{len(alarms)} series in alarm",
                   {"metric": metric, "onset": onset, "detectors": fired,
                    "series": [{"metric": a[2][0], "module": a[2][1], "onset": a[0], "detectors": a[3]}
                               for a in alarms]})
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


def evaluate_warnings(runs: pd.DataFrame, history: pd.DataFrame, factor: float = 10.0,
                      min_lead: int = 50, **detector) -> tuple[pd.DataFrame, dict]:
    """Lead time and false-alarm rates of ``EarlyWarning(**detector)`` over a sweep.

    Args:
        runs: runs table (``run_id``; ``diverged`` is used only to report runs that ended worse than
            init without a blow-up in the logged loss).
        history: tidy history of those runs (needs the ``loss`` metric).
        factor: blow-up factor of ``divergence_step``.
        min_lead: lead time (steps) counted as "warned in time".
        **detector: ``EarlyWarning`` arguments.

    Returns:
        ``(per_run, summary)``: per run ``run_id, diverge_step, first_warning, lead_steps, n_warnings,
        alarm_steps, logged_steps, outcome`` (outcome: ``warned``, ``missed``, ``late``, ``false_alarm``,
        ``quiet``, ``diverged_no_blowup``); the summary has ``n_diverged``, ``n_warned_in_time``,
        ``median_lead_steps``, ``false_alarm_run_rate`` (non-diverged runs with a warning / those runs)
        and ``false_alarm_step_rate`` (alarm steps / logged steps after warm-up on non-diverged runs).
    """
    from stabilitylab.analysis.tables import check_history, check_runs

    runs = check_runs(runs, "evaluate_warnings")
    history = check_history(history, "evaluate_warnings")
    ew = EarlyWarning(**detector)
    rows = []
    by_run = dict(tuple(history.groupby("run_id", sort=False)))
    for r in runs.itertuples(index=False):
        h = by_run.get(r.run_id)
        if h is None or h.empty:
            continue
        loss = h[h["metric"] == M.LOSS].set_index("step")["value"].astype(float)
        dstep = divergence_step(loss, factor)
        if not math.isnan(dstep):  # the detector only sees what was logged before divergence
            h = h[h["step"] < dstep]
        events = ew.replay(h, r.run_id)
        first = float(events[0].step) if events else math.nan
        lead = dstep - first if events and not math.isnan(dstep) else math.nan
        logged = int(h["step"].nunique())
        if not math.isnan(dstep):
            outcome = "missed" if not events else ("warned" if lead >= min_lead else "late")
        elif bool(r.diverged):
            outcome = "diverged_no_blowup"
        else:
            outcome = "false_alarm" if events else "quiet"
        rows.append({"run_id": r.run_id, "diverge_step": dstep, "first_warning": first, "lead_steps": lead,
                     "n_warnings": len(events), "alarm_steps": len(ew.alarm_steps),
                     "logged_steps": logged, "outcome": outcome})
    per_run = pd.DataFrame(rows, columns=["run_id", "diverge_step", "first_warning", "lead_steps", "n_warnings",
                                          "alarm_steps", "logged_steps", "outcome"])
    div = per_run[per_run["diverge_step"].notna()]
    stable = per_run[per_run["outcome"].isin(["quiet", "false_alarm"])]
    judged = (stable["logged_steps"] - ew.warmup).clip(lower=0).sum()
    summary = {
        "n_runs": len(per_run), "n_diverged": len(div),
        "n_warned_in_time": int((div["outcome"] == "warned").sum()),
        "n_late": int((div["outcome"] == "late").sum()), "n_missed": int((div["outcome"] == "missed").sum()),
        "median_lead_steps": float(div["lead_steps"].median()) if div["lead_steps"].notna().any() else math.nan,
        "n_stable": len(stable),
        "false_alarm_run_rate": float((stable["outcome"] == "false_alarm").mean()) if len(stable) else math.nan,
        "false_alarm_step_rate": float(stable["alarm_steps"].sum() / judged) if judged else math.nan,
    }
    return per_run, summary
