"""Optimizers: AdamW with independent weight decay, and Adam-atan2 (Adam without eps).

Both are ``torch.optim.Optimizer`` subclasses with the usual ``state_dict`` round-trip and the Adam
state names ``exp_avg`` / ``exp_avg_sq`` / ``step``, so stabilitylab's optimizer probe reads them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch


def _check(name: str, **values: Any) -> None:
    for key, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name}({key}={v!r}): must be a finite number")
    if values.get("lr", 1.0) < 0 or values.get("weight_decay", 0.0) < 0:
        raise ValueError(f"{name}: lr and weight_decay must be >= 0, got lr={values.get('lr')}, "
                         f"weight_decay={values.get('weight_decay')}")


def _check_betas(name: str, betas: tuple[float, float]) -> None:
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"{name}(betas={betas!r}): need two numbers in [0, 1), e.g. (0.9, 0.95)")


def schedule_factor(group: dict[str, Any]) -> float:
    """``lr_t / peak_lr`` of a parameter group: the LR schedule's current factor.

    The peak is ``group["initial_lr"]`` (set by every ``torch.optim.lr_scheduler``) or, without a
    scheduler, the group's ``lr`` when the optimizer was built (``group["peak_lr"]``).
    """
    peak = group.get("initial_lr", group["peak_lr"])
    return group["lr"] / peak if peak > 0 else 0.0


class _RecordsPeakLR:
    """Stores each parameter group's construction-time LR as ``group["peak_lr"]``."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self.param_groups[-1].setdefault("peak_lr", float(self.param_groups[-1]["lr"]))


class AdamWIndependentWD(_RecordsPeakLR, torch.optim.AdamW):
    """AdamW whose weight decay follows the schedule, not the learning rate (Wortsman et al., 2023).

    Each step: ``theta <- theta * (1 - lambda * s_t)`` with ``s_t = lr_t / peak_lr`` the schedule
    factor, then the Adam update ``theta <- theta - lr_t * m_hat / (sqrt(v_hat) + eps)``. PyTorch's
    AdamW decays by ``lr_t * lambda`` instead, which ties the best ``lambda`` to the LR; here
    ``lambda`` is a per-step decay rate (the paper uses 1e-4), independent of the LR.

    Args and defaults are those of ``torch.optim.AdamW``, except ``weight_decay`` (``lambda``, a rate per
    step at the peak of the schedule) defaults to 1e-4 as in the paper.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-4, **kwargs: Any):
        _check("AdamWIndependentWD", lr=lr, eps=eps, weight_decay=weight_decay)
        _check_betas("AdamWIndependentWD", betas)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """One step; AdamW's ``lr_t * wd`` is set to ``lambda * s_t`` for its duration."""
        saved = [g["weight_decay"] for g in self.param_groups]
        for g, wd in zip(self.param_groups, saved):
            g["weight_decay"] = wd * schedule_factor(g) / g["lr"] if g["lr"] > 0 else 0.0
        try:
            return super().step(closure)
        finally:
            for g, wd in zip(self.param_groups, saved):
                g["weight_decay"] = wd


class AdamAtan2(_RecordsPeakLR, torch.optim.Optimizer):
    """Adam-atan2 (Everett et al., 2024): Adam with ``atan2`` in place of the division, so no eps.

    Per element, with ``t`` the step count::

        m = beta1 * m + (1 - beta1) * g;     v = beta2 * v + (1 - beta2) * g^2
        m_hat = m / (1 - beta1^t);           v_hat = v / (1 - beta2^t)
        theta <- theta * (1 - lr * wd)                       (coupled, like AdamW; see below)
        theta <- theta - lr * a * atan2(m_hat, b * sqrt(v_hat))

    The update is bounded by ``lr * a * pi / 2``, invariant to rescaling the gradient, and defined for
    ``g = 0``. Where ``|m_hat| << b * sqrt(v_hat)`` it is ``(a / b) * m_hat / sqrt(v_hat)``, i.e. Adam
    with eps 0 times ``a / b``. Matches ``adam_atan2_pytorch.AdamAtan2``, defaults included
    (lr 1e-4, betas (0.9, 0.99), a 1.27, b 1).

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        betas: ``(beta1, beta2)``.
        weight_decay: decay rate; ``theta *= 1 - lr * weight_decay`` (``independent_wd=False``) or
            ``theta *= 1 - weight_decay * lr_t / peak_lr`` (``independent_wd=True``).
        a: output scale of the update.
        b: scale of ``sqrt(v_hat)`` inside atan2.
        independent_wd: decay with the schedule factor instead of the LR (see ``AdamWIndependentWD``).
    """

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, a: float = 1.27, b: float = 1.0, independent_wd: bool = False):
        _check("AdamAtan2", lr=lr, weight_decay=weight_decay, a=a, b=b)
        _check_betas("AdamAtan2", betas)
        if a <= 0 or b <= 0:
            raise ValueError(f"AdamAtan2(a={a}, b={b}): both must be > 0 (defaults a=1.27, b=1)")
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, a=a, b=b,
                        independent_wd=independent_wd)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """One optimizer step (``closure`` re-evaluates the loss, as in every torch optimizer)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, a, b = group["lr"], group["a"], group["b"]
            wd = group["weight_decay"] * (schedule_factor(group) if group["independent_wd"] else lr)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamAtan2 does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                m, v, g = state["exp_avg"], state["exp_avg_sq"], p.grad
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                m_hat = m / (1 - beta1 ** t)
                den = (v / (1 - beta2 ** t)).sqrt_().mul_(b)
                if wd:
                    p.mul_(1 - wd)
                p.add_(torch.atan2(m_hat, den), alpha=-lr * a)
        return loss
