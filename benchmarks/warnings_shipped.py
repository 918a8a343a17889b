"""The shipped early-warning defaults, nothing recalibrated, measured on any store (e.g. a rebuild of the benchmark).

    stabilitylab warnings build --scale quick --out runs/wq        # a rebuild, here or on another machine
    python benchmarks/warnings_shipped.py runs/wq --out benchmarks/results/warnings_shipped_rebuild.json

``stabilitylab warnings evaluate`` calibrates on some runs of a store and tests on the others; this measures
``detectors.DEFAULT_CALIBRATIONS`` as shipped (the calibration ``EarlyWarning()`` takes at each interval), at
their own settings and at each of ``--margins``, on every run, with the same outcome labels, censoring and
per-run measurement as ``evaluate`` (``studies.warnings_bench``). On a rebuild of the quick benchmark on another
CPU the runs are not the ones the defaults were calibrated on (the same seeds, other last bits: see the README's
CPU paragraph), so this is how the forecast interval fit at one margin covers at another.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import pandas as pd

from stabilitylab import detectors as D
from stabilitylab.analysis.early_warning import logged_interval, run_steps
from stabilitylab.studies import warnings_bench as W


def measure(store: str | Path, everys=(1, 10), margins=(1.0, 1.25, 1.5, 2.0), censor: int = W.CENSOR) -> list[dict]:
    """One row per interval and margin (``None``: the calibration's own): ``warnings_bench.summarise``'s numbers."""
    runs, history = W.load_benchmark(store)
    outcomes = W.label_runs(runs, history)
    ids = list(outcomes["run_id"])
    base = D.DetectorConfig()
    rows = []
    for asked in everys:
        steps = run_steps(history, asked)
        every = logged_interval(steps)
        cal = D.pick_calibration(D.DEFAULT_CALIBRATIONS, every, base.window_at(every))
        scored = {rid: D.score_run(steps[rid], base) for rid in ids if rid in steps}
        for margin in (None, *margins):
            settings = {**cal.settings, **({} if margin is None else {"margin": margin})}
            cfg = replace(base, **{k: settings[k] for k in D.ADOPTABLE if k in settings})
            summary, _ = W._measure([i for i in ids if i in scored], outcomes, scored, cfg, cal, censor=censor)
            rows.append({"every": every, "calibration": cal.interval, "margin": cfg.margin,
                         "settings": "shipped" if margin is None else f"margin={margin:g}", **summary})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", help="benchmark folder (warnings build) or any sweep store with loss histories")
    ap.add_argument("--every", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--margins", type=float, nargs="+", default=[1.0, 1.25, 1.5, 2.0])
    ap.add_argument("--censor", type=int, default=W.CENSOR)
    ap.add_argument("--out", help="write the rows (and the store's build facts) as JSON here")
    a = ap.parse_args()
    rows = measure(a.store, tuple(a.every), tuple(a.margins), a.censor)
    cols = ["every", "settings", "margin", "n_diverged", "n_stable", "warned_50_share", "median_lead",
            "stable_warned_share", "fa_steps_stable", "forecast_coverage"]
    print(pd.DataFrame(rows)[cols].to_string(index=False, float_format="{:.3g}".format))
    if a.out:
        meta_file = Path(a.store) / "benchmark.json"
        build = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
        Path(a.out).write_text(json.dumps({"store": str(a.store), "cpu": W.cpu_name(),
                                           "build": build, "rows": clean}, indent=1) + "\n")


if __name__ == "__main__":
    main()
