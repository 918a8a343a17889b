"""Pure detectors (no torch, no sinks): outcome labels of a run, and the runaway-growth early warning.

Outcome of a run (``label_outcome``), from its training loss only, so no detector can influence it:
``e_t`` is the EMA of the finite losses (``alpha = 2 / (span + 1)``) and ``b_t = min_{s <= t} e_s`` its
running best. An *excursion* starts at the first step with ``e_t > b_t + rise``; it *recovers* when, within
``patience`` steps, ``e`` falls back to ``<= b_start + recover``. The run is

- ``diverged`` at the start of the first excursion that does not recover (within ``patience`` steps or
  before the run ends), or at the first non-finite loss when no excursion is in progress;
- ``spiked_recovered`` when it had at least one excursion and all of them recovered;
- ``stable`` otherwise.

Runaway-growth warning (``RunawayDetector``), after papers.md section 7: healthy trends decelerate,
runaway ones accelerate. Each watched ``(metric, module)`` series is transformed into log space
(``log x``; ``-log x`` for signals that collapse toward 0 such as attention entropy; ``x`` for signals that
already are logs, e.g. log Z), and on each logged step ``t`` the detector computes

- ``g_t``: the least-squares slope of the transformed series over the last ``window`` steps, per 100 steps;
- ``h_t``: the same slope over the last ``window / 2`` steps only, and ``h_{t - window/2}`` the slope over
  the older half of the window;
- the score ``s_t = min(g_t, h_{t - window/2} / sustain)`` (the growth rate sustained over the whole
  window; ``sustain`` = 0.75 by default) if ``g_t > 0``, the trend accelerates
  (``g_t > accel * max(g_{t - window}, 0)``, where ``g_{t - window}`` counts only if it was fit on at least
  ``lag_points`` = 5 logged steps: the first slopes of a series at sparse logging fit 2-4 points), still
  grows at least as fast in the recent half (``h_t >= g_t``) and already grew in the older half
  (``h_{t - window/2} > 0``), else 0. The two half-window tests keep a level shift quiet (an abrupt jump, e.g. an LR spike, keeps ``g_t`` positive for
  a whole window after it): while the jump is in the recent half, the older half is flat, so the score is
  at most the pre-jump slope / ``sustain``; once it is in the older half, the recent half is flat
  (``h_t < g_t``). Runaway growth is convex in log space and lasts longer than a window, so both halves
  rise and ``h_t >= g_t`` holds on it.

A series is *hot* when ``s_t > threshold[metric]`` on every logged step of the last ``persist`` steps.
A warning is raised when series of at least ``min_metrics`` different metrics, or one series of a ``solo``
metric, have been hot within the last ``window`` steps (and a series is hot on this step). Thresholds are calibrated (``calibrate``) as ``margin`` x the largest score seen on
runs that stayed stable (or spiked and recovered), per ``envelope``-step bin of training (and its two
neighbours; no bin below ``floor`` = 0.25 x the metric's largest bin, chosen on the development build),
so they follow the schedule the calibration runs share and the false-alarm rate is set by
healthy runs, not by each run's own early noise. Window, persistence and
burn-in are in *steps*, so the same settings apply at every logging interval; the window is widened to span
at least ``min_points`` logged steps (90 steps at ``every=10``), and thresholds are calibrated per logging
interval (``Calibration.interval``; a detector given ``{interval: Calibration}`` takes the one whose slope window,
``Calibration.window``, is nearest its own: ``pick_calibration``).

With ``loss_gate = d > 0`` an alarm also needs the training loss to be at least ``d`` nats above its best so far
(the EMA ``e_t`` of the logged loss over ``gate_span`` = 20 steps, minus ``min_{s <= t} e_s``: the smoothing of the
outcome label): signals of a model that is still learning (its loss at its best) grow and accelerate during LR
ramps and near the edge of stability without warning anyone, and a runaway that will diverge has usually begun
to lift the loss before the label's 0.5-nat excursion.

Each warning carries a forecast: the leading series (the hot one with the largest ``s / threshold``), its
metric and module, and the steps left to divergence ``(level_at_divergence[metric] - x_t) / g_t``
(``g_t`` per step), with the interval ``[estimate * ratio_lo, estimate * ratio_hi]`` where the ratios are
quantiles of (true steps left / estimate) on the calibration runs.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from stabilitylab._checks import int_at_least

OUTCOMES = ("stable", "spiked_recovered", "diverged")
#: ``DetectorConfig`` fields a ``Calibration`` can carry (``Calibration.settings``).
ADOPTABLE = ("margin", "min_metrics", "persist")
TRANSFORMS = ("log", "neglog", "identity")
#: The metric ``DetectorConfig.loss_gate`` reads (the training loss, nats).
GATE_METRIC = "loss"

#: watched metric -> transform of the default warning. Not watched by default: ``logits.max`` (the largest
#: output logit grows while a healthy model grows confident; on the warnings benchmark it led no warning that
#: came >= 50 steps ahead and led 2 of its 4 false alarms at ``every=10``, on models outside it 8 of 25, and
#: leaving it out warned fewer stable runs on the development build, the benchmark and those models with the
#: same divergences warned); log Z (``logits.lse_mean``) is the output-logit drift signal. Add it with
#: ``EarlyWarning(watch={**DEFAULT_WATCH, "logits.max": "log"})`` and recalibrate.
DEFAULT_WATCH: dict[str, str] = {
    "attn.max_logit": "log",
    "attn.entropy": "neglog",
    "logits.lse_mean": "identity",
    "grad.global_norm": "log",
    "update.ratio": "log",
    "loss": "log",
}


# ---------------------------------------------------------------------------------------------- building blocks
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


# ---------------------------------------------------------------------------------------------- outcomes
@dataclass(frozen=True)
class Outcome:
    """A run's outcome: ``label`` (one of ``OUTCOMES``), the divergence step (NaN unless diverged) and
    the start steps of the excursions that recovered."""

    label: str
    diverge_step: float
    spike_steps: tuple[int, ...] = ()


def label_outcome(steps: Sequence[int], loss: Sequence[float], span: int = 20, rise: float = 0.5,
                  recover: float = 0.25, patience: int = 100) -> Outcome:
    """Label a run from its per-step training loss (see the module docstring for the definition).

    Args:
        steps: optimizer steps of the losses (increasing).
        loss: training losses (nats); non-finite values are allowed.
        span: EMA span in logged values.
        rise: excursion threshold above the running best of the EMA (nats).
        recover: an excursion recovers when the EMA is back within ``recover`` nats of the best.
        patience: steps an excursion has to recover.

    Returns:
        the ``Outcome``.
    """
    if not (0 <= recover < rise):
        raise ValueError(f"label_outcome(recover={recover!r}, rise={rise!r}): need 0 <= recover < rise")
    if span < 1 or patience < 1:
        raise ValueError(f"label_outcome(span={span!r}, patience={patience!r}): both must be >= 1")
    steps = [int(s) for s in steps]
    loss = [float(v) for v in loss]
    if len(steps) != len(loss):
        raise ValueError(f"label_outcome: {len(steps)} steps but {len(loss)} losses")
    alpha = 2.0 / (span + 1)
    ema, best = math.nan, math.inf
    start: int | None = None
    base = math.nan
    spikes: list[int] = []
    for step, v in zip(steps, loss):
        if not math.isfinite(v):
            return Outcome("diverged", float(start if start is not None else step), tuple(spikes))
        ema = v if math.isnan(ema) else ema + alpha * (v - ema)
        if start is not None:
            if ema <= base + recover:
                spikes.append(start)
                start = None
            elif step - start > patience:
                return Outcome("diverged", float(start), tuple(spikes))
        elif ema > best + rise:
            start, base = step, best
        best = min(best, ema)
    if start is not None:
        return Outcome("diverged", float(start), tuple(spikes))
    return Outcome("spiked_recovered" if spikes else "stable", math.nan, tuple(spikes))


# ---------------------------------------------------------------------------------------------- detector
@dataclass(frozen=True, kw_only=True)
class Calibration:
    """What the detector learned from calibration runs (``calibrate``), and where from."""

    thresholds: Mapping[str, Any]
    """metric -> score threshold (slope per 100 steps of the transformed signal): one number, or a list
    with one threshold per ``bin_steps`` steps of training (the last one holds beyond the list)."""
    bin_steps: int = 0
    """Width of the step bins of list thresholds (0: thresholds are single numbers)."""
    level_at_divergence: Mapping[str, float] = field(default_factory=dict)
    """metric -> median transformed level (max over modules) at divergence on calibration runs."""
    ratio_lo: float = 0.3
    """Low quantile (10%) of true steps left / estimate on calibration warnings."""
    ratio_hi: float = 3.0
    """High quantile (90%) of true steps left / estimate on calibration warnings."""
    fallback_lead: float = 100.0
    """Steps-left estimate when the leading signal has no usable level at divergence."""
    source: str = ""
    """What it was calibrated on (benchmark version, runs)."""
    interval: int = 1
    """Logging interval (steps between logged steps) of the runs it was calibrated on: slopes over fewer
    points are noisier, so thresholds hold for this interval."""
    window: int = 0
    """Steps of the slope window its thresholds were computed with (``max(window, min_points * interval)``
    of the calibrating config). A detector takes the calibration whose window is nearest its own
    (``pick_calibration``): slopes fit on a window of another length have another noise level; at
    ``every=5`` (a 60-step window) the every=10 thresholds (a 90-step window), which the nearest interval gave,
    warned 110 of the 167 stable runs of ``benchmarks/warnings_external.py``'s eight families, the every=1 ones
    29. 0: not recorded (older files); the nearest interval is taken then."""
    settings: Mapping[str, Any] = field(default_factory=dict)
    """``DetectorConfig`` fields chosen with these thresholds (``margin``, ``min_metrics``, ``persist``, by
    ``stabilitylab warnings evaluate``); a detector built with ``adopt`` takes them (see ``RunawayDetector``)."""
    also: tuple[Calibration, ...] = ()
    """Further rules, each a calibration of its own slope window (``window``, > 0) and ``settings``, which it
    always adopts: a detector with this calibration warns when it or any of these warns (``RunawayDetector``).
    The shipped every=1 calibration carries one, the *sustained* rule: a 90-step window, one metric, margin 2.5
    (see ``DEFAULT_CALIBRATIONS``)."""

    def __post_init__(self) -> None:
        bad = set(self.settings) - set(ADOPTABLE)
        if bad:
            raise ValueError(f"Calibration(settings={dict(self.settings)}): only {ADOPTABLE} can be carried")
        also = tuple(a if isinstance(a, Calibration) else Calibration.from_dict(a) for a in self.also)
        for a in also:
            if a.window <= 0 or a.also:
                raise ValueError(f"Calibration(also=...): each further rule needs its slope window (window > 0, got "
                                 f"{a.window}) and no further rules of its own ({len(a.also)} given)")
        object.__setattr__(self, "also", also)

    @property
    def adoptable(self) -> dict[str, Any]:
        """The ``ADOPTABLE`` fields this calibration's ``settings`` carry (what a detector adopts from it)."""
        return {k: self.settings[k] for k in ADOPTABLE if k in self.settings}

    def to_dict(self) -> dict[str, Any]:
        return {"thresholds": dict(self.thresholds), "bin_steps": self.bin_steps,
                "level_at_divergence": dict(self.level_at_divergence),
                "ratio_lo": self.ratio_lo, "ratio_hi": self.ratio_hi, "fallback_lead": self.fallback_lead,
                "source": self.source, "interval": self.interval, "window": self.window,
                "settings": dict(self.settings), "also": [a.to_dict() for a in self.also]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        return cls(**dict(d))


#: What a detector can be given: one calibration, or one per logging interval (chosen at the second logged step).
Calibrations = Calibration | Mapping[int, Calibration]


def load_calibration(obj: Any, what: str = "calibration") -> Calibrations | None:
    """A ``Calibration``, a mapping ``interval -> Calibration``, or None, from any of: those, a
    ``Calibration.to_dict()`` dict, a ``{interval: dict}`` dict (``stabilitylab warnings evaluate
    --calibration-out``), or the path of a JSON file holding either."""
    if obj is None or isinstance(obj, Calibration):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        p = Path(obj)
        if not p.is_file():
            raise FileNotFoundError(f"{what}={str(p)!r}: no such file; write one with "
                                    "`stabilitylab warnings evaluate STORE --calibration-out FILE`")
        obj = json.loads(p.read_text())
    if isinstance(obj, Mapping):
        if "thresholds" in obj:
            return Calibration.from_dict(obj)
        if obj and all(type(k) is int and k >= 1 and isinstance(v, Calibration) for k, v in obj.items()):
            return obj
        try:
            out = {int(k): v if isinstance(v, Calibration) else Calibration.from_dict(v) for k, v in obj.items()}
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what}: a dict must be one calibration (with 'thresholds') or map logging "
                             f"intervals to calibrations; got keys {list(obj)[:5]} ({e})") from None
        if not out or min(out) < 1:
            raise ValueError(f"{what}: give at least one calibration, keyed by logging intervals >= 1")
        return out
    raise TypeError(f"{what}={obj!r}: pass None (the defaults), a Calibration, a dict or the path of a "
                    "calibration JSON file")


