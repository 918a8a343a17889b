"""torch.nn.MultiheadAttention: attention probe against float64 references and PyTorch's own weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import stabilitylab as sl

E, H, B, L = 16, 4, 3, 6


class Wrap(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, **kw)

    def forward(self, *args, **kwargs):
        return self.attn(*args, **kwargs)


def _build(**kw) -> Wrap:
    torch.manual_seed(0)
    m = Wrap(**kw).double()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3.0)  # sharp, non-uniform attention
    return m


def _reference(mha, query, key, allowed, bias=None, attn_reference=None):
    """Float64 max/entropy from the weights, with inputs in (B, L, E) layout and masks by meaning."""
    Bn, Ln, _ = query.shape
    D = E // H
    if mha._qkv_same_embed_dim:
        wq, wk = mha.in_proj_weight[:E], mha.in_proj_weight[E:2 * E]
    else:
        wq, wk = mha.q_proj_weight, mha.k_proj_weight
    bq, bk = (mha.in_proj_bias[:E], mha.in_proj_bias[E:2 * E]) if mha.in_proj_bias is not None else (0.0, 0.0)
    q = (query @ wq.T + bq).view(Bn, Ln, H, D).transpose(1, 2)
    k = key @ wk.T + bk
    if mha.bias_k is not None:
        k = torch.cat([k, mha.bias_k.transpose(0, 1).expand(Bn, 1, E)], dim=1)
    k = k.view(Bn, -1, H, D).transpose(1, 2)
    if mha.add_zero_attn:
        k = torch.cat([k, k.new_zeros(Bn, H, 1, D)], dim=2)
    return attn_reference(q, k, allowed=allowed, bias=bias)


def _torch_entropy(mha, *args, **kwargs):
    """Mean row entropy of the attention weights PyTorch itself returns (NaN rows = fully masked)."""
    kwargs.update(need_weights=True, average_attn_weights=False)
    kwargs.pop("is_causal", None)
    with torch.no_grad():
        _, w = mha(*args, **kwargs)
    w = w.reshape(-1, w.shape[-1])
    w = w[~torch.isnan(w).any(-1)]
    return (-torch.where(w > 0, w * w.log(), torch.zeros_like(w)).sum(-1)).mean().item()


def _pad(S=L):
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, S - 2:] = True
    kpm[2, :3] = True
    return kpm


def _rand_bool(*shape, seed=5):
    m = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) > 0.6  # True = forbidden
    m[..., 0] = False
    return m


CASES = ["kpm_bool_batch_first", "attn_bool_seq_first", "float_masks", "mask3d", "causal_hint", "cross_kdim",
         "bias_kv_zero_attn", "unbatched", "no_bias"]


@pytest.mark.parametrize("case", CASES)
def test_mha_matches_float64_reference_and_torch_weights(case, attn_reference):
    g = torch.Generator().manual_seed(1)
    kw = {"batch_first": case in ("kpm_bool_batch_first", "cross_kdim", "float_masks")}
    S = 7 if case == "cross_kdim" else L
    if case == "cross_kdim":
        kw.update(kdim=12, vdim=10)
    if case == "bias_kv_zero_attn":
        kw.update(add_bias_kv=True, add_zero_attn=True)
    if case == "no_bias":
        kw.update(bias=False)
    model = _build(**kw)
    mha = model.attn
    x = torch.randn(B, L, E, generator=g, dtype=torch.float64)
    kv = torch.randn(B, S, kw.get("kdim", E), generator=g, dtype=torch.float64) if case == "cross_kdim" else x
    vv = torch.randn(B, S, 10, generator=g, dtype=torch.float64) if case == "cross_kdim" else x
    call: dict = {}
    allowed = torch.ones(B, 1, L, S, dtype=torch.bool)
    bias = None
    if case in ("kpm_bool_batch_first", "cross_kdim", "bias_kv_zero_attn"):
        call["key_padding_mask"] = _pad(S)
        allowed = allowed & ~_pad(S)[:, None, None, :]
    if case in ("attn_bool_seq_first", "bias_kv_zero_attn", "unbatched", "no_bias"):
        call["attn_mask"] = _rand_bool(L, S)
        allowed = allowed & ~call["attn_mask"]
    if case == "mask3d":
        call["attn_mask"] = _rand_bool(B * H, L, S)
        allowed = allowed & ~call["attn_mask"].view(B, H, L, S)
    if case == "float_masks":
        forbidden = _rand_bool(L, S)
        am = torch.randn(L, S, generator=g, dtype=torch.float64).masked_fill(forbidden, -math.inf)
        kpm = torch.zeros(B, S, dtype=torch.float64).masked_fill(_pad(S), -math.inf)
        call.update(attn_mask=am, key_padding_mask=kpm)
        allowed = allowed & ~forbidden & ~_pad(S)[:, None, None, :]
        bias = am.masked_fill(forbidden, 0.0)
    if case == "causal_hint":
        call.update(attn_mask=torch.ones(L, S, dtype=torch.bool).triu(1), is_causal=True, need_weights=False)
        allowed = allowed & torch.ones(L, S, dtype=torch.bool).tril()
    if case == "bias_kv_zero_attn":  # the appended bias key and zero key are always allowed
        allowed = torch.cat([allowed, torch.ones(B, 1, L, 2, dtype=torch.bool)], dim=-1)
    if case == "unbatched":
        inputs = (x[0], x[0], x[0])
        allowed = allowed[:1]
        ref_q = x[:1]
        ref_k = x[:1]
    elif kw["batch_first"]:
        inputs, ref_q, ref_k = (x, kv, vv), x, kv
    else:
        inputs, ref_q, ref_k = (x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1)), x, x
    mx, ent, _ = _reference(mha, ref_q, ref_k, allowed, bias, attn_reference)
    with sl.Monitor(model, every=1, probes=["attention"]) as mon:
        assert mon.probe("attention").covered == {"attn": "multihead_attention"}
        model(*inputs, **call)
        vals = mon.step()
    assert vals[("attn.max_logit", "attn")] == pytest.approx(mx, rel=1e-10)
    assert vals[("attn.entropy", "attn")] == pytest.approx(ent, rel=1e-10)
    assert vals[("attn.entropy", "attn")] == pytest.approx(_torch_entropy(mha, *inputs, **call), rel=1e-9)


def test_mha_transformer_encoder_named_records_and_eval_fast_path():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, batch_first=True, dropout=0.0)
    enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    x = torch.randn(B, L, E)
    with sl.Monitor(enc, every=1, probes=["attention"]) as mon:
        with torch.no_grad():
            enc(x, src_key_padding_mask=_pad())
        vals = mon.step()
    assert {m for (_, m) in vals} == {"layers.0.self_attn", "layers.1.self_attn"}
    assert all(math.isfinite(v) for v in vals.values())


def _train_encoder(monitor: bool):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.1, batch_first=True)
    enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    opt = torch.optim.SGD(enc.parameters(), lr=0.1)
    mon = sl.Monitor(enc, optimizer=opt, every=1) if monitor else None
    torch.manual_seed(1)
    losses = []
    for _ in range(3):
        x = torch.randn(B, L, E)
        causal = torch.ones(L, L, dtype=torch.bool).triu(1)
        loss = enc(x, mask=causal, src_key_padding_mask=_pad()).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
        if mon is not None:
            assert ("attn.max_logit", "layers.1.self_attn") in mon.step(loss)
    if mon is not None:
        mon.close()
    return torch.stack(losses), [p.detach().clone() for p in enc.parameters()]


def test_mha_training_is_bit_identical_with_and_without_probes():
    la, pa = _train_encoder(False)
    lb, pb = _train_encoder(True)
    assert torch.equal(la, lb) and all(torch.equal(a, b) for a, b in zip(pa, pb))
