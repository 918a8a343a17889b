"""Overhead of the Monitor vs the plain training step, and vs what training scripts do instead.

    python benchmarks/overhead.py                  # CPU: proxy + reduced GPT-2 -> results/overhead_cpu.json
    python benchmarks/overhead.py --device cuda    # proxy + GPT-2 small (163M, 16 x 1024, bf16 autocast)
    python benchmarks/overhead.py --quick          # fewer, shorter windows (a smoke run)

Configurations, each compared with the plain step (forward, backward, AdamW step, zero_grad) on the same
model, data and optimizer, in one process:

- the default Monitor at ``every=1`` and ``every=10``, and each default probe alone at ``every=1``;
- ``wandb.watch(model, log="all", log_freq=1)`` and ``log_freq=10``, offline (``WANDB_MODE=offline``,
  a temporary ``WANDB_DIR``), with ``run.log({"loss": loss.item()})`` every step so the histograms are
  committed the way a training script commits them;
- a hand-written per-parameter loop ``{name: p.grad.norm().item()}`` every step (one host sync per tensor);
- fused norms every step: ``torch.stack(torch._foreach_norm(grads)).cpu()`` (one transfer).

Timing: after one warm-up window per configuration, ``--repeats`` rounds; in each round every
configuration runs one window of ``--steps`` steps right after a plain window, so drift of a shared
machine cancels in the per-round ratio ``window time / preceding plain window time``. Rows give the median
ratio and its spread (interquartile range, min-max); the ``plain`` row is the ratio of consecutive plain
windows, i.e. the noise floor. On CPU the time is the CPU time of this process and its children (the
wandb service included), since wall time on a shared machine mostly measures the neighbours; wall time
is stored too. On CUDA the time is wall time between ``torch.cuda.synchronize()`` calls.

Memory: the peak of each configuration at every step (a fresh window after the timing), as extra bytes
over the plain step's peak and as % of it. CUDA: ``torch.cuda.max_memory_allocated()`` after
``reset_peak_memory_stats()``. CPU: the CPU allocator's live bytes seen by ``torch.profiler``
(``profile_memory=True``, max of "Total Allocated" over the window, relative to its start) plus the
bytes of parameters, gradients and optimizer state alive at the window's start. Host-side Python objects
(records kept by the Monitor, wandb's buffers) are not tensors and are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

import stabilitylab as sl
from stabilitylab.probes import DEFAULT
from stabilitylab.studies.warnings_bench import cpu_name

RESULTS = Path(__file__).parent / "results"


@dataclass
class Workload:
    """A model, its optimizer, a fixed set of batches and the loss of one batch."""

    info: dict
    model: torch.nn.Module
    loss_fn: Callable[[torch.Tensor], torch.Tensor]
    data: list[torch.Tensor]
    opt: torch.optim.Optimizer = field(init=False)

    def __post_init__(self) -> None:
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.info["n_params"] = sum(p.numel() for p in self.model.parameters())


def _autocast(device: str, dtype: torch.dtype):
    return torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)


def proxy(device: str, dtype: torch.dtype) -> Workload:
    """The built-in proxy: preset xs, batch 8 x 64 on CPU; preset xxl, batch 16 x 1024 on CUDA."""
    cfg = sl.proxy.preset("xs", seq_len=64) if device == "cpu" else sl.proxy.preset("xxl", seq_len=1024)
    model = sl.ProxyTransformer(cfg).to(device)
    B = 8 if device == "cpu" else 16

    def loss_fn(x):
        with _autocast(device, dtype):
            return model(x, x)[1]

    data = [torch.randint(0, cfg.vocab_size, (B, cfg.seq_len), device=device) for _ in range(4)]
    return Workload({"model": "proxy", "batch": B, "seq": cfg.seq_len, "d_model": cfg.d_model,
                     "layers": cfg.n_layers}, model, loss_fn, data)


def gpt2(device: str, dtype: torch.dtype) -> Workload:
    """Hugging Face GPT-2 (SDPA attention, untied LM head). CUDA: GPT-2 small's shape with an untied head
    (163M parameters), batch 16 x 1024; CPU: a reduced shape (d 128, 4 layers, vocab 4096, 4 x 128)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if device == "cpu":
        shape = dict(n_embd=128, n_layer=4, n_head=4, vocab_size=4096, n_positions=128)
        B, T = 4, 128
    else:
        shape = dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)
        B, T = 16, 1024
    cfg = GPT2Config(**shape, attn_implementation="sdpa", tie_word_embeddings=False, bos_token_id=0,
                     eos_token_id=0)
    model = GPT2LMHeadModel(cfg).to(device)

    def loss_fn(x):
        with _autocast(device, dtype):
            return model(x, labels=x).loss

    data = [torch.randint(0, cfg.vocab_size, (B, T), device=device) for _ in range(4)]
    return Workload({"model": "hf_gpt2", "batch": B, "seq": T, **shape}, model, loss_fn, data)


