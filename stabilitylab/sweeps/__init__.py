"""Sweeps: learning-rate x size x mitigation x seed studies that resume after a crash.

    spec = SweepSpec(name="lr", lrs={"log_range": [1e-3, 1e-1, 5]}, sizes=["xs", "s"],
                     variants=["baseline", "qk_layernorm"])
    sweep(spec, executor="local" | "processes" | "ray" | "vectorized", store="runs/lr")
    runs, history = load_sweep("runs/lr")
"""

from stabilitylab.sweeps.run import sweep
from stabilitylab.sweeps.runner import MonitorFactory
from stabilitylab.sweeps.spec import Point, SweepSpec
from stabilitylab.sweeps.store import load_sweep, sweep_status

__all__ = ["MonitorFactory", "Point", "SweepSpec", "load_sweep", "sweep", "sweep_status"]
