"""The proxy Transformer: attention paths agree, no biases, head dim, causality, init loss, tying."""

from __future__ import annotations

import math

import pytest
import torch

from stabilitylab.proxy import PRESETS, ProxyConfig, ProxyTransformer, preset


def _pair(cfg_kwargs):
    torch.manual_seed(0)
    a = ProxyTransformer(ProxyConfig(use_sdpa=True, **cfg_kwargs)).double()
    b = ProxyTransformer(ProxyConfig(use_sdpa=False, **cfg_kwargs)).double()
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("extra", [{}, {"qk_layernorm": True}, {"attn_scale": "linear"}])
def test_hand_written_attention_equals_sdpa_in_float64(extra):
    a, b = _pair(dict(d_model=32, n_layers=2, head_dim=8, seq_len=12, **extra))
    x = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))
    la, lb = a(x)[0], b(x)[0]
    torch.testing.assert_close(la, lb, rtol=1e-10, atol=1e-10)


def test_manual_attention_matches_a_naive_loop():
    torch.manual_seed(0)
    cfg = ProxyConfig(d_model=16, n_layers=1, head_dim=8, seq_len=5, use_sdpa=False)
    attn = ProxyTransformer(cfg).double().blocks[0].attn
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    y = attn.manual_attention(q, k, v)
    for h in range(2):
        for i in range(5):
            s = [float(q[0, h, i] @ k[0, h, j]) / math.sqrt(8) for j in range(i + 1)]
            m = max(s)
            p = [math.exp(v_ - m) for v_ in s]
            ref = sum(p[j] / sum(p) * v[0, h, j] for j in range(i + 1))
            torch.testing.assert_close(y[0, h, i], ref, rtol=1e-12, atol=1e-12)


def test_no_bias_parameters_anywhere():
    model = ProxyTransformer(ProxyConfig(d_model=32, n_layers=2, head_dim=16, seq_len=8, qk_layernorm=True))
    assert not [n for n, _ in model.named_parameters() if "bias" in n]
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)):
            assert m.bias is None


@pytest.mark.parametrize("d_model, head_dim", [(32, 16), (64, 8), (128, 64)])
def test_head_dim_sets_number_of_heads(d_model, head_dim):
    cfg = ProxyConfig(d_model=d_model, head_dim=head_dim, n_layers=1, seq_len=8)
    attn = ProxyTransformer(cfg).blocks[0].attn
    assert (attn.n_heads, attn.head_dim) == (d_model // head_dim, head_dim)
    seen = {}
    import stabilitylab.proxy.model as pm

    real = pm.record_qk
    pm.record_qk = lambda q, k, **kw: seen.setdefault("q", q.shape)
    try:
        attn(torch.randn(2, 8, d_model))
    finally:
        pm.record_qk = real
    assert seen["q"] == (2, d_model // head_dim, 8, head_dim)
    assert attn.scale == pytest.approx(1 / math.sqrt(head_dim))


def test_default_head_dim_is_64_and_presets_are_valid():
    assert ProxyConfig().head_dim == 64
    for name in PRESETS:
        cfg = preset(name)
        assert cfg.d_model % cfg.head_dim == 0 and cfg.mlp_ratio == 4
    assert preset("xxs", qk_layernorm=True).qk_layernorm
    with pytest.raises(ValueError, match="huge"):
        preset("huge")


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_causal_future_tokens_do_not_change_earlier_logits(use_sdpa):
    torch.manual_seed(0)
    model = ProxyTransformer(ProxyConfig(d_model=32, n_layers=2, head_dim=16, seq_len=10, use_sdpa=use_sdpa))
    model = model.double()
    x = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(2))
    t = 6
    x2 = x.clone()
    x2[:, t] = (x2[:, t] + 17) % 256
    a, b = model(x)[0], model(x2)[0]
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-12)
    assert (a[:, t:] - b[:, t:]).abs().max() > 1e-3


def test_init_loss_is_near_log_vocab(tiny_cfg):
    torch.manual_seed(0)
    model = ProxyTransformer(tiny_cfg)
    x = torch.randint(0, 256, (8, tiny_cfg.seq_len), generator=torch.Generator().manual_seed(0))
    _, loss = model(x, x)
    assert abs(loss.item() - math.log(256)) < 1.0


def test_tied_embeddings_share_one_tensor():
    kw = dict(d_model=32, n_layers=1, head_dim=16, seq_len=8)
    tied, untied = ProxyTransformer(ProxyConfig(tie_embeddings=True, **kw)), ProxyTransformer(ProxyConfig(**kw))
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.n_params() - tied.n_params() == 256 * 32


def test_z_loss_adds_coefficient_times_mean_squared_log_z():
    torch.manual_seed(0)
    kw = dict(d_model=32, n_layers=1, head_dim=16, seq_len=8)
    a = ProxyTransformer(ProxyConfig(**kw)).double()
    b = ProxyTransformer(ProxyConfig(z_loss=1e-2, **kw)).double()
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    logits, la = a(x, x)
    _, lb = b(x, x)
    ref = 1e-2 * torch.logsumexp(logits, -1).pow(2).mean()
    assert (lb - la).item() == pytest.approx(ref.item(), rel=1e-6)


def test_sequence_longer_than_seq_len_is_rejected(tiny_model, tiny_cfg):
    with pytest.raises(ValueError, match="seq_len"):
        tiny_model(torch.zeros(1, tiny_cfg.seq_len + 1, dtype=torch.long))


@pytest.mark.parametrize("field, value", [("d_model", 0), ("n_layers", -1), ("head_dim", 2.5), ("seq_len", 0),
                                          ("vocab_size", 0), ("z_loss", -1.0), ("attn_scale", "cubic"),
                                          ("logit_softcap", 0.0), ("attn_softcap", -1.0), ("mlp_ratio", 0)])
def test_bad_proxy_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ProxyConfig(**{field: value})


def test_d_model_not_multiple_of_head_dim_names_both():
    with pytest.raises(ValueError, match="head_dim"):
        ProxyConfig(d_model=48, head_dim=32)
