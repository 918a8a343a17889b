"""Would the every=10 warning gain from logging the loss as its mean over the logging interval? (Tried, not kept.)

    stabilitylab warnings build --scale quick --out runs/wq
    python benchmarks/warnings_interval_mean.py runs/wq --out benchmarks/results/warnings_interval_mean.json

A Monitor at ``every=10`` sees the loss of one step in ten; it could instead add every step's loss to a device
tensor (no host sync) and log the mean over the interval. This replays the benchmark's ``every=1`` histories at
``every=10`` both ways (``warnings evaluate``'s protocol at ``every=10``, the development settings): ``step``,
the logged step's loss as today; ``interval_mean``, the mean of the losses of the 10 steps up to it (a
non-finite loss makes the mean non-finite, as a device sum would). Only the loss changes; it is both a watched
signal and the loss gate's input.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from stabilitylab.studies import warnings_bench as W

DEV_SETTINGS = Path(__file__).parent / "results" / "warnings_calibration_dev.json"
COLS = ["split", "warned_50_share", "warned_50_reachable_share", "median_lead", "stable_warned_share",
        "fa_steps_stable", "fa_steps_spiked", "forecast_coverage"]


def interval_mean_steps(real):
    """``run_steps`` with the loss at each logged step replaced by its mean over the interval up to it."""
    def run_steps(history: pd.DataFrame, every: int = 1):
        out = real(history, every)
        if every <= 1:
            return out
        loss = history[history["metric"] == "loss"].sort_values(["run_id", "step"])
        for rid, g in loss.groupby("run_id"):
            mean = pd.Series(g["value"].to_numpy(float), index=g["step"].to_numpy()).rolling(every, min_periods=1).mean()
            for step, vals in out.get(str(rid), []):
                if ("loss", "") in vals and step in mean.index:
                    vals[("loss", "")] = float(mean.loc[step])
        return out
    return run_steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", help="the warnings benchmark folder (`stabilitylab warnings build --out`)")
    ap.add_argument("--out", help="write the results as JSON here")
    a = ap.parse_args()
    real = W.run_steps
    res = {}
    for mode in ("step", "interval_mean"):
        W.run_steps = real if mode == "step" else interval_mean_steps(real)
        try:
            r = W.evaluate(a.store, everys=(10,), settings_from=DEV_SETTINGS)
        finally:
            W.run_steps = real
        res[mode] = {"summary": json.loads(r["summary"][COLS].to_json(orient="records")),
                     "tradeoff": json.loads(r["tradeoff"].to_json(orient="records"))}
        print(f"\n{mode}:\n" + r["summary"][COLS].round(4).to_string(index=False))
    if a.out:
        Path(a.out).write_text(json.dumps({"cpu": W.cpu_name(), "every": 10, **res}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
