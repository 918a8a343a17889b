"""Sweep throughput: runs/hour of one grid with the local, processes (2), ray (2 CPUs) and vectorized executors.

Grids (``--grid``):

- ``tiny`` (default): 2 sizes (d_model 16 x 1 layer, 32 x 2 layers) x 4 LRs x {baseline, qk_layernorm} =
  16 proxy runs of 30 steps (batch 8, seq 32, monitor every 10 steps): start-up and per-run fixed costs
  dominate, the regime where batching runs pays most.
- ``demo-xs``: the demo's smallest study, preset ``xs`` (d_model 64, 2 layers, seq 64), the demo's six
  LRs, baseline, batch 16, ``--steps`` steps (default 300), monitor every 10: arithmetic dominates.

Wall time covers the whole ``sweep()`` call: process spawning / Ray start-up, data loading in each worker,
training, writing the store; ``runs/hour = 3600 * runs / wall seconds``; ``vs local`` is the ratio of
runs/hour to the local (sequential) executor's. The vectorized executor trains every group of points
that differ only in LR / seed as one batched model (``stabilitylab.proxy.vectorized.train_many``). The
process's own CPU time (all its threads; worker processes not included) and the load average are stored
too: on a shared machine wall time partly measures the neighbours. Prints a table and writes JSON.

    python benchmarks/sweep_throughput.py [--grid tiny|demo-xs] [--executors local,processes,ray,vectorized]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from stabilitylab.proxy import ByteData
from stabilitylab.studies.demo import DEMO_LRS
from stabilitylab.sweeps import SweepSpec, sweep

GRIDS = {
    "tiny": dict(name="throughput", lrs=[1e-3, 1e-2, 1e-1, 1.0], seeds=[0],
                 sizes=[{"d_model": 16, "n_layers": 1, "head_dim": 8}, {"d_model": 32, "n_layers": 2, "head_dim": 16}],
                 variants=["baseline", "qk_layernorm"], steps=30, batch_size=8, seq_len=32, every=10),
    "demo-xs": dict(name="throughput-xs", lrs=list(DEMO_LRS), seeds=[0], sizes=["xs"], variants=["baseline"],
                    steps=300, batch_size=16, every=10),
}
WORKERS = {"local": None, "processes": 2, "ray": 2, "vectorized": None}


def measure(executor: str, spec: SweepSpec) -> dict:
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        t0, c0 = time.perf_counter(), time.process_time()
        runs = sweep(spec, executor=executor, workers=WORKERS[executor], store=Path(d) / "s", progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"workers": WORKERS[executor] or 1, "runs": len(runs), "failed": int((runs["status"] == "failed").sum()),
            "diverged": int(runs["diverged"].sum()), "wall_s": round(wall, 2),
            "runs_per_hour": round(3600 * len(runs) / wall), "driver_cpu_s": round(cpu, 2),
            "mean_run_s": round(float(runs["wall_time"].mean()), 3), "loadavg_1min_at_start": round(load, 2),
            "final_loss": dict(zip(runs["run_id"], runs["final_loss"].astype(float).round(6)))}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--grid", default="tiny", choices=sorted(GRIDS))
    ap.add_argument("--steps", type=int, default=None, help="override the grid's steps per run")
    ap.add_argument("--executors", default="local,processes,ray,vectorized")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in this process")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default results/sweep_throughput.json; demo-xs: sweep_throughput_xs.json)")
    args = ap.parse_args(argv)
    executors = args.executors.split(",")
    if bad := [e for e in executors if e not in WORKERS]:
        ap.error(f"--executors: unknown {bad}; choose from {', '.join(WORKERS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = SweepSpec(**{**GRIDS[args.grid], **({"steps": args.steps} if args.steps else {})})
    ByteData(32)  # read the corpus once, outside every timing
    results = {ex: measure(ex, spec) for ex in executors}
    base = results.get("local", {}).get("runs_per_hour")
    print(f"{'executor':<11}{'workers':>8}{'runs':>6}{'wall s':>9}{'runs/hour':>11}{'vs local':>10}"
          f"{'s/run (in worker)':>19}")
    for ex, r in results.items():
        r["vs_local"] = round(r["runs_per_hour"] / base, 3) if base else None
        vs = f"{r['vs_local']:.2f}x" if base else "-"
        print(f"{ex:<11}{r['workers']:>8}{r['runs']:>6}{r['wall_s']:>9.1f}{r['runs_per_hour']:>11}{vs:>10}"
              f"{r['mean_run_s']:>19.3f}")
    out = {"grid": args.grid, "spec": spec.to_dict(), "n_points": len(spec), "results": results,
           "machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "python": platform.python_version(), "platform": platform.platform()},
           "note": "wall time of the whole sweep() call, start-up included; a shared machine adds noise"}
    path = args.out or Path(__file__).parent / "results" / (
        "sweep_throughput.json" if args.grid == "tiny" else f"sweep_throughput_{args.grid.split('-')[1]}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
