"""torch.compile: compiled models are monitored without recompiles or graph breaks on non-logged steps."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch._dynamo.utils import counters

import stabilitylab as sl
from stabilitylab.proxy import ProxyConfig, ProxyTransformer

pytestmark = pytest.mark.slow


def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 256, (4, 16), generator=g), torch.randint(0, 256, (4, 16), generator=g))
            for _ in range(n)]


def _train(model, call, every, attach_after_compile, batches):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    compiled = None
    if attach_after_compile is None:
        mon = sl.Monitor(model, optimizer=opt, every=every)
    elif attach_after_compile:
        compiled = torch.compile(model)
        mon = sl.Monitor(compiled, optimizer=opt, every=every)
    else:
        mon = sl.Monitor(model, optimizer=opt, every=every)
        compiled = torch.compile(model)
    fn = compiled if compiled is not None else model
    graphs = []
    for x, y in batches:
        logged = mon.logging_now
        _, loss = fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        mon.step(loss)
        graphs.append((logged, counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())))
    mon.close()
    return mon.history(), graphs


@pytest.mark.parametrize("attach_after_compile", [True, False])
def test_compiled_model_records_every_metric_without_recompiling(attach_after_compile):
    gc.collect()  # Monitors dropped by earlier tests release the eager stance when collected
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    base = ProxyTransformer(ProxyConfig(d_model=32, n_layers=2, head_dim=16, seq_len=16))
    batches = _batches(7)
    eager_hist, _ = _train(copy.deepcopy(base), None, 3, None, batches)
    hist, graphs = _train(copy.deepcopy(base), None, 3, attach_after_compile, batches)
    # the first non-logged step compiles once; later non-logged steps reuse that graph, no breaks
    non_logged = [(g, b) for logged, g, b in graphs if not logged]
    assert non_logged[0][0] == 1 and all(g == 1 for g, _ in non_logged)
    assert all(b == 0 for _, b in non_logged)
    # logged steps record exactly what the eager model records, with names free of "_orig_mod."
    key = ["step", "metric", "module"]
    a = eager_hist.set_index(key)["value"].sort_index()
    b = hist.set_index(key)["value"].sort_index()
    assert list(a.index) == list(b.index)
    assert not any("_orig_mod" in m for m in hist["module"])
    assert {"attn.max_logit", "act.rms", "logits.lse_mean", "grad.global_norm"} <= set(hist["metric"])
    torch.testing.assert_close(torch.tensor(b.to_numpy()), torch.tensor(a.to_numpy()), rtol=2e-3, atol=1e-5,
                               equal_nan=True)
    # the global compile stance is restored after the run
    from torch._dynamo import eval_frame
    assert eval_frame._stance.stance == "default"
