"""z-loss: penalise log Z of the output logits so it stays near 0 (PaLM's auxiliary loss)."""

from __future__ import annotations

from typing import Any

import torch


def z_loss(logits: torch.Tensor, coef: float = 1e-4, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``coef * mean(logsumexp(logits, -1) ** 2)`` over tokens (those where ``mask`` is True).

    Its gradient with respect to the logits is ``2 * coef * log Z * softmax(logits) / n_tokens``, so
    it pulls log Z toward 0 without changing which token is predicted.

    Args:
        logits: ``(..., vocab)`` output logits.
        coef: weight of the penalty (the paper uses 1e-4).
        mask: optional bool ``(...)`` selecting the tokens that count (e.g. labels != -100).
    """
    if not isinstance(coef, (int, float)) or coef < 0:
        raise ValueError(f"z_loss(coef={coef!r}): must be a number >= 0 (the paper uses 1e-4)")
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()  # 16-bit: upcast
    lse = torch.logsumexp(z, dim=-1)
    if mask is not None:
        if mask.shape != lse.shape:
            raise ValueError(f"z_loss(mask=...): shape {tuple(mask.shape)} must equal the logits' token shape "
                             f"{tuple(lse.shape)}")
        lse = lse[mask.bool()]
    return coef * lse.pow(2).sum() / max(lse.numel(), 1)  # no kept token: 0, not NaN


def add_z_loss(output: Any, coef: float = 1e-4, labels: torch.Tensor | None = None,
               ignore_index: int = -100, shift: bool = True) -> torch.Tensor:
    """The model's loss plus ``z_loss`` of its logits, for Hugging Face and proxy outputs.

    Args:
        output: a Hugging Face ``ModelOutput`` / dict with ``loss`` and ``logits``, or the proxy's
            ``(logits, loss)`` tuple.
        coef: z-loss weight.
        labels: optional ``(B, T)`` labels; only tokens whose label is not ``ignore_index`` count.
        ignore_index: label value that marks padding (Hugging Face uses -100).
        shift: the labels are unshifted as in Hugging Face causal LMs (logit ``t`` predicts label
            ``t + 1``), so logits ``[:, :-1]`` are matched with labels ``[:, 1:]``; False when labels
            are already aligned with the logits (the proxy's targets).

    Returns:
        ``loss + coef * mean(log Z^2)`` (a 0-d tensor with gradient).
    """
    if isinstance(output, tuple) and len(output) == 2:
        logits, loss = output
    elif isinstance(output, dict) or hasattr(output, "logits"):
        get = output.get if isinstance(output, dict) else (lambda k: getattr(output, k, None))
        logits, loss = get("logits"), get("loss")
    else:
        raise TypeError(f"add_z_loss(output=...): expected a Hugging Face output with .loss/.logits or the "
                        f"proxy's (logits, loss) tuple, got {type(output).__name__}")
    if loss is None or logits is None:
        raise ValueError("add_z_loss(output=...): the output has no loss (pass labels/targets to the model) "
                         "or no logits")
    mask = None
    if labels is not None:
        if shift:
            logits, labels = logits[..., :-1, :], labels[..., 1:]
        mask = labels != ignore_index
    return loss + z_loss(logits, coef, mask)
