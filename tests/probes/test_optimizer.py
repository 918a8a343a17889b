"""Optimizer probe against hand-computed float64 references (pre-clipping gradients, Adam state)."""

from __future__ import annotations

import math

import pytest
import torch

from stabilitylab import Monitor
from stabilitylab import metrics as M
from stabilitylab.probes.optimizer import unwrap_optimizer


def _named(model):
    return [(n, p) for n, p in model.named_parameters()]


def _grad_ref(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().double().clone() for n, p in _named(model) if p.grad is not None}


def _expected(model, opt, grads, before) -> dict[tuple[str, str], float]:
    """Slow float64 reference of every optimizer metric after ``opt.step()``."""
    exp = {}
    total = 0.0
    eps_hits, eps_n = 0, 0
    for n, p in _named(model):
        g, p0, p1 = grads[n], before[n], p.detach().double()
        exp[(M.GRAD_RMS, n)] = math.sqrt((g ** 2).mean().item())
        total += (g ** 2).sum().item()
        exp[(M.PARAM_RMS, n)] = math.sqrt((p1 ** 2).mean().item())
        d = p1 - p0
        exp[(M.UPDATE_RMS, n)] = math.sqrt((d ** 2).mean().item())
        exp[(M.UPDATE_RATIO, n)] = math.sqrt((d ** 2).sum().item() / ((p1 ** 2).sum().item() + p1.numel() * 1e-16))
        st = opt.state[p]
        group = next(gr for gr in opt.param_groups if any(q is p for q in gr["params"]))
        t = float(st["step"])
        v_hat = st["exp_avg_sq"].double() / (1 - group["betas"][1] ** t)
        hits = (v_hat.sqrt() < group["eps"]).sum().item()
        exp[(M.ADAM_EPS_DOMINANCE, n)] = hits / v_hat.numel()
        exp[(M.ADAM_V_RMS, n)] = math.sqrt(v_hat.mean().item())
        eps_hits += hits
        eps_n += v_hat.numel()
    exp[(M.GRAD_GLOBAL_NORM, "")] = math.sqrt(total)
    exp[(M.ADAM_EPS_DOMINANCE, "")] = eps_hits / eps_n
    exp[(M.LR, "")] = opt.param_groups[0]["lr"]
    exp[(M.HEALTH_NONFINITE, "grad")] = 0.0
    return exp


def _compare(got, exp, rel=2e-5):
    for key, v in exp.items():
        assert key in got, f"missing {key}"
        assert got[key] == pytest.approx(v, rel=rel, abs=1e-7), key


def _params_before(model):
    return {n: p.detach().double().clone() for n, p in _named(model)}


@pytest.fixture
def setup(tiny_model):
    # eps large enough that some (not all) elements are eps-dominated, so the share can be wrong.
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=3e-3, weight_decay=0.1)
    return tiny_model, opt


def test_per_tensor_and_global_metrics_match_float64_reference_before_clipping(setup, tiny_batch):
    model, opt = setup
    x, y = tiny_batch
    mon = Monitor(model, optimizer=opt, every=1, probes=["optimizer"])
    for _ in range(3):
        _, loss = model(x, y)
        loss.backward()
        grads, before = _grad_ref(model), _params_before(model)
        clipped_to = 0.05 * math.sqrt(sum((g ** 2).sum().item() for g in grads.values()))
        torch.nn.utils.clip_grad_norm_(model.parameters(), clipped_to)  # clips hard: must not be seen
        opt.step()
        exp = _expected(model, opt, grads, before)
        opt.zero_grad()
        got = mon.step(loss)
        _compare(got, exp)
        assert got[(M.GRAD_GLOBAL_NORM, "")] > 10 * clipped_to
    dom = exp[(M.ADAM_EPS_DOMINANCE, "")]
    assert 0.0 < dom < 1.0, "test setup: eps dominance should be strictly between 0 and 1"
    mon.close()