@dataclass(frozen=True)
class Config:
    name: str
    kind: str  # plain | monitor | wandb | item | foreach
    every: int = 1
    probes: str | tuple[str, ...] = "default"


def configs(with_wandb: bool) -> list[Config]:
    rows = [Config("plain", "plain"), Config("default suite", "monitor", 1), Config("default suite", "monitor", 10)]
    rows += [Config(f"{p} probe", "monitor", 1, (p,)) for p in DEFAULT]
    if with_wandb:
        rows += [Config("wandb.watch(log='all')", "wandb", f) for f in (1, 10)]
    rows += [Config("per-param .item() norms", "item"), Config("torch._foreach_norm norms", "foreach")]
    return rows


class Runner:
    """Builds the step function of one configuration and cleans up after it."""

    def __init__(self, w: Workload, device: str, wandb_run=None):
        self.w, self.device, self.wandb_run = w, device, wandb_run
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self._i = 0

    def _train(self) -> torch.Tensor:
        w = self.w
        self._i += 1
        loss = w.loss_fn(w.data[self._i % len(w.data)])
        loss.backward()
        return loss

    def _finish(self) -> None:
        self.w.opt.step()
        self.w.opt.zero_grad(set_to_none=True)

    def start(self, cfg: Config) -> tuple[Callable[[], None], Callable[[], None]]:
        """(step, stop) for ``cfg``; ``stop`` removes every hook it installed."""
        w = self.w
        if cfg.kind == "monitor":
            mon = sl.Monitor(w.model, optimizer=w.opt, every=cfg.every, probes=cfg.probes
                             if cfg.probes == "default" else list(cfg.probes))

            def step():
                loss = self._train()
                self._finish()
                mon.step(loss)
            return step, mon.close
        if cfg.kind == "wandb":
            run = self.wandb_run
            run.watch(w.model, log="all", log_freq=cfg.every)

            def step():
                loss = self._train()
                self._finish()
                run.log({"loss": loss.item()})
            return step, lambda: run.unwatch(w.model)
        named = [(n, p) for n, p in w.model.named_parameters() if p.requires_grad]
        if cfg.kind == "item":
            def step():
                self._train()
                self.norms = {n: p.grad.norm().item() for n, p in named}
                self._finish()
        elif cfg.kind == "foreach":
            def step():
                self._train()
                self.norms = torch.stack(torch._foreach_norm([p.grad for _, p in named])).cpu()
                self._finish()
        else:
            def step():
                self._train()
                self._finish()
        return step, lambda: None

    def window(self, cfg: Config, steps: int) -> tuple[float, float]:
        """(CPU seconds per step incl. child processes, wall seconds per step) of one fresh window."""
        step, stop = self.start(cfg)
        try:
            self.sync()
            c0, t0 = _cpu_time(), time.perf_counter()
            for _ in range(steps):
                step()
            self.sync()
            return (_cpu_time() - c0) / steps, (time.perf_counter() - t0) / steps
        finally:
            stop()

    def peak_bytes(self, cfg: Config, steps: int = 3) -> int:
        """Peak memory of ``steps`` steps of ``cfg`` (see the module docstring for the method)."""
        step, stop = self.start(cfg)
        try:
            if self.device == "cuda":
                self.sync()
                torch.cuda.reset_peak_memory_stats()
                for _ in range(steps):
                    step()
                self.sync()
                return torch.cuda.max_memory_allocated()
            from torch.profiler import ProfilerActivity, profile

            state = _state_bytes(self.w)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                for _ in range(steps):
                    step()
            with tempfile.TemporaryDirectory() as d:
                prof.export_chrome_trace(f"{d}/trace.json")
                events = json.loads(Path(f"{d}/trace.json").read_text())["traceEvents"]
            live = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"
                    and e["args"].get("Device Type") == 0]
            return state + max([0, *live])
        finally:
            stop()


