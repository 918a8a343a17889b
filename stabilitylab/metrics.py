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
"""

from __future__ import annotations

from dataclasses import dataclass

RECORD_COLUMNS = ("run_id", "step", "metric", "module", "value")

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
