"""Output-logit probe vs torch.logsumexp in float64 on the proxy's output."""

from __future__ import annotations

import pytest
import torch

from stabilitylab import Monitor
from stabilitylab import metrics as M
from stabilitylab.probes.logits import LogitsProbe, find_logits


def _reference(logits: torch.Tensor) -> dict[str, float]:
    lse = torch.logsumexp(logits.detach().double(), dim=-1).reshape(-1)
    return {M.LOGITS_LSE_MEAN: lse.mean().item(), M.LOGITS_LSE_STD: lse.std().item(),
            M.LOGITS_MAX: logits.detach().double().max().item()}


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_lse_stats_match_float64_logsumexp_on_the_proxy_output(tiny_cfg, tiny_batch, softcap):
    from stabilitylab.proxy import ProxyTransformer

    tiny_cfg.logit_softcap = softcap
    torch.manual_seed(1)
    model = ProxyTransformer(tiny_cfg)
    with torch.no_grad():  # larger logits than at init, so the std is not dominated by rounding
        model.lm_head.weight.mul_(4.0)
    mon = Monitor(model, every=1, probes=["logits"])
    logits, loss = model(*tiny_batch)
    vals = mon.step(loss)
    mon.close()
    for metric, ref in _reference(logits).items():
        assert vals[(metric, "")] == pytest.approx(ref, rel=1e-5), metric


def test_observe_in_float64_is_exact_and_single_token_std_is_zero():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 7, 11, generator=g, dtype=torch.float64) * 3 + 100  # large log Z, small spread
    probe = LogitsProbe()
    probe.observe(z)
    blocks = {b.metric: (b.num / b.weight).item() if b.metric != M.LOGITS_MAX else b.num.item()
              for b in probe.collect()}
    for metric, ref in _reference(z).items():
        assert blocks[metric] == pytest.approx(ref, rel=1e-12), metric
    probe.observe(z[:1, :1])
    std = next(b for b in probe.collect() if b.metric == M.LOGITS_LSE_STD)
    assert std.num.item() == 0.0


def test_module_argument_reads_a_submodule_and_bad_name_is_named(tiny_model, tiny_batch):
    mon = Monitor(tiny_model, every=1, probes=[LogitsProbe(module="lm_head")])
    x, y = tiny_batch
    seen = []
    h = tiny_model.lm_head.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    vals = mon.step(tiny_model(x, y)[1])
    h.remove()
    mon.close()
    assert vals[(M.LOGITS_MAX, "")] == pytest.approx(_reference(seen[0])[M.LOGITS_MAX], rel=1e-6)
    with pytest.raises(ValueError, match="nope"):
        Monitor(tiny_model, probes=[LogitsProbe(module="nope")])


def test_find_logits_handles_common_output_types():
    z = torch.randn(2, 3, 5)
    assert find_logits(z) is z
    assert find_logits((z, torch.tensor(1.0))) is z
    assert find_logits({"logits": z}) is z

    class Out:
        logits = z

    assert find_logits(Out()) is z
    assert find_logits(torch.tensor(1.0)) is None


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                       bos_token_id=0, eos_token_id=0, attn_implementation="eager"))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(20.0)  # (tied head) a spread of log Z the pad positions would shift
    return model


