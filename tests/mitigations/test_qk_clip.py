import pytest
import torch
from _hf_ref import capture_inputs, gpt2_qk, head_max, llama_qk, tiny_gpt2, tiny_llama

from stabilitylab import Monitor
from stabilitylab.mitigations import QKClip
from stabilitylab.mitigations.qk_clip import clip_factors, head_scales
from stabilitylab.proxy import ProxyConfig, ProxyTransformer, TrainConfig, preset, train_one


@torch.no_grad()
def _proxy_head_max(model, x):
    """Per-layer per-head max causal logit from the proxy's own materialised scores, float64."""
    out = {}
    for i, block in enumerate(model.blocks):
        store, h = capture_inputs(block.attn)
        model(x)
        h.remove()
        att = block.attn
        q, k, _ = att.c_attn(store["h"]).double().split(att.n_heads * att.head_dim, dim=2)
        B, T, _ = q.shape
        q = q.view(B, T, att.n_heads, att.head_dim).transpose(1, 2)
        k = k.view(B, T, att.n_heads, att.head_dim).transpose(1, 2)
        out[f"blocks.{i}.attn"] = head_max(q, k, att.scale)
    return out


def test_gqa_scales_multiply_to_gamma():
    gamma = clip_factors(torch.tensor([10.0, 50.0, 200.0, float("nan")]), 40.0)
    torch.testing.assert_close(gamma, torch.tensor([1.0, 0.8, 0.2, 1.0], dtype=torch.float64))
    a, c = head_scales(gamma, 4)
    torch.testing.assert_close(a * c, gamma)
    a, c = head_scales(gamma, 2)
    torch.testing.assert_close(a * c.repeat_interleave(2), gamma)


def test_clip_brings_measured_heads_exactly_to_threshold_on_the_proxy():
    torch.manual_seed(0)
    model = ProxyTransformer(ProxyConfig(d_model=32, n_layers=2, head_dim=8, seq_len=16)).double()
    with torch.no_grad():
        model.blocks[0].attn.c_attn.weight.mul_(4.0)  # large logits in layer 0
    x = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    before = _proxy_head_max(model, x)
    tau = float(before["blocks.0.attn"].median())
    clip = QKClip(model, tau)
    model(x)
    clip()
    assert clip() == {}  # no new measurement: nothing to clip twice
    after = _proxy_head_max(model, x)
    # layer 0 is measured on the same input, so it is exact; layer 1 saw layer 0's new output
    want = torch.minimum(before["blocks.0.attn"], torch.tensor(tau, dtype=torch.float64))
    torch.testing.assert_close(after["blocks.0.attn"], want)
    torch.testing.assert_close(clip.last_gamma["blocks.0.attn"], want / before["blocks.0.attn"])
    clip.close()


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "llama_bias"])
def test_clip_is_exact_for_hf_attention(family):
    model = {"gpt2": tiny_gpt2, "llama_gqa": lambda: tiny_llama(kv_heads=2),
             "llama_bias": lambda: tiny_llama(kv_heads=4, bias=True)}[family]()
    attn = model.transformer.h[0].attn if family == "gpt2" else model.model.layers[0].self_attn
    name = "transformer.h.0.attn" if family == "gpt2" else "model.layers.0.self_attn"
    with torch.no_grad():
        for p in attn.parameters():
            p.mul_(6.0)
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    store, _ = capture_inputs(attn)

    @torch.no_grad()
    def measure():
        model(x)
        if family == "gpt2":
            q, k, _ = gpt2_qk(attn, store["h"])
        else:
            q, k, _ = llama_qk(attn, store["h"], *store["kwargs"]["position_embeddings"])
        return head_max(q, k, attn.scaling)

    clip = QKClip(model, 1.0)  # measured first, below
    before = measure()
    tau = float(before.median())
    clip.threshold = tau
    clip()
    after = measure()
    want = torch.minimum(before, torch.tensor(tau, dtype=torch.float64))
    torch.testing.assert_close(after, want)
    torch.testing.assert_close(clip.last_gamma[name], want / before)
    assert (before > tau).any() and (before < tau).any()
    clip.close()


def test_clip_refuses_qk_layernorm_and_bad_threshold(tiny_cfg):
    model = ProxyTransformer(ProxyConfig(**{**tiny_cfg.to_dict(), "qk_layernorm": True}))
    with pytest.raises(ValueError, match="qk-layernorm"):
        QKClip(model, 10.0)
    with pytest.raises(ValueError, match="threshold"):
        QKClip(ProxyTransformer(tiny_cfg), -1.0)


