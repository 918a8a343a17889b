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

This module is the record contract, the bottom layer every other one builds on: the tidy record's
columns, ``Block`` (partials of one metric as a probe hands them over), ``Event`` (discrete happenings),
the metric names, the reduction table above as code (``REDUCE_CODE``, ``combine``, ``finalise``) and the
logging schedule (``check_every``, ``is_logged``), which the Monitor and ``proxy.vectorized`` share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from stabilitylab._checks import int_at_least

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

LOSS = "loss"
ATTN_MAX_LOGIT = "attn.max_logit"
ATTN_ENTROPY = "attn.entropy"
#: Max post-soft-cap attention score (what the softmax sees); recorded only when a cap is active.
ATTN_MAX_LOGIT_CAPPED = "attn.max_logit_capped"
LOGITS_LSE_MEAN = "logits.lse_mean"
LOGITS_LSE_STD = "logits.lse_std"
LOGITS_MAX = "logits.max"
ACT_RMS = "act.rms"
ACT_BATCH_ENTROPY = "act.batch_entropy"
ACT_KURTOSIS = "act.kurtosis"
GRAD_RMS = "grad.rms"
PARAM_RMS = "param.rms"
UPDATE_RMS = "update.rms"
UPDATE_RATIO = "update.ratio"
GRAD_GLOBAL_NORM = "grad.global_norm"
ADAM_EPS_DOMINANCE = "adam.eps_dominance"
ADAM_V_RMS = "adam.v_rms"
SHARPNESS_PRECONDITIONED = "sharpness.preconditioned"
SHARPNESS_THRESHOLD = "sharpness.threshold"
HEALTH_NONFINITE = "health.nonfinite"
HEALTH_SPIKE = "health.spike"
LR = "lr"


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


_SPECS = [
    MetricSpec(LOSS, "mean", "mean", "training loss passed to Monitor.step (nats/token)"),
    MetricSpec(ATTN_MAX_LOGIT, "max", "max", "max over batch, heads, allowed (query, key) of q.k*scale"),
    MetricSpec(ATTN_ENTROPY, "mean", "min", "mean over softmax rows of -sum p log p (nats)"),
    MetricSpec(ATTN_MAX_LOGIT_CAPPED, "max", "max",
               "max over allowed (query, key) of the soft-capped score cap*tanh(s/cap) (+ bias) fed to softmax"),
    MetricSpec(LOGITS_LSE_MEAN, "mean", "mean", "mean over tokens of log Z = logsumexp(output logits)"),
    MetricSpec(LOGITS_LSE_STD, "mean", "mean", "std over tokens of log Z (token-weighted mean over micro-batches)"),
    MetricSpec(LOGITS_MAX, "max", "max", "max output logit"),
    MetricSpec(ACT_RMS, "rms", "max", "sqrt(mean(h^2)) of a module's output"),
    MetricSpec(ACT_BATCH_ENTROPY, "mean", "min",
               "mean over units of 0.5*log(2*pi*e*var) of the unit across batch positions (nats)"),
    MetricSpec(ACT_KURTOSIS, "mean", "max", "mean over tokens of E[h^4]/E[h^2]^2 across features"),
    MetricSpec(GRAD_RMS, "rms", "max", "sqrt(mean(g^2)) of a parameter's gradient, before clipping"),
    MetricSpec(PARAM_RMS, "rms", "max", "sqrt(mean(p^2)) of a parameter after the step"),
    MetricSpec(UPDATE_RMS, "rms", "max", "sqrt(mean((p_after - p_before)^2))"),
    MetricSpec(UPDATE_RATIO, "rms", "max",
               "||dp|| / sqrt(||p_after||^2 + n*1e-16), dp = p_after - p_before; partials (sum dp^2, sum p_after^2 + n*1e-16)"),
    MetricSpec(GRAD_GLOBAL_NORM, "rms", "max", "sqrt(sum over all parameters of g^2), before clipping"),
    MetricSpec(ADAM_EPS_DOMINANCE, "mean", "max", "share of elements with sqrt(v_hat) < eps (0..1)"),
    MetricSpec(ADAM_V_RMS, "rms", "min", "sqrt(mean(v_hat)) = RMS of Adam's second-moment root"),
    MetricSpec(SHARPNESS_PRECONDITIONED, "max", "max", "top eigenvalue of P^-1 H, P = diag(sqrt(v_hat)+eps)"),
    MetricSpec(SHARPNESS_THRESHOLD, "max", "max", "(2 + 2*beta1) / ((1 - beta1) * lr), the edge of stability"),
    MetricSpec(HEALTH_NONFINITE, "sum", "max", "count of non-finite elements (module names the tensor kind)"),
    MetricSpec(HEALTH_SPIKE, "max", "max", "loss z-score vs trailing window when above threshold, else 0"),
    MetricSpec(LR, "max", "max", "learning rate of the first parameter group"),
]

METRICS: dict[str, MetricSpec] = {s.name: s for s in _SPECS}
REDUCTIONS = ("max", "min", "mean", "rms", "sum")
#: Integer code of each reduction (its index in ``REDUCTIONS``): the rows the Monitor and
#: ``distributed.Reducer`` carry as one numpy array.
REDUCE_CODE: dict[str, int] = {r: i for i, r in enumerate(REDUCTIONS)}
REDUCE_MAX, REDUCE_MIN, REDUCE_MEAN, REDUCE_RMS, REDUCE_SUM = (REDUCE_CODE[r] for r in REDUCTIONS)


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


def check_every(every: Any, where: str, none_ok: bool = False) -> int | None:
    """``every`` if it is a valid logging interval (an int >= 1), else a ValueError naming ``where``.

    Args:
        every: the interval to check.
        where: how the caller spells the argument, e.g. ``"Monitor(every"``; the message reads
            ``"Monitor(every=0): must be an int >= 1 (1 logs every step)"``.
        none_ok: also accept None (no logging at all).
    """
    if none_ok and every is None:
        return None
    if not int_at_least(every, 1):
        hint = ", or None for no monitoring" if none_ok else ""
        raise ValueError(f"{where}={every!r}): must be an int >= 1 (1 logs every step){hint}")
    return every


def is_logged(step: int, every: int) -> bool:
    """The logging schedule: step ``step`` (counted from the run's first step) is logged when
    ``step % every == 0``, so step 0 always is."""
    return step % every == 0


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


def spec(name: str) -> MetricSpec:
    """Look up a metric; unknown names get an error listing the known ones."""
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(
            f"unknown metric {name!r}; known metrics: {', '.join(sorted(METRICS))} "
            "(declare new ones with stabilitylab.metrics.register_metric)"
        ) from None
