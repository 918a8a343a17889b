"""Tiny Hugging Face models of every family the attention probe supports, and their float64 reference.

The reference is independent of the probe: the same weights run in float64 through an explicit
attention path while ``F.softmax``, ``torch.softmax`` and ``Tensor.softmax`` are patched to keep their
inputs (the exact scores the model normalises: biases, masks and soft-caps included). For "eager" that
is the model's own hand-written path; for "sdpa" the model runs in sdpa mode with
``F.scaled_dot_product_attention`` replaced by its textbook definition, ``softmax(q k^T * scale + mask)
@ v``, because HF's eager and sdpa paths do not always compute the same scores (Falcon with ALiBi adds
the ALiBi bias twice in eager: once to the scores, once inside the mask). Max logit and entropy are then
computed over the allowed (query, key) pairs of the query rows that are not padding. ``run_case`` is shared by
``test_hf_families.py`` and ``scripts/attention_matrix.py`` (which writes the measured errors).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

import stabilitylab as sl

V, T, B = 100, 10, 2


@dataclass
class Family:
    """One model family: how to build it, which modules are its attention, and how to call it."""

    config: str
    model: str
    kwargs: dict[str, Any]
    pattern: str  # full-match regex of the attention module names
    n_attn: int
    enc_dec: bool = False
    softcap: float | None = None
    impls: tuple[str, ...] = ("sdpa", "eager")


_DEC = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=V, max_position_embeddings=32, initializer_range=0.3, pad_token_id=0, bos_token_id=0,
            eos_token_id=0)
FAMILIES: dict[str, Family] = {
    "gpt2": Family("GPT2Config", "GPT2LMHeadModel",
                   dict(n_embd=32, n_layer=2, n_head=4, vocab_size=V, n_positions=32, initializer_range=0.3,
                        bos_token_id=0, eos_token_id=0), r"transformer\.h\.\d\.attn", 2),
    "llama": Family("LlamaConfig", "LlamaForCausalLM", _DEC, r"model\.layers\.\d\.self_attn", 2),
    "mistral": Family("MistralConfig", "MistralForCausalLM", {**_DEC, "sliding_window": 6},
                      r"model\.layers\.\d\.self_attn", 2),
    "qwen2": Family("Qwen2Config", "Qwen2ForCausalLM", _DEC, r"model\.layers\.\d\.self_attn", 2),
    "qwen3": Family("Qwen3Config", "Qwen3ForCausalLM", {**_DEC, "head_dim": 8}, r"model\.layers\.\d\.self_attn", 2),
    "gemma2": Family("Gemma2Config", "Gemma2ForCausalLM",
                     {**_DEC, "head_dim": 8, "sliding_window": 6, "attn_logit_softcapping": 2.0,
                      "query_pre_attn_scalar": 8}, r"model\.layers\.\d\.self_attn", 2, softcap=2.0,
                     impls=("eager",)),
    "gemma3": Family("Gemma3TextConfig", "Gemma3ForCausalLM",
                     {**_DEC, "head_dim": 8, "sliding_window": 6, "query_pre_attn_scalar": 8},
                     r"model\.layers\.\d\.self_attn", 2),
    "phi3": Family("Phi3Config", "Phi3ForCausalLM", _DEC, r"model\.layers\.\d\.self_attn", 2),
    "gpt_neox": Family("GPTNeoXConfig", "GPTNeoXForCausalLM",
                       dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=V, max_position_embeddings=32, initializer_range=0.3, pad_token_id=0),
                       r"gpt_neox\.layers\.\d\.attention", 2),
    "opt": Family("OPTConfig", "OPTForCausalLM",
                  dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=V,
                       max_position_embeddings=32, word_embed_proj_dim=32, init_std=0.3, pad_token_id=0,
                       enable_bias=True), r"model\.decoder\.layers\.\d\.self_attn", 2),
    "falcon_rope": Family("FalconConfig", "FalconForCausalLM",
                          dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=V,
                               initializer_range=0.3, alibi=False, pad_token_id=0),
                          r"transformer\.h\.\d\.self_attention", 2),
    "falcon_alibi": Family("FalconConfig", "FalconForCausalLM",
                           dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=V,
                                initializer_range=0.3, alibi=True, pad_token_id=0),
                           r"transformer\.h\.\d\.self_attention", 2),
    "bert": Family("BertConfig", "BertForMaskedLM",
                   dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=V, max_position_embeddings=32, initializer_range=0.3, pad_token_id=0),
                   r"bert\.encoder\.layer\.\d\.attention\.self", 2),
    "modernbert": Family("ModernBertConfig", "ModernBertForMaskedLM",
                         dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              vocab_size=V, max_position_embeddings=32, initializer_range=0.3, local_attention=4,
                              global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              cls_token_id=1, sep_token_id=2), r"model\.layers\.\d\.attn", 2),
    "t5": Family("T5Config", "T5ForConditionalGeneration",
                 dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=V,
                      relative_attention_num_buckets=8, initializer_factor=3.0, decoder_start_token_id=0,
                      pad_token_id=0, eos_token_id=1),
                 r"(encoder|decoder)\.block\.\d\.layer\.\d\.(SelfAttention|EncDecAttention)", 6, enc_dec=True),
    "bart": Family("BartConfig", "BartForConditionalGeneration",
                   dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=V,
                        max_position_embeddings=32, init_std=0.3, pad_token_id=0, bos_token_id=0, eos_token_id=2,
                        decoder_start_token_id=2),
                   r"model\.(encoder|decoder)\.layers\.\d\.(self_attn|encoder_attn)", 6, enc_dec=True),
}


def build(family: str, impl: str) -> torch.nn.Module:
    """The family's tiny model with ``attn_implementation=impl`` (same weights for every impl)."""
    import transformers

    f = FAMILIES[family]
    cfg = getattr(transformers, f.config)(**f.kwargs, attn_implementation=impl)
    torch.manual_seed(0)
    return getattr(transformers, f.model)(cfg).eval()


