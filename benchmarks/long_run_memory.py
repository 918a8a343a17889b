"""Host memory of a long monitored run at every=1: flat with keep_history=False or a bounded N + Parquet.

    python benchmarks/long_run_memory.py --steps 100000 --fault-every 100   # writes results/long_run_memory.json

For each setting, trains a tiny proxy (d_model 16, 1 layer, seq 8, batch 2) with a Monitor logging every
step, and samples every ``--sample`` steps: process RSS (/proc/self/statm), Python heap in use
(tracemalloc, traced from step 0) and the Monitor's buffered records (history kept in memory + rows
waiting in the Parquet sink + records pending in failed-sink buffers). Growth is measured from the
first sample after warm-up (10% of the steps) to the end. With ``--fault-every N`` a probe raises on
every N-th step (one ``probe_error`` event each): ``Monitor.events`` keeps the last ``--max-events``
and counts the rest in ``events_dropped``; the Parquet sink still writes every event.
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
from stabilitylab import metrics as M
from stabilitylab.probes.base import Probe
from stabilitylab.proxy import ProxyConfig, ProxyTransformer


class Faulty(Probe):
    """Records the step number; raises in ``collect`` on every ``every``-th call (a recurring fault)."""

    name = "faulty"
    metrics = (M.LR,)

    def __init__(self, every: int):
        super().__init__()
        self.every, self.calls = every, 0

    def _attach(self) -> None:
        pass

    def collect(self):
        self.calls += 1
        if self.calls % self.every == 0:
            raise RuntimeError(f"injected fault {self.calls // self.every}")
        return []


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


DEFAULT_PROBES = ("attention", "logits", "activations", "optimizer", "health")


def run(keep_history: bool | int, steps: int, sample: int, store: Path, fault_every: int = 0,
        max_events: int = 1000, heap: bool = True, probes: tuple[str, ...] = DEFAULT_PROBES,
        progress: bool = False) -> dict:
    """Train ``steps`` steps at every=1; a probe fault every ``fault_every`` steps (0: none).

    ``heap=False`` skips tracemalloc (about 30x faster; ``heap_growth_mib`` is then NaN)."""
    import warnings

    torch.manual_seed(0)
    model = ProxyTransformer(ProxyConfig(d_model=16, n_layers=1, head_dim=8, seq_len=8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    probes = list(probes)
    if fault_every:
        probes.append(Faulty(fault_every))
    warnings.filterwarnings("ignore", message=".*injected fault")
    mon = sl.Monitor(model, optimizer=opt, every=1, keep_history=keep_history, probes=probes,
                     max_events=max_events, sinks=[sl.sinks.Parquet(store, flush_records=2000)])
    x = torch.randint(0, 256, (2, 8))
    samples = []
    if heap:
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
                            "heap_mib": tracemalloc.get_traced_memory()[0] / 2**20 if heap else float("nan"),
                            "buffered_records": buffered_records(mon), "events_held": len(mon.events),
                            "events_dropped": mon.events_dropped})
            if progress:
                print(json.dumps(samples[-1]), flush=True)
    mon.close()
    tracemalloc.stop()
    rows = len(sl.sinks.parquet.read_history(store))
    on_disk = sl.sinks.parquet.read_events(store)
    warm = next(s for s in samples if s["step"] >= steps // 10)
    end = samples[-1]
    return {"keep_history": keep_history, "steps": steps, "seconds": time.perf_counter() - t0,
            "rows_on_disk": rows, "rss_growth_mib": end["rss_mib"] - warm["rss_mib"],
            "heap_growth_mib": end["heap_mib"] - warm["heap_mib"],
            "max_buffered_records": max(s["buffered_records"] for s in samples),
            "max_events": max_events, "faults": steps // fault_every if fault_every else 0,
            "events_held": len(mon.events), "events_dropped": mon.events_dropped,
            "probe_errors_on_disk": int((on_disk["kind"] == "probe_error").sum()),
            "events_dropped_events": int((on_disk["kind"] == "events_dropped").sum()), "samples": samples}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--sample", type=int, default=500)
    ap.add_argument("--fault-every", type=int, default=100, help="a probe fault every N steps (0: none)")
    ap.add_argument("--max-events", type=int, default=1000)
    ap.add_argument("--keep", default="False,100", help="keep_history settings, comma-separated")
    ap.add_argument("--no-heap", action="store_true", help="skip tracemalloc (RSS only; much faster)")
    ap.add_argument("--probes", default=",".join(DEFAULT_PROBES), help="probe names, comma-separated")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "long_run_memory.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = []
    for keep in [False if k == "False" else int(k) for k in args.keep.split(",")]:
        with tempfile.TemporaryDirectory() as d:
            r = run(keep, args.steps, args.sample, Path(d), args.fault_every, args.max_events, not args.no_heap,
                    tuple(args.probes.split(",")), progress=True)
        r["probes"] = args.probes
        results.append(r)
        print(f"keep_history={keep!s:>5}  steps={r['steps']}  rows on disk={r['rows_on_disk']}  "
              f"RSS growth={r['rss_growth_mib']:+.2f} MiB  heap growth={r['heap_growth_mib']:+.3f} MiB  "
              f"max buffered records={r['max_buffered_records']}  faults={r['faults']}  events held="
              f"{r['events_held']} dropped={r['events_dropped']}  ({r['seconds']:.0f} s)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "python": platform.python_version(),
                                          "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