def calibrations_to_dict(calibrations: Mapping[int, Calibration]) -> dict[str, Any]:
    """The JSON-able ``{"interval": Calibration.to_dict()}`` that ``load_calibration`` reads back."""
    return {str(k): c.to_dict() for k, c in calibrations.items()}


def pick_calibration(calibrations: Calibrations | None, interval: int, window: int | None = None
                     ) -> Calibration | None:
    """The calibration for a run logged every ``interval`` steps whose slope window is ``window`` steps: the one
    given; else, when ``window`` is given and every calibration recorded its window, the one with the nearest
    window (in log scale; ties: the nearest interval); else the nearest interval (in log scale).

    With the shipped defaults (every=1: a 60-step window, every=10: 90 steps) and ``DetectorConfig``'s window
    rule ``max(60, 9 * interval)``, runs logged every 1-8 steps take the every=1 calibration, every 9+ steps
    the every=10 one (``benchmarks/warnings_external.py``'s ``intervals`` measure 2, 3, 5, 7 and 20).
    """
    if calibrations is None or isinstance(calibrations, Calibration):
        return calibrations

    def off(k: int) -> float:
        return abs(math.log(k / max(interval, 1)))

    if window is not None and window > 0 and all(c.window > 0 for c in calibrations.values()):
        return calibrations[min(calibrations, key=lambda k: (abs(math.log(calibrations[k].window / window)), off(k), k))]
    return calibrations[min(calibrations, key=lambda k: (off(k), k))]


