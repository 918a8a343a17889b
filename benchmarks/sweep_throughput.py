"""Sweep throughput: runs/hour of a fixed tiny grid with the local, processes (2) and ray (2 CPUs) executors.

The grid: 2 sizes (d_model 16 x 1 layer, 32 x 2 layers) x 4 LRs x {baseline, qk_layernorm} = 16 proxy runs
of 30 steps (batch 8, seq 32, monitor every 10 steps, default data). Wall time covers the whole
``sweep()`` call: process spawning / Ray start-up, data loading in each worker, training, writing the
store. runs/hour = 3600 * runs / wall seconds. Prints a table and writes JSON.

    python benchmarks/sweep_throughput.py [--executors local,processes,ray] [--out benchmarks/results/...]
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

from stabilitylab.sweeps import SweepSpec, sweep

GRID = dict(name="throughput", lrs=[1e-3, 1e-2, 1e-1, 1.0], seeds=[0],
            sizes=[{"d_model": 16, "n_layers": 1, "head_dim": 8}, {"d_model": 32, "n_layers": 2, "head_dim": 16}],
            variants=["baseline", "qk_layernorm"], steps=30, batch_size=8, seq_len=32, every=10)
WORKERS = {"local": None, "processes": 2, "ray": 2}


def measure(executor: str, spec: SweepSpec) -> dict:
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        runs = sweep(spec, executor=executor, workers=WORKERS[executor], store=Path(d) / "s", progress=False)
        wall = time.perf_counter() - t0
    return {"workers": WORKERS[executor] or 1, "runs": len(runs), "failed": int((runs["status"] == "failed").sum()),
            "wall_s": round(wall, 2), "runs_per_hour": round(3600 * len(runs) / wall),
            "mean_run_s": round(float(runs["wall_time"].mean()), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--executors", default="local,processes,ray")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sweep_throughput.json"))
    args = ap.parse_args()
    spec = SweepSpec(**GRID)
    results = {ex: measure(ex, spec) for ex in args.executors.split(",")}
    print(f"{'executor':<10} {'workers':>7} {'runs':>5} {'wall s':>8} {'runs/hour':>10} {'s/run (in worker)':>18}")
    for ex, r in results.items():
        print(f"{ex:<10} {r['workers']:>7} {r['runs']:>5} {r['wall_s']:>8.1f} {r['runs_per_hour']:>10} "
              f"{r['mean_run_s']:>18.3f}")
    out = {"grid": spec.to_dict(), "n_points": len(spec), "results": results,
           "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                       "platform": platform.platform()},
           "note": "wall time of the whole sweep() call, start-up included; a shared machine adds noise"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
