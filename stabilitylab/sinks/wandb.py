"""Weights & Biases sink: stability signals as a dashboard that stays readable for a 100-layer model.

What lands in the run (``metric`` is a name from ``stabilitylab.metrics``, ``module`` a module name):

- ``<metric>/<module>``   one series per module (``<metric>/model`` for whole-model values such as
                          ``loss/model`` or ``grad.global_norm/model``); W&B groups them into one
                          section per metric. Metrics with more than ``max_modules`` modules (per-tensor
                          gradient RMS of a large model) skip these and keep only the summary.
- ``<metric>/max``        one summary series per metric over its modules, folded as the metric declares
                          (``METRICS[metric].summary``: ``max``, ``min`` or ``mean``; NaN ignored)
- ``stabilitylab/step``   the training step: every series above uses it as its x-axis
                          (``define_metric``), so the user's own ``wandb.log`` calls never clash with ours;
                          the run summary keeps each series' peak (max or min, as declared) and last value
- ``stabilitylab/events`` a table of health events and early warnings (step, kind, module, value,
                          message); the first event of each kind is also sent as a W&B alert
- run config ``stabilitylab``: the Monitor's settings (every, probes, run_id, n_params, and the sweep's
                          grid point when the Monitor gets it as ``config``)

The sink logs into ``run`` if given, else into the active ``wandb.run`` (yours, Hugging Face's or
Lightning's ``WandbLogger``'s), else starts its own run (``wandb.init``) and finishes it on close.
If W&B cannot start or log, the Monitor warns once and training goes on; the records stay in
``Monitor.history()`` and the Parquet sink. A lost connection to W&B's service process (it was killed,
or crashed) is permanent for this run: the sink stops calling into the client (each write then fails at
once, so the Monitor keeps the records buffered up to its bound), sends no alerts, and ``close()``
returns at once instead of waiting on a service that is gone.

``log_figures`` and ``log_table`` log figures and tables (``stabilitylab.studies.sweep_summary.log_sweep_summary``
uses them to log a finished sweep).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from stabilitylab import metrics as M
from stabilitylab._checks import int_at_least
from stabilitylab.metrics import Event
from stabilitylab.sinks._keys import WHOLE_MODEL, series_row, summary_key  # noqa: F401 - re-exported
from stabilitylab.sinks._keys import series_key as wandb_key  # noqa: F401 - re-exported
from stabilitylab.sinks.base import Records, Sink

STEP_METRIC = "stabilitylab/step"
EVENTS_KEY = "stabilitylab/events"
_EVENT_COLUMNS = ["run_id", "step", "kind", "module", "value", "message"]
_ALERT_LEVEL = {"nonfinite": "ERROR"}


def require_wandb(caller: str) -> None:
    """Raise ImportError naming ``caller`` when the wandb package is not installed."""
    if importlib.util.find_spec("wandb") is None:
        raise ImportError(f"{caller} needs the wandb package: pip install wandb")


class WandB(Sink):
    """Stability signals to a Weights & Biases run.

    Args:
        project: W&B project of a run this sink starts (ignored when it reuses a run).
        run: a ``wandb`` run to log into (default: the active ``wandb.run``, else a new run).
        group: run group of a run this sink starts; give sweep runs the sweep's name so W&B's grouping
            and parallel-coordinates views work.
        name: display name of a run this sink starts (default: the Monitor's ``run_id``).
        max_modules: log the per-module series of a metric only when it has at most this many modules
            (None: always, 0: never); its summary series is always logged.
        alerts: send the first event of each kind (``loss_spike``, ``nonfinite``, early warnings) as a
            W&B alert.
        **init_kwargs: passed to ``wandb.init`` when this sink starts the run (entity, tags, mode, dir, ...).
    """

    def __init__(self, project: str | None = None, run: Any = None, group: str | None = None,
                 name: str | None = None, max_modules: int | None = 128, alerts: bool = True,
                 **init_kwargs: Any):
        require_wandb("sinks.WandB")
        if max_modules is not None and not int_at_least(max_modules, 0):
            raise ValueError(f"WandB(max_modules={max_modules!r}): pass an int >= 0 or None (no limit)")
        if run is not None and not callable(getattr(run, "log", None)):
            raise TypeError(f"WandB(run=...): expected a wandb run (wandb.init() / wandb.run), got "
                            f"{type(run).__name__}")
        self.project = project
        self.run = run
        self.group = group
        self.name = name
        self.max_modules = max_modules
        self.alerts = alerts
        self.init_kwargs = init_kwargs
        self._run: Any = None
        self._owned = False
        self._failed = False
        self._defined: set[str] = set()
        self._events: list[dict[str, Any]] = []
        self._events_logged = 0
        self._alerted: set[str] = set()
        self._warned_alert = False
        self.broken: str | None = None  # why the connection to W&B's service is gone for good

    # ------------------------------------------------------------------ run
    def open(self, run_id: str, config: dict[str, Any]) -> None:
        """Reuse ``run`` / ``wandb.run`` or start a run; record the Monitor's settings in its config."""
        if self._run is not None:
            return
        import wandb

        self._failed = True  # until the run is up: a failed start is reported once, then writes are no-ops
        run = self.run if self.run is not None else wandb.run
        settings = {"stabilitylab": _jsonable(config)}
        if run is None:
            run = wandb.init(project=self.project, group=self.group, name=self.name or run_id,
                             config=settings, **self.init_kwargs)
            self._owned = True
        else:
            run.config.update(settings, allow_val_change=True)
            if self.group is not None and getattr(run, "group", None) != self.group:
                warnings.warn(f"stabilitylab: WandB(group={self.group!r}) is ignored: logging into the "
                              f"existing run {run.name!r}, whose group is set by whoever started it", stacklevel=2)
        run.define_metric(STEP_METRIC, hidden=True)
        self._run = run
        self._failed = False

    def _define(self, metric: str) -> None:
        if metric in self._defined:
            return
        how = M.spec(metric).summary  # run summary: the peak (max or min) and the last value
        self._run.define_metric(f"{metric}/*", step_metric=STEP_METRIC,
                                summary=None if how == "mean" else f"{how},last")
        self._defined.add(metric)

    # ------------------------------------------------------------------ records
    def row(self, records: Records) -> dict[str, float]:
        """The W&B row of one logged step: per-module series, summary series and the step metric."""
        return {STEP_METRIC: records.step, **series_row(records, self.max_modules)}

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args)`` on the W&B client; a lost service connection marks the sink broken for good."""
        if self.broken is not None:
            raise ConnectionError(f"W&B service connection lost earlier ({self.broken}); not retried")
        try:
            return fn(*args, **kwargs)
        except (ConnectionError, BrokenPipeError) as e:
            self.broken = f"{type(e).__name__}: {e}"
            raise

    def write(self, records: Records) -> None:
        if self._run is None:
            if self._failed:
                return
            self.open(records.run_id, {"run_id": records.run_id})
        for metric in dict.fromkeys(records.metric):
            self._call(self._define, metric)
        self._call(self._run.log, self.row(records))

    def write_events(self, events: Sequence[Event]) -> None:
        if self._run is None:
            return
        for e in events:
            self._events.append({"run_id": e.run_id, "step": int(e.step), "kind": e.kind, "module": e.module,
                                 "value": float(e.value), "message": e.message})
            if self.alerts and e.kind not in self._alerted:
                self._alerted.add(e.kind)
                self._alert(e)

    def _alert(self, e: Event) -> None:
        if self.broken is not None:  # the write that found it broken already warned
            return
        where = f" in {e.module}" if e.module else ""
        try:
            self._call(self._run.alert, title=f"stabilitylab: {e.kind}"[:63],
                            text=f"run {e.run_id}, step {e.step}{where}: {e.message}",
                            level=_ALERT_LEVEL.get(e.kind, "WARN"))
        except Exception as err:  # noqa: BLE001 - alerts are best effort; the events table still has it
            if not self._warned_alert and self.broken is None:
                self._warned_alert = True
                warnings.warn(f"stabilitylab: W&B alert failed ({type(err).__name__}: {err}); events still go "
                              f"to the {EVENTS_KEY} table", stacklevel=3)

    def flush(self) -> None:
        """Log the events table when new events arrived since it was last logged."""
        if self._run is None or len(self._events) == self._events_logged:
            return
        import wandb

        frame = pd.DataFrame(self._events, columns=_EVENT_COLUMNS)
        self._call(self._run.log, {EVENTS_KEY: wandb.Table(dataframe=frame)})
        self._events_logged = len(self._events)

    def close(self) -> None:
        """Log pending events; finish the run if this sink started it. Closing twice is a no-op."""
        if self._run is None:
            return
        if self.broken is not None:  # nothing can reach W&B: release the run without waiting on it
            run, self._run = self._run, None
            self._failed = True
            if self._owned:
                _teardown_broken(run)
            return
        try:
            self.flush()
        finally:
            run, self._run = self._run, None
            self._failed = True  # closed: later writes are no-ops
            if self._owned:
                run.finish()


def _teardown_broken(run: Any) -> None:
    """Drop a run whose service process is gone, and the dead service: ``finish`` only fails fast there
    (before it clears ``wandb.run``), so the globals are cleared here and a later ``wandb.init`` in this
    process starts a new service instead of reusing the dead one."""
    import wandb

    def unset() -> None:
        if wandb.run is run:
            from wandb.sdk.lib import module

            module.unset_globals()

    for fn in (run.finish, unset, wandb.teardown):
        try:
            fn()
        except Exception:  # noqa: BLE001, S110 - the connection is gone; these only fail fast
            pass


def _jsonable(config: Mapping[str, Any]) -> dict[str, Any]:
    """Config values W&B can store: numbers, strings, bools, None, lists and dicts of them; else str()."""
    def conv(v: Any) -> Any:
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, Mapping):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return str(v)

    return conv(dict(config))


# ---------------------------------------------------------------------- sweep helpers
def target_run(run: Any, init: Mapping[str, Any]) -> tuple[Any, bool]:
    """(run, owned): ``run``, else the active ``wandb.run``, else a new run started with ``init``."""
    import wandb

    if run is not None:
        return run, False
    if wandb.run is not None:
        return wandb.run, False
    return wandb.init(**{k: v for k, v in init.items() if v is not None}), True


def log_figures(figures: Mapping[str, Any], run: Any = None, prefix: str = "stabilitylab/figures") -> list[str]:
    """Log figures as images under ``<prefix>/<name>``.

    Args:
        figures: name -> matplotlib ``Figure`` or path of an image file (PNG, JPEG).
        run: the W&B run (default: the active ``wandb.run``; one must exist).
        prefix: key prefix; W&B shows one media panel per key.

    Returns:
        the keys logged.
    """
    require_wandb("log_figures")
    import wandb

    run = run if run is not None else wandb.run
    if run is None:
        raise ValueError("log_figures(run=None): no active W&B run; pass run=wandb.init(...) or start one first")
    images = {}
    for name, fig in figures.items():
        if isinstance(fig, (str, os.PathLike)) and not os.path.isfile(fig):
            raise ValueError(f"log_figures(figures={{{name!r}: {str(fig)!r}}}): no such image file")
        images[f"{prefix}/{name}"] = wandb.Image(os.fspath(fig) if isinstance(fig, os.PathLike) else fig)
    run.log(images)
    return list(images)


def log_table(df: pd.DataFrame, key: str, run: Any = None) -> None:
    """Log a DataFrame as a ``wandb.Table`` under ``key`` (default run: the active ``wandb.run``)."""
    require_wandb("log_table")
    import wandb

    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"log_table(df=...): expected a pandas DataFrame, got {type(df).__name__}")
    run = run if run is not None else wandb.run
    if run is None:
        raise ValueError("log_table(run=None): no active W&B run; pass run=wandb.init(...) or start one first")
    run.log({key: wandb.Table(dataframe=df.reset_index(drop=True))})


# ---------------------------------------------------------------------- the stability view
from stabilitylab.sinks.wandb_workspace import stability_workspace  # noqa: E402,F401 - re-exported