def test_qk_clip_holds_the_max_logit_at_the_threshold_in_training():
    tau = 30.0
    clips = []

    def monitor(model, opt):
        mon = Monitor(model, optimizer=opt, every=1, probes=["attention"])
        clips.append(QKClip(model, tau, source=mon))
        clips[-1].hook(opt)
        return mon

    cfg = TrainConfig(model=preset("xs", seq_len=32), lr=1e-1, steps=60, warmup_steps=5, batch_size=8,
                      eval_batches=1, independent_wd=False)
    h = train_one(cfg, monitor=monitor).history
    m = h[h["metric"] == "attn.max_logit"].groupby("step")["value"].max()
    # without the clip this run reaches ~1.9e3 (test_qk_layernorm). The clip uses the logits measured
    # before the step, so the next measurement overshoots by one step's growth: measured max ~62.
    assert m.max() < 3 * tau
    assert m.iloc[-20:].median() <= 1.1 * tau


def test_before_forward_mode_keeps_every_recorded_max_logit_under_the_threshold():
    tau = 30.0
    clips = []

    def monitor(model, opt):
        clips.append(QKClip(model, tau, mode="before_forward"))
        return Monitor(model, optimizer=opt, every=1, probes=["attention"])

    cfg = TrainConfig(model=preset("xs", seq_len=32), lr=1e-1, steps=60, warmup_steps=5, batch_size=8,
                      eval_batches=1, independent_wd=False)
    res = train_one(cfg, monitor=monitor)
    m = res.history[res.history["metric"] == "attn.max_logit"]
    assert len(m) == 60 * 2 and m["value"].max() <= tau * (1 + 1e-5)
    assert m["value"].max() >= tau * 0.99  # it did have to clip
    ent = res.history[res.history["metric"] == "attn.entropy"]
    assert len(ent) == 60 * 2  # the measuring pass records nothing into the Monitor
    clips[0].close()


def test_before_forward_mode_on_hf_gpt2_with_cache_and_dropout():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                       bos_token_id=0, eos_token_id=0, attn_implementation="sdpa"))
    tau = 1.0  # unclipped, this run reaches ~4.2
    clip = QKClip(model, tau, mode="before_forward")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    with Monitor(model, optimizer=opt, every=1, probes=["attention"]) as mon:
        for _ in range(8):
            out = model(x, labels=x, use_cache=True)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            mon.step(out.loss)
        h = mon.history()
    m = h[h["metric"] == "attn.max_logit"]["value"]
    assert len(m) == 16 and tau * 0.99 <= m.max() <= tau * (1 + 1e-5)
    model.eval()
    before = {n: p.clone() for n, p in model.named_parameters()}
    model(x)  # evaluation forwards never clip
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    clip.close()


def _cache_of(out):
    """The KV cache a HF forward returned (``cache`` in transformers 5.x, ``past_key_values`` in 4.x)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_before_forward_clip_keeps_the_cache_and_the_kv_gradients_of_an_unclipped_model(family):
    build = tiny_gpt2 if family == "gpt2" else (lambda: tiny_llama(kv_heads=2))
    model, ref = build(), build()
    blocks = model.transformer.h if family == "gpt2" else model.model.layers
    with torch.no_grad():
        for p in (blocks[0].attn if family == "gpt2" else blocks[0].self_attn).parameters():
            p.mul_(6.0)  # large logits in layer 0
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    clip = QKClip(model, 1e30, mode="before_forward")
    with torch.no_grad():
        model(x, use_cache=False)  # measures every head; a threshold of 1e30 clips nothing
    tau = float(torch.cat(list(clip.probe.head_max.values())).median())
    clip.threshold = tau
    out = model(x, labels=x, use_cache=True)
    out.loss.backward()
    assert float(torch.cat(list(clip.last_gamma.values())).min()) < 1.0  # it did clip
    # reference: the un-clipped model with the weights the clipped one trained with (clip is in place)
    ref.load_state_dict(model.state_dict())
    ref_out = ref(x, labels=x, use_cache=True)
    ref_out.loss.backward()
    lengths = [_cache_of(out).get_seq_length(i) for i in range(len(blocks))]
    assert lengths == [_cache_of(ref_out).get_seq_length(i) for i in range(len(blocks))] == [12, 12]
    torch.testing.assert_close(out.loss, ref_out.loss)
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[n].grad, msg=n)
    for block in blocks:
        if family == "gpt2":
            C = block.attn.embed_dim
            kv_grads = [block.attn.c_attn.weight.grad[:, C:2 * C], block.attn.c_attn.weight.grad[:, 2 * C:]]
        else:
            kv_grads = [block.self_attn.k_proj.weight.grad, block.self_attn.v_proj.weight.grad]
        assert all(float(g.abs().max()) > 0 for g in kv_grads)
    clip.close()
