import copy

import pytest
import torch
from _hf_ref import capture_inputs, causal_attention, gpt2_qk, llama_qk, tiny_gpt2, tiny_llama

from stabilitylab.mitigations import QKLayerNorm, apply_qk_layernorm, register_qk_layernorm
from stabilitylab.proxy import ProxyConfig, ProxyTransformer, TrainConfig, preset, train_one


def _randomise_gains(model):
    g = torch.Generator().manual_seed(1)
    for n, p in model.named_parameters():
        if "q_norm" in n or "k_norm" in n:
            p.data.copy_(0.5 + torch.rand(p.shape, generator=g, dtype=p.dtype))


def test_qklayernorm_normalises_each_head_over_head_dim():
    norm = QKLayerNorm(8).double()
    norm.norm.weight.data = torch.linspace(0.5, 2.0, 8, dtype=torch.float64)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64) * 7 + 3
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    ref = (x - mu) / torch.sqrt(var + 1e-5) * norm.norm.weight
    torch.testing.assert_close(norm(x), ref)
    y = torch.randn(2, 5, 24, dtype=torch.float64)  # 3 heads of 8, concatenated
    torch.testing.assert_close(norm.normalise_features(y, 8, 24)[..., :8], y[..., :8])
    torch.testing.assert_close(norm.normalise_features(y, 8, 24)[..., 8:16], norm(y[..., 8:16]))


def test_apply_on_proxy_equals_building_it_with_qk_layernorm(tiny_cfg, tiny_batch):
    torch.manual_seed(0)
    plain = ProxyTransformer(tiny_cfg)
    built = ProxyTransformer(ProxyConfig(**{**tiny_cfg.to_dict(), "qk_layernorm": True}))
    names = apply_qk_layernorm(plain)
    assert names == ["blocks.0.attn", "blocks.1.attn"] and plain.cfg.qk_layernorm
    _randomise_gains(plain)
    built.load_state_dict(plain.state_dict())  # same keys, same values
    x, y = tiny_batch
    torch.testing.assert_close(plain(x, y)[1], built(x, y)[1])


def test_gpt2_surgery_matches_reference_attention_with_normalised_qk():
    model = tiny_gpt2()
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    before = set(model.state_dict())
    apply_qk_layernorm(model)
    assert before < set(model.state_dict())  # only new keys
    _randomise_gains(model)
    attn = model.transformer.h[1].attn
    store, h = capture_inputs(attn)
    out = {}
    attn.register_forward_hook(lambda m, a, o: out.setdefault("y", o[0]))
    model(x)
    h.remove()
    q, k, v = gpt2_qk(attn, store["h"], norm=True)
    ref = causal_attention(q, k, v) @ attn.c_proj.weight + attn.c_proj.bias
    torch.testing.assert_close(out["y"], ref)


@pytest.mark.parametrize("kv_heads,bias", [(2, False), (4, True)])
def test_llama_surgery_normalises_heads_before_rope(kv_heads, bias):
    model = tiny_llama(kv_heads=kv_heads, bias=bias)
    apply_qk_layernorm(model)
    _randomise_gains(model)
    attn = model.model.layers[0].self_attn
    store, _ = capture_inputs(attn)
    out = {}
    attn.register_forward_hook(lambda m, a, o: out.setdefault("y", o[0]))
    model(torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0)))
    cos, sin = store["kwargs"]["position_embeddings"]
    q, k, v = llama_qk(attn, store["h"], cos, sin, norm=True)
    torch.testing.assert_close(out["y"], attn.o_proj(causal_attention(q, k, v)))


def test_surgery_survives_deepcopy_and_refuses_twice(tiny_model, tiny_batch):
    apply_qk_layernorm(tiny_model)
    with pytest.raises(ValueError, match="already"):
        apply_qk_layernorm(tiny_model)
    gpt2 = tiny_gpt2()
    apply_qk_layernorm(gpt2)
    twin = copy.deepcopy(gpt2)
    for p in twin.parameters():
        if p.dim() == 1 and p.numel() == 8:  # the copied gains (head_dim 8)
            p.data.mul_(3.0)
    x = torch.randint(0, 64, (1, 8))
    # the copy's hooks use the copy's gains: changing them changes the copy only
    assert not torch.allclose(twin(x).logits, gpt2(x).logits)
    torch.testing.assert_close(copy.deepcopy(gpt2)(x).logits, gpt2(x).logits)


def test_registry_accepts_user_types_and_unknown_models_get_a_clear_error():
    class MyAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    def surgery(module, eps):
        module.q_norm = QKLayerNorm(4, eps=eps)

    register_qk_layernorm(MyAttention, surgery)
    model = torch.nn.Sequential(MyAttention(), torch.nn.ReLU())
    assert apply_qk_layernorm(model) == ["0"] and isinstance(model[0].q_norm, QKLayerNorm)
    with pytest.raises(ValueError, match="no supported attention module in Linear"):
        apply_qk_layernorm(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="surgery"):
        register_qk_layernorm(MyAttention, "not callable")


def _max_logit_trace(qk: bool):
    cfg = TrainConfig(model=preset("xs", qk_layernorm=qk, seq_len=32), lr=1e-1, steps=60, warmup_steps=5,
                      batch_size=8, eval_batches=1, independent_wd=False)
    h = train_one(cfg, monitor=dict(every=10, probes=["attention"])).history
    return h[h["metric"] == "attn.max_logit"].groupby("step")["value"].max()


def test_qk_layernorm_stops_attention_logit_growth_at_high_lr():
    base, fixed = _max_logit_trace(False), _max_logit_trace(True)
    assert base.max() > 100  # measured ~1.9e3
    assert fixed.max() < 30  # measured ~9.5
