"""``stabilitylab analyze STORE`` prints the analysis tables; ``stabilitylab report STORE`` writes the report."""

from __future__ import annotations

import argparse
import warnings

import pandas as pd


def _analyze(args: argparse.Namespace) -> int:
    from stabilitylab.analysis import load_store
    from stabilitylab.report import analysis_tables

    runs, history = load_store(args.store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        tables = analysis_tables(runs, history, holdout=None if args.no_holdout else "largest",
                                 n_boot=args.n_boot)
    titles = {
        "sensitivity": "LR sensitivity (mean over LRs of min(L, L0) - L*; diverged = init loss)",
        "lr_curves": "Optimal LR (quadratic fit in log LR, bootstrap interval) and critical LR interval",
        "predictions": "Predictions for the largest size from the smaller ones (held out) vs observed",
        "heldout_critical_lr": "Held-out size: critical LR (leaves the basin) and largest stable LR, predicted vs "
                               "observed (stabilitylab predict)",
        "heldout_attn_logit": "Held-out size: peak max attention logit per LR, predicted vs observed",
        "warnings": "Early warning per run (lead = steps from first warning to divergence)",
        "warning_summary": "Early warning summary",
    }
    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.max_rows", 500,
                           "display.float_format", "{:.4g}".format):
        for name, df in tables.items():
            print(f"\n{titles[name]}:")
            print(df.to_string(index=False) if len(df) else "  (nothing to show)")
    if "predictions" not in tables:
        print("\nPredictions need >= 3 model sizes (2 to fit, the largest held out).")
    return 0


def _report(args: argparse.Namespace) -> int:
    from stabilitylab.report import write_report

    html, md = write_report(args.store, args.out, holdout=None if args.no_holdout else "largest",
                            n_boot=args.n_boot)
    print(f"report: {html}\nsummary: {md}")
    return 0


def add_parser(sub) -> None:
    for name, func, help_ in (("analyze", _analyze, "print LR-sensitivity, LR-curve, prediction and warning tables"),
                              ("report", _report, "write a self-contained HTML report and a markdown summary")):
        p = sub.add_parser(name, help=help_, description=__doc__)
        p.add_argument("store", help="sweep store or demo folder (runs.parquet + history.parquet)")
        p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates (default 1000)")
        p.add_argument("--no-holdout", action="store_true", help="fit on every size (no held-out check)")
        if name == "report":
            p.add_argument("--out", default=None, help="output folder (default STORE/report)")
        p.set_defaults(func=func)
