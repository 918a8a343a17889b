"""Train one grid point (in whatever process an executor picks) and turn the outcome into a result row.

The ``train_fn`` contract (``sweep(spec, train_fn=...)``)::

    def train_fn(config: TrainConfig, monitor: MonitorFactory) -> float | RunResult | dict: ...

* ``config`` is the point's ``TrainConfig``: ``config.lr``, ``config.seed``, ``config.steps``,
  ``config.batch_size``, ``config.warmup_steps``, ``config.weight_decay``, ``config.eps``, ... and
  ``config.model`` (a ``ProxyConfig``: ``d_model``, ``n_layers``, ``head_dim``, ``seq_len`` and the
  variant's switches such as ``qk_layernorm``). Build *your* model from it.
* ``monitor(model, optimizer=None, **monitor_kwargs)`` returns a ``stabilitylab.Monitor`` already set to
  the point's ``run_id``, the spec's ``every`` and ``probes``; call ``mon.step(loss)`` each step. Its
  records become the run's history, and ``n_params`` is taken from the model it saw. The sweep closes it
  after ``train_fn`` returns (closing it yourself is fine). Using it is optional.
* Return the final loss (a float; NaN/Inf means diverged), a ``RunResult``, or a dict with
  ``final_loss`` and optionally ``init_loss`` (needed for LR sensitivity of diverged runs),
  ``diverged``, ``steps_done``, ``n_params``, plus any extra scalar metrics (each becomes a column).
  Defaults: ``init_loss`` NaN, ``steps_done = config.steps``, ``diverged`` = final loss not finite or
  above ``init_loss`` (the proxy's rule).
* Raising is fine: the point is recorded as ``failed`` with the error text and the sweep goes on.
  For ``executor="processes"`` the function must be picklable (a module-level function).
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable, Mapping
from numbers import Real
from typing import Any

import numpy as np
import pandas as pd
import torch

from stabilitylab.proxy.train import RunResult, TrainConfig
from stabilitylab.sweeps.spec import Point

TrainFn = Callable[[TrainConfig, "MonitorFactory"], Any]
_MAX_ERROR_CHARS = 4000


class MonitorFactory:
    """``factory(model, optimizer=None, **kwargs) -> Monitor`` for one grid point; remembers what it built.

    Args:
        point: the grid point (gives ``run_id``, ``every``, ``probes`` and the labels stored as config).
    """

    def __init__(self, point: Point):
        self.point = point
        self.monitors: list = []
        self.n_params: int | None = None

    def __call__(self, model: torch.nn.Module, optimizer: Any = None, **kwargs: Any):
        from stabilitylab.monitor import Monitor

        p = self.point
        kwargs = {"every": p.every, "probes": p.probes if isinstance(p.probes, str) else list(p.probes),
                  "config": {"lr": p.lr, "size": p.size, "variant": p.variant, "seed": p.seed}, **kwargs}
        kwargs["run_id"] = p.run_id
        mon = Monitor(model, optimizer=optimizer, **kwargs)
        self.monitors.append(mon)
        self.n_params = sum(t.numel() for t in model.parameters())
        return mon

    def close(self) -> None:
        for m in self.monitors:
            m.close()

    def history(self) -> pd.DataFrame | None:
        frames = [m.history() for m in self.monitors]
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else None


def _is_number(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) or (isinstance(v, torch.Tensor) and v.numel() == 1)


def _outcome(out: Any, config: TrainConfig, factory: MonitorFactory) -> tuple[dict[str, Any], pd.DataFrame | None]:
    """A train function's return value -> (result columns, history)."""
    history = factory.history()
    if isinstance(out, RunResult):
        res = out.to_row()
        return res, history if history is not None else out.history
    if _is_number(out):
        out = {"final_loss": out}
    if not isinstance(out, Mapping) or "final_loss" not in out:
        raise TypeError(f"train_fn returned {type(out).__name__}; return the final loss (float), a RunResult, "
                        "or a dict with 'final_loss'")
    res = dict(out)
    for k in ("final_loss", "init_loss"):
        if k in res and not _is_number(res[k]):
            raise TypeError(f"train_fn returned {k}={res[k]!r}; it must be a number")
        res[k] = float(res.get(k, math.nan))
    for k, v in res.items():
        if not (v is None or isinstance(v, (str, bool, np.bool_)) or _is_number(v)):
            raise TypeError(f"train_fn returned {k}={v!r}; extra result values must be scalars (number/str/bool)")
        if isinstance(v, torch.Tensor):
            res[k] = v.item()
    fl, il = res["final_loss"], res["init_loss"]
    res["diverged"] = bool(res.get("diverged", not math.isfinite(fl) or (math.isfinite(il) and fl > il)))
    res.setdefault("steps_done", config.steps)
    res.setdefault("n_params", factory.n_params)
    res["status"] = "diverged" if res["diverged"] else "ok"
    res.setdefault("error", "")
    return res, history


def failed_row(point: Point, error: str, n_params: int | None = None, wall_time: float = math.nan) -> dict[str, Any]:
    """The row of a point whose training raised (or whose worker died)."""
    return {**point.row(), "n_params": n_params, "final_loss": math.nan, "init_loss": math.nan,
            "diverged": False, "steps_done": 0, "status": "failed", "error": error[-_MAX_ERROR_CHARS:],
            "wall_time": wall_time}


def run_point(point: Point, train_fn: TrainFn | None = None, threads: int | None = None,
              run_progress: bool = False) -> tuple[dict[str, Any], pd.DataFrame | None]:
    """Train ``point`` once; never raises for a failing run (returns a ``failed`` row with the traceback).

    Args:
        point: the grid point.
        train_fn: the user's function (see the module docstring); None trains the proxy with ``train_one``.
        threads: ``torch.set_num_threads(threads)`` first (executors that share cores set it).
        run_progress: per-step tqdm bar (proxy only).

    Returns:
        (row, history): the point's labels and config columns plus ``n_params``, ``final_loss``,
        ``init_loss``, ``diverged``, ``steps_done``, ``status``, ``error``, ``wall_time`` (seconds) and any
        extra result keys; the tidy monitor history (or None).
    """
    if threads:
        torch.set_num_threads(threads)
    factory = MonitorFactory(point)
    t0 = time.time()
    try:
        if train_fn is None:
            from stabilitylab.proxy.train import train_one

            out = train_one(point.config, monitor=factory, progress=run_progress)
        else:
            out = train_fn(point.config, factory)
        factory.close()
        res, history = _outcome(out, point.config, factory)
    except Exception:
        factory.close()
        return failed_row(point, traceback.format_exc(), factory.n_params, time.time() - t0), factory.history()
    res["wall_time"] = time.time() - t0
    if history is not None:
        history = history.assign(run_id=point.run_id)
    return {**point.row(), **res}, history
