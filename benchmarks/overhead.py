"""Overhead of the Monitor: per-probe and whole-suite step time vs the plain training step.

    python benchmarks/overhead.py                 # CPU: proxy + small HF GPT-2 -> results/overhead_cpu.json
    python benchmarks/overhead.py --device cuda   # + GPT-2-small shape, 16 x 1024 tokens, bf16
    python benchmarks/overhead.py --quick --wandb # fewer repeats; add a wandb.watch(log="all") row

Method: one model per workload; every configuration (plain, each probe alone, the default suite) at
every=1 and every=10 is timed in windows of ``steps`` full training steps (forward, backward, optimizer,
``Monitor.step``), after warm-up. Configurations are interleaved round-robin and each window is paired
with a plain window timed just before it, so drift of a shared machine cancels in the ratio:
``ratio = median over repeats of (window step time / paired plain step time)``; ``step_ms`` is the
median window step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import stabilitylab as sl
from stabilitylab.probes import DEFAULT

RESULTS = Path(__file__).parent / "results"


def _proxy(device: str, dtype: torch.dtype):
    cfg = sl.proxy.preset("xs", seq_len=64) if device == "cpu" else sl.proxy.preset("xxl", seq_len=1024)
    model = sl.ProxyTransformer(cfg).to(device)
    B = 4 if device == "cpu" else 16

    def batch():
        return torch.randint(0, cfg.vocab_size, (B, cfg.seq_len), device=device)

    def loss_fn(x):
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            return model(x, x)[1]

    return model, batch, loss_fn, {"model": "proxy", "batch": B, "seq": cfg.seq_len, "d_model": cfg.d_model,
                                   "layers": cfg.n_layers}


def _gpt2(device: str, dtype: torch.dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    if device == "cpu":
        shape = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=512, n_positions=64)
        B, T = 4, 64
    else:  # GPT-2 small
        shape = dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)
        B, T = 16, 1024
    cfg = GPT2Config(**shape, attn_implementation="sdpa", bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).to(device)

    def batch():
        return torch.randint(0, cfg.vocab_size, (B, T), device=device)

    def loss_fn(x):
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            return model(x, labels=x).loss

    return model, batch, loss_fn, {"model": "hf_gpt2", "batch": B, "seq": T, **shape}


def _configs(with_wandb: bool) -> list[tuple[str, list[str] | None, int]]:
    rows: list[tuple[str, list[str] | None, int]] = [("plain", None, 1)]
    for every in (1, 10):
        rows += [(name, [name], every) for name in DEFAULT]
        rows.append(("default suite", "default", every))
    if with_wandb:
        rows.append(("wandb.watch(log='all')", "wandb", 1))
    return rows


def _window(step: Callable[[], None], steps: int, sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t0) / steps


def bench_workload(build, device: str, dtype: torch.dtype, repeats: int, steps: int, warmup: int,
                   with_wandb: bool) -> dict:
    """Median step time of every configuration on one workload (see module docstring)."""
    torch.manual_seed(0)
    model, batch, loss_fn, info = build(device, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    data = [batch() for _ in range(4)]
    configs = _configs(with_wandb)
    times: dict[int, list[float]] = {i: [] for i in range(len(configs))}
    ratios: dict[int, list[float]] = {i: [] for i in range(len(configs))}

    def run(mon, wandb_run=None):
        it = iter(range(1 << 62))

        def step():
            loss = loss_fn(data[next(it) % len(data)])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if mon is not None:
                mon.step(loss)
            if wandb_run is not None:
                wandb_run.log({"loss": loss.detach()})
        return step

    for r in range(repeats + 1):  # round 0 is warm-up for every configuration
        for i, (_, probes, every) in enumerate(configs):
            mon, wb = None, None
            if probes == "wandb":
                import wandb

                wb = wandb.init(mode="offline", dir=tempfile.mkdtemp(), reinit="finish_previous")
                wb.watch(model, log="all", log_freq=1)
            elif probes is not None:
                mon = sl.Monitor(model, optimizer=opt, every=every, probes=probes, keep_history=1)
            step = run(mon, wb)
            for _ in range(warmup if r == 0 else 0):
                step()
            t_plain = _window(run(None), steps, sync) if probes is not None else None
            t = _window(step, steps, sync)
            if r > 0:
                times[i].append(t)
                ratios[i].append(1.0 if t_plain is None else t / t_plain)
            if mon is not None:
                mon.close()
            if wb is not None:
                wb.unwatch(model)
                wb.finish()
    rows = [{"config": name, "every": every if probes is not None else None,
             "step_ms": 1e3 * statistics.median(times[i]), "ratio": statistics.median(ratios[i]),
             "windows_ms": [1e3 * t for t in times[i]], "window_ratios": ratios[i]}
            for i, (name, probes, every) in enumerate(configs)]
    return {**info, "dtype": str(dtype).removeprefix("torch."), "steps_per_window": steps, "repeats": repeats,
            "rows": rows}


def print_table(result: dict) -> None:
    for w in result["workloads"]:
        print(f"\n{w['model']}  batch {w['batch']} x seq {w['seq']}  {w['dtype']}  "
              f"({w['repeats']} windows x {w['steps_per_window']} steps, median)")
        print(f"  {'config':<24}{'every':>6}{'step ms':>10}{'ratio':>8}")
        for r in w["rows"]:
            every = "" if r["every"] is None else str(r["every"])
            print(f"  {r['config']:<24}{every:>6}{r['step_ms']:>10.2f}{r['ratio']:>8.3f}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="3 windows of 10 steps (default 7 of 20)")
    ap.add_argument("--wandb", action="store_true", help="also time wandb.watch(log='all', log_freq=1), offline")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default results/overhead_<device>.json)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available; use --device cpu")
    os.environ.setdefault("WANDB_SILENT", "true")
    repeats, steps, warmup = (3, 10, 3) if args.quick else (7, 20, 5)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    workloads = [bench_workload(b, args.device, dtype, repeats, steps, warmup, args.wandb) for b in (_proxy, _gpt2)]
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "workloads": workloads}
    print_table(result)
    out = args.out or RESULTS / f"overhead_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
