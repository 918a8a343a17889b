"""Online early warning of divergence with a forecast: the live ``EarlyWarning`` probe.

``EarlyWarning`` is a probe that only uses ``on_host``: attach it to a Monitor next to the default probes
(``Monitor(model, opt, probes=[*DEFAULT, EarlyWarning()])``) and on each logged step it feeds the logged
values to ``stabilitylab.detectors.RunawayDetector``, the same code the offline evaluation
(``stabilitylab.analysis.evaluate_warnings``, ``stabilitylab warnings evaluate``) replays. The detector warns
when a watched signal (max attention logit, attention entropy, log Z, grad norm, update
ratio, loss; each per module) grows *and accelerates* in log space faster than it ever did on calibration
runs that stayed stable; the warning names the leading signal and module and forecasts the steps left to
divergence with an interval (see ``stabilitylab.detectors`` for the formulas).

The default calibrations (``detectors.DEFAULT_CALIBRATIONS``, for ``every=1`` and ``every=10``) come from the warnings benchmark
(``stabilitylab warnings build --scale quick``: tiny proxies and a tiny GPT-2, LR ramps and step-ups);
recalibrate on your own stable runs with ``stabilitylab warnings calibrate STORE --out cal.json --extend default``
and ``EarlyWarning(calibration="cal.json")``. At ``every=1`` two rules run side by side, and the first to fire
warns: two metrics accelerating together over 60 steps, or one sustaining growth over 90 steps at 2.5x the
fastest any stable run showed (``Calibration.also``; the event's ``window`` says which). Either warns only while
the training loss (its 20-step EMA) is at least ``loss_gate`` = 0.1 nats above its best so far (pass the loss to
``monitor.step(loss)``; the event's ``loss_gap`` gives the rise). ``solo`` names metrics that warn without a
second one (default none: ``grad.global_norm`` alone warned more divergences early on the benchmark, and more
runs that did not diverge on held-out model families; README). On model families the
benchmark does not train (``benchmarks/warnings_external.py``: a GPT written there, HF Llama, GPT-NeoX, Qwen2,
OPT, Falcon, Phi-3 and Gemma 3; README gives the numbers) the defaults warn some runs near the edge that did not
diverge: treat a first warning on a new model as a prompt to look, and recalibrate. The calibration used is the one whose slope window is nearest
the run's (``detectors.pick_calibration``); a run whose window is far from every calibration's is told so once.

On a warning it can write a flight-recorder snapshot (``snapshot_dir``): the last ``snapshot_steps``
logged steps of every signal (``signals.parquet``), the step's batch indices given to ``note_batch``,
and the RNG states (``rng.pt``: torch CPU/CUDA, numpy, python), plus ``event.json``.
"""

from __future__ import annotations

import json
import random
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stabilitylab import detectors as D
from stabilitylab import metrics as M
from stabilitylab._checks import int_at_least
from stabilitylab._io import atomic_write_parquet
from stabilitylab.detectors import DEFAULT_WATCH
from stabilitylab.metrics import Event
from stabilitylab.probes.base import Probe

__all__ = ["EarlyWarning"]


