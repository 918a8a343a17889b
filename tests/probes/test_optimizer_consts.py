"""The optimizer probe builds its per-tensor constants once: a logged step makes no host-to-device copy.

On CUDA every ``torch.tensor(list, device=...)`` is a blocking host-to-device copy (a sync under
``torch.cuda.set_sync_debug_mode("error")``); here, on CPU, the probe's ``torch.tensor`` calls are counted
and the cached tensors are checked to be the same objects from one logged step to the next, while the
values still match a float64 reference with two parameter groups of different betas and eps.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import stabilitylab.probes.optimizer as optimizer_module
from stabilitylab import Monitor
from stabilitylab import metrics as M


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    opt = torch.optim.AdamW([{"params": model[0].parameters(), "betas": (0.9, 0.95), "eps": 1e-3},
                             {"params": model[2].parameters(), "betas": (0.8, 0.999), "eps": 1e-8}], lr=1e-2)
    mon = Monitor(model, optimizer=opt, every=1, probes=["optimizer"])
    return model, opt, mon


def _train_step(model, opt, mon):
    x = torch.randn(4, 6)
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return mon.step()


@pytest.fixture
def tensor_calls(monkeypatch):
    """Count ``torch.tensor`` calls made from the optimizer probe's module."""
    calls = []
    real = torch.tensor

    def counting(*args, **kwargs):
        if inspect.currentframe().f_back.f_code.co_filename == optimizer_module.__file__:
            calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", counting)
    return calls


def test_logged_steps_after_the_first_build_no_tensor_from_host_lists(tensor_calls):
    model, opt, mon = _setup()
    _train_step(model, opt, mon)
    assert tensor_calls, "the first logged step builds the constants"
    cached = {k: v for k, v in mon.probe("optimizer")._consts.items()}
    tensor_calls.clear()
    for _ in range(3):
        _train_step(model, opt, mon)
    assert tensor_calls == []
    consts = mon.probe("optimizer")._consts
    assert consts.keys() == cached.keys()
    assert all(consts[k] is cached[k] for k in cached)  # the very same device tensors, reused
    mon.close()


def test_cached_constants_give_the_float64_adam_values_and_follow_a_changed_eps():
    model, opt, mon = _setup()
    for step in range(3):
        if step == 2:
            opt.param_groups[1]["eps"] = 1e-2  # a new layout: rebuilt, not the stale eps
        vals = _train_step(model, opt, mon)
        hits = n = 0
        for g in opt.param_groups:
            for name, p in model.named_parameters():
                if not any(q is p for q in g["params"]):
                    continue
                st = opt.state[p]
                v_hat = st["exp_avg_sq"].double() / (1 - g["betas"][1] ** float(st["step"]))
                h = int((v_hat.sqrt() < g["eps"]).sum())
                assert vals[(M.ADAM_EPS_DOMINANCE, name)] == pytest.approx(h / p.numel(), abs=1e-12)
                assert vals[(M.ADAM_V_RMS, name)] == pytest.approx(float(v_hat.mean().sqrt()), rel=1e-5)
                hits, n = hits + h, n + p.numel()
        assert vals[(M.ADAM_EPS_DOMINANCE, "")] == pytest.approx(hits / n, abs=1e-12)
    mon.close()
