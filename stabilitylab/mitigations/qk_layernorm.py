"""qk-layernorm: LayerNorm on queries and keys (per head, over head_dim) before the dot product."""

from __future__ import annotations

import torch
from torch import nn


class QKLayerNorm(nn.Module):
    """LayerNorm over the last dim (``head_dim``) with a learnable gain and no bias.

    Applied to q and k of shape ``(B, H, T, head_dim)``, it bounds every attention logit by
    ``|q.k| * scale <= head_dim * max|gain_q| * max|gain_k| * scale``, which is what stops attention
    logit growth (Wortsman et al., 2023; Dehghani et al., 2023).
    """

    def __init__(self, head_dim: int, eps: float = 1e-5, bias: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(head_dim, eps=eps, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)
