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
