"""Fast paths of the probes against slow, obvious references (values only; timings live in benchmarks/)."""

from __future__ import annotations

import math

import pytest
import torch

import stabilitylab as sl
from stabilitylab import functional as F
from stabilitylab import metrics as M


def _poison(t: torch.Tensor, n: int, g: torch.Generator) -> None:
    """Set ``n`` random elements of ``t`` to NaN, +Inf or -Inf (in place)."""
    flat = t.view(-1)
    idx = torch.randperm(flat.numel(), generator=g)[:n]
    vals = torch.tensor([math.nan, math.inf, -math.inf], dtype=t.dtype)
    flat[idx] = vals[torch.arange(n) % 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_nonfinite_counts_equal_a_per_tensor_isfinite_loop(dtype):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, generator=g).to(dtype) for s in [(7, 5), (3,), (4, 2, 6), (1,)]]
    for t, n in zip(tensors, [9, 0, 30, 1]):
        _poison(t, n, g)
    tensors.append(torch.full((5,), 3e38, dtype=torch.float32).to(dtype))  # large but finite (fp16: inf)
    ref = [float((~torch.isfinite(t)).sum()) for t in tensors]
    got = F.nonfinite_counts(tensors)
    assert got.tolist() == ref
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_nonfinite_counts_skip_integer_tensors_and_keep_positions():
    t = torch.tensor([1.0, math.nan, math.inf])
    got = F.nonfinite_counts([torch.arange(4), t, torch.zeros(2, dtype=torch.bool), t[:1]])
    assert got.tolist() == [0.0, 2.0, 0.0, 0.0]
    assert F.nonfinite_counts([]).numel() == 0