def _padded_batch():
    """Token ids, an attention mask (right and left padding) and labels with -100 at pads and one prompt."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 64, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 7:] = 0  # right padding
    mask[1, :4] = 0  # left padding
    labels = x.masked_fill(mask == 0, -100)
    labels[2, :3] = -100  # a prompt the loss ignores
    return x, mask, labels


def _reference_over(logits: torch.Tensor, counted: torch.Tensor) -> dict[str, float]:
    z = logits.detach().double()[counted]
    lse = torch.logsumexp(z, dim=-1)
    return {M.LOGITS_LSE_MEAN: lse.mean().item(), M.LOGITS_LSE_STD: lse.std().item(),
            M.LOGITS_MAX: z.max().item()}


def _one_step(model, probe, **kwargs):
    seen = []
    h = model.register_forward_hook(lambda m, a, o: seen.append(o.logits.detach()))
    mon = Monitor(model, every=1, probes=[probe])
    out = model(**kwargs)
    vals = mon.step(out.loss if out.loss is not None else None)
    mon.close()
    h.remove()
    return vals, seen[0]


def _assert_matches(vals, ref, rel=1e-5):
    for metric, want in ref.items():
        assert vals[(metric, "")] == pytest.approx(want, rel=rel), metric


def test_causal_lm_counts_the_positions_its_shifted_loss_scores():
    model = _tiny_gpt2()
    x, mask, labels = _padded_batch()
    vals, logits = _one_step(model, LogitsProbe(), input_ids=x, attention_mask=mask, labels=labels)
    # the loss scores logits[t] against labels[t + 1]; the last position is never scored
    counted = torch.zeros_like(labels, dtype=torch.bool)
    counted[:, :-1] = labels[:, 1:] != -100
    ref = _reference_over(logits, counted)
    _assert_matches(vals, ref)
    everywhere = _reference(logits)
    assert abs(everywhere[M.LOGITS_LSE_MEAN] - ref[M.LOGITS_LSE_MEAN]) > 1e-3 * abs(ref[M.LOGITS_LSE_MEAN])
    # the same loss, computed by transformers over the same positions, as a cross-check of the rule
    logp = torch.log_softmax(logits.double(), -1)[:, :-1]
    nll = -logp.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert vals[(M.LOSS, "")] == pytest.approx(nll[counted[:, :-1]].mean().item(), rel=1e-5)


def test_attention_mask_alone_excludes_padding_even_when_passed_positionally():
    model = _tiny_gpt2()
    x, mask, _ = _padded_batch()
    seen = []
    h = model.register_forward_hook(lambda m, a, o: seen.append(o.logits.detach()))
    mon = Monitor(model, every=1, probes=["logits"])
    model(x, None, mask)  # GPT2LMHeadModel.forward(input_ids, cache, attention_mask, ...)
    vals = mon.step()
    mon.close()
    h.remove()
    _assert_matches(vals, _reference_over(seen[0], mask.bool()))


def test_masked_lm_labels_are_not_shifted():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=16))
    x, mask, _ = _padded_batch()
    labels = torch.full_like(x, -100)
    labels[:, [1, 4, 8]] = x[:, [1, 4, 8]]  # the masked positions the MLM loss scores
    vals, logits = _one_step(model, LogitsProbe(), input_ids=x, attention_mask=mask, labels=labels)
    _assert_matches(vals, _reference_over(logits, labels != -100))


def test_without_labels_or_mask_every_position_counts():
    model = _tiny_gpt2()
    x, _, _ = _padded_batch()
    vals, logits = _one_step(model, LogitsProbe(), input_ids=x)
    _assert_matches(vals, _reference(logits))


def test_loss_mask_block_sets_the_positions_for_a_plain_loop_and_bad_input_is_named():
    import stabilitylab as sl

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(64, 16), torch.nn.Linear(16, 64))
    with torch.no_grad():
        model[1].weight.mul_(10.0)
    x, mask, _ = _padded_batch()
    mon = Monitor(model, every=1, probes=["logits"])
    with sl.loss_mask(mask.bool()):
        logits = model(x)
    vals = mon.step()
    _assert_matches(vals, _reference_over(logits, mask.bool()))
    # two micro-batches in one logged step: the mean is over the counted positions of both
    with sl.loss_mask(mask[:1].bool()):
        first = model(x[:1])
    with sl.loss_mask(mask[1:].bool()):
        second = model(x[1:])
    vals = mon.step()
    both = torch.cat([first, second])
    ref = _reference_over(both, mask.bool())
    for metric in (M.LOGITS_LSE_MEAN, M.LOGITS_MAX):
        assert vals[(metric, "")] == pytest.approx(ref[metric], rel=1e-5), metric
    with pytest.warns(UserWarning, match="shape"), sl.loss_mask(mask[:, :5].bool()):
        logits = model(x)
    _assert_matches(mon.step(), _reference(logits))  # a mis-shaped mask falls back to every position
    mon.close()
    with pytest.raises(TypeError, match="loss_mask"), sl.loss_mask(mask.float()):
        pass
    with pytest.raises(TypeError, match="ignore_index"):
        LogitsProbe(ignore_index=None)
