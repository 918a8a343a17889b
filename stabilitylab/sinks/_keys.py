"""Dashboard keys of tidy records, shared by the W&B and TensorBoard sinks (and the W&B workspace).

- ``<metric>/<module>``   one series per module; ``<metric>/model`` for whole-model values (module "")
- ``<metric>/<summary>``  one series per metric over its named modules, folded as the metric declares
                          (``METRICS[metric].summary``: ``max``, ``min`` or ``mean``; NaN ignored), e.g.
                          ``attn.max_logit/max``, ``attn.entropy/min``

A metric with more than ``max_modules`` named modules (per-tensor gradient RMS of a large model) keeps only
its summary series, so dashboards stay small.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from stabilitylab import metrics as M
from stabilitylab.sinks.base import Records

WHOLE_MODEL = "model"


def series_key(metric: str, module: str) -> str:
    """Key of one tidy record: ``"<metric>/<module>"``, ``"<metric>/model"`` for module ``""``."""
    return f"{metric}/{module or WHOLE_MODEL}"


def summary_key(metric: str) -> str:
    """Key of a metric's summary series over its modules, e.g. ``"attn.max_logit/max"``."""
    return f"{metric}/{M.spec(metric).summary}"


def fold(values: np.ndarray, how: str) -> float:
    """max / min / mean over modules, ignoring NaN (NaN only when every value is NaN)."""
    finite_or_inf = values[~np.isnan(values)]
    if finite_or_inf.size == 0:
        return math.nan
    return float({"max": np.max, "min": np.min, "mean": np.mean}[how](finite_or_inf))


def series_row(records: Records, max_modules: int | None = None) -> dict[str, float]:
    """The dashboard row of one logged step: per-module series and summary series (no step key).

    Args:
        records: one logged step's tidy records.
        max_modules: log a metric's per-module series only when it has at most this many named modules
            (None: always, 0: never); its whole-model value and summary series are always there.
    """
    by_metric: dict[str, list[tuple[str, float]]] = {}
    for metric, module, value in zip(records.metric, records.module, np.asarray(records.value, float)):
        by_metric.setdefault(metric, []).append((module, float(value)))
    row: dict[str, float] = {}
    for metric, pairs in by_metric.items():
        named = [(m, v) for m, v in pairs if m]
        if max_modules is None or len(named) <= max_modules:
            row.update((series_key(metric, m), v) for m, v in named)
        row.update((series_key(metric, m), v) for m, v in pairs if not m)
        if named:
            row[summary_key(metric)] = fold(np.array([v for _, v in named]), M.spec(metric).summary)
    return row


def series_keys(pairs: Iterable[tuple[str, str]], max_modules: int | None = None) -> dict[str, list[str]]:
    """Every key the sinks write for these ``(metric, module)`` pairs, per metric: summary (or whole-model)
    keys first, then per-module keys in module order.

    Args:
        pairs: ``(metric, module)`` of the records, e.g. ``zip(history.metric, history.module)``.
        max_modules: as in ``series_row``.

    Returns:
        metric -> its keys, metrics in first-seen order.
    """
    modules: dict[str, list[str]] = {}
    for metric, module in pairs:
        mods = modules.setdefault(metric, [])
        if module not in mods:
            mods.append(module)
    out: dict[str, list[str]] = {}
    for metric, mods in modules.items():
        named = [m for m in mods if m]
        keys = [series_key(metric, "")] if "" in mods else []
        if named:
            keys.append(summary_key(metric))
            if max_modules is None or len(named) <= max_modules:
                keys += [series_key(metric, m) for m in named]
        out[metric] = keys
    return out
