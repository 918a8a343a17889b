"""An LR x size x mitigation sweep on Ray: a local Ray by default, or an existing cluster.

    python examples/sweep_ray.py                        # starts a local Ray with all cores
    python examples/sweep_ray.py --workers 2            # local Ray with 2 CPUs
    python examples/sweep_ray.py --address auto         # join the cluster this machine belongs to
    python examples/sweep_ray.py --quick                # 4 tiny runs on a 2-CPU local Ray (CI)

Each grid point is one Ray task (1 CPU). The driver (this script) writes every result into the store,
so the workers need stabilitylab installed but no shared filesystem. Kill it and run it again: finished
points are skipped.
"""

from __future__ import annotations

import argparse

import stabilitylab as sl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    ap.add_argument("--workers", type=int, default=None, help="CPUs of the local Ray / tasks in flight")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--store", default="runs/ray_lr_sweep")
    ap.add_argument("--quick", action="store_true", help="2 LRs x 2 variants of the smallest size, 20 steps")
    args = ap.parse_args()
    if args.quick:
        grid = dict(lrs=[1e-2, 1e-1], sizes=["xxs"], steps=20)
        args.workers = args.workers or 2
    else:
        grid = dict(lrs={"log_range": [1e-3, 3e-1, 6]}, sizes=["xxs", "xs"], steps=args.steps)
    spec = sl.SweepSpec(name="ray_lr_sweep", variants=["baseline", "qk_layernorm"], batch_size=8, seq_len=32,
                        **grid)
    runs = sl.sweep(spec, executor="ray", address=args.address, workers=args.workers, store=args.store)
    print(sl.lr_sensitivity(runs[runs["status"] != "failed"]).round(4).to_string(index=False))
    print(f"store: {args.store}  (stabilitylab status {args.store})")


if __name__ == "__main__":
    main()
