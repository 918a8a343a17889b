"""functional.attention_stats against a float64 reference and against SDPA's own probabilities."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stabilitylab import functional


def _qk(B=2, H=4, Hk=4, Tq=7, Tk=7, D=8, seed=0, mult=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64) * mult
    k = torch.randn(B, Hk, Tk, D, generator=g, dtype=torch.float64) * mult
    return q.to(dtype), k.to(dtype)


def _sdpa_probs(q, k, **kw):
    """Attention probabilities exactly as SDPA computes them: values = identity."""
    B, Tk = q.shape[0], k.shape[-2]
    v = torch.eye(Tk, dtype=q.dtype).expand(B, k.shape[1], Tk, Tk)
    return F.scaled_dot_product_attention(q, k, v, **kw)


def _entropy_of(p):
    rows = ~torch.isnan(p).any(-1)
    p = p[rows]
    return (-torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)).mean().item()


def _masks(B, Tq, Tk):
    g = torch.Generator().manual_seed(1)
    allowed = torch.rand(B, 1, Tq, Tk, generator=g) > 0.4
    allowed[..., 0] = True  # every row keeps a key, so SDPA's probabilities have no NaN rows
    bias = torch.randn(B, 1, Tq, Tk, generator=g, dtype=torch.float64).masked_fill(~allowed, -math.inf)
    return allowed, bias


@pytest.mark.parametrize("kind", ["none", "causal", "bool", "float", "causal_rect", "gqa", "gqa_bool", "scale"])
def test_attention_stats_matches_float64_reference_and_sdpa_probabilities(kind, attn_reference):
    Hk = 2 if kind.startswith("gqa") else 4
    Tq, Tk = (5, 9) if kind == "causal_rect" else (7, 7)
    q, k = _qk(Hk=Hk, Tq=Tq, Tk=Tk)
    allowed, bias = _masks(2, Tq, Tk)
    kw: dict = {}
    ref_kw: dict = {}
    if kind in ("causal", "causal_rect"):
        kw["is_causal"] = True
        ref_kw["allowed"] = torch.ones(Tq, Tk, dtype=torch.bool).tril()
    elif kind in ("bool", "gqa_bool"):
        kw["attn_mask"] = ref_kw["allowed"] = allowed
    elif kind == "float":
        kw["attn_mask"] = bias
        ref_kw["allowed"], ref_kw["bias"] = allowed, bias.masked_fill(~allowed, 0.0)
    elif kind == "scale":
        kw["scale"] = ref_kw["scale"] = 0.37
    if Hk != 4:
        kw["enable_gqa"] = True
    st = functional.attention_stats(q, k, **kw)
    mx, ent, rows = attn_reference(q, k, **ref_kw)
    assert st.max_logit.item() == pytest.approx(mx, rel=1e-12, abs=1e-12)
    assert st.entropy.item() == pytest.approx(ent, rel=1e-10)
    assert st.rows.sum().item() == rows
    assert st.entropy.item() == pytest.approx(_entropy_of(_sdpa_probs(q, k, **kw)), rel=1e-10)


def test_attention_stats_chunked_equals_unchunked():
    q, k = _qk(B=3, H=2, Hk=2, Tq=33, Tk=40, seed=3)
    allowed, bias = _masks(3, 33, 40)
    for kw in ({"is_causal": True}, {"attn_mask": allowed}, {"attn_mask": bias}):
        whole = functional.attention_stats(q, k, chunk_elements=1 << 30, **kw)
        for chunk in (1, 3 * 2 * 40 * 5, 3 * 2 * 40 * 7 + 1):
            part = functional.attention_stats(q, k, chunk_elements=chunk, **kw)
            torch.testing.assert_close(part.head_max, whole.head_max, rtol=1e-14, atol=0)
            assert torch.equal(part.rows, whole.rows)
            torch.testing.assert_close(part.entropy_sum, whole.entropy_sum, rtol=1e-13, atol=1e-13)


def test_attention_stats_rows_without_allowed_keys_are_left_out(attn_reference):
    q, k = _qk(Tq=6, Tk=6)
    allowed = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    allowed[0, :, 2] = False  # one query row sees nothing
    allowed[1, :, :, 4:] = False
    st = functional.attention_stats(q, k, attn_mask=allowed)
    mx, ent, rows = attn_reference(q, k, allowed=allowed)
    assert rows == st.rows.sum().item() == (2 * 6 - 1) * 4
    assert st.max_logit.item() == pytest.approx(mx, rel=1e-12)
    assert st.entropy.item() == pytest.approx(ent, rel=1e-10)


def test_attention_stats_entropy_stays_exact_for_huge_logits(attn_reference):
    q, k = _qk(mult=1.0)
    q, k = q * 300.0, k * 300.0  # logits ~1e5: near one-hot rows, entropy ~1e-30 .. 1
    st = functional.attention_stats(q.float(), k.float(), is_causal=True)
    mx, ent, _ = attn_reference(q.float(), k.float(), allowed=torch.ones(7, 7, dtype=torch.bool).tril())
    assert st.max_logit.item() == pytest.approx(mx, rel=1e-6)
    assert st.entropy.item() == pytest.approx(ent, abs=1e-6)


def test_attention_stats_16bit_inputs_use_float32_and_match(attn_reference):
    q, k = _qk(mult=2.0, dtype=torch.bfloat16)
    st = functional.attention_stats(q, k, is_causal=True)
    assert st.head_max.dtype == torch.float32
    mx, ent, _ = attn_reference(q, k, allowed=torch.ones(7, 7, dtype=torch.bool).tril())
    assert st.max_logit.item() == pytest.approx(mx, rel=1e-5)
    assert st.entropy.item() == pytest.approx(ent, rel=1e-5)


def test_attention_stats_propagates_nan_and_never_keeps_graph():
    q, k = _qk(dtype=torch.float32)
    q.requires_grad_(True)
    st = functional.attention_stats(q * 1.0, k)
    assert not st.head_max.requires_grad and st.head_max.grad_fn is None
    q2 = q.detach().clone()
    q2[0, 1, 3, 0] = float("nan")
    st = functional.attention_stats(q2, k)
    assert torch.isnan(st.head_max[1]) and torch.isfinite(st.head_max[0])
    assert torch.isnan(st.entropy)


def test_attention_stats_rejects_head_counts_that_do_not_divide():
    q, k = _qk(H=4, Hk=3)
    with pytest.raises(ValueError, match="not a multiple"):
        functional.attention_stats(q, k)
