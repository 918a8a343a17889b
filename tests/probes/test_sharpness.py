"""Preconditioned sharpness: power iteration vs dense eigenvalues of P^-1 H (quadratic and a tiny net)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stabilitylab import Monitor
from stabilitylab.probes.sharpness import SharpnessProbe, top_eigenvalue


def _dense_top(h: np.ndarray, p_diag: np.ndarray) -> float:
    ev = np.linalg.eigvals(np.diag(1.0 / p_diag) @ h)
    return float(ev[np.argmax(np.abs(ev))].real)


def _adam_p(opt: torch.optim.Adam, params) -> np.ndarray:
    beta2, eps = opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]
    out = []
    for p in params:
        st = opt.state[p]
        v_hat = st["exp_avg_sq"].double() / (1 - beta2 ** float(st["step"]))
        out.append((v_hat.sqrt() + eps).reshape(-1).numpy())
    return np.concatenate(out)


def test_power_iteration_top_eigenvalue_of_known_symmetric_matrix():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a = torch.tensor(q @ np.diag([5.0, 2.0, 1.0, 0.5, -0.3, 0.1]) @ q.T)
    lam = top_eigenvalue(lambda v: [a @ v[0]], [torch.zeros(6, dtype=torch.float64)], iters=500, tol=1e-12)
    assert lam == pytest.approx(5.0, rel=1e-6)


def test_quadratic_loss_matches_dense_preconditioned_eigenvalue_and_threshold():
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    m = rng.normal(size=(5, 5))
    a = torch.tensor(m @ m.T + np.eye(5), dtype=torch.float64)
    model = torch.nn.Module()
    model.theta = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.8, 0.95))
    probe = SharpnessProbe(loss_fn=lambda: 0.5 * model.theta @ a @ model.theta, every=1, iters=300, tol=1e-12)
    mon = Monitor(model, optimizer=opt, every=1, probes=[probe])
    for _ in range(2):
        loss = 0.5 * model.theta @ a @ model.theta
        loss.backward()
        opt.step()
        opt.zero_grad()
        vals = mon.step(loss)
    expected = _dense_top(a.numpy(), _adam_p(opt, [model.theta]))
    assert vals[("sharpness.preconditioned", "")] == pytest.approx(expected, rel=1e-6)
    assert vals[("sharpness.threshold", "")] == pytest.approx((2 + 2 * 0.8) / (0.2 * 3e-3))
    mon.close()


def test_tiny_network_matches_dense_hessian_and_replay_equals_closure():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, inp, target):
            out = self.net(inp)
            return out, torch.nn.functional.cross_entropy(out, target)

    model = Wrapped()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    closure = SharpnessProbe(loss_fn=lambda: model(x, y)[1], every=1, iters=2000, tol=1e-12, seed=3)
    replay = SharpnessProbe(every=1, iters=2000, tol=1e-12, seed=3)
    mons = [Monitor(model, optimizer=opt, every=1, probes=[p]) for p in (closure, replay)]
    for _ in range(2):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        got = [m.step(loss)[("sharpness.preconditioned", "")] for m in mons]
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def loss_of(v):
        chunks, i = [], 0
        for p in params:
            chunks.append(v[i:i + p.numel()].view_as(p))
            i += p.numel()
        out = torch.func.functional_call(model, {n: c for (n, _), c in zip(model.named_parameters(), chunks)},
                                         (x, y))
        return out[1]

    h = torch.autograd.functional.hessian(loss_of, flat).numpy()
    expected = _dense_top(h, _adam_p(opt, params))
    assert got[0] == pytest.approx(expected, rel=1e-5)
    assert got[1] == pytest.approx(expected, rel=1e-5)
    for m in mons:
        m.close()


def test_registry_name_works_on_proxy_and_does_not_disturb_other_probes(tiny_cfg, tiny_batch):
    from stabilitylab.proxy import ProxyTransformer

    records = []
    for probes in (["attention"], ["attention", "sharpness"]):
        torch.manual_seed(0)
        model = ProxyTransformer(tiny_cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        mon = Monitor(model, optimizer=opt, every=1, probes=probes)
        for _ in range(2):
            _, loss = model(*tiny_batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            mon.step(loss)
        mon.close()
        records.append(mon.history())
    base, both = records
    a = base[base.metric == "attn.max_logit"].sort_values(["step", "module"])["value"].to_numpy()
    b = both[both.metric == "attn.max_logit"].sort_values(["step", "module"])["value"].to_numpy()
    np.testing.assert_allclose(a, b, rtol=1e-6)
    sharp = both[both.metric == "sharpness.preconditioned"]
    assert sharp["step"].tolist() == [0] and np.isfinite(sharp["value"]).all()  # default: every 10th logged step


def test_sharpness_needs_optimizer_and_checks_args():
    with pytest.raises(ValueError, match="every"):
        SharpnessProbe(every=0)
    with pytest.raises(TypeError, match="loss_fn"):
        SharpnessProbe(loss_fn=3)
    with pytest.raises(ValueError, match="optimizer"):
        Monitor(torch.nn.Linear(2, 2), probes=[SharpnessProbe(loss_fn=lambda: torch.zeros(()))])


class _CountingCache:
    """A KV cache by duck typing that counts how often a forward appends to it."""

    def __init__(self):
        self.updates = 0

    def update(self, key, value, layer_idx=0):
        self.updates += 1
        return key, value

    def get_seq_length(self, layer_idx=0):
        return self.updates


class _CachedRegression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        self.replay_use_cache = []

    def forward(self, x, y, kv=None, use_cache=False):
        if kv is not None:
            kv.update(x, x)
        self.replay_use_cache.append(use_cache)
        return ((self.lin(x) - y) ** 2).mean()


def test_replay_never_extends_a_live_kv_cache():
    torch.manual_seed(0)
    model = _CachedRegression()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y, cache = torch.randn(8, 4), torch.randn(8, 1), _CountingCache()
    with Monitor(model, optimizer=opt, every=1, probes=[SharpnessProbe(every=1)]) as mon:
        for _ in range(3):
            loss = model(x, y, kv=cache, use_cache=True)
            loss.backward()
            opt.step()
            opt.zero_grad()
            mon.step(loss)
        h = mon.history()
    sharp = h[h.metric == "sharpness.preconditioned"]
    assert len(sharp) == 3 and np.isfinite(sharp["value"]).all()  # the replay ran on every logged step
    assert cache.updates == 3  # the training forwards only
    assert model.replay_use_cache.count(False) == 3  # each replay ran with use_cache=False
