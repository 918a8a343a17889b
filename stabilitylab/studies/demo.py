"""``stabilitylab demo``: a small LR-sensitivity study on the proxy that shows the paper's headline.

Two sizes x six learning rates (1e-3 .. 3e-1) x {baseline, qk_layernorm}, monitored; writes
``runs.parquet`` and ``history.parquet``, prints final loss per LR and LR sensitivity, saves two
figures (LR vs final loss; max attention logit vs step), writes the report and ends with its findings
(what broke, which signal and layer led, what qk-layernorm changed, what to do, early warnings).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["DEMO_LRS", "DEMO_SIZES", "DEMO_VARIANTS", "add_parser", "findings", "run_demo", "summarise"]

DEMO_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
DEMO_SIZES = ("xs", "s")
DEMO_VARIANTS = ("baseline", "qk_layernorm")


def run_demo(out: str | Path = "runs/demo", sizes=DEMO_SIZES, lrs=DEMO_LRS, variants=DEMO_VARIANTS,
             steps: int = 300, batch_size: int = 16, every: int = 10, seed: int = 0,
             progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train every (size, lr, variant) once with a Monitor; return (runs, history) and write them.

    The grid runs through ``sweep`` (local executor) into the resumable store ``<out>/sweep``, so an
    interrupted demo picks up where it stopped and points shared with an earlier demo are reused;
    ``<out>/runs.parquet`` and ``<out>/history.parquet`` hold this invocation's runs only.
    """
    from stabilitylab.sweeps import SweepSpec, load_sweep, sweep

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = SweepSpec(name="demo", lrs=list(lrs), sizes=list(sizes), variants=list(variants), seeds=[seed],
                     steps=steps, batch_size=batch_size, every=every)
    runs = sweep(spec, executor="local", store=out / "sweep", extend=True, progress=progress)
    history = load_sweep(out / "sweep")[1]
    history = history[history["run_id"].isin(runs["run_id"])].reset_index(drop=True)
    runs.to_parquet(out / "runs.parquet", index=False)
    history.to_parquet(out / "history.parquet", index=False)
    return runs, history


def summarise(runs: pd.DataFrame, history: pd.DataFrame, out: Path) -> str:
    """Tables and figures of a demo study; returns the text printed."""
    from stabilitylab import plots
    from stabilitylab.analysis import lr_sensitivity

    lines = []
    table = runs.assign(final=np.where(runs["diverged"], np.nan, runs["final_loss"]))
    wide = table.pivot_table(index=["size", "variant"], columns="lr", values="final", dropna=False)
    wide.columns = [f"{c:g}" for c in wide.columns]
    lines.append("Final held-out loss per peak LR (NaN = diverged):")
    lines.append(wide.round(3).to_string())
    sens = lr_sensitivity(runs, by=["size", "n_params", "variant"])
    peak = (history[history["metric"] == "attn.max_logit"].merge(runs[["run_id", "size", "variant"]], on="run_id")
            .groupby(["size", "variant"])["value"].max().rename("peak_attn_logit"))
    sens = sens.merge(peak.reset_index(), on=["size", "variant"], how="left")
    lines.append("")
    lines.append("LR sensitivity (Wortsman et al. 2023: mean over LRs of min(L, L0) - L*; lower is better):")
    lines.append(sens[["size", "n_params", "variant", "lr_sensitivity", "best_lr", "best_loss", "n_diverged",
                       "peak_attn_logit"]].round(4).to_string(index=False))
    f1 = plots.save(plots.lr_vs_loss(runs), out / "lr_vs_loss.png")
    f2 = plots.save(plots.max_attention_logit(history, runs), out / "attn_max_logit.png")
    sens.to_csv(out / "lr_sensitivity.csv", index=False)
    lines.append("")
    lines.append(f"Figures: {f1}\n         {f2}")
    lines.append(f"Data:    {out / 'runs.parquet'} (one row per run), {out / 'history.parquet'} (tidy records)")
    return "\n".join(lines)


def findings(runs: pd.DataFrame, history: pd.DataFrame) -> str:
    """The report's findings (``stabilitylab.diagnosis``) as the text that ends the demo's output."""
    from stabilitylab.diagnosis import diagnose

    return "Findings (the report opens with these):\n" + diagnose(runs, history).text()


def _cmd(args: argparse.Namespace) -> int:
    t0 = time.time()
    out = Path(args.out)
    sizes = tuple(args.sizes.split(","))
    lrs = tuple(float(x) for x in args.lrs.split(","))
    runs, history = run_demo(out, sizes=sizes, lrs=lrs, steps=args.steps, every=args.every, seed=args.seed)
    print(summarise(runs, history, out))
    from stabilitylab.report import write_report

    html, md = write_report(out, out / "report")
    print("\n" + findings(runs, history))
    print(f"\nDemo finished in {time.time() - t0:.0f} s.")
    print(f"Report: {Path(html).resolve()} (markdown: {Path(md).resolve()})")
    print(f"Next:   stabilitylab analyze {out}    |    stabilitylab reproduce --scale quick")
    return 0


def add_parser(sub) -> None:
    """Register ``stabilitylab demo`` on the CLI's subparsers."""
    p = sub.add_parser("demo", help="small LR-sensitivity study on the proxy (baseline vs qk-layernorm)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--sizes", default=",".join(DEMO_SIZES), help="comma-separated proxy presets")
    p.add_argument("--lrs", default=",".join(f"{x:g}" for x in DEMO_LRS), help="comma-separated peak LRs")
    p.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    p.add_argument("--every", type=int, default=10, help="monitor logging interval (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd)
