"""Activation probe vs statistics computed by hand (float64) from forward-hook outputs."""

from __future__ import annotations

import math

import pytest
import torch

from stabilitylab import Monitor
from stabilitylab import metrics as M
from stabilitylab.probes.activations import ActivationProbe, find_blocks


def _reference(h: torch.Tensor) -> dict[str, float]:
    x = h.detach().double().reshape(-1, h.shape[-1])  # (tokens, units)
    n, d = x.shape
    rms = math.sqrt(sum(v * v for v in x.reshape(-1).tolist()) / x.numel())
    ent = 0.0
    for j in range(d):
        col = x[:, j]
        mu = col.sum().item() / n
        var = sum((v - mu) ** 2 for v in col.tolist()) / (n - 1)
        ent += 0.5 * math.log(2 * math.pi * math.e * var)
    kurt = 0.0
    for i in range(n):
        row = x[i]
        mu = row.mean().item()
        m2 = ((row - mu) ** 2).mean().item()
        m4 = ((row - mu) ** 4).mean().item()
        kurt += m4 / m2 ** 2
    return {M.ACT_RMS: rms, M.ACT_BATCH_ENTROPY: ent / d, M.ACT_KURTOSIS: kurt / n}


def test_block_statistics_match_hand_computed_reference(tiny_model, tiny_batch):
    assert find_blocks(tiny_model) == ["blocks.0", "blocks.1"]
    outs = {}
    hooks = [tiny_model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: outs.__setitem__(n, o.detach())) for n in ("blocks.0", "blocks.1")]
    mon = Monitor(tiny_model, every=1, probes=["activations"])
    _, loss = tiny_model(*tiny_batch)
    vals = mon.step(loss)
    mon.close()
    for h in hooks:
        h.remove()
    for name, h in outs.items():
        for metric, ref in _reference(h).items():
            assert vals[(metric, name)] == pytest.approx(ref, rel=1e-5), (metric, name)


def test_explicit_modules_and_stats_selection(tiny_model, tiny_batch):
    probe = ActivationProbe(modules=["ln_f"], stats=("rms",))
    mon = Monitor(tiny_model, every=1, probes=[probe])
    out = {}
    h = tiny_model.ln_f.register_forward_hook(lambda m, a, o: out.__setitem__("h", o.detach()))
    vals = mon.step(tiny_model(*tiny_batch)[1])
    h.remove()
    mon.close()
    assert set(k for k in vals if k[0].startswith("act.")) == {(M.ACT_RMS, "ln_f")}
    assert vals[(M.ACT_RMS, "ln_f")] == pytest.approx(_reference(out["h"])[M.ACT_RMS], rel=1e-5)


def test_bad_arguments_are_named(tiny_model):
    with pytest.raises(ValueError, match="stats"):
        ActivationProbe(stats=("rms", "median"))
    with pytest.raises(ValueError, match="no_such"):
        Monitor(tiny_model, probes=[ActivationProbe(modules=["no_such"])])


def test_nothing_is_recorded_when_not_armed(tiny_model, tiny_batch):
    probe = ActivationProbe().attach(tiny_model)
    probe.arm(False)
    tiny_model(*tiny_batch)
    assert probe.collect() == []
    probe.arm(True)
    tiny_model(*tiny_batch)
    assert {b.metric for b in probe.collect()} == {M.ACT_RMS, M.ACT_BATCH_ENTROPY, M.ACT_KURTOSIS}
    probe.detach()
