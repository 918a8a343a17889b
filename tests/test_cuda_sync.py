"""No hidden host syncs on CUDA: a logged and a non-logged step under
``torch.cuda.set_sync_debug_mode("error")``. The one deliberate device -> host transfer of a logged step
(``_runtime.to_host``) is exempt; any other sync raises, and a sync inside a probe hook (which the
probe's guard turns into a ``probe_error`` event) fails the test too."""

from __future__ import annotations

import warnings

import pytest
import torch

import stabilitylab as sl
from stabilitylab.proxy import ProxyTransformer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _loop(model, opt, x, y, mon=None):
    _, loss = model(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return mon.step(loss) if mon is not None else None


def _strict(fn):
    """``fn()`` with every CUDA sync an error and every warning an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.cuda.set_sync_debug_mode("error")
        try:
            return fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("probes", [["activations", "logits", "attention", "health"], "default"])
def test_a_logged_and_a_non_logged_step_make_no_hidden_sync(tiny_cfg, probes):
    torch.manual_seed(0)
    model = ProxyTransformer(tiny_cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)  # step counts stay on the device
    x = torch.randint(0, tiny_cfg.vocab_size, (4, tiny_cfg.seq_len), device="cuda")
    y = torch.randint(0, tiny_cfg.vocab_size, (4, tiny_cfg.seq_len), device="cuda")
    _loop(model, opt, x, y)
    _strict(lambda: _loop(model, opt, x, y))  # control: the training loop itself does not sync
    mon = sl.Monitor(model, optimizer=opt, every=2, probes=probes)
    for _ in range(4):  # warm-up: per-device constants, optimizer state
        _loop(model, opt, x, y, mon)
    assert mon.logging_now
    logged, unlogged = _strict(lambda: (_loop(model, opt, x, y, mon), _loop(model, opt, x, y, mon)))
    assert logged is not None and unlogged is None
    assert logged[("loss", "")] > 0
    assert not [e for e in mon.events if e.kind == "probe_error"], [e.message for e in mon.events]
    mon.close()
