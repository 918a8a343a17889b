"""Runs/hour of an LR study of the proxy: sequential ``train_one`` vs ``train_many`` (one batched model).

    python benchmarks/vectorized_throughput.py                      # xs, 300 steps, K = 6 and 12
    python benchmarks/vectorized_throughput.py --steps 60 --k 6     # quick look

Workload: the demo's smallest study, preset ``xs`` (d_model 64, 2 layers, seq 64), batch 16, 300 steps,
the demo's six peak LRs (1e-3 .. 3e-1); K = 12 adds seed 1 for each LR. Sequential = what the sweep's
``local`` executor does per point: ``train_one`` with the default Monitor every ``--every`` steps, run over
the six K = 6 configs (its mean cost per run is the baseline for every K). ``--plain-runs`` also times
``train_one`` without a Monitor. Vectorized = ``train_many(configs, monitor_every=every)``.

Both wall-clock and process CPU time are reported: on a shared machine wall time mostly measures the
neighbours, while CPU time (one thread by default, ``--threads``) measures the work. ``runs/hour =
3600 * runs / seconds``; ``ratio = vectorized runs/hour / sequential runs/hour``. The final losses of
the K = 6 vectorized runs are compared with the sequential ones (relative difference per LR, over the
members that did not diverge). JSON goes to ``benchmarks/results/vectorized_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from stabilitylab.proxy import ByteData, TrainConfig, preset, train_one
from stabilitylab.proxy.vectorized import train_many
from stabilitylab.studies.demo import DEMO_LRS

RESULTS = Path(__file__).parent / "results"


def _timed(fn):
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def _per_hour(runs: int, seconds: float) -> float:
    return 3600.0 * runs / seconds


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="xs")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--every", type=int, default=10, help="monitor every N steps (both paths)")
    ap.add_argument("--k", type=int, nargs="+", default=[6, 12], choices=[6, 12], help="members per batch")
    ap.add_argument("--plain-runs", type=int, default=2, help="train_one runs without a Monitor to time")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--out", type=Path, default=RESULTS / "vectorized_throughput.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    def configs(seeds: tuple[int, ...]) -> list[TrainConfig]:
        return [TrainConfig(model=preset(args.size), lr=lr, seed=s, steps=args.steps, batch_size=args.batch,
                            warmup_steps=max(1, args.steps // 10)) for s in seeds for lr in DEMO_LRS]

    ByteData(preset(args.size).seq_len)  # load the corpus once, outside every timing
    load0 = os.getloadavg()
    grid6 = configs((0,))
    seq = [_timed(lambda c=c: train_one(c, monitor={"every": args.every})) for c in grid6]
    seq_wall, seq_cpu = sum(s[1] for s in seq) / len(seq), sum(s[2] for s in seq) / len(seq)
    result: dict = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": args.threads},
        "workload": {"size": args.size, "steps": args.steps, "batch_size": args.batch, "every": args.every,
                     "lrs": list(DEMO_LRS)},
        "sequential": {"runs": len(seq), "wall_s_per_run": seq_wall, "cpu_s_per_run": seq_cpu,
                       "runs_per_hour_wall": _per_hour(1, seq_wall), "runs_per_hour_cpu": _per_hour(1, seq_cpu),
                       "diverged": sum(s[0].diverged for s in seq)},
        "vectorized": [],
    }
    if args.plain_runs:
        plain = [_timed(lambda c=c: train_one(c)) for c in grid6[:args.plain_runs]]
        w, c = sum(p[1] for p in plain) / len(plain), sum(p[2] for p in plain) / len(plain)
        result["sequential_no_monitor"] = {"runs": len(plain), "wall_s_per_run": w, "cpu_s_per_run": c,
                                           "runs_per_hour_wall": _per_hour(1, w),
                                           "runs_per_hour_cpu": _per_hour(1, c)}
    for k in args.k:
        grid = grid6 if k == 6 else configs((0, 1))
        res, wall, cpu = _timed(lambda g=grid: train_many(g, monitor_every=args.every))
        row = {"k": k, "wall_s": wall, "cpu_s": cpu, "runs_per_hour_wall": _per_hour(k, wall),
               "runs_per_hour_cpu": _per_hour(k, cpu), "diverged": sum(r.diverged for r in res)}
        row["ratio_wall"] = row["runs_per_hour_wall"] / result["sequential"]["runs_per_hour_wall"]
        row["ratio_cpu"] = row["runs_per_hour_cpu"] / result["sequential"]["runs_per_hour_cpu"]
        if "sequential_no_monitor" in result:
            row["ratio_cpu_vs_no_monitor"] = row["runs_per_hour_cpu"] / result["sequential_no_monitor"][
                "runs_per_hour_cpu"]
        if k == 6:
            # Per LR; the highest LRs are chaotic, so float rounding (even a different thread count) grows.
            row["rel_final_loss_diff_vs_sequential"] = {
                f"{c.lr:g}": abs(r.final_loss - s[0].final_loss) / abs(s[0].final_loss)
                for c, r, s in zip(grid, res, seq) if not s[0].diverged and math.isfinite(s[0].final_loss)}
            row["diverged_agree"] = all(r.diverged == s[0].diverged for r, s in zip(res, seq))
        result["vectorized"].append(row)
    result["loadavg_start_end"] = [load0, os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    s = result["sequential"]
    print(f"sequential train_one + Monitor(every={args.every}): {s['runs_per_hour_wall']:.0f} runs/h wall, "
          f"{s['runs_per_hour_cpu']:.0f} runs/h CPU")
    if "sequential_no_monitor" in result:
        p = result["sequential_no_monitor"]
        print(f"sequential train_one, no Monitor: {p['runs_per_hour_wall']:.0f} runs/h wall, "
              f"{p['runs_per_hour_cpu']:.0f} runs/h CPU")
    for r in result["vectorized"]:
        print(f"train_many K={r['k']}: {r['runs_per_hour_wall']:.0f} runs/h wall ({r['ratio_wall']:.2f}x), "
              f"{r['runs_per_hour_cpu']:.0f} runs/h CPU ({r['ratio_cpu']:.2f}x)")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
