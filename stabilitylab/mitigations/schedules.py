"""Learning-rate schedules as ``LambdaLR`` factories (factor of the peak LR per step)."""

from __future__ import annotations

import math

import torch


def warmup_cosine_factor(step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps to 1, then cosine decay to ``floor`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int, floor: float = 0.0):
    """``LambdaLR`` with linear warm-up then cosine decay to ``floor`` x peak LR."""
    if warmup < 0 or total < 1:
        raise ValueError(f"warmup_cosine: need warmup >= 0 and total >= 1, got warmup={warmup}, total={total}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine_factor(s, warmup, total, floor))
