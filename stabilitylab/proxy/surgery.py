"""The proxy registers its own attention surgery with the mitigations' registries (on import of the package).

``apply_qk_layernorm(proxy_model)`` sets the proxy attention's ``q_norm`` / ``k_norm`` (what
``ProxyConfig(qk_layernorm=True)`` builds) and ``QKClip(proxy_model)`` rescales the q and k rows of its
fused ``c_attn`` projection.
"""

from __future__ import annotations

from torch import nn

from stabilitylab.mitigations.qk_clip import QK_CLIP_REGISTRY, QKSlices
from stabilitylab.mitigations.qk_layernorm import QK_LAYERNORM_REGISTRY, add_qk_norms
from stabilitylab.proxy.model import CausalSelfAttention


def qk_layernorm_surgery(module: nn.Module, eps: float) -> None:
    """Add qk-layernorm to one proxy ``CausalSelfAttention`` in place (and mark the shared config)."""
    add_qk_norms(module, module.head_dim, eps)
    module.cfg.qk_layernorm = True  # the config is shared by the whole proxy; keeps it truthful


def qk_clip_slices(m: nn.Module) -> QKSlices:
    """Where the q and k heads of a proxy ``CausalSelfAttention`` live: rows of ``c_attn.weight``."""
    C = m.n_heads * m.head_dim  # c_attn.weight: (3C, C) = [q; k; v] rows
    return QKSlices([(m.c_attn.weight, 0, 0)], [(m.c_attn.weight, 0, C)], m.n_heads, m.n_heads, m.head_dim)


# setdefault: an entry a user registered for the proxy's attention class stays.
QK_LAYERNORM_REGISTRY.setdefault(CausalSelfAttention, qk_layernorm_surgery)
QK_CLIP_REGISTRY.setdefault(CausalSelfAttention, qk_clip_slices)
