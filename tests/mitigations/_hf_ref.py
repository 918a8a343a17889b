"""Independent float64 re-computations of HF GPT-2 / Llama attention for the mitigation tests."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                     attn_implementation="eager")
    return GPT2LMHeadModel(cfg).double()


def tiny_llama(seed: int = 0, kv_heads: int = 2, bias: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=32,
                      attention_bias=bias, attn_implementation="eager")
    return LlamaForCausalLM(cfg).double()


def capture_inputs(attn: torch.nn.Module) -> tuple[dict, object]:
    """Forward pre-hook storing the attention module's hidden_states and kwargs."""
    store: dict = {}

    def hook(module, args, kwargs):
        store["h"] = args[0] if args else kwargs["hidden_states"]
        store["kwargs"] = kwargs

    return store, attn.register_forward_pre_hook(hook, with_kwargs=True)


def layer_norm_heads(x: torch.Tensor, gain: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps)
    return y if gain is None else y * gain


def gpt2_qk(attn, h: torch.Tensor, norm: bool = False):
    """(q, k, v) as (B, H, T, D) from GPT2Attention weights; per-head LayerNorm on q/k if ``norm``."""
    B, T, C = h.shape
    H = attn.num_heads
    qkv = h @ attn.c_attn.weight + attn.c_attn.bias
    q, k, v = (t.reshape(B, T, H, C // H).transpose(1, 2) for t in qkv.split(C, dim=-1))
    if norm:
        q = layer_norm_heads(q, attn.q_norm.norm.weight)
        k = layer_norm_heads(k, attn.k_norm.norm.weight)
    return q, k, v


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(1) + rot * sin.unsqueeze(1)


def llama_qk(attn, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm: bool = False):
    """(q, k, v) after RoPE as (B, H, T, D) / (B, Hk, T, D); LayerNorm per head before RoPE if ``norm``."""
    B, T, _ = h.shape
    D = attn.head_dim
    # F.linear, not the modules: their forward hooks (qk-layernorm surgery) must not run here
    q, k, v = (F.linear(h, p.weight, p.bias).reshape(B, T, -1, D).transpose(1, 2)
               for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    if norm:
        q = layer_norm_heads(q, attn.q_norm.norm.weight)
        k = layer_norm_heads(k, attn.k_norm.norm.weight)
    return rotate(q, cos, sin), rotate(k, cos, sin), v


def causal_attention(q, k, v, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v with keys/values repeated for GQA; (B, T, H*D)."""
    H, Hk = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(H // Hk, 1), v.repeat_interleave(H // Hk, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-2, -1) * scale
    T = q.shape[-2]
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
    y = F.softmax(s, -1) @ v
    return y.transpose(1, 2).reshape(q.shape[0], T, -1)


def head_max(q, k, scale: float | None = None) -> torch.Tensor:
    """Per-head max causal logit, (H,)."""
    H, Hk = q.shape[1], k.shape[1]
    k = k.repeat_interleave(H // Hk, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-2, -1) * scale
    T = q.shape[-2]
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
    return s.amax(dim=(0, 2, 3))
