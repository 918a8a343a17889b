"""Hugging Face GPT-2 and Llama: attention and output-logit probes against float64 references."""

from __future__ import annotations

import pytest
import torch

import stabilitylab as sl

transformers = pytest.importorskip("transformers")
from transformers.modeling_utils import AttentionInterface  # noqa: E402

V, T = 100, 10


def _gpt2(impl: str, dropout: float = 0.0):
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=V, n_positions=32,
                                  initializer_range=0.3, scale_attn_by_inverse_layer_idx=True,
                                  resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                  bos_token_id=0, eos_token_id=0, attn_implementation=impl)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def _llama(impl: str):
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=V, max_position_embeddings=32,
                                   initializer_range=0.3, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                   attn_implementation=impl)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


MODELS = {"gpt2": (_gpt2, "transformer.h.{}.attn"), "llama": (_llama, "model.layers.{}.self_attn")}


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _reference_qk(family: str, attn: torch.nn.Module, args: tuple, kwargs: dict):
    """q, k (after RoPE for Llama) and the score scale, recomputed from the module's weights."""
    h = kwargs.get("hidden_states", args[0] if args else None)
    B, Tn, E = h.shape
    if family == "gpt2":
        q, k, _ = attn.c_attn(h).split(E, dim=2)
        q, k = (x.view(B, Tn, -1, attn.head_dim).transpose(1, 2) for x in (q, k))
        return q, k, attn.head_dim ** -0.5 / (attn.layer_idx + 1)
    D = attn.head_dim
    q = attn.q_proj(h).view(B, Tn, -1, D).transpose(1, 2)
    k = attn.k_proj(h).view(B, Tn, -1, D).transpose(1, 2)
    cos, sin = (x.unsqueeze(1) for x in kwargs["position_embeddings"])
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, D ** -0.5


def _capture_references(family, model, n_layers, attention_mask, attn_reference):
    """Install pre-hooks that compute the float64 reference of every layer during the forward."""
    fmt = MODELS[family][1]
    refs, handles = {}, []
    for i in range(n_layers):
        name = fmt.format(i)

        def pre(mod, args, kwargs, name=name):
            with torch.no_grad():
                q, k, scale = _reference_qk(family, mod, args, kwargs)
            B, _, Tn, _ = q.shape
            allowed = torch.ones(Tn, Tn, dtype=torch.bool).tril().expand(B, 1, Tn, Tn)
            if attention_mask is not None:  # padded keys are masked; padded query rows do not count
                allowed = allowed & attention_mask.bool()[:, None, None, :] & attention_mask.bool()[:, None, :, None]
            refs.setdefault(name, []).append(attn_reference(q, k, allowed=allowed, scale=scale))

        handles.append(model.get_submodule(name).register_forward_pre_hook(pre, with_kwargs=True))
    return refs, handles


def _padding(kind: str, B: int = 3):
    if kind == "none":
        return None
    am = torch.ones(B, T, dtype=torch.long)
    for b, n_pad in zip(range(1, B), (4, 7)):
        if kind == "right":
            am[b, T - n_pad:] = 0
        else:
            am[b, :n_pad] = 0
    return am


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_hf_attention_matches_float64_reference(family, impl, padding, attn_reference):
    model = MODELS[family][0](impl).double()
    am = _padding(padding)
    x = torch.randint(1, V, (3, T), generator=torch.Generator().manual_seed(1))
    refs, handles = _capture_references(family, model, 2, am, attn_reference)
    with sl.Monitor(model, every=1, probes=["attention", "logits"]) as mon:
        assert set(mon.probe("attention").covered) == {MODELS[family][1].format(i) for i in range(2)}
        out = model(x, attention_mask=am)
        vals = mon.step()
    for h in handles:
        h.remove()
    for name, [(mx, ent, _)] in refs.items():
        assert vals[("attn.max_logit", name)] == pytest.approx(mx, rel=1e-9), name
        assert vals[("attn.entropy", name)] == pytest.approx(ent, rel=1e-9), name
        assert mx > 1.0  # the test exercises real, non-uniform attention
    keep = torch.ones(x.shape, dtype=torch.bool) if am is None else am.bool()  # logits.* skip padding
    lse = torch.logsumexp(out.logits.detach().double(), dim=-1)[keep]
    assert vals[("logits.lse_mean", "")] == pytest.approx(lse.mean().item(), rel=1e-9, nan_ok=True)
    assert vals[("logits.lse_std", "")] == pytest.approx(lse.std().item(), rel=1e-7, nan_ok=True)
    assert vals[("logits.max", "")] == pytest.approx(out.logits[keep].max().item(), rel=1e-12, nan_ok=True)


