"""Metric names, how each one reduces, and the tidy record schema.

Every signal stabilitylab records is one row ``run_id, step, metric, module, value`` (``module`` is ""
for whole-model metrics). A metric declares here how partial values combine, across the micro-batches
of one logged step and across data-parallel ranks. Probes report *partials* ``(numerator, weight)``;
the Monitor reduces them once and finalises:

=========  ==========================================  ===================================
reduce     combine partials (num, w)                   final value
=========  ==========================================  ===================================
``max``    num = max(num_i), w = sum(w_i)              num
``min``    num = min(num_i), w = sum(w_i)              num
``mean``   num = sum(num_i), w = sum(w_i)              num / w   (weighted mean)
``rms``    num = sum(num_i) (sums of squares)          sqrt(num / w)
``sum``    num = sum(num_i)                            num
=========  ==========================================  ===================================

This module is the record contract, the bottom layer: the record's columns, ``Block`` (one metric's
partials as a probe hands them over), ``Event``, the metric names, the table above as code
(``REDUCE_CODE``, ``combine``, ``finalise``) and the logging schedule (``is_logged``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from stabilitylab._checks import check_every  # noqa: F401 - re-exported (the logging schedule's check)

RECORD_COLUMNS = ("run_id", "step", "metric", "module", "value")


@dataclass
class Block:
    """Partials of one metric for several modules: final value per module from ``(num, weight)``."""

    metric: str
    modules: tuple[str, ...]
    num: torch.Tensor  # (N,)
    weight: torch.Tensor  # (N,)


@dataclass
class Event:
    """A discrete happening worth an alert: a loss spike, non-finite values, an early warning."""

    run_id: str
    step: int
    kind: str
    module: str = ""
    value: float = float("nan")
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricSpec:
    """What a metric means and how it reduces.

    Attributes:
        name: dotted metric name, e.g. ``"attn.max_logit"``.
        reduce: one of ``max``, ``min``, ``mean``, ``rms``, ``sum`` (see module docstring).
        summary: how per-module values fold into one dashboard series (``max``, ``min`` or ``mean``).
        doc: one line with the formula and units.
    """

    name: str
    reduce: str
    summary: str
    doc: str


METRICS: dict[str, MetricSpec] = {}  # every declared metric by name (the built-ins below, then custom ones)
REDUCTIONS = ("max", "min", "mean", "rms", "sum")
#: Integer code of each reduction (its index in ``REDUCTIONS``), one per row of a logged step.
REDUCE_CODE: dict[str, int] = {r: i for i, r in enumerate(REDUCTIONS)}
REDUCE_MAX, REDUCE_MIN, REDUCE_MEAN, REDUCE_RMS, REDUCE_SUM = (REDUCE_CODE[r] for r in REDUCTIONS)


def register_metric(name: str, reduce: str, summary: str = "max", doc: str = "") -> MetricSpec:
    """Declare a new metric (for custom probes). Re-registering an identical spec is a no-op."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"register_metric: reduce={reduce!r} is not one of {REDUCTIONS}")
    if summary not in ("max", "min", "mean"):
        raise ValueError(f"register_metric: summary={summary!r} must be 'max', 'min' or 'mean'")
    spec = MetricSpec(name, reduce, summary, doc)
    old = METRICS.get(name)
    if old is not None and (old.reduce, old.summary) != (reduce, summary):
        raise ValueError(f"register_metric: {name!r} is already declared with reduce={old.reduce!r}")
    METRICS[name] = spec
    return spec


def _metric(name: str, reduce: str, summary: str, doc: str) -> str:
    """Declare a built-in metric; returns its name for the constant."""
    return register_metric(name, reduce, summary, doc).name


# The built-in metrics: constant = (dotted name, reduce, dashboard summary, formula and units).
LOSS = _metric("loss", "mean", "mean", "training loss passed to Monitor.step (nats/token)")
ATTN_MAX_LOGIT = _metric("attn.max_logit", "max", "max",
                         "max over batch, heads, allowed (query, key) of q.k*scale")
ATTN_ENTROPY = _metric("attn.entropy", "mean", "min", "mean over softmax rows of -sum p log p (nats)")
#: Max post-soft-cap attention score (what the softmax sees); recorded only when a cap is active.
ATTN_MAX_LOGIT_CAPPED = _metric("attn.max_logit_capped", "max", "max",
                                "max over allowed (query, key) of the soft-capped score cap*tanh(s/cap) (+ bias) fed to softmax")
