"""``record_qk``: the one-line call that lets any model report its attention q and k."""

from __future__ import annotations

import torch

#: Attention probes currently attached; record_qk hands q/k to the armed ones.
ACTIVE: list = []


def record_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    module: torch.nn.Module | str | None = None,
) -> None:
    """Report the queries and keys of one attention call to any armed attention probe.

    Place it where your model computes attention, with the same arguments you give
    ``scaled_dot_product_attention``::

        q, k, v = ...                                   # (B, H, T, D)
        stabilitylab.record_qk(q, k, is_causal=True, module=self)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)

    It returns at once (no computation, no host sync) unless a Monitor's attention probe is armed for a
    logged step; then it computes max logit and entropy from q and k without keeping any graph alive.

    Args:
        q: ``(B, H, Tq, D)`` queries; k: ``(B, Hk, Tk, D)`` keys.
        attn_mask: bool (True = attend) or additive float mask, broadcastable to ``(B, H, Tq, Tk)``.
        is_causal: causal masking as in SDPA.
        scale: score scale (default ``1/sqrt(D)``).
        enable_gqa: keys have fewer heads than queries.
        module: the attention module (``self``) or its name; names the records.
    """
    if not ACTIVE:
        return
    for probe in ACTIVE:
        if probe.armed:
            probe.guard(probe.observe_call)(q, k, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                            enable_gqa=enable_gqa, module=module)
