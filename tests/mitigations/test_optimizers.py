import math

import pytest
import torch

from stabilitylab import Monitor
from stabilitylab.mitigations import AdamAtan2, AdamWIndependentWD, warmup_cosine
from stabilitylab.proxy import ProxyConfig, ProxyTransformer


def _grads(n_steps: int, shape=(5, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n_steps)]
    out[1][0, 0] = 0.0  # a zero gradient entry (atan2(0, x) = 0)
    return out


def _atan2_reference(p0, grads, lr, betas, wd, a, b):
    """The update written out directly in float64."""
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for t, g in enumerate(grads, start=1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        p = p * (1 - lr * wd)
        p = p - lr * a * torch.atan2(m_hat, b * torch.sqrt(v_hat))
    return p


def _run(opt_cls, p0, grads, **kw):
    p = torch.nn.Parameter(p0.clone())
    opt = opt_cls([p], **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt


@pytest.mark.parametrize("wd,a,b", [(0.0, 1.27, 1.0), (0.1, 1.0, 2.0)])
def test_adam_atan2_matches_direct_formula_elementwise(wd, a, b):
    p0 = torch.randn(5, 4, dtype=torch.float64)
    grads = _grads(6)
    got, _ = _run(AdamAtan2, p0, grads, lr=0.05, betas=(0.9, 0.95), weight_decay=wd, a=a, b=b)
    torch.testing.assert_close(got, _atan2_reference(p0, grads, 0.05, (0.9, 0.95), wd, a, b), rtol=1e-12, atol=1e-14)


def test_adam_atan2_matches_the_adam_atan2_pytorch_package():
    pkg = pytest.importorskip("adam_atan2_pytorch")
    p0 = torch.randn(5, 4, dtype=torch.float64)
    grads = _grads(6, seed=3)
    ours, _ = _run(AdamAtan2, p0, grads, lr=0.01, weight_decay=0.05)
    theirs, _ = _run(pkg.AdamAtan2, p0, grads, lr=0.01, weight_decay=0.05)  # same defaults
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    ours, _ = _run(AdamAtan2, p0, grads, lr=0.03, betas=(0.8, 0.95), a=2.0, b=0.5)
    theirs, _ = _run(pkg.AdamAtan2, p0, grads, lr=0.03, betas=(0.8, 0.95), a=2.0, b=0.5)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


def test_adam_atan2_state_dict_round_trip_continues_identically():
    p0 = torch.randn(5, 4, dtype=torch.float64)
    grads = _grads(6)
    full, _ = _run(AdamAtan2, p0, grads, lr=0.05)
    half, opt = _run(AdamAtan2, p0, grads[:3], lr=0.05)
    p = torch.nn.Parameter(half.clone())
    opt2 = AdamAtan2([p], lr=0.9)  # overwritten by the loaded hyperparameters
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["lr"] == 0.05
    for g in grads[3:]:
        p.grad = g.clone()
        opt2.step()
    torch.testing.assert_close(p.detach(), full, rtol=0, atol=0)


def test_optimizers_reject_bad_arguments():
    p = [torch.nn.Parameter(torch.zeros(2))]
    for kw, word in [({"lr": -1.0}, "lr"), ({"betas": (0.9, 1.5)}, "betas"), ({"a": 0.0}, "a="),
                     ({"weight_decay": float("nan")}, "weight_decay")]:
        with pytest.raises(ValueError, match=word):
            AdamAtan2(p, **kw)
    with pytest.raises(ValueError, match="eps"):
        AdamWIndependentWD(p, eps=float("inf"))


@pytest.mark.parametrize("lr", [1e-3, 1e-1])
@pytest.mark.parametrize("make", [
    lambda ps, lr, lam: AdamWIndependentWD(ps, lr=lr, weight_decay=lam),
    lambda ps, lr, lam: AdamAtan2(ps, lr=lr, weight_decay=lam, independent_wd=True),
])
def test_independent_wd_decays_by_lambda_times_schedule_factor(lr, make):
    """With zero gradients the Adam / atan2 update is 0, so the parameter only decays: prod(1 - lambda * s_t)."""
    lam, steps = 0.01, 12
    p = torch.nn.Parameter(torch.full((3,), 2.0, dtype=torch.float64))
    opt = make([p], lr, lam)
    sched = warmup_cosine(opt, warmup=3, total=steps, floor=0.1)
    want = 2.0
    for _ in range(steps):
        want *= 1 - lam * opt.param_groups[0]["lr"] / lr
        p.grad = torch.zeros_like(p)
        opt.step()
        sched.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), want, dtype=torch.float64))
    assert opt.param_groups[0]["weight_decay"] == lam  # restored after each step