def test_gradient_accumulation_records_the_accumulated_unclipped_gradient(setup, tiny_cfg):
    model, opt = setup
    g = torch.Generator().manual_seed(1)
    mon = Monitor(model, optimizer=opt, every=1, probes=["optimizer"])
    for _ in range(2):
        for _micro in range(3):
            x = torch.randint(0, 256, (2, tiny_cfg.seq_len), generator=g)
            _, loss = model(x, x)
            (loss / 3).backward()
        grads, before = _grad_ref(model), _params_before(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        opt.step()
        exp = _expected(model, opt, grads, before)
        opt.zero_grad()
        _compare(mon.step(loss), exp)
    mon.close()


def test_closure_step_with_backward_and_clipping_inside_the_closure(setup, tiny_batch):
    model, opt = setup
    x, y = tiny_batch
    mon = Monitor(model, optimizer=opt, every=1, probes=["optimizer"])
    seen = {}

    def closure():
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        seen["grads"] = _grad_ref(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        return loss

    for _ in range(2):
        before = _params_before(model)
        loss = opt.step(closure)
        exp = _expected(model, opt, seen["grads"], before)
        _compare(mon.step(loss), exp)
    mon.close()


class _Wrapper:
    """Like accelerate's AcceleratedOptimizer / Lightning's LightningOptimizer: holds ``.optimizer``."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self, closure=None):
        return self.optimizer.step(closure)

    def zero_grad(self):
        self.optimizer.zero_grad()


def test_wrapped_optimizer_is_unwrapped(setup, tiny_batch):
    model, opt = setup
    wrapped = _Wrapper(_Wrapper(opt))
    assert unwrap_optimizer(wrapped) is opt
    x, y = tiny_batch
    mon = Monitor(model, optimizer=wrapped, every=1, probes=["optimizer"])
    _, loss = model(x, y)
    loss.backward()
    grads, before = _grad_ref(model), _params_before(model)
    wrapped.step()
    exp = _expected(model, opt, grads, before)
    wrapped.zero_grad()
    _compare(mon.step(loss), exp)
    mon.close()


def test_non_optimizer_is_rejected_with_the_argument_named(tiny_model):
    with pytest.raises(TypeError, match="optimizer"):
        Monitor(tiny_model, optimizer=object(), probes=["optimizer"])


def test_non_logged_steps_register_no_grad_hooks_and_compute_nothing(setup, tiny_batch, monkeypatch):
    model, opt = setup
    x, y = tiny_batch
    mon = Monitor(model, optimizer=opt, every=3, probes=["optimizer"])
    probe = mon.probe("optimizer")
    calls = []
    real = torch._foreach_norm
    monkeypatch.setattr(torch, "_foreach_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    per_step = []
    for step in range(7):
        assert bool(probe._grad_hooks) == (step % 3 == 0)
        n0 = len(calls)
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert (probe._before is None) or step % 3 == 0
        out = mon.step(loss)
        per_step.append(len(calls) - n0)
        assert (out is None) == (step % 3 != 0)
    assert all(c == 0 for i, c in enumerate(per_step) if i % 3), per_step
    assert all(c > 0 for i, c in enumerate(per_step) if i % 3 == 0), per_step
    mon.close()
    assert probe._grad_hooks == [] and not probe.attached


def _tiny_hf_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                      bos_token_id=0, eos_token_id=0, attn_implementation="eager"))


@pytest.mark.parametrize("family", ["proxy", "hf_gpt2"])
def test_zero_initialised_tensors_get_a_finite_update_ratio_and_no_health_event_at_step_0(family, tiny_cfg):
    from stabilitylab.proxy import ProxyTransformer

    model = ProxyTransformer(tiny_cfg) if family == "proxy" else _tiny_hf_gpt2()
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = _params_before(model)
    zero = [n for n, p in before.items() if not p.any()]
    with Monitor(model, optimizer=opt, every=1) as mon:  # the default probes, health included
        loss = model(x, x)[1] if family == "proxy" else model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        mon.step(loss)
        h = mon.history()
        assert mon.events == []
    assert h[(h.metric == M.HEALTH_NONFINITE) & (h.module == "metrics")]["value"].tolist() == [0.0]
    ratio = h[h.metric == M.UPDATE_RATIO].set_index("module")["value"]
    assert set(ratio.index) == set(before) and ratio.map(math.isfinite).all()
    for n, p in _named(model):  # float64 reference: ||dp|| / sqrt(||p_after||^2 + n * 1e-16)
        p1 = p.detach().double()
        d = p1 - before[n]
        want = math.sqrt((d ** 2).sum().item() / ((p1 ** 2).sum().item() + p1.numel() * 1e-16))
        assert ratio[n] == pytest.approx(want, rel=2e-5, abs=1e-9), n
    if family == "hf_gpt2":
        assert len(zero) >= 8  # every bias and LayerNorm bias starts at zero; its first update is all of it
        assert all(ratio[n] == pytest.approx(1.0, rel=1e-6) for n in zero)
