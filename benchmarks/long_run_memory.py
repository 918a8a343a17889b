"""Host memory of a long monitored run at every=1: flat with keep_history=False or a bounded N + Parquet.

    python benchmarks/long_run_memory.py --steps 10000      # prints a table, writes results/long_run_memory.json

For each setting, trains a tiny proxy (d_model 16, 1 layer, seq 8, batch 2) with a Monitor logging every
step, and samples every ``--sample`` steps: process RSS (/proc/self/statm), Python heap in use
(tracemalloc, traced from step 0) and the Monitor's buffered records (history kept in memory + rows
waiting in the Parquet sink + records pending in failed-sink buffers). Growth is measured from the
first sample after warm-up (10% of the steps) to the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch

import stabilitylab as sl
from stabilitylab.proxy import ProxyConfig, ProxyTransformer


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def buffered_records(mon: sl.Monitor) -> int:
    """Records the Monitor holds on the host: in-memory history + sink buffers + failed-write backlog."""
    n = sum(len(r) for r in mon._memory.batches) if mon._memory is not None else 0
    for g in mon._guards:
        n += sum(len(r) for r in g.pending)
        if isinstance(g.sink, sl.sinks.Parquet):
            n += g.sink._rows
    return n


def run(keep_history: bool | int, steps: int, sample: int, store: Path) -> dict:
    torch.manual_seed(0)
    model = ProxyTransformer(ProxyConfig(d_model=16, n_layers=1, head_dim=8, seq_len=8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = sl.Monitor(model, optimizer=opt, every=1, keep_history=keep_history,
                     sinks=[sl.sinks.Parquet(store, flush_records=2000)])
    x = torch.randint(0, 256, (2, 8))
    samples = []
    tracemalloc.start()
    t0 = time.perf_counter()
    for step in range(steps):
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mon.step(loss)
        if (step + 1) % sample == 0:
            samples.append({"step": step + 1, "rss_mib": rss_mib(),
                            "heap_mib": tracemalloc.get_traced_memory()[0] / 2**20,
                            "buffered_records": buffered_records(mon)})
    mon.close()
    tracemalloc.stop()
    rows = len(sl.sinks.parquet.read_history(store))
    warm = next(s for s in samples if s["step"] >= steps // 10)
    end = samples[-1]
    return {"keep_history": keep_history, "steps": steps, "seconds": time.perf_counter() - t0,
            "rows_on_disk": rows, "rss_growth_mib": end["rss_mib"] - warm["rss_mib"],
            "heap_growth_mib": end["heap_mib"] - warm["heap_mib"],
            "max_buffered_records": max(s["buffered_records"] for s in samples), "samples": samples}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--sample", type=int, default=500)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "long_run_memory.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = []
    for keep in (False, 100):
        with tempfile.TemporaryDirectory() as d:
            r = run(keep, args.steps, args.sample, Path(d))
        results.append(r)
        print(f"keep_history={keep!s:>5}  steps={r['steps']}  rows on disk={r['rows_on_disk']}  "
              f"RSS growth={r['rss_growth_mib']:+.2f} MiB  heap growth={r['heap_growth_mib']:+.3f} MiB  "
              f"max buffered records={r['max_buffered_records']}  ({r['seconds']:.0f} s)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "python": platform.python_version(),
                                          "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