@dataclass(frozen=True, kw_only=True)
class DetectorConfig:
    """Settings of ``RunawayDetector``; lengths are in optimizer steps, so they hold at any logging interval."""

    watch: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_WATCH))
    """metric -> transform (``log``, ``neglog``, ``identity``)."""
    window: int = 60
    """Steps in the slope fit; also the acceleration lag and how long a hot series counts."""
    min_points: int = 9
    """The window spans at least this many logged steps: ``max(window, min_points * interval)`` steps, with the
    logging interval taken from the first two logged steps (at ``every=10``: 90 steps, so each half-window
    slope still fits 4-5 points)."""
    persist: int = 0
    """Steps a series must stay above its threshold before it counts (0: from the first step above)."""
    burn_in: int = 60
    """Steps before any series can be hot (early training moves every signal)."""
    min_metrics: int = 2
    """Distinct metrics that must be hot (within ``window`` steps) for a warning."""
    margin: float = 1.0
    """Threshold multiplier applied on top of the calibration thresholds."""
    cooldown: int = 50
    """Steps after a warning before the next one."""
    accel: float = 1.5
    """Acceleration gate: a series scores only while ``g_t > accel * max(g_{t - window}, 0)``."""
    lag_points: int = 5
    """The gate's lagged slope ``g_{t - window}`` counts only if it was fit on at least this many logged steps
    (else the series does not score yet): at sparse logging the first slopes of a series fit 2-4 points, and
    a gate against such a noisy slope passes on chance (at ``every=10``: no score before ~130 steps)."""
    sustain: float = 0.75
    """The score is ``min(g_t, h_{t - window/2} / sustain)``: growth counts at the rate the older half of
    the window sustained (1: exactly that rate; smaller values trust the whole-window slope more)."""
    envelope: int = 50
    """``calibrate``: 0 gives one threshold per metric (max over all steps after burn-in); ``n > 0`` gives
    one per ``n``-step bin of training (max over that bin and its two neighbours), an envelope that
    follows the schedule shared by the calibration runs."""
    floor: float = 0.25
    """``calibrate``: no bin's threshold is below ``floor`` x the metric's largest over all bins (a bin where
    the calibration runs barely grew would otherwise fire on any noise of a run that differs from them)."""
    loss_gate: float = 0.1
    """Loss gate (nats; 0: off): an alarm counts only while the training loss is at least this far above its
    best so far, ``e_t - min_{s <= t} e_s >= loss_gate`` with ``e`` the EMA of the logged loss over
    ``gate_span`` steps (``alpha = 2 k / (gate_span + k)`` at logging interval ``k``: ``label_outcome``'s
    smoothing at ``every=1``). Growth that a model learning normally shows (its loss still at its best) then
    warns no one. The gate reads the logged ``loss`` (a ``watch`` without it still scores it, at 0, as a level
    for the gate); runs that log no finite loss are not gated. The default 0.1 is the gate of 0, 0.05, 0.1, 0.15, 0.2
    with the best Youden's J on four model families (``benchmarks/warnings_gate.py``; results/warnings_gate.json),
    checked on four others and on the warnings benchmark."""
    gate_span: int = 20
    """Steps in the loss gate's EMA."""
    solo: tuple[str, ...] = ()
    """Metrics that warn alone: a hot series of one of these meets ``min_metrics`` by itself (the other rules,
    the loss gate included, still hold)."""

    def __post_init__(self) -> None:
        bad = {m: t for m, t in dict(self.watch).items() if t not in TRANSFORMS}
        if bad or not self.watch:
            raise ValueError(f"DetectorConfig(watch={bad or dict(self.watch)}): give a non-empty metric -> "
                             f"transform mapping with transforms in {TRANSFORMS}")
        for name, lo in (("window", 3), ("min_points", 3), ("lag_points", 2), ("persist", 0), ("burn_in", 0), ("min_metrics", 1), ("cooldown", 0),
                         ("envelope", 0), ("gate_span", 1)):
            v = getattr(self, name)
            if not int_at_least(v, lo):
                raise ValueError(f"DetectorConfig({name}={v!r}): must be an int >= {lo}")
        if self.min_metrics > len(self.watch):
            raise ValueError(f"DetectorConfig(min_metrics={self.min_metrics}): only {len(self.watch)} metrics are "
                             "watched; lower min_metrics or watch more metrics")
        if not (isinstance(self.margin, (int, float)) and self.margin > 0):
            raise ValueError(f"DetectorConfig(margin={self.margin!r}): must be a number > 0")
        if not (isinstance(self.floor, (int, float)) and 0 <= self.floor <= 1):
            raise ValueError(f"DetectorConfig(floor={self.floor!r}): must be a number in [0, 1] (a fraction of the "
                             "metric's largest threshold)")
        if not (isinstance(self.sustain, (int, float)) and 0 < self.sustain <= 1):
            raise ValueError(f"DetectorConfig(sustain={self.sustain!r}): must be a number in (0, 1]")
        if not (isinstance(self.accel, (int, float)) and self.accel >= 0):
            raise ValueError(f"DetectorConfig(accel={self.accel!r}): must be a number >= 0 (0: no gate)")
        if not isinstance(self.solo, str) and isinstance(self.solo, Sequence):
            object.__setattr__(self, "solo", tuple(self.solo))
        if not isinstance(self.solo, tuple) or not all(isinstance(m, str) for m in self.solo) or \
                set(self.solo) - set(self.watch):
            raise ValueError(f"DetectorConfig(solo={self.solo!r}): give a tuple of watched metric names (watched: "
                             f"{sorted(self.watch)}); add a metric to watch to let it warn alone")
        if not (isinstance(self.loss_gate, (int, float)) and math.isfinite(self.loss_gate) and self.loss_gate >= 0):
            raise ValueError(f"DetectorConfig(loss_gate={self.loss_gate!r}): must be a finite number of nats >= 0 "
                             "(0: no loss gate)")

    def window_at(self, interval: int) -> int:
        """The slope window in steps at a logging interval: ``max(window, min_points * interval)``."""
        return max(self.window, self.min_points * interval)


