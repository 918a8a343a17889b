"""The reference proxy: a small decoder-only pre-LN Transformer in the spirit of Wortsman et al. (2023).

No biases, head dim 64 by default (smaller for tiny sizes), MLP ratio 4, learned positions, optional
tied embeddings, attention through ``scaled_dot_product_attention`` with a hand-written path beside it
(the ground truth the attention probe is tested against), and switches for the mitigations:
qk-layernorm, z-loss, logit soft-capping and a simple muP.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stabilitylab.adapters.generic import record_qk
from stabilitylab.mitigations.qk_layernorm import QKLayerNorm
from stabilitylab.mitigations.softcap import softcap
from stabilitylab.mitigations.z_loss import z_loss
from stabilitylab.proxy._checks import check_proxy_config


@dataclass(kw_only=True)
class ProxyConfig:
    """Shape and switches of the proxy Transformer."""

    vocab_size: int = 256
    """Vocabulary size (256 for byte-level data)."""
    seq_len: int = 64
    """Maximum sequence length (learned position table size)."""
    d_model: int = 128
    """Residual width."""
    n_layers: int = 2
    """Number of Transformer blocks."""
    head_dim: int = 64
    """Per-head width; ``n_heads = d_model // head_dim``."""
    mlp_ratio: int = 4
    """MLP hidden width / d_model."""
    tie_embeddings: bool = False
    """Share the input embedding and the output projection."""
    qk_layernorm: bool = False
    """LayerNorm on q and k (per head) before the dot product."""
    z_loss: float = 0.0
    """Coefficient of the z-loss added to the cross-entropy (1e-4 in the paper)."""
    logit_softcap: float | None = None
    """If set, output logits become ``cap * tanh(logits / cap)``."""
    attn_softcap: float | None = None
    """If set, attention scores become ``cap * tanh(s / cap)`` (uses the hand-written attention)."""
    mup: bool = False
    """Simple muP: output logits x base_width/width (init is fan-in either way; LR scaling is the optimizer's)."""
    mup_base_width: int = 64
    """Base width for muP multipliers."""
    attn_scale: str = "sqrt"
    """Attention score scale: ``"sqrt"`` (1/sqrt(head_dim)) or ``"linear"`` (1/head_dim, muP)."""
    use_sdpa: bool = True
    """Use fused SDPA (True) or the hand-written attention (False); both compute the same function."""

    def __post_init__(self) -> None:
        check_proxy_config(self)

    @property
    def n_heads(self) -> int:
        return self.d_model // self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; reports q/k to stabilitylab's attention probe."""

    stabilitylab_records_qk = True

    def __init__(self, cfg: ProxyConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.q_norm = QKLayerNorm(cfg.head_dim) if cfg.qk_layernorm else None
        self.k_norm = QKLayerNorm(cfg.head_dim) if cfg.qk_layernorm else None
        self.scale = 1.0 / (cfg.head_dim if cfg.attn_scale == "linear" else math.sqrt(cfg.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        record_qk(q, k, is_causal=True, scale=self.scale, module=self)
        if self.cfg.use_sdpa and self.cfg.attn_softcap is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            y = self.manual_attention(q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Materialised pre-softmax scores with the causal mask as -inf: (B, nh, T, T)."""
        T = q.size(-2)
        att = (q @ k.transpose(-2, -1)) * self.scale
        if self.cfg.attn_softcap is not None:
            att = softcap(att, self.cfg.attn_softcap)
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        return att.masked_fill(~mask, float("-inf"))

    def manual_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.scores(q, k), dim=-1) @ v


class MLP(nn.Module):
    def __init__(self, cfg: ProxyConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False)
        self.c_proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LN block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ProxyConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, bias=False)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, bias=False)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ProxyTransformer(nn.Module):
    """Decoder-only byte-level LM. ``forward(idx, targets=None) -> (logits, loss)``."""

    def __init__(self, cfg: ProxyConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=False)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.output_mult = cfg.mup_base_width / cfg.d_model if cfg.mup else 1.0
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def reset_parameters(self) -> None:
        """Fan-in init: every Linear ~ N(0, 1/fan_in); embeddings ~ N(0, 1); LayerNorm gains 1."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=1.0 / math.sqrt(m.in_features))
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=1.0)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)

    def n_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wpe.weight.numel() + self.wte.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.shape
        if T > self.cfg.seq_len:
            raise ValueError(f"ProxyTransformer: sequence length {T} exceeds cfg.seq_len={self.cfg.seq_len}")
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x)) * self.output_mult  # (B, T, vocab)
        if self.cfg.logit_softcap is not None:
            logits = softcap(logits, self.cfg.logit_softcap)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
            if self.cfg.z_loss > 0:
                loss = loss + z_loss(logits, self.cfg.z_loss)
        return logits, loss


def __getattr__(name: str):  # PRESETS and preset moved to proxy.presets; old imports keep working
    if name in ("PRESETS", "preset"):
        from stabilitylab.proxy import presets

        return getattr(presets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