def _cpu_time() -> float:
    """CPU seconds of this process (all threads) and its live children (wandb's service process)."""
    total = time.process_time()
    for p in psutil.Process().children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _state_bytes(w: Workload) -> int:
    """Bytes of the parameters, gradients and optimizer state tensors alive now (each storage once)."""
    seen: dict[int, int] = {}
    tensors = [t for p in w.model.parameters() for t in (p, p.grad) if t is not None]
    tensors += [v for st in w.opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _quantiles(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"ratio": q[1], "ratio_q25": q[0], "ratio_q75": q[2], "ratio_min": min(xs), "ratio_max": max(xs)}


def bench_workload(w: Workload, device: str, cfgs: list[Config], repeats: int, steps: int, wandb_run) -> dict:
    """Ratios and peak memory of every configuration on one workload (see the module docstring)."""
    runner = Runner(w, device, wandb_run)
    basis = 1 if device == "cuda" else 0  # index into (cpu, wall)
    plain = cfgs[0]
    for cfg in cfgs:  # warm-up: allocator, autograd graph, optimizer state, wandb hooks
        runner.window(cfg, steps)
    samples: dict[Config, list[tuple[float, float, float]]] = {c: [] for c in cfgs}
    last_plain = runner.window(plain, steps)
    for _ in range(repeats):
        for cfg in cfgs:
            ref = runner.window(plain, steps)
            t = ref if cfg is plain else runner.window(cfg, steps)
            base = last_plain if cfg is plain else ref
            samples[cfg].append((t[0], t[1], t[basis] / base[basis]))
            last_plain = ref
    peak_plain = runner.peak_bytes(plain)
    rows = []
    for cfg in cfgs:
        cpu, wall, ratio = zip(*samples[cfg])
        peak = peak_plain if cfg is plain else runner.peak_bytes(cfg)
        rows.append({"config": cfg.name, "every": cfg.every if cfg.kind in ("monitor", "wandb") else 1,
                     "step_ms": 1e3 * statistics.median(wall if basis else cpu),
                     "cpu_ms": 1e3 * statistics.median(cpu), "wall_ms": 1e3 * statistics.median(wall),
                     **_quantiles(list(ratio)), "window_ratios": list(ratio),
                     "peak_mb": peak / 2**20, "extra_peak_mb": (peak - peak_plain) / 2**20,
                     "extra_peak_pct": 100.0 * (peak - peak_plain) / peak_plain})
    return {**w.info, "steps_per_window": steps, "repeats": repeats, "rows": rows}


def print_table(result: dict) -> None:
    print(f"\n{result['machine']['device']}, {result['timing']}")
    for w in result["workloads"]:
        print(f"\n{w['model']} ({w['n_params'] / 1e6:.2f}M params)  batch {w['batch']} x seq {w['seq']}  "
              f"{result['dtype']}  ({w['repeats']} windows x {w['steps_per_window']} steps)")
        print(f"  {'config':<28}{'every':>6}{'ms/step':>9}{'ratio':>8}{'IQR':>15}{'+peak mem':>11}")
        for r in w["rows"]:
            iqr = f"{r['ratio_q25']:.3f}-{r['ratio_q75']:.3f}"
            print(f"  {r['config']:<28}{r['every']:>6}{r['step_ms']:>9.2f}{r['ratio']:>8.3f}{iqr:>15}"
                  f"{r['extra_peak_pct']:>10.1f}%")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--models", default="proxy,gpt2", help="comma-separated: proxy, gpt2")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7; --quick 3)")
    ap.add_argument("--steps", type=int, default=None, help="steps per window, a multiple of 10 (default 20)")
    ap.add_argument("--quick", action="store_true", help="3 rounds of 10-step windows")
    ap.add_argument("--no-wandb", action="store_true", help="leave out the wandb.watch rows")
    ap.add_argument("--threads", type=int, default=1, help="CPU: torch.set_num_threads (default 1)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default results/overhead_<device>.json)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available; use --device cpu")
    repeats = args.repeats or (3 if args.quick else 7)
    steps = args.steps or (10 if args.quick else 20)
    if steps % 10:
        ap.error(f"--steps {steps}: pass a multiple of 10 so every=10 logs the same share of every window")
    builders = {"proxy": proxy, "gpt2": gpt2}
    models = args.models.split(",")
    if unknown := [m for m in models if m not in builders]:
        ap.error(f"--models: unknown {unknown}; choose from {sorted(builders)}")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    run = None
    if not args.no_wandb:
        import wandb

        os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true",
                          WANDB_DIR=os.environ.get("WANDB_DIR") or tempfile.mkdtemp(prefix="wandb-bench-"))
        run = wandb.init(project="stabilitylab-overhead", mode="offline")
    load0 = os.getloadavg()
    cfgs = configs(run is not None)
    try:
        workloads = []
        for name in models:
            torch.manual_seed(0)
            workloads.append(bench_workload(builders[name](args.device, dtype), args.device, cfgs, repeats,
                                            steps, run))
    finally:
        if run is not None:
            run.finish()
    result = {
        "machine": {"device": torch.cuda.get_device_name() if args.device == "cuda" else f"CPU: {cpu_name()}",
                    "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "platform": platform.platform()},
        "timing": ("wall time between cuda.synchronize()" if args.device == "cuda" else
                   "CPU time of the process and its children (time per step, ratio to the paired plain window)"),
        "memory": ("torch.cuda.max_memory_allocated" if args.device == "cuda" else
                   "torch.profiler CPU allocator peak + parameter/gradient/optimizer-state bytes"),
        "dtype": str(dtype).removeprefix("torch."), "loadavg_start_end": [load0, os.getloadavg()],
        "workloads": workloads}
    print_table(result)
    out = args.out or RESULTS / f"overhead_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