def inputs(family: str) -> dict[str, torch.Tensor]:
    """Batch of 2, sequence 10, the second row right-padded by 3 (a 2-D attention_mask)."""
    g = torch.Generator().manual_seed(1)
    am = torch.ones(B, T, dtype=torch.long)
    am[1, T - 3:] = 0
    out = {"input_ids": torch.randint(3, V, (B, T), generator=g), "attention_mask": am}
    if FAMILIES[family].enc_dec:
        out["decoder_input_ids"] = torch.randint(3, V, (B, T - 2), generator=g)
    return out


def attention_names(model: torch.nn.Module, family: str) -> list[str]:
    pat = re.compile(FAMILIES[family].pattern)
    return [n for n, _ in model.named_modules() if pat.fullmatch(n)]


def _softmax_inputs(model: torch.nn.Module, names: list[str], x: dict) -> dict[str, list[torch.Tensor]]:
    """Run ``model`` with every softmax patched; the inputs each attention module normalised."""
    import torch.nn.functional as F

    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    active: list[str] = []
    busy = [False]
    originals = (F.softmax, torch.softmax, torch.Tensor.softmax, F.scaled_dot_product_attention)

    def explicit_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                      enable_gqa=False):
        k, v = key, value
        if k.shape[-3] != query.shape[-3]:
            k = k.repeat_interleave(query.shape[-3] // k.shape[-3], dim=-3)
            v = v.repeat_interleave(query.shape[-3] // v.shape[-3], dim=-3)
        s = query @ k.transpose(-2, -1) * (query.shape[-1] ** -0.5 if scale is None else scale)
        if is_causal:
            s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), -math.inf)
        if attn_mask is not None:
            s = s.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else s + attn_mask
        return torch.softmax(s, dim=-1) @ v

    def patched(orig):
        def fn(inp, *args, **kwargs):
            if not busy[0] and active and inp.dim() >= 3:
                seen[active[-1]].append(inp.detach().clone())
            busy[0] = True
            try:
                return orig(inp, *args, **kwargs)
            finally:
                busy[0] = False
        return fn

    hooks = []
    for n in names:
        m = model.get_submodule(n)
        hooks.append(m.register_forward_pre_hook(lambda mod, a, n=n: active.append(n)))  # returns None
        hooks.append(m.register_forward_hook(lambda mod, a, o: (active.pop(), None)[1]))
    F.softmax, torch.softmax, torch.Tensor.softmax = (patched(o) for o in originals[:3])
    F.scaled_dot_product_attention = explicit_sdpa
    try:
        with torch.no_grad():
            model(**x)
    finally:
        F.softmax, torch.softmax, torch.Tensor.softmax, F.scaled_dot_product_attention = originals
        for h in hooks:
            h.remove()
    return seen


def reference(family: str, impl: str, state: dict, x: dict) -> dict[str, dict[str, float]]:
    """Float64 max logit (pre- and post-cap) and mean entropy per attention module, from an explicit path."""
    ref = build(family, impl).double()
    ref.load_state_dict(state)
    names = attention_names(ref, family)
    cap = FAMILIES[family].softcap
    out = {}
    for name, scores in _softmax_inputs(ref, names, x).items():
        assert scores, f"{family}: no softmax seen in {name}"
        mx, mx_capped, ents = -math.inf, -math.inf, []
        for s in scores:
            Bq, Tq = s.shape[0], s.shape[-2]
            allowed = s > torch.finfo(s.dtype).min / 2
            if not (FAMILIES[family].enc_dec and "decoder" in name):  # padded query rows do not count
                rows = x["attention_mask"].bool()[:, -Tq:]
                allowed = allowed & rows.view(Bq, *([1] * (s.dim() - 3)), Tq, 1)
            rows_ok = allowed.any(-1)
            z = s.masked_fill(~allowed, -math.inf)[rows_ok]
            p = torch.softmax(z, -1)
            ents.append(-torch.where(p > 0, p * p.log(), 0.0).sum(-1))
            top = z.max().item()
            mx_capped = max(mx_capped, top)
            mx = max(mx, cap * math.atanh(top / cap) if cap else top)
        out[name] = {"max_logit": mx, "entropy": torch.cat(ents).mean().item()}
        if cap:
            out[name]["max_logit_capped"] = mx_capped
    return out


def run_case(family: str, impl: str) -> dict[str, Any]:
    """Probe the family in ``impl`` (float64) and compare with the reference; relative errors per metric."""
    model = build(family, impl).double()
    x = inputs(family)
    ref = reference(family, impl, model.state_dict(), x)
    with sl.Monitor(model, every=1, probes=["attention"]) as mon:
        covered = sorted(mon.probe("attention").covered)
        with torch.no_grad():
            model(**x)
        vals = mon.step()
    errors: dict[str, float] = {}
    for name, r in ref.items():
        for metric, v in r.items():
            got = vals.get((f"attn.{metric}", name), float("nan"))
            errors[f"{metric}/{name}"] = abs(got - v) / abs(v)
    expected = sorted(attention_names(model, family))
    return {"family": family, "impl": impl, "covered": covered, "expected": expected,
            "max_rel_error": max(errors.values()), "errors": errors, "ref": ref,
            "extra": sorted(k for k in vals if k[1] not in ref)}