@dataclass(frozen=True)
class WarningForecast:
    """One early warning with its forecast."""

    step: int
    metric: str
    module: str
    score: float
    """Leading series' score over its threshold (> 1)."""
    steps_left: float
    steps_left_lo: float
    steps_left_hi: float
    hot: tuple[tuple[str, str], ...]
    """Every hot (metric, module) at the warning."""
    window: int = 0
    """Slope window in steps of the rule that warned (the calibration's own, or one of ``Calibration.also``)."""
    loss_gap: float = math.nan
    """The loss EMA's rise above its best at the warning (nats; NaN without a loss gate, ``DetectorConfig.loss_gate``)."""


class _Slope:
    """Least-squares slope of (step, value) over a trailing window of steps, O(1) per update."""

    __slots__ = ("pts", "window", "n", "st", "sx", "stt", "stx", "t0", "slopes")

    def __init__(self, window: int):
        self.pts: deque[tuple[float, float]] = deque()
        self.window = window
        self.n = 0
        self.st = self.sx = self.stt = self.stx = 0.0
        self.t0: float | None = None
        self.slopes: deque[tuple[int, float]] = deque()

    def add(self, step: int, x: float) -> float:
        if self.t0 is None:
            self.t0 = float(step)
        t = step - self.t0
        self.pts.append((t, x))
        self.n += 1
        self.st += t
        self.sx += x
        self.stt += t * t
        self.stx += t * x
        while self.pts and t - self.pts[0][0] >= self.window:
            ot, ox = self.pts.popleft()
            self.n -= 1
            self.st -= ot
            self.sx -= ox
            self.stt -= ot * ot
            self.stx -= ot * ox
        if self.n < 2:
            return math.nan
        den = self.n * self.stt - self.st * self.st
        if den <= 1e-9 * max(1.0, self.n * self.stt):
            return math.nan
        return (self.n * self.stx - self.st * self.sx) / den

    def lagged(self, step: int, slope: float) -> float:
        """Record this step's slope; return the slope from about ``window`` steps ago (NaN if none)."""
        self.slopes.append((step, slope))
        old = math.nan
        while self.slopes and step - self.slopes[0][0] >= self.window:
            old = self.slopes.popleft()[1]
        return old


def transform(value: float, how: str) -> float:
    """The detector's transform of one raw value (NaN where undefined)."""
    if not math.isfinite(value):
        return math.nan
    if how == "identity":
        return value
    if value <= 0:
        return math.nan
    return math.log(value) if how == "log" else -math.log(value)


def untransform(x: float, how: str) -> float:
    """The raw value of a transformed one (the inverse of ``transform``)."""
    return x if how == "identity" else math.exp(x) if how == "log" else math.exp(-x)


#: One logged step's scored series: ``[((metric, module), score, slope per step, transformed level), ...]``.
Scored = list[tuple[tuple[str, str], float, float, float]]


