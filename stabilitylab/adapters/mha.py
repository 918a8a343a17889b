"""``torch.nn.MultiheadAttention``: q and k recomputed from the input projection on logged steps.

``nn.MultiheadAttention`` runs its attention inside ``F.multi_head_attention_forward`` (or a fused C++
fast path), where no Python-level interception sees q and k. A forward pre-hook (with kwargs) therefore
recomputes, on logged steps only and without autograd,

    q = query @ W_q^T + b_q,   k = key @ W_k^T + b_k          (per head: (B, H, L, D), (B, H, S, D))

with ``bias_k`` / ``add_zero_attn`` appended to the keys, and the masks merged exactly as
``F.multi_head_attention_forward`` does: a bool mask marks *forbidden* positions (True = ignore) and
becomes ``-inf``, a float mask is additive, ``key_padding_mask`` (B, S) is added to ``attn_mask``
(L, S) or (B*H, L, S). The ``is_causal`` hint is honoured exactly when PyTorch honours it (no
``key_padding_mask`` and ``need_weights=False``: the mask is replaced by SDPA's causal mask); otherwise
the given ``attn_mask`` is what counts. The score scale is ``1/sqrt(head_dim)``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F

from stabilitylab.adapters import runtime
from stabilitylab.adapters.base import AttentionAdapter

_FORWARD = inspect.signature(torch.nn.MultiheadAttention.forward)


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """PyTorch MHA mask convention -> additive float mask (bool True = forbidden -> -inf)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, -math.inf)
    return mask.to(dtype)


def mha_qk(mha: torch.nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor,
           key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
           attn_mask: torch.Tensor | None = None, is_causal: bool = False,
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
    """The q, k, additive mask and causal flag that ``mha(query, key, value, ...)`` attends with.

    Args:
        mha: the module.
        query: ``(L, E)`` unbatched, ``(L, B, E)``, or ``(B, L, E)`` with ``batch_first``.
        key: same layout with source length S and ``kdim`` features.
        key_padding_mask, need_weights, attn_mask, is_causal: as in ``MultiheadAttention.forward``.

    Returns:
        ``(q, k, mask, is_causal)`` with q ``(B, H, L, D)``, k ``(B, H, S', D)`` (S' includes ``bias_k``
        and the zero key of ``add_zero_attn``), ``mask`` additive float broadcastable to
        ``(B, H, L, S')`` or None, in SDPA semantics (``scale = 1/sqrt(D)``).
    """
    batched = query.dim() == 3
    if not batched:
        query, key = query.unsqueeze(1), key.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif mha.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    L, B, E = query.shape
    H, D = mha.num_heads, mha.head_dim
    if mha._qkv_same_embed_dim:
        w_q, w_k = mha.in_proj_weight[:E], mha.in_proj_weight[E:2 * E]
    else:
        w_q, w_k = mha.q_proj_weight, mha.k_proj_weight
    b = mha.in_proj_bias
    q = F.linear(query, w_q, None if b is None else b[:E])
    k = F.linear(key, w_k, None if b is None else b[E:2 * E])
    dtype = q.dtype
    kpm = _additive(key_padding_mask, dtype)
    if is_causal and kpm is None and not need_weights:
        mask = None
    else:
        is_causal = False
        mask = _additive(attn_mask, dtype)
    extra = 0
    if mha.bias_k is not None:
        k = torch.cat([k, mha.bias_k.repeat(1, B, 1)])
        extra += 1
    q = q.view(L, B, H, D).permute(1, 2, 0, 3)
    k = k.view(k.shape[0], B, H, D).permute(1, 2, 0, 3)
    if mha.add_zero_attn:
        k = torch.cat([k, k.new_zeros(B, H, 1, D)], dim=2)
        extra += 1
    if mask is not None:
        mask = F.pad(mask, (0, extra))
        mask = mask.view(B, H, *mask.shape[-2:]) if mask.dim() == 3 else mask
    if kpm is not None:
        kpm = F.pad(kpm, (0, extra)).view(B, 1, 1, -1)
        mask = kpm if mask is None else mask + kpm
    return q, k, mask, is_causal


class MHAAdapter(AttentionAdapter):
    """``torch.nn.MultiheadAttention`` modules (also inside ``nn.Transformer*`` layers)."""

    name = "multihead_attention"
    description = ("torch.nn.MultiheadAttention (batch_first or not, key_padding_mask, bool/float attn_mask, "
                   "bias_k, add_zero_attn, kdim/vdim)")

    def find(self, model: torch.nn.Module) -> list[str]:
        return [n for n, m in model.named_modules() if isinstance(m, torch.nn.MultiheadAttention)]

    def install(self, probe: Any, model: torch.nn.Module, names: list[str]) -> list[Any]:
        def pre_hook(module: torch.nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
            if not probe.armed or runtime.in_backward():
                return
            a = _FORWARD.bind(module, *args, **kwargs)
            a.apply_defaults()
            a = a.arguments
            with torch.no_grad():
                q, k, mask, causal = mha_qk(module, a["query"], a["key"], a["key_padding_mask"],
                                            a["need_weights"], a["attn_mask"], a["is_causal"])
            probe.observe_call(q, k, attn_mask=mask, is_causal=causal, module=module)

        # Frames that capture nothing: an SDPA or softmax call inside the module is not recorded again.
        frames = runtime.install_frames(probe, model, names, capture=False)
        return frames + [model.get_submodule(n).register_forward_pre_hook(pre_hook, with_kwargs=True) for n in names]