LOGITS_LSE_MEAN = _metric("logits.lse_mean", "mean", "mean",
                          "mean over tokens of log Z = logsumexp(output logits)")
LOGITS_LSE_STD = _metric("logits.lse_std", "mean", "mean",
                         "std over tokens of log Z (token-weighted mean over micro-batches)")
LOGITS_MAX = _metric("logits.max", "max", "max", "max output logit")
ACT_RMS = _metric("act.rms", "rms", "max", "sqrt(mean(h^2)) of a module's output")
ACT_BATCH_ENTROPY = _metric("act.batch_entropy", "mean", "min",
                            "mean over units of 0.5*log(2*pi*e*var) of the unit across batch positions (nats)")
ACT_KURTOSIS = _metric("act.kurtosis", "mean", "max", "mean over tokens of E[h^4]/E[h^2]^2 across features")
GRAD_RMS = _metric("grad.rms", "rms", "max", "sqrt(mean(g^2)) of a parameter's gradient, before clipping")
PARAM_RMS = _metric("param.rms", "rms", "max", "sqrt(mean(p^2)) of a parameter after the step")
UPDATE_RMS = _metric("update.rms", "rms", "max", "sqrt(mean((p_after - p_before)^2))")
UPDATE_RATIO = _metric("update.ratio", "rms", "max",
                       "||dp|| / sqrt(||p_after||^2 + n*1e-16), dp = p_after - p_before; partials (sum dp^2, sum p_after^2 + n*1e-16)")
GRAD_GLOBAL_NORM = _metric("grad.global_norm", "rms", "max",
                           "sqrt(sum over all parameters of g^2), before clipping")
ADAM_EPS_DOMINANCE = _metric("adam.eps_dominance", "mean", "max",
                             "share of elements with sqrt(v_hat) < eps (0..1)")
ADAM_V_RMS = _metric("adam.v_rms", "rms", "min", "sqrt(mean(v_hat)) = RMS of Adam's second-moment root")
SHARPNESS_PRECONDITIONED = _metric("sharpness.preconditioned", "max", "max",
                                   "top eigenvalue of P^-1 H, P = diag(sqrt(v_hat)+eps)")
SHARPNESS_THRESHOLD = _metric("sharpness.threshold", "max", "max",
                              "(2 + 2*beta1) / ((1 - beta1) * lr), the edge of stability")
HEALTH_NONFINITE = _metric("health.nonfinite", "sum", "max",
                           "count of non-finite elements (module names the tensor kind)")
HEALTH_SPIKE = _metric("health.spike", "max", "max",
                       "loss z-score vs trailing window when above threshold, else 0")
LR = _metric("lr", "max", "max", "learning rate of the first parameter group")


def combine(reduce: str, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Combine the numerators of two partials of a metric with reduction ``reduce`` (weights add).

    ``max``/``min``: elementwise max/min; ``mean``/``rms``/``sum``: ``old + new`` (see the table above).
    """
    if reduce == "max":
        return torch.maximum(old, new)
    if reduce == "min":
        return torch.minimum(old, new)
    return old + new


def finalise(codes: np.ndarray, num: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Final values from reduced partials, vectorised over rows (``codes``: ``REDUCE_CODE`` per row).

    ``mean``: ``num / w``; ``rms``: ``sqrt(num / w)``; ``max``/``min``/``sum``: ``num``.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        out = num.copy()
        mean = codes == REDUCE_MEAN
        out[mean] = num[mean] / w[mean]
        r = codes == REDUCE_RMS
        out[r] = np.sqrt(num[r] / w[r])
    return out


def is_logged(step: int, every: int) -> bool:
    """The logging schedule: step ``step`` (counted from the run's first) is logged when ``step % every == 0``."""
    return step % every == 0


def spec(name: str) -> MetricSpec:
    """Look up a metric; unknown names get an error listing the known ones."""
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(
            f"unknown metric {name!r}; known metrics: {', '.join(sorted(METRICS))} "
            "(declare new ones with stabilitylab.metrics.register_metric)"
        ) from None
