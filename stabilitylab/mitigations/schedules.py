"""Learning-rate schedules as ``LambdaLR`` factories, each with its pure factor function.

A factor ``f(step)`` multiplies the peak LR; ``step`` counts ``scheduler.step()`` calls from 0, so the
optimizer step number ``s`` (0-based) runs at ``peak * f(s)``. Warm-up is linear and reaches 1 at step
``warmup - 1``: ``f(s) = (s + 1) / warmup`` for ``s < warmup``.

==========================  ===============================================================
schedule                    factor after warm-up (``t`` = steps since warm-up ended)
==========================  ===============================================================
``warmup_cosine``           ``floor + (1 - floor) * (1 + cos(pi * t / (total - warmup))) / 2``
``constant_with_warmup``    ``1``
``wsd``                     ``1`` until ``total - decay``, then ``1 -> floor`` (linear, cosine or
                            1 - sqrt) over the last ``decay`` steps
==========================  ===============================================================
"""

from __future__ import annotations

import math

import torch

from stabilitylab._checks import int_at_least


def _warmup(step: int, warmup: int) -> float | None:
    return (step + 1) / warmup if warmup > 0 and step < warmup else None


def _check(name: str, warmup: int, total: int | None = None, floor: float = 0.0) -> None:
    if not int_at_least(warmup, 0):
        raise ValueError(f"{name}(warmup={warmup!r}): must be an int >= 0")
    if total is not None and not int_at_least(total, 1):
        raise ValueError(f"{name}(total={total!r}): must be an int >= 1 (the number of optimizer steps)")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"{name}(floor={floor!r}): must be in [0, 1] (a fraction of the peak LR)")


def warmup_cosine_factor(step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps to 1, then cosine decay to ``floor`` at ``total``."""
    w = _warmup(step, warmup)
    if w is not None:
        return w
    if total <= warmup:
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int,
                  floor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` with linear warm-up then cosine decay to ``floor`` x peak LR at step ``total``."""
    _check("warmup_cosine", warmup, total, floor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine_factor(s, warmup, total, floor))


def constant_with_warmup_factor(step: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps to 1, then 1."""
    w = _warmup(step, warmup)
    return 1.0 if w is None else w


def constant_with_warmup(optimizer: torch.optim.Optimizer, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` with linear warm-up then the constant peak LR."""
    _check("constant_with_warmup", warmup)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: constant_with_warmup_factor(s, warmup))


_DECAY_SHAPES = ("linear", "cosine", "sqrt")


def wsd_factor(step: int, warmup: int, total: int, decay: int, floor: float = 0.0,
               shape: str = "linear") -> float:
    """Warm-up, stable, decay: warm-up to 1, hold 1, then decay to ``floor`` over the last ``decay`` steps.

    With ``u = (step - (total - decay)) / decay`` in ``[0, 1]`` the decay is ``1 - u`` (``"linear"``),
    ``(1 + cos(pi u)) / 2`` (``"cosine"``) or ``1 - sqrt(u)`` (``"sqrt"``), mapped onto ``[floor, 1]``.
    """
    w = _warmup(step, warmup)
    if w is not None:
        return w
    start = total - decay
    if step < start or decay == 0:
        return 1.0
    u = min(1.0, (step - start) / decay)
    d = {"linear": 1 - u, "cosine": 0.5 * (1 + math.cos(math.pi * u)), "sqrt": 1 - math.sqrt(u)}[shape]
    return floor + (1 - floor) * d


def wsd(optimizer: torch.optim.Optimizer, warmup: int, total: int, decay: int | float = 0.2,
        floor: float = 0.0, shape: str = "linear") -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` for the warm-up / stable / decay schedule.

    Args:
        optimizer: the optimizer.
        warmup: linear warm-up steps.
        total: total optimizer steps; the decay ends at ``total``.
        decay: decay steps (int) or fraction of ``total`` (float in (0, 1]); 20% is common.
        floor: final LR as a fraction of the peak.
        shape: ``"linear"``, ``"cosine"`` or ``"sqrt"`` (1 - sqrt).
    """
    _check("wsd", warmup, total, floor)
    if isinstance(decay, float):
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"wsd(decay={decay!r}): a float is a fraction of total, must be in (0, 1]")
        decay = max(1, round(decay * total))
    if not int_at_least(decay, 0) or warmup + decay > total:
        raise ValueError(f"wsd(decay={decay!r}): need an int >= 0 with warmup + decay <= total "
                         f"(warmup={warmup}, total={total})")
    if shape not in _DECAY_SHAPES:
        raise ValueError(f"wsd(shape={shape!r}): choose from {_DECAY_SHAPES}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: wsd_factor(s, warmup, total, decay, floor, shape))