def test_independent_wd_gradient_part_is_plain_adamw():
    p0, grads = torch.randn(5, 4, dtype=torch.float64), _grads(4)
    ours, _ = _run(AdamWIndependentWD, p0, grads, lr=0.02, weight_decay=0.0, eps=1e-8)
    ref, _ = _run(torch.optim.AdamW, p0, grads, lr=0.02, weight_decay=0.0)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def _update_rms(make_opt, scale: float, steps: int = 4):
    """Mean update.rms over tensors and steps, and whole-model eps dominance, of a tiny proxy with loss x scale."""
    torch.manual_seed(0)
    model = ProxyTransformer(ProxyConfig(d_model=32, n_layers=1, head_dim=16, seq_len=16))
    opt = make_opt(model.parameters())
    g = torch.Generator().manual_seed(0)
    with Monitor(model, optimizer=opt, every=1, probes=["optimizer"]) as mon:
        for _ in range(steps):
            x = torch.randint(0, 256, (4, 17), generator=g)
            loss = model(x[:, :-1], x[:, 1:])[1] * scale
            loss.backward()
            opt.step()
            opt.zero_grad()
            mon.step(loss)
        h = mon.history()
    per = h[(h["metric"] == "update.rms")]["value"].mean()
    grad = (h[h["metric"] == "grad.rms"]["value"] ** 2).mean() ** 0.5
    dom = h[(h["metric"] == "adam.eps_dominance") & (h["module"] == "")]["value"]
    return per, grad, (dom.mean() if len(dom) else math.nan)


def test_adam_eps_dominance_shrinks_updates_and_eps_1e15_or_atan2_fix_it():
    def adamw(eps):
        return lambda ps: torch.optim.AdamW(ps, lr=1e-3, betas=(0.9, 0.95), eps=eps, weight_decay=0.0)

    _, g_rms, _ = _update_rms(adamw(1e-8), 1.0)
    scale = 1e-9 / g_rms  # gradients down to ~1e-9 RMS
    ref, _, dom_ref = _update_rms(adamw(1e-8), 1.0)
    small, g_small, dom_small = _update_rms(adamw(1e-8), scale)
    fixed, _, dom_fixed = _update_rms(adamw(1e-15), scale)
    atan_ref, _, _ = _update_rms(lambda ps: AdamAtan2(ps, lr=1e-3), 1.0)
    atan, _, _ = _update_rms(lambda ps: AdamAtan2(ps, lr=1e-3), scale)
    assert 3e-10 < g_small < 3e-9
    print(f"grad rms {g_small:.2e}; eps dominance {dom_small:.3f} (1e-8) vs {dom_fixed:.3f} (1e-15) vs "
          f"{dom_ref:.3f} (unscaled); update rms {small:.3e} vs {fixed:.3e} vs {ref:.3e}; atan2 {atan:.3e} vs {atan_ref:.3e}")
    # the unscaled share is the embedding rows of bytes absent from the batches (v = 0 exactly)
    assert dom_small > 0.95 and dom_ref < 0.3 and dom_fixed == pytest.approx(dom_ref, abs=1e-3)
    assert small < 0.2 * ref  # measured ~0.06x
    assert fixed == pytest.approx(ref, rel=1e-2)
    assert atan == pytest.approx(atan_ref, rel=1e-2)
