"""z-loss: penalise log Z of the output logits so it stays near 0 (PaLM's auxiliary loss)."""

from __future__ import annotations

import torch


def z_loss(logits: torch.Tensor, coef: float = 1e-4, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``coef * mean(logsumexp(logits, -1) ** 2)`` over tokens (those where ``mask`` is True).

    Args:
        logits: ``(..., vocab)`` output logits.
        coef: weight of the penalty (the paper uses 1e-4).
        mask: optional bool ``(...)`` selecting the tokens that count (e.g. labels != -100).
    """
    if coef < 0:
        raise ValueError(f"z_loss(coef={coef}): must be >= 0")
    lse = torch.logsumexp(logits.float(), dim=-1)
    if mask is not None:
        lse = lse[mask]
    return coef * lse.pow(2).mean()