@pytest.mark.parametrize("chunk", [1, 7, 50, 1 << 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_chunked_lse_stats_match_float64_logsumexp(chunk, dtype):
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(3, 5, 11, generator=g) * 20 + 40).to(dtype)
    lse = torch.logsumexp(z.double(), -1).reshape(-1)
    mean, std, mx = F.lse_stats(z, chunk_elements=chunk)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert mean.item() == pytest.approx(lse.mean().item(), rel=tol)
    assert std.item() == pytest.approx(lse.std().item(), rel=tol * 10)
    assert mx.item() == z.double().max().item()


def test_chunked_lse_stats_propagate_nan_and_inf_like_logsumexp():
    z = torch.randn(4, 6)
    z[0] = -math.inf
    z[1, 2] = math.inf
    mean, std, mx = F.lse_stats(z, chunk_elements=6)
    assert math.isnan(mean.item()) and math.isnan(std.item()) and mx.item() == math.inf
    z[2, 0] = math.nan
    assert math.isnan(F.lse_stats(z, chunk_elements=12)[2].item())


def test_kurtosis_matches_float64_moments():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(3, 9, 17, generator=g) ** 3 + 0.5
    x = h.double()
    c = x - x.mean(-1, keepdim=True)
    ref = ((c ** 4).mean(-1) / (c ** 2).mean(-1) ** 2).mean()
    assert F.kurtosis(h).item() == pytest.approx(ref.item(), rel=1e-5)


def test_activation_probe_statistics_of_bf16_input_match_float64_reference():
    probe = sl.probes.ActivationProbe(modules=[])
    probe.armed = True
    g = torch.Generator().manual_seed(3)
    h = (torch.randn(2, 12, 16, generator=g) * 3).to(torch.bfloat16)
    probe.observe("b", h)
    got = {b.metric: (b.num.double() / b.weight.double()).item() for b in probe.collect()}
    x = h.double().reshape(-1, 16)
    c = x - x.mean(-1, keepdim=True)
    assert got[M.ACT_RMS] == pytest.approx(x.pow(2).mean().item(), rel=1e-5)  # mean of squares partial
    assert got[M.ACT_KURTOSIS] == pytest.approx(((c ** 4).mean(-1) / (c ** 2).mean(-1) ** 2).mean().item(),
                                                rel=1e-5)
    var = x.var(0).clamp_min(1e-12)
    assert got[M.ACT_BATCH_ENTROPY] == pytest.approx((0.5 * torch.log(2 * math.pi * math.e * var)).mean().item(),
                                                     rel=1e-5)


def _reference_adam(opt: torch.optim.Optimizer, names: dict) -> tuple[dict, float]:
    """Per-tensor (eps dominance share, v_hat RMS) and the whole-model share, one tensor at a time."""
    per, hit, total = {}, 0, 0
    for grp in opt.param_groups:
        b2, eps = grp["betas"][1], grp["eps"]
        for p in grp["params"]:
            st = opt.state[p]
            bc2 = 1 - b2 ** float(st["step"])
            v_hat = st["exp_avg_sq"].double() / bc2
            n = int((v_hat.sqrt() < eps).sum())
            per[names[id(p)]] = (n / v_hat.numel(), v_hat.mean().sqrt().item())
            hit, total = hit + n, total + v_hat.numel()
    return per, hit / total


def test_optimizer_probe_fast_paths_match_per_tensor_references(tiny_model, tiny_batch):
    """Two parameter groups with different betas/eps, NaN in some gradients, against per-tensor loops."""
    model = tiny_model
    x, y = tiny_batch
    params = list(model.named_parameters())
    half = len(params) // 2
    opt = torch.optim.AdamW([{"params": [p for _, p in params[:half]], "eps": 1e-3},
                             {"params": [p for _, p in params[half:]], "betas": (0.8, 0.95), "eps": 1e-6}],
                            lr=1e-3)
    names = {id(p): n for n, p in params}
    mon = sl.Monitor(model, optimizer=opt, every=1, probes=["optimizer", "health"])
    g = torch.Generator().manual_seed(4)
    for step in range(3):
        hooks = []
        if step == 2:  # NaN/Inf in two gradients, put there during backward (captured at its end)
            def poison(grad):
                grad = grad.clone()
                _poison(grad, 3, g)
                return grad
            hooks = [p.register_hook(poison) for _, p in (params[1], params[-1])]
        _, loss = model(x, y)
        loss.backward()
        poisoned = sum(int((~torch.isfinite(p.grad)).sum()) for p in model.parameters())
        assert poisoned == (6 if step == 2 else 0)
        for h in hooks:
            h.remove()
        opt.step()
        opt.zero_grad()
        vals = mon.step(loss)
        per, share = _reference_adam(opt, names)
        for name, (dom, v_rms) in per.items():
            assert vals[(M.ADAM_EPS_DOMINANCE, name)] == pytest.approx(dom, abs=1e-7)
            if math.isfinite(v_rms):
                assert vals[(M.ADAM_V_RMS, name)] == pytest.approx(v_rms, rel=1e-5)
            else:
                assert not math.isfinite(vals[(M.ADAM_V_RMS, name)])
        assert vals[(M.ADAM_EPS_DOMINANCE, "")] == pytest.approx(share, abs=1e-7)
        assert vals[(M.HEALTH_NONFINITE, "grad")] == poisoned
        ref_params = sum(int((~torch.isfinite(p)).sum()) for p in model.parameters())
        assert vals[(M.HEALTH_NONFINITE, "param")] == ref_params
    assert ref_params > 0  # the NaN gradients reached the weights through AdamW
    mon.close()


def test_grad_stats_with_some_parameters_without_gradients(tiny_model, tiny_batch):
    """A tensor the loss never uses (grad None) keeps its position: grad.rms 0, global norm without it."""
    model = tiny_model
    x, y = tiny_batch
    unused = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.SGD([*model.parameters(), unused], lr=0.1)
    mon = sl.Monitor(model, optimizer=opt, every=1, probes=["optimizer"])
    _, loss = model(x, y)
    loss.backward()
    assert unused.grad is None
    grads = {n: p.grad.double() for n, p in model.named_parameters()}
    opt.step()
    vals = mon.step(loss)
    for n, gr in grads.items():
        assert vals[(M.GRAD_RMS, n)] == pytest.approx(gr.pow(2).mean().sqrt().item(), rel=1e-5)
    assert vals[(M.GRAD_RMS, f"group0.param{len(grads)}")] == 0.0
    assert vals[(M.GRAD_GLOBAL_NORM, "")] == pytest.approx(
        math.sqrt(sum(gr.pow(2).sum().item() for gr in grads.values())), rel=1e-5)
    assert vals[(M.HEALTH_NONFINITE, "grad")] == 0.0
    mon.close()


@pytest.mark.slow
def test_overhead_benchmark_writes_every_configuration_with_ratios_and_memory(tmp_path, monkeypatch):
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "overhead.py"
    spec = importlib.util.spec_from_file_location("overhead_bench", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "overhead_bench", bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    out = tmp_path / "o.json"
    bench.main(["--device", "cpu", "--models", "proxy", "--repeats", "2", "--steps", "10", "--no-wandb",
                "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["workloads"][0]["rows"]
    assert [(r["config"], r["every"]) for r in rows] == [(c.name, c.every) for c in bench.configs(False)]
    for r in rows:
        assert len(r["window_ratios"]) == 2 and r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
        assert r["peak_mb"] > 0 and math.isfinite(r["extra_peak_pct"])
    with pytest.raises(SystemExit):
        bench.main(["--steps", "15", "--out", str(out)])
