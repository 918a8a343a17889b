"""Custom modules that call scaled_dot_product_attention: found and observed without any code change."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stabilitylab as sl
from stabilitylab.adapters import SDPACapture


class NanoAttention(nn.Module):
    """nanoGPT-style attention: no stabilitylab call anywhere."""

    def __init__(self, d=16, h=4, hk=4, mode="causal"):
        super().__init__()
        self.h, self.hk, self.d, self.mode = h, hk, d // h, mode
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * hk * self.d)

    def qk(self, x):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.h, self.d).transpose(1, 2)
        k, v = self.kv(x).view(B, T, 2, self.hk, self.d).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x, mask=None):
        q, k, v = self.qk(x)
        if self.mode == "causal":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.hk != self.h)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=self.hk != self.h)
        if self.mode == "boom":
            raise RuntimeError("boom")
        return y.transpose(1, 2).reshape(x.shape)


class Net(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([NanoAttention(**kw) for _ in range(2)])

    def forward(self, x, mask=None):
        for b in self.blocks:
            x = x + b(x, mask)
        return x


@pytest.mark.parametrize("mode,hk", [("causal", 4), ("causal", 2), ("mask", 2), ("mask", 4)])
def test_sdpa_module_matches_float64_reference(mode, hk, attn_reference):
    net = Net(hk=hk, mode=mode).double()
    x = torch.randn(3, 8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(3, 1, 8, 8, generator=g) > 0.3
    mask[..., 0] = True
    refs = {}

    def pre(mod, args, name):
        q, k, _ = mod.qk(args[0])
        allowed = torch.ones(8, 8, dtype=torch.bool).tril() if mode == "causal" else mask
        refs[name] = attn_reference(q, k, allowed=allowed, scale=None if mode == "causal" else 0.3)

    hs = [b.register_forward_pre_hook(lambda m, a, n=f"blocks.{i}": pre(m, a, n)) for i, b in enumerate(net.blocks)]
    with sl.Monitor(net, every=1, probes=["attention"]) as mon:
        assert mon.probe("attention").covered == {"blocks.0": "sdpa", "blocks.1": "sdpa"}
        net(x, mask)
        vals = mon.step()
    for h in hs:
        h.remove()
    for name, (mx, ent, _) in refs.items():
        assert vals[("attn.max_logit", name)] == pytest.approx(mx, rel=1e-10)
        assert vals[("attn.entropy", name)] == pytest.approx(ent, rel=1e-10)


def test_sdpa_capture_leaves_the_mode_stack_clean_on_errors_and_counts_nested_calls_once():
    net = Net(mode="boom")
    mon = sl.Monitor(net, every=1, probes=["attention"])
    depth = torch._C._len_torch_function_stack()
    with pytest.raises(RuntimeError, match="boom"):
        net(torch.randn(2, 8, 16))
    assert torch._C._len_torch_function_stack() == depth
    probe = mon.probe("attention")
    probe._blocks.clear()
    q = torch.randn(1, 2, 4, 8)
    with SDPACapture("outer"), SDPACapture("inner"):
        F.scaled_dot_product_attention(q, q, q)
    assert [b.modules for b in probe._blocks.values()] == [("inner",), ("inner",)]
    mon.close()


def test_sdpa_probe_not_armed_on_unlogged_steps_records_nothing():
    net = Net()
    mon = sl.Monitor(net, every=3, probes=["attention"])
    net(torch.randn(2, 8, 16))
    assert mon.step() is not None
    net(torch.randn(2, 8, 16))
    assert not mon.probe("attention")._blocks and mon.step() is None
    mon.close()
