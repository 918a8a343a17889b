"""``stabilitylab predict STORE --holdout largest``: predicted vs observed for the held-out size.

Fits every size of the store but the largest (``analysis.predict``) and prints, per variant, the predicted
critical LR (where the LR-vs-loss curve leaves the basin) and the largest stable LR with their intervals
next to what the held-out size's runs did, then the predicted peak max attention logit per LR.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import pandas as pd


def _table(pred) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The two printed tables (rounded column names for a terminal)."""
    c = pred.critical_lr
    crit = pd.DataFrame({
        "variant": c["variant"], "critical LR predicted": c["predicted"], "lo": c["lo"], "hi": c["hi"],
        "observed": c["observed_critical_lr"], "inside": c["critical_inside"],
        "largest stable LR predicted": [f"[{a:.3g}, {b:.3g}]" for a, b in zip(c["stable_lo"], c["stable_hi"])],
        "observed ": c["observed_largest_stable_lr"], "inside ": c["stable_inside"],
        "width (grid steps)": c["stable_width_steps"], "critical LR width": c["width_steps"], "note": c["note"]})
    a = pred.attn_logit
    attn = a[["variant", "lr", "predicted", "lo", "hi", "observed", "inside"]]
    return crit, attn


def _predict(args: argparse.Namespace) -> int:
    from stabilitylab.analysis import load_store, predict

    runs, history = load_store(args.store)
    holdout = None if args.holdout == "none" else args.holdout
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pred = predict(runs, history, holdout=holdout, target_n_params=args.target, tol=args.tol,
                       level=args.level, n_boot=args.n_boot)
    crit, attn = _table(pred)
    where = f"held-out size {pred.heldout}" if pred.heldout is not None else "target"
    print(f"Fitted on sizes {', '.join(map(str, pred.fit_sizes))}; predicting {where} "
          f"({pred.target_n_params:.4g} parameters); {pred.level:.0%} intervals for one run; stable = not "
          f"diverged and final loss within {pred.tol:g} x (init - best loss) of the best loss.")
    with pd.option_context("display.width", 220, "display.max_columns", 30, "display.max_rows", 500,
                           "display.float_format", "{:.4g}".format):
        print("\nCritical LR (leaves the basin) and largest stable grid LR:")
        print(crit.to_string(index=False))
        print("\nPeak max attention logit per LR:")
        print(attn.to_string(index=False))
    if args.json:
        Path(args.json).write_text(json.dumps(pred.summary(), indent=1) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    if args.figure:
        from stabilitylab import plots

        print(f"wrote {plots.save(plots.heldout_prediction(pred), args.figure)}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="predict the largest size's stable LR and attention logits from the others",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store", help="sweep store with >= 3 sizes (e.g. runs/reproduce_quick/attention)")
    p.add_argument("--holdout", choices=["largest", "none"], default="largest",
                   help="largest: fit the others and check it (default); none: fit all, predict --target")
    p.add_argument("--target", type=float, default=None, help="parameters of the size to predict (--holdout none)")
    p.add_argument("--tol", type=float, default=0.1, help="basin tolerance, share of (init - best loss); 0.1")
    p.add_argument("--level", type=float, default=0.9, help="interval coverage (default 0.9)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates (default 2000)")
    p.add_argument("--json", default=None, help="also write the predictions as JSON here")
    p.add_argument("--figure", default=None, help="also save the fit figure (PNG) here")
    p.set_defaults(func=_predict)