def test_hf_float32_model_matches_float64_reference(attn_reference):
    model = _llama("sdpa")
    am = _padding("right")
    x = torch.randint(1, V, (3, T), generator=torch.Generator().manual_seed(2))
    refs, handles = _capture_references("llama", model, 2, am, attn_reference)
    with sl.Monitor(model, every=1, probes=["attention"]) as mon:
        model(x, attention_mask=am)
        vals = mon.step()
    for h in handles:
        h.remove()
    for name, [(mx, ent, _)] in refs.items():
        assert vals[("attn.max_logit", name)] == pytest.approx(mx, rel=1e-5)
        assert vals[("attn.entropy", name)] == pytest.approx(ent, rel=1e-5)


def test_hf_gradient_accumulation_reduces_by_max_and_row_weighted_mean(attn_reference):
    model = _gpt2("sdpa").double()
    name = "transformer.h.1.attn"
    mon = sl.Monitor(model, every=1, probes=["attention"])
    refs_all = []
    for seed, pad in ((3, "right"), (4, "left")):
        am = _padding(pad)
        refs, handles = _capture_references("gpt2", model, 2, am, attn_reference)
        model(torch.randint(1, V, (3, T), generator=torch.Generator().manual_seed(seed)), attention_mask=am)
        for h in handles:
            h.remove()
        refs_all.append(refs[name][0])
    vals = mon.step()
    mon.close()
    assert vals[("attn.max_logit", name)] == pytest.approx(max(r[0] for r in refs_all), rel=1e-9)
    mean = sum(r[1] * r[2] for r in refs_all) / sum(r[2] for r in refs_all)
    assert vals[("attn.entropy", name)] == pytest.approx(mean, rel=1e-9)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_records_under_no_grad_and_only_on_logged_steps(impl):
    model = _llama(impl).eval()
    x = torch.randint(1, V, (2, T))
    with sl.Monitor(model, every=2, probes=["attention", "logits"]) as mon:
        with torch.no_grad():
            model(x)
        logged = mon.step()
        model(x)
        assert mon.step() is None
        assert not mon.probe("attention")._blocks
    assert ("attn.max_logit", "model.layers.0.self_attn") in logged
    assert ("logits.lse_mean", "") in logged


def _train(model, monitor: bool, steps: int = 3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mon = sl.Monitor(model, optimizer=opt, every=1) if monitor else None
    losses = []
    torch.manual_seed(123)  # same dropout masks in both runs unless a probe consumes randomness
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        x = torch.randint(1, V, (2, T), generator=g)
        am = _padding("right", 2)
        loss = model(x, attention_mask=am, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
        if mon is not None:
            assert ("attn.max_logit", next(iter(mon.probe("attention").covered))) in mon.step(loss)
    if mon is not None:
        mon.close()
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("build", [lambda: _gpt2("sdpa", dropout=0.1), lambda: _gpt2("eager", dropout=0.1),
                                   lambda: _llama("sdpa"), lambda: _llama("eager")])
def test_hf_training_is_bit_identical_with_and_without_probes(build):
    loss_a, params_a = _train(build(), monitor=False)
    loss_b, params_b = _train(build(), monitor=True)
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))


def test_hf_probe_keeps_no_graph_and_restores_attention_interface():
    original = AttentionInterface.get_interface
    model = _gpt2("sdpa")
    mon = sl.Monitor(model, every=1, probes=["attention", "logits"])
    assert AttentionInterface.get_interface is not original
    out = model(torch.randint(1, V, (2, T)), labels=torch.randint(1, V, (2, T)))
    blocks = [b for p in mon.probes for b in p._blocks.values()]
    assert blocks and all(b.num.grad_fn is None and not b.num.requires_grad for b in blocks)
    out.loss.backward()
    mon.step(out.loss)
    mon.close()
    assert AttentionInterface.get_interface is original


def test_hf_custom_attention_implementation_calling_sdpa_is_observed(attn_reference):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("sl_test_sdpa", sdpa_attention_forward)
    model = _llama("sl_test_sdpa").double()
    refs, handles = _capture_references("llama", model, 2, None, attn_reference)
    with sl.Monitor(model, every=1, probes=["attention"]) as mon:
        model(torch.randint(1, V, (2, T)))
        vals = mon.step()
    for h in handles:
        h.remove()
    for name, [(mx, ent, _)] in refs.items():
        assert vals[("attn.max_logit", name)] == pytest.approx(mx, rel=1e-9)
        assert vals[("attn.entropy", name)] == pytest.approx(ent, rel=1e-9)
