"""Logit soft-capping: ``cap * tanh(x / cap)`` bounds logits smoothly (Gemma 2, Grok-1)."""

from __future__ import annotations

import math

import torch


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(logits / cap)``: about the identity for ``|x| << cap``, never beyond ``+-cap``.

    Use on attention scores (before the mask and softmax) or on output logits.

    Args:
        logits: any tensor.
        cap: the bound (> 0), e.g. 50 for attention scores, 30 for output logits (Gemma 2).
    """
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not (cap > 0 and math.isfinite(cap)):
        raise ValueError(f"softcap(cap={cap!r}): must be a positive finite number, e.g. 30.0")
    return cap * torch.tanh(logits / cap)