class RunawayDetector:
    """Online runaway-growth warning over logged values (see the module docstring).

    ``update(step, values)`` is ``decide(step, score(step, values))``: ``score`` keeps the per-series slope
    fits, ``decide`` the hot/warning state. Offline evaluation scores each run once and replays ``decide``
    under several thresholds; the live probe calls ``update``; both run this code.

    Args:
        config: detector settings.
        calibration: thresholds and forecast constants, or one per logging interval (the nearest to the
            run's is taken at its second logged step); None scores but never warns.
        adopt: ``config`` fields (of ``ADOPTABLE``) to take from the calibration's ``settings`` where it has
            them (the live probe adopts the ones its user did not set); ``config`` keeps the others.
    """

    def __init__(self, config: DetectorConfig | None = None, calibration: Calibrations | None = None,
                 adopt: tuple[str, ...] = ()):
        self.base_config = self.config = config or DetectorConfig()
        self.calibrations = load_calibration(calibration, "RunawayDetector(calibration)")
        bad = set(adopt) - set(ADOPTABLE)
        if bad:
            raise ValueError(f"RunawayDetector(adopt={adopt!r}): only {ADOPTABLE} can be adopted")
        self.adopt = tuple(adopt)
        self.reset()

    def _calibrate(self, calibration: Calibration | None) -> None:
        self.calibration = cal = calibration
        take = {k: v for k, v in (cal.settings if cal is not None else {}).items() if k in self.adopt}
        self.config = replace(self.base_config, **take) if take else self.base_config
        also = cal.also if cal is not None else ()
        if [c.calibration for c in self._children] != list(also):
            # a margin set apart from the calibration's scales every rule alike
            scale = self.config.margin / float(cal.settings.get("margin", 1.0)) if cal is not None else 1.0
            self._children = [RunawayDetector(replace(self.base_config, window=a.window,
                                                      margin=scale * float(a.settings.get("margin", 1.0))),
                                              a, adopt=tuple(k for k in ADOPTABLE if k != "margin")) for a in also]
            for step, values in self._early:  # rules picked at the second logged step see the first one too
                for child in self._children:
                    child.update(step, values)
        self._bin = cal.bin_steps if cal is not None else 0
        self._thresholds = {} if cal is None else \
            {m: [self.config.margin * float(v) for v in t] if isinstance(t, (list, tuple))
             else self.config.margin * float(t) for m, t in cal.thresholds.items()}

    def reset(self) -> None:
        """Forget every series (a new run)."""
        self._children: list[RunawayDetector] = []
        """One detector per further rule of the calibration (``Calibration.also``)."""
        self._early: list[tuple[int, Mapping[tuple[str, str], float]]] = []
        self._series: dict[tuple[str, str], _Slope] = {}
        self._recent: dict[tuple[str, str], _Slope] = {}
        self._above: dict[tuple[str, str], int] = {}
        self._hot_at: dict[tuple[str, str], int] = {}
        self._calibrate(pick_calibration(self.calibrations, 1))
        self._first: int | None = None
        self._fixed = False
        self.interval: int | None = None
        """Steps between the first two logged steps (None before the second); picks the calibration."""
        self.window = self.config.window
        """Slope window in steps (``DetectorConfig.min_points``)."""
        self._last_warning = -(10**12)
        self._gate_ema = math.nan
        self._gate_best = math.inf
        self.warnings: list[WarningForecast] = []
        self.alarm_steps: list[int] = []

    def _window(self, step: int) -> int:
        """The window in steps (``DetectorConfig.min_points``), fixed at the second logged step."""
        if self._first is None:
            self._first = step
        elif not self._fixed and step > self._first:
            self._fixed = True
            self.interval = step - self._first
            self.window = self.config.window_at(self.interval)
            self._calibrate(pick_calibration(self.calibrations, self.interval, self.window))
            for fit in self._series.values():
                fit.window = self.window
            for fit in self._recent.values():
                fit.window = max(self.window // 2, 2)
        return self.window

    def score(self, step: int, values: Mapping[tuple[str, str], float]) -> Scored:
        """Update the slope fits with one logged step's raw values; returns the scored watched series."""
        out: Scored = []
        watch = self.config.watch
        window = self._window(step)
        if not self._fixed:
            self._early.append((step, values))
        for key, raw in values.items():
            how = watch.get(key[0])
            if how is None:
                if key[0] == GATE_METRIC and self.config.loss_gate:  # the gate reads it: a level that never scores
                    x = transform(float(raw), "log")
                    if x == x:
                        out.append((key, 0.0, math.nan, x))
                continue
            x = transform(float(raw), how)
            if math.isnan(x):
                continue
            fit = self._series.get(key)
            if fit is None:
                fit = self._series[key] = _Slope(window)
            g = fit.add(step, x)
            old = fit.lagged(step, g if fit.n >= self.config.lag_points else math.nan)
            rec = self._recent.get(key)
            if rec is None:
                rec = self._recent[key] = _Slope(max(window // 2, 2))
            h = rec.add(step, x)
            h_old = rec.lagged(step, h)
            ok = g > 0 and old == old and g > self.config.accel * max(old, 0.0) and h >= g and h_old > 0
            out.append((key, 100.0 * min(g, h_old / self.config.sustain) if ok else 0.0, g, x))
        return out

    def decide(self, step: int, scored: Scored) -> WarningForecast | None:
        """Hot series and warnings from one step's scores; ``alarm_steps`` gets every step with enough
        hot metrics (also inside the cooldown)."""
        cfg = self.config
        window = self._window(step)
        if cfg.loss_gate:
            self._gate_update(scored)
        if step - self._first < cfg.burn_in:
            return None
        thresholds = self._thresholds
        b = (step - self._first) // self._bin if self._bin else 0
        above: dict[tuple[str, str], int] = {}
        hot = []
        for key, score, slope, level in scored:
            thr = thresholds.get(key[0], math.inf)
            if type(thr) is list:
                thr = thr[min(b, len(thr) - 1)]
            if score > thr:
                since = self._above.get(key, step)
                above[key] = since
                if step - since >= cfg.persist:
                    self._hot_at[key] = step
                    hot.append((score / thr, key, slope, level))
        self._above = above
        if not hot:
            return None
        recent = {k for k, at in self._hot_at.items() if step - at < window}
        metrics = {k[0] for k in recent}
        if (len(metrics) < cfg.min_metrics and not metrics.intersection(cfg.solo)) or not self.gate_open:
            return None
        self.alarm_steps.append(step)
        if step - self._last_warning < cfg.cooldown:
            return None
        self._last_warning = step
        ratio, (metric, module), slope, level = max(hot, key=lambda h: h[0])
        est, lo, hi = self.forecast(metric, level, slope)
        w = WarningForecast(step, metric, module, ratio, est, lo, hi, tuple(sorted(recent)), window, self.gate_gap)
        self.warnings.append(w)
        return w

    def _gate_update(self, scored: Scored) -> None:
        """Advance the loss gate's EMA and best with this step's loss (from its scored level)."""
        level = next((lv for (m, _), _, _, lv in scored if m == GATE_METRIC), math.nan)
        v = untransform(level, self.config.watch.get(GATE_METRIC, "log"))
        if not math.isfinite(v):
            return
        k = self.interval or 1
        alpha = 2.0 * k / (self.config.gate_span + k)
        self._gate_ema = v if math.isnan(self._gate_ema) else self._gate_ema + alpha * (v - self._gate_ema)
        self._gate_best = min(self._gate_best, self._gate_ema)

    @property
    def gate_gap(self) -> float:
        """The loss gate's EMA minus its best so far (nats; NaN before a finite loss)."""
        return self._gate_ema - self._gate_best

    @property
    def gate_open(self) -> bool:
        """Whether alarms count (``DetectorConfig.loss_gate``): the gate is off, no finite loss was seen yet,
        or the loss EMA is at least ``loss_gate`` above its best."""
        gap = self.gate_gap
        return not self.config.loss_gate or math.isnan(gap) or gap >= self.config.loss_gate

    def update(self, step: int, values: Mapping[tuple[str, str], float]) -> WarningForecast | None:
        """Feed one logged step's raw values (``{(metric, module): value}``); returns a warning or None."""
        w = self.decide(step, self.score(step, values))
        return self._merge(step, w, [c.update(step, values) for c in self._children]) if self._children else w

    def _merge(self, step: int, w: WarningForecast | None, further: list[WarningForecast | None]) -> WarningForecast | None:
        """This step's result over every rule: an alarm step if any rule's was; this rule's warning, else the
        first further rule's, outside the cooldown of the last warning of any rule."""
        if any(c.alarm_steps and c.alarm_steps[-1] == step for c in self._children) and \
                not (self.alarm_steps and self.alarm_steps[-1] == step):
            self.alarm_steps.append(step)
        if w is not None or step - self._last_warning < self.config.cooldown:
            return w
        w = next((x for x in further if x is not None), None)
        if w is not None:
            self._last_warning = step
            self.warnings.append(w)
        return w

    def forecast(self, metric: str, level: float, slope_per_step: float) -> tuple[float, float, float]:
        """Steps left to divergence and its interval from the leading signal's level and slope."""
        cal = self.calibration
        if cal is None:
            return math.nan, math.nan, math.nan
        target = cal.level_at_divergence.get(metric, math.nan)
        est = (target - level) / slope_per_step if slope_per_step > 0 and math.isfinite(target) else math.nan
        if not (math.isfinite(est) and est > 0):
            est = cal.fallback_lead
        return est, est * cal.ratio_lo, est * cal.ratio_hi


# ---------------------------------------------------------------------------------------------- calibration
#: One run as the detector sees it: ``[(step, {(metric, module): value}), ...]`` in step order.
Steps = Sequence[tuple[int, Mapping[tuple[str, str], float]]]
#: One scored run: ``[(step, Scored), ...]`` from ``score_run``.
ScoredRun = Sequence[tuple[int, Scored]]


def score_run(steps: Steps, config: DetectorConfig | None = None) -> list[tuple[int, Scored]]:
    """Scores of every logged step of a run (``RunawayDetector.score`` on a fresh detector)."""
    det = RunawayDetector(config)
    return [(step, det.score(step, values)) for step, values in steps]


def decide_run(scored: ScoredRun, config: DetectorConfig | None = None, calibration: Calibrations | None = None,
               before: float = math.inf, also: Mapping[int, ScoredRun] | None = None) -> RunawayDetector:
    """Replay ``decide`` over a scored run (steps ``< before``) on a fresh detector; returns the detector
    (its ``warnings`` and ``alarm_steps``, over every rule: what ``update`` gives live).

    ``also``: the run scored with each further rule's slope window (``Calibration.also``), ``{window: scored}``
    (``score_rules``); without it a calibration's further rules are left out (this rule alone)."""
    det = RunawayDetector(config, calibration)
    fed: dict[int, int] = {}
    for i, (step, sc) in enumerate(scored):
        if step >= before:
            break
        w = det.decide(step, sc)
        if not det._children or also is None:
            continue
        further = []
        for child in det._children:
            rows = also.get(child.base_config.window)
            if rows is None:
                raise ValueError(f"decide_run(also=...): no run scored with the {child.base_config.window}-step window "
                                 f"of a further rule (given: {sorted(also)}); use score_rules")
            k, r = fed.get(id(child), 0), None
            while k <= i:  # a rule picked at the second logged step sees the first one too
                r = child.decide(*rows[k])
                k += 1
            fed[id(child)] = k
            further.append(r)
        det._merge(step, w, further)
    return det


def rule_windows(calibrations: Calibrations | None) -> list[int]:
    """Every slope window a further rule of these calibrations scores on (``Calibration.also``)."""
    cals = [calibrations] if isinstance(calibrations, Calibration) else list((calibrations or {}).values())
    return sorted({a.window for c in cals for a in c.also})


def score_windows(steps: Steps, config: DetectorConfig | None = None, windows: Sequence[int] = ()
                  ) -> dict[int, list[tuple[int, Scored]]]:
    """The run scored with each of these slope windows, ``{window: scored}`` (``decide_run``'s ``also``)."""
    cfg = config or DetectorConfig()
    return {w: score_run(steps, replace(cfg, window=w)) for w in windows}


def score_rules(steps: Steps, config: DetectorConfig | None = None, calibrations: Calibrations | None = None
                ) -> dict[int, list[tuple[int, Scored]]]:
    """The run scored with each further rule's slope window (``rule_windows``): ``decide_run``'s ``also``."""
    return score_windows(steps, config, rule_windows(calibrations))


def calibrate(negatives: Sequence[ScoredRun], positives: Sequence[tuple[ScoredRun, float]] = (),
              config: DetectorConfig | None = None, source: str = "",
              quantiles: tuple[float, float] = (0.1, 0.9)) -> Calibration:
    """Thresholds and forecast constants from scored calibration runs (``score_run``).

    Args:
        negatives: runs that stayed stable or spiked and recovered.
        positives: ``(scored run, divergence_step)`` of diverged runs: the forecast's level at divergence
            (median over runs of the metric's largest transformed value at the last logged step before
            divergence) and its interval (``quantiles`` of true / estimated steps left at the first warning).
        config: detector settings (burn-in, margin for the interval pass); default ``DetectorConfig()``.
        source: recorded in the calibration (what it was calibrated on).
        quantiles: low and high quantile of the interval ratios.

    Returns:
        the ``Calibration``: ``threshold[m]`` = the largest score of metric ``m`` after burn-in over all
        negatives (per bin with ``envelope``; a bin no negative scored in takes the largest over all bins;
        metrics never seen, or never scored, on a negative get no finite threshold, so they never fire).
    """
    cfg = config or DetectorConfig()
    width = cfg.envelope
    peak: dict[str, dict[int, float]] = {}
    for run in negatives:
        if not run:
            continue
        first = run[0][0]
        for step, sc in run:
            if step - first >= cfg.burn_in:
                b = (step - first) // width if width else 0
                for (metric, _), score, _, _ in sc:
                    bins = peak.setdefault(metric, {})
                    if score > bins.get(b, 0.0):
                        bins[b] = score
                    else:
                        bins.setdefault(b, 0.0)
    thr: dict[str, Any] = {}
    for metric, bins in peak.items():
        overall = max(bins.values())
        if overall <= 0:  # no negative ever scored it: no false-alarm rate can be set, so it never fires
            thr[metric] = math.inf
            continue
        if not width:
            thr[metric] = overall
            continue
        last, start = max(bins), min(bins)
        filled = [bins.get(b, 0.0) for b in range(last + 1)]
        # a bin whose neighbourhood never scored on a negative takes the metric's largest score over all bins
        env = [max(max(filled[max(start, b - 1):b + 2]) or overall, cfg.floor * overall)
               for b in range(start, last + 1)]
        thr[metric] = [env[0]] * start + env  # bins before the burn-in take the first calibrated value
    levels: dict[str, list[float]] = {}
    for run, dstep in positives:
        top: dict[str, tuple[int, float]] = {}
        for step, sc in run:
            if step >= dstep:
                break
            for (metric, _), _, _, x in sc:
                old = top.get(metric)
                if old is None or step > old[0] or x > old[1]:
                    top[metric] = (step, x if old is None or step > old[0] else max(x, old[1]))
        for m, (_, x) in top.items():
            levels.setdefault(m, []).append(x)
    gaps = [run[1][0] - run[0][0] for run in [*negatives, *(r for r, _ in positives)] if len(run) > 1]
    interval = int(np.median(gaps)) if gaps else 1
    cal = Calibration(thresholds=thr, bin_steps=width,
                      level_at_divergence={m: float(np.median(v)) for m, v in levels.items()}, source=source,
                      interval=interval, window=cfg.window_at(interval))
    ratios, leads = [], []
    for run, dstep in positives:
        ws = decide_run(run, cfg, cal, before=dstep).warnings
        if ws:
            leads.append(dstep - ws[0].step)
            if ws[0].steps_left > 0:
                ratios.append((dstep - ws[0].step) / ws[0].steps_left)
    lo, hi = (float(q) for q in np.quantile(ratios, quantiles)) if len(ratios) >= 3 else (0.3, 3.0)
    return replace(cal, ratio_lo=max(lo, 1e-3), ratio_hi=max(hi, lo, 1e-3),
                   fallback_lead=max(float(np.median(leads)) if leads else 100.0, 1.0))


def extend_calibration(base: Calibration, own: Calibration) -> Calibration:
    """``own`` (fitted on your runs) with ``base``'s thresholds as a floor: per metric and bin the larger of
    the two finite thresholds (a metric or bin one of them never calibrated takes the other's), so the result
    fires on neither calibration's stable runs. ``own``'s forecast constants are kept where it has them
    (it saw divergences), else ``base``'s; ``base``'s ``settings``; ``own``'s interval.

    Raises:
        ValueError: if both have list thresholds on different ``bin_steps``.
    """
    if base.bin_steps and own.bin_steps and base.bin_steps != own.bin_steps:
        raise ValueError(f"extend_calibration: bins of {base.bin_steps} and {own.bin_steps} steps; calibrate yours "
                         f"with envelope={base.bin_steps} to extend this one")

    def as_list(v: Any, n: int) -> list[float]:
        v = [float(x) for x in v] if isinstance(v, (list, tuple)) else [float(v)]
        return v + [v[-1]] * (n - len(v))

    def larger(a: float, b: float) -> float:
        fin = [x for x in (a, b) if math.isfinite(x)]
        return max(fin) if fin else math.inf

    thr: dict[str, Any] = {}
    for m in [*base.thresholds, *(k for k in own.thresholds if k not in base.thresholds)]:
        a, b = base.thresholds.get(m, math.inf), own.thresholds.get(m, math.inf)
        if not isinstance(a, (list, tuple)) and not isinstance(b, (list, tuple)):
            thr[m] = larger(float(a), float(b))
            continue
        n = max(len(x) if isinstance(x, (list, tuple)) else 1 for x in (a, b))
        thr[m] = [larger(x, y) for x, y in zip(as_list(a, n), as_list(b, n))]
    saw = bool(own.level_at_divergence)
    return replace(own, thresholds=thr, bin_steps=base.bin_steps or own.bin_steps,
                   level_at_divergence={**base.level_at_divergence, **own.level_at_divergence},
                   ratio_lo=own.ratio_lo if saw else base.ratio_lo, ratio_hi=own.ratio_hi if saw else base.ratio_hi,
                   fallback_lead=own.fallback_lead if saw else base.fallback_lead,
                   settings={**base.settings, **own.settings},
                   source=f"{own.source}, extending {base.source}" if base.source else own.source)


#: Calibrations shipped as the defaults: ``stabilitylab warnings evaluate --settings-from DEV --calibration-out``
#: on the quick benchmark (v2, 6 seeds, all 144 runs; the settings those of the development build on seeds
#: 10-12, except every=10's margin: 2, chosen on benchmarks/warnings_external.py's families, see its ``source``),
#: one per logging interval; regenerate and paste, or pass your own to ``EarlyWarning``. every=1 carries a second
#: rule (``Calibration.also``), the *sustained* rule: one signal growing over a 90-step window faster than 2.5x any
#: stable run's, next to the main rule's two signals over 60 steps; it catches the divergences of models the
#: benchmark does not train, whose signals grow for longer but on fewer metrics at once (on the eight families
#: of benchmarks/warnings_external.py, divergences warned >= 50 steps ahead 7 -> 15 of 24, runs that did not
#: diverge warned 21 -> 25 of 168; on the benchmark, each seed held out, 40% -> 44% with no stable run added). The thresholds and levels do
#: not depend on the margin; the forecast interval's ratios do (they are fit on the calibration runs' first
#: warnings), and every=10's were fit at margin 1.25: at margin 2 they cover 74% of the divergences warned on a
#: rebuild of the benchmark on another CPU (``stabilitylab warnings check``), 78% at 1.25.
DEFAULT_CALIBRATIONS: dict[int, Calibration] = {
    1: Calibration(
        thresholds={
            "attn.max_logit": [11.35, 11.35, 11.35, 3.705, 4.079, 5.201, 5.201],
            "attn.entropy": [1.588, 1.588, 1.874, 3.023, 3.838, 5.966, 5.966],
            "logits.lse_mean": [1.629, 1.629, 1.629, 1.629, 0.9647, 0.9647, 0.9647],
            "update.ratio": [4.776, 4.776, 4.776, 3.815, 3.143, 3.143, 2.664],
            "grad.global_norm": [0.5703, 0.5703, 0.5703, 0.8209, 1.302, 1.306, 1.306],
            "loss": [0.1095, 0.1095, 0.132, 0.4381, 0.4381, 0.4381, 0.1866],
        },
        bin_steps=50, interval=1, window=60, settings={"margin": 1.0, "min_metrics": 2, "persist": 0},
        level_at_divergence={"attn.max_logit": 9.231, "attn.entropy": 5.719, "logits.lse_mean": 4.957, "update.ratio": -1.674, "grad.global_norm": 0.03714, "loss": 1.207},
        ratio_lo=0.3752, ratio_hi=6.011, fallback_lead=104,
        source="warnings benchmark v2, 144 runs, every=1 (window 60, min_points 9, lag_points 5, burn-in 60, envelope 50, floor 0.25; tiny proxies and a "
               "tiny GPT-2 on byte-level text, LR ramps, step-ups and spikes over 450 steps)",
        also=(Calibration(  # the sustained rule: benchmarks/warnings_rules.py (benchmarks/results/warnings_rules.json)
            thresholds={
                "attn.max_logit": [5.653, 5.653, 5.653, 5.653, 4.222, 4.222, 3.786],
                "attn.entropy": [1.58, 1.58, 3.584, 4.501, 4.501, 4.501, 3.398],
                "logits.lse_mean": [1.516, 1.516, 1.516, 1.516, 0.8927, 0.5078, 0.5078],
                "update.ratio": [3.661, 3.661, 3.661, 3.661, 2.487, 2.519, 2.519],
                "grad.global_norm": [0.3298, 0.3298, 0.3298, 0.7492, 0.7492, 0.9925, 0.9925],
                "loss": [0.1932, 0.1932, 0.04829, 0.1932, 0.1932, 0.1932, 0.1283],
            },
            bin_steps=50, interval=1, window=90, settings={"margin": 2.5, "min_metrics": 1, "persist": 0},
            level_at_divergence={"attn.max_logit": 9.413, "attn.entropy": 5.497, "logits.lse_mean": 4.992, "update.ratio": -1.703, "grad.global_norm": 0.3442, "loss": 1.199},
            ratio_lo=0.316, ratio_hi=6.167, fallback_lead=80,
            source="warnings benchmark v2 rebuilt on AMD EPYC, 144 runs, every=1, the 90-step sustained rule (min_metrics 1, "
                   "margin 2.5: the smallest of benchmarks/warnings_rules.py's margins 2, 2.5, 3 at which it adds no "
                   "warned stable or spiked run to the main rule's, each seed and each mechanism held out)"),)),
    10: Calibration(
        thresholds={
            "attn.max_logit": [2.44, 2.44, 2.44, 3.586, 3.586, 3.921, 3.921],
            "attn.entropy": [1.333, 1.333, 1.504, 2.635, 3.321, 3.714, 3.714],
            "logits.lse_mean": [1.25, 1.25, 1.25, 1.25, 0.8828, 0.5255, 0.5255],
            "update.ratio": [2.591, 2.591, 2.591, 2.591, 2.234, 1.881, 1.526],
            "grad.global_norm": [0.4253, 0.4253, 0.474, 0.5873, 0.7652, 1.701, 1.701],
            "loss": [0.07731, 0.07731, 0.07731, 0.3092, 0.3092, 0.3092, 0.2607],
        },
        bin_steps=50, interval=10, window=90, settings={"margin": 2.0, "min_metrics": 1, "persist": 0},
        level_at_divergence={"attn.max_logit": 9.033, "attn.entropy": 5.323, "logits.lse_mean": 5.067, "update.ratio": -1.67, "grad.global_norm": 0.1503, "loss": 1.147},
        ratio_lo=0.4035, ratio_hi=4.52, fallback_lead=97,
        source="warnings benchmark v2, 144 runs, every=10 (window 60, min_points 9, lag_points 5, burn-in 60, envelope 50, floor 0.25; tiny proxies and a "
               "tiny GPT-2 on byte-level text, LR ramps, step-ups and spikes over 450 steps); margin raised from the "
               "development build's 1.25 to 2 afterwards (the smallest of benchmarks/warnings_external.py's MARGINS at "
               "which <= 5% of its eight families' runs that did not diverge are warned); the forecast constants are "
               "those fit at 1.25"),
}
#: The ``every=1`` default (kept for code that reads one calibration).
DEFAULT_CALIBRATION = DEFAULT_CALIBRATIONS[1]
