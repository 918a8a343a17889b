"""The sustained rule of the every=1 default (``Calibration.also``) measured on a warnings benchmark store.

    python benchmarks/warnings_rules.py STORE [--out results/warnings_rules.json]

For the every=1 main rule alone (the shipped settings, ``warnings_calibration_dev.json``) and with a sustained
rule added (a 90-step slope window, one metric, ``persist`` 0) at each of ``MARGINS``: ``warnings evaluate``'s
held-out numbers (each seed held out, each mechanism held out; every rule calibrated on each split's calibration
runs), and the thresholds of the rule calibrated on every run. The shipped margin is the smallest of ``MARGINS``
at which the rule adds no warned stable or spiked run to the main rule's in either split; the shipped thresholds
are that margin's calibration on every run (``also[0]`` of ``calibration``). The last row is the rule alone at
that margin (no main rule), for comparison.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from stabilitylab import detectors as D
from stabilitylab.studies import warnings_bench as W

MARGINS = (2.0, 2.5, 3.0)
WINDOW = 90
SPLITS = ("each seed held out", "all mechanisms held out")
COLS = ("warned_50_share", "warned_any_share", "median_lead", "stable_warned_share", "fa_steps_stable",
        "fa_steps_spiked", "forecast_coverage", "n_diverged", "n_stable", "n_spiked")
DEV = Path(__file__).parent / "results" / "warnings_calibration_dev.json"


def measure(store: str, margin: float | None, alone: bool = False) -> dict:
    """The held-out numbers with the rule at ``margin`` (None: without it); ``alone``: the rule as the only one."""
    rule = {"margin": margin, "min_metrics": 1, "persist": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if alone:
            res = W.evaluate(store, everys=(1,), base=D.DetectorConfig(window=WINDOW), rules=(),
                             settings_from={1: D.Calibration(thresholds={}, window=WINDOW, settings=rule)})
        else:
            res = W.evaluate(store, everys=(1,), settings_from=str(DEV),
                             rules=() if margin is None else ((WINDOW, rule),))
    s = res["summary"].set_index("split")
    pr = res["per_run"]
    quiet = pr[(pr["outcome"] != "diverged") & pr["first_warning"].notna()]
    return {"margin": margin, "alone": alone, **{split: {c: s.loc[split, c] for c in COLS} for split in SPLITS},
            "warned_not_diverged": {kind: sorted(quiet.loc[quiet["kind"] == kind, "run_id"]) for kind in ("seed", "mechanism")},
            "calibration": res["calibrations"][1].to_dict()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", help="a warnings benchmark folder (`stabilitylab warnings build`)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "warnings_rules.json"))
    args = ap.parse_args()
    rows = [measure(args.store, m) for m in (None, *MARGINS)]
    base = rows[0]["warned_not_diverged"]
    chosen = next((r["margin"] for r in rows[1:] if r["warned_not_diverged"] == base), None)
    rows.append(measure(args.store, chosen, alone=True))  # not a candidate: what the main rule adds
    for r in rows:
        print(f"margin {r['margin']}{' (the rule alone)' if r['alone'] else ''}: " + "; ".join(
            f"{split}: warned>=50 {r[split]['warned_50_share']:.3f}, median lead {r[split]['median_lead']}, stable "
            f"warned {r[split]['stable_warned_share']:.3f}, fa steps {r[split]['fa_steps_stable']:.5f}" for split in SPLITS))
    print(f"chosen margin: {chosen}")
    out = {"store": args.store, "window": WINDOW, "margins": list(MARGINS), "chosen_margin": chosen, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1, default=float) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
