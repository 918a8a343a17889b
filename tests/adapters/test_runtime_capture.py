"""Custom attention modules observed by what runs: helpers, hand-written paths, soft-caps, silent gaps."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import stabilitylab as sl

D, H, T = 16, 4, 8


class Attend(nn.Module):
    """x-transformers style: the SDPA call lives in a helper method, not in forward."""

    def __init__(self, flash: bool):
        super().__init__()
        self.flash = flash
        self.attn_fn = F.softmax

    def flash_attn(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def forward(self, q, k, v):
        if self.flash:
            return self.flash_attn(q, k, v)
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -torch.finfo(s.dtype).max)
        return self.attn_fn(s, dim=-1) @ v


class TimmAttention(nn.Module):
    """timm ViT style: forward names SDPA, but fused_attn=False takes the hand-written softmax path."""

    def __init__(self, fused_attn: bool):
        super().__init__()
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(D, 3 * D)
        self.scale = (D // H) ** -0.5

    def qk(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], T, 3, H, D // H).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x):
        q, k, v = self.qk(x)
        if self.fused_attn:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            y = attn.softmax(dim=-1) @ v
        return y.transpose(1, 2).reshape(x.shape)


class LitConfig:
    attention_logit_softcapping = 1.5


class LitAttention(nn.Module):
    """litgpt style: scores soft-capped with tanh before the causal mask and the softmax."""

    def __init__(self):
        super().__init__()
        self.config = LitConfig()
        self.qkv = nn.Linear(D, 3 * D)

    def qk(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], T, 3, H, D // H).permute(2, 0, 3, 1, 4)
        return q, k, v

    def scaled_dot_product_attention(self, q, k, v):
        cap = self.config.attention_logit_softcapping
        scores = q @ k.transpose(-2, -1) * (D // H) ** -0.5
        scores = torch.tanh(scores / cap) * cap
        scores = scores + torch.full((T, T), float("-inf")).triu(1)
        return F.softmax(scores, dim=-1, dtype=torch.float64) @ v

    def forward(self, x):
        q, k, v = self.qk(x)
        return self.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)


class XLayer(nn.Module):
    def __init__(self, flash: bool):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.attend = Attend(flash)

    def qk(self, x):
        return self.qkv(x).view(x.shape[0], T, 3, H, D // H).permute(2, 0, 3, 1, 4)

    def forward(self, x):
        q, k, v = self.qk(x)
        return x + self.attend(q, k, v).transpose(1, 2).reshape(x.shape)


class Stack(nn.Module):
    def __init__(self, make, ckpt: bool | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([make() for _ in range(2)])
        for p in self.parameters():
            p.data.mul_(3.0)  # sharp attention
        self.ckpt = ckpt

    def forward(self, x):
        for layer in self.layers:
            x = x + (layer(x) if self.ckpt is None else checkpoint(layer, x, use_reentrant=self.ckpt))
        return x


def _x():
    return torch.randn(2, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _run(model, x, steps=1, **mon_kw):
    with sl.Monitor(model, every=1, probes=["attention"], **mon_kw) as mon:
        covered = dict(mon.probe("attention").covered)
        for _ in range(steps):
            model(x)
            vals = mon.step()
    return covered, vals


def _reference(s, allowed):
    s = s.detach().double().masked_fill(~allowed, -math.inf)
    p = torch.softmax(s, -1)
    return s.max().item(), (-torch.where(p > 0, p * p.log(), 0.0).sum(-1)).mean().item()


@pytest.mark.parametrize("flash", [True, False])
def test_x_transformers_style_helper_method_is_found_and_exact(flash):
    model = Stack(lambda: XLayer(flash)).double()
    x = _x()
    covered, vals = _run(model, x)
    assert covered == {"layers.0.attend": "sdpa", "layers.1.attend": "sdpa"}
    h = x
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i, layer in enumerate(model.layers):
        q, k, _ = layer.qk(h)
        mx, ent = _reference(q @ k.transpose(-2, -1) * (D // H) ** -0.5, causal)
        assert vals[("attn.max_logit", f"layers.{i}.attend")] == pytest.approx(mx, rel=1e-12)
        assert vals[("attn.entropy", f"layers.{i}.attend")] == pytest.approx(ent, rel=1e-12)
        h = h + layer(h)


@pytest.mark.parametrize("fused", [True, False])
def test_timm_style_module_is_exact_whichever_path_runs(fused):
    model = Stack(lambda: TimmAttention(fused)).double()
    x = _x()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        covered, vals = _run(model, x)
    assert set(covered) == {"layers.0", "layers.1"}
    h = x
    for i, layer in enumerate(model.layers):
        q, k, _ = layer.qk(h)
        mx, ent = _reference(q @ k.transpose(-2, -1) * layer.scale, torch.ones(T, T, dtype=torch.bool))
        assert vals[("attn.max_logit", f"layers.{i}")] == pytest.approx(mx, rel=1e-12)
        assert vals[("attn.entropy", f"layers.{i}")] == pytest.approx(ent, rel=1e-12)
        h = h + layer(h)


def test_litgpt_style_soft_cap_records_raw_and_capped_max_and_capped_entropy():
    model = Stack(LitAttention).double()
    x = _x()
    _, vals = _run(model, x)
    cap = LitConfig.attention_logit_softcapping
    h = x
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i, layer in enumerate(model.layers):
        q, k, _ = layer.qk(h)
        raw = q @ k.transpose(-2, -1) * (D // H) ** -0.5
        mx_raw, _ = _reference(raw, causal)
        mx_cap, ent_cap = _reference(cap * torch.tanh(raw / cap), causal)
        assert mx_raw > 2 * cap  # the cap binds
        name = f"layers.{i}"
        assert vals[("attn.max_logit", name)] == pytest.approx(mx_raw, rel=1e-12)
        assert vals[("attn.max_logit_capped", name)] == pytest.approx(mx_cap, rel=1e-12)
        assert vals[("attn.entropy", name)] == pytest.approx(ent_cap, rel=1e-12)
        h = h + layer(h)


class Silent(nn.Module):
    """Mentions softmax, but this configuration normalises by hand: nothing the probe can see runs."""

    use_softmax = False

    def forward(self, x):
        s = x @ x.transpose(-2, -1)
        if self.use_softmax:
            return F.softmax(s, dim=-1) @ x
        e = (s - s.amax(-1, keepdim=True)).exp()
        return (e / e.sum(-1, keepdim=True)) @ x


def test_found_but_silent_module_warns_once_by_name_and_never_on_unlogged_steps():
    model = nn.Sequential(Silent(), Silent())
    x = torch.randn(2, T, D)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with sl.Monitor(model, every=2, probes=["attention"]) as mon:
            for _ in range(4):
                model(x)
                mon.step()
    msgs = sorted(str(w.message) for w in caught if "stabilitylab" in str(w.message))
    assert len(msgs) == 2
    for i, m in enumerate(msgs):
        assert f"attention probe: {i} (Silent) ran on a logged step" in m and "stabilitylab.record_qk(q, k" in m


def test_no_function_mode_is_entered_on_unlogged_steps():
    depths = []

    class Probe(TimmAttention):
        def forward(self, x):
            depths.append(torch._C._len_torch_function_stack())
            return super().forward(x)

    model = Stack(lambda: Probe(False)).double()
    base = torch._C._len_torch_function_stack()
    with sl.Monitor(model, every=2, probes=["attention"]) as mon:
        for _ in range(2):
            model(_x())
            mon.step()
    assert depths == [base + 1, base + 1, base, base]


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_torch_checkpoint_recompute_is_not_counted_by_attention_or_activation_probes(use_reentrant):
    x = _x().requires_grad_()
    vals = {}
    for ckpt in (None, use_reentrant):
        model = Stack(lambda: TimmAttention(False), ckpt=ckpt).double()
        with sl.Monitor(model, every=1, probes=["attention", "activations"]) as mon:
            model(x).sum().backward()
            vals[ckpt] = mon.step()
    assert vals[None].keys() == vals[use_reentrant].keys()
    for k, v in vals[None].items():
        assert vals[use_reentrant][k] == pytest.approx(v, rel=1e-12), k
