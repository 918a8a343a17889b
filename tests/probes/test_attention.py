"""AttentionProbe: the proxy, the generic record_qk call, per-head maxima and the unsupported-model error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stabilitylab as sl
from stabilitylab.probes import AttentionProbe, UnsupportedModelError
from stabilitylab.proxy import ProxyConfig, ProxyTransformer


@pytest.mark.parametrize("overrides", [{}, {"qk_layernorm": True}, {"use_sdpa": False, "attn_scale": "linear"}])
def test_proxy_attention_matches_hand_written_scores_in_float64(overrides, attn_reference):
    cfg = ProxyConfig(d_model=32, n_layers=2, head_dim=8, seq_len=16, **overrides)
    torch.manual_seed(0)
    model = ProxyTransformer(cfg).double()
    x = torch.randint(0, cfg.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    refs = {}

    def pre(mod, args, name):
        B, T, C = args[0].shape
        q, k, _ = mod.c_attn(args[0]).split(C, dim=2)
        q, k = (t.view(B, T, mod.n_heads, mod.head_dim).transpose(1, 2) for t in (q, k))
        if mod.q_norm is not None:
            q, k = mod.q_norm(q), mod.k_norm(k)
        s = mod.scores(q, k).double()  # the proxy's own materialised, causally masked scores
        refs[name] = (s.amax(dim=(0, 2, 3)), attn_reference(q, k, allowed=torch.isfinite(s), scale=mod.scale))

    hs = [b.attn.register_forward_pre_hook(lambda m, a, n=f"blocks.{i}.attn": pre(m, a, n))
          for i, b in enumerate(model.blocks)]
    with sl.Monitor(model, every=1, probes=["attention"]) as mon:
        model(x)
        vals = mon.step()
        head_max = mon.probe("attention").head_max
    for h in hs:
        h.remove()
    for name, (per_head, (mx, ent, _)) in refs.items():
        assert vals[("attn.max_logit", name)] == pytest.approx(mx, rel=1e-10)
        assert vals[("attn.entropy", name)] == pytest.approx(ent, rel=1e-10)
        torch.testing.assert_close(head_max[name], per_head, rtol=1e-10, atol=0)


class KVCacheAttention(nn.Module):
    """A custom decoder step with cached keys (Tk > Tq) and a hand-written softmax: reports via record_qk."""

    stabilitylab_records_qk = True

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.k_cache = nn.Buffer(torch.randn(2, 2, 5, 8))
        self.proj = nn.Linear(8, 8)

    def forward(self, x):  # x: (B, 2, Tq, 8)
        q = self.proj(x) * 2
        k = torch.cat([self.k_cache, self.proj(x)], dim=2)  # (B, 2, 5 + Tq, 8)
        sl.record_qk(q, k, is_causal=True, module=self)
        s = (q @ k.transpose(-1, -2)) / 8 ** 0.5
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
        return torch.softmax(s, -1) @ k


def test_record_qk_with_is_causal_and_more_keys_than_queries_is_top_left_aligned(attn_reference):
    model = nn.Sequential(KVCacheAttention())
    x = torch.randn(2, 2, 3, 8)
    with sl.Monitor(model, every=1, probes=["attention"]) as mon:
        model(x)
        vals = mon.step()
    m = model[0]
    q, k = m.proj(x) * 2, torch.cat([m.k_cache, m.proj(x)], dim=2)
    mx, ent, _ = attn_reference(q, k, allowed=torch.ones(3, 8, dtype=torch.bool).tril())
    assert vals[("attn.max_logit", "0")] == pytest.approx(mx, rel=1e-6)
    assert vals[("attn.entropy", "0")] == pytest.approx(ent, rel=1e-6)


def test_record_qk_module_named_explicitly_without_the_class_flag():
    class Plain(nn.Module):
        def forward(self, q, k):
            sl.record_qk(q, k, module=self)
            return q

    model = nn.ModuleDict({"mine": Plain()})
    probe = AttentionProbe(modules=["mine"])
    with sl.Monitor(model, every=1, probes=[probe]) as mon:
        q = torch.randn(1, 2, 4, 8)
        model["mine"](q, q)
        vals = mon.step()
    assert set(vals) == {("attn.max_logit", "mine"), ("attn.entropy", "mine")}
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        AttentionProbe(modules=["nope"]).attach(model)


def test_unsupported_model_error_lists_every_supported_family_and_the_generic_call():
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedModelError) as err:
        sl.Monitor(mlp, probes=[AttentionProbe(required=True)])
    msg = str(err.value)
    for needle in ("Sequential", "Hugging Face", "MultiheadAttention", "scaled_dot_product_attention",
                   "stabilitylab.record_qk(q, k", "modules=[...]"):
        assert needle in msg
    with pytest.warns(UserWarning, match="no attention found in Sequential"):
        mon = sl.Monitor(mlp)
    assert "attention" not in [p.name for p in mon.probes]
    mon.close()