class EarlyWarning(Probe):
    """Online divergence early warning with a forecast, on the Monitor's logged values.

    Args:
        watch: metric -> transform (``"log"``, ``"neglog"``, ``"identity"``); default ``DEFAULT_WATCH``.
        calibration: thresholds and forecast constants: None (``detectors.DEFAULT_CALIBRATIONS``, one per
            logging interval; the one whose slope window is nearest this run's is used, so every=1-8 take
            every=1's and every=9+ every=10's: ``detectors.pick_calibration``), a ``Calibration``, a mapping
            ``interval -> Calibration``, their dicts, or the path of a JSON file (``--calibration-out``).
        window: steps in each slope fit (and the acceleration lag).
        persist: steps a series must stay above its threshold before it counts.
        burn_in: steps from the first logged step before any warning.
        min_metrics: distinct metrics that must be hot together for a warning.
        margin: multiplier on the calibrated thresholds (> 1: fewer, later warnings).
            ``persist``, ``min_metrics`` and ``margin`` left None take the calibration's ``settings`` (chosen
            with its thresholds by ``warnings evaluate``; the defaults differ at ``every=1`` and ``every=10``),
            else ``DetectorConfig``'s defaults (0, 2, 1.0).
        cooldown: steps after a warning before the next one.
        callback: ``fn(event)`` called on every warning event.
        snapshot_dir: folder for flight-recorder snapshots (None: off).
        snapshot_steps: logged steps of history kept for a snapshot.
        max_snapshots: snapshots written per run at most.
        min_points: the window spans at least this many logged steps (``window`` is widened at sparse logging).
        lag_points: the acceleration gate's lagged slope counts once it was fit on this many logged steps
            (``DetectorConfig.lag_points``).
        loss_gate: an alarm counts only while the loss EMA is at least this many nats above its best so far
            (``DetectorConfig.loss_gate``; None: its default, 0: no gate). Log the loss
            (``monitor.step(loss)``) for the gate to act; without it alarms are not gated.
        solo: metrics that warn alone, without a second metric hot (``DetectorConfig.solo``; None: its default).
    """

    name = "early_warning"
    metrics = ()

    def __init__(self, watch: dict[str, str] | None = None, calibration=None, window: int = 60,
                 persist: int | None = None, burn_in: int = 60, min_metrics: int | None = None,
                 margin: float | None = None, cooldown: int = 50,
                 callback: Callable[[Event], None] | None = None, snapshot_dir: str | Path | None = None,
                 snapshot_steps: int = 50, max_snapshots: int = 1, min_points: int = 9,
                 lag_points: int = 5, loss_gate: float | None = None, solo: tuple[str, ...] | None = None):
        super().__init__()
        given = {k: v for k, v in (("persist", persist), ("min_metrics", min_metrics), ("margin", margin))
                 if v is not None}
        self.adopt = tuple(k for k in D.ADOPTABLE if k not in given)
        self.config = D.DetectorConfig(watch=dict(DEFAULT_WATCH if watch is None else watch), window=window,
                                       min_points=min_points, lag_points=lag_points, burn_in=burn_in,
                                       cooldown=cooldown, **given,
                                       **({} if loss_gate is None else {"loss_gate": loss_gate}),
                                       **({} if solo is None else {"solo": solo}))
        cal = D.load_calibration(calibration, "EarlyWarning(calibration)")
        self.calibrations = D.DEFAULT_CALIBRATIONS if cal is None else cal
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
        self.detector = D.RunawayDetector(self.config, self.calibrations, adopt=self.adopt)
        self._batch = None
        self._snapshots = 0
        self._python_warned = False
        self._interval_checked = False
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
        if not self._interval_checked and self.detector.interval is not None:
            self._interval_checked = True
            self._check_interval()
        if w is None:
            return [], []
        where = f"{w.metric}[{w.module}]" if w.module else w.metric
        ev = Event(self.run_id, step, "early_warning", w.module, w.score,
                   f"{where} is running away ({w.score:.2g}x its calibrated growth limit); forecast: divergence "
                   f"in ~{w.steps_left:.0f} steps ({w.steps_left_lo:.0f}-{w.steps_left_hi:.0f}); "
                   f"{len(w.hot)} series hot over {w.window} steps"
                   + (f"; loss {w.loss_gap:.2g} nats above its best" if w.loss_gap == w.loss_gap else ""),
                   {"metric": w.metric, "module": w.module, "steps_left": w.steps_left,
                    "steps_left_lo": w.steps_left_lo, "steps_left_hi": w.steps_left_hi,
                    "predicted_step": step + w.steps_left, "window": w.window,
                    "loss_gap": w.loss_gap if w.loss_gap == w.loss_gap else None,
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

    def _check_interval(self) -> None:
        """Say once (a Python warning) when the run's slope window is more than 1.25x away from the one its
        calibration was made with (without a recorded window: its interval more than 2x away). Thresholds are
        growth rates of slopes fit on that window, and the measured lead times and false alarms hold for it:
        the shipped ones were measured at every=1, 2, 3, 5, 7, 10 and 20 (README); at every=20 (a 180-step
        window) or every=50 this says so, as does a single every=1 calibration used at every=10."""
        det, cal = self.detector, self.detector.calibration
        if cal is None:
            return
        if cal.window > 0:
            if cal.window / 1.25 <= det.window <= cal.window * 1.25:
                return
            what = f"slope windows of {cal.window} steps; this run's is {det.window}"
        elif cal.interval / 2 <= det.interval <= cal.interval * 2:
            return
        else:
            what = f"runs logged every {cal.interval} steps"
        warnings.warn(
            f"stabilitylab EarlyWarning (run {self.run_id}): this run logs every {det.interval} steps, and the "
            f"calibration it uses was made with {what}; its thresholds, lead times and false-alarm rates hold "
            f"there. Recalibrate on a few stable runs logged like this one: `stabilitylab warnings calibrate "
            f"STORE --every {det.interval} --extend default --out cal.json`, then "
            f"EarlyWarning(calibration='cal.json')", RuntimeWarning, stacklevel=3)

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
        self._python_warned = self._interval_checked = True
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
