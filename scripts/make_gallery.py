"""Regenerate the README gallery (docs/gallery/*.png): the demo study and its standard figures.

    python scripts/make_gallery.py                     # demo grid (3 sizes x 6 LRs x 3 variants), minutes
    python scripts/make_gallery.py --quick --out /tmp/g   # tiny grid, seconds (used by the tests)

Runs ``stabilitylab.studies.demo.run_demo`` (a resumable sweep store: points already trained by ``make demo``
are reused) with sizes xxs, xs, s and variants baseline, qk_layernorm, z_loss, then saves:

- ``lr_vs_loss.png``            final loss vs peak LR per size, one panel per variant (``plots.lr_vs_loss``)
- ``lr_sensitivity_vs_size.png`` LR sensitivity vs parameters per variant (``plots.lr_sensitivity_vs_size``)
- ``attn_max_logit.png``        max attention logit vs step per LR, largest size (``plots.max_attention_logit``)
- ``lse_drift.png``             drift of the mean output log Z vs step, largest size (``plots.lse_drift``)
- ``scaling_fit.png``           early max attention logit vs parameters at one LR, power-law fit with its
                                bootstrap band (``analysis.fit_scaling`` + ``plots.scaling_fit``)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

GALLERY = ("lr_vs_loss.png", "lr_sensitivity_vs_size.png", "attn_max_logit.png", "lse_drift.png",
           "scaling_fit.png")


def scaling_figure(runs: pd.DataFrame, history: pd.DataFrame, variant: str = "baseline"):
    """Power-law fit of the early max attention logit vs ``n_params`` at the largest LR no size diverged at."""
    from stabilitylab import plots
    from stabilitylab.analysis import fit_scaling, run_signals

    sig = run_signals(runs, history).merge(runs[["run_id", "n_params", "lr", "variant", "diverged"]])
    sig = sig[sig["variant"] == variant]
    stable = sig.groupby("lr")["diverged"].any()
    lr = float(stable[~stable].index.max()) if (~stable).any() else float(sig["lr"].min())
    pts = sig[sig["lr"] == lr].groupby("n_params", as_index=False)["attn_logit"].median()
    fit = fit_scaling(pts, "n_params", "attn_logit", n_boot=2000)
    return plots.scaling_fit(fit, x_max=10 * pts["n_params"].max(),
                             title=f"early max attention logit, {variant}, lr={lr:.3g} "
                                   f"(slope {fit.exponent:.2f})")


def make_gallery(out: str | Path = "docs/gallery", store: str | Path = "runs/demo",
                 sizes=("xxs", "xs", "s"), lrs=None, variants=("baseline", "qk_layernorm", "z_loss"),
                 steps: int = 300, progress: bool = True) -> list[Path]:
    """Train (or reuse) the demo grid in ``store`` and write the gallery PNGs into ``out``; returns their paths."""
    from stabilitylab import plots
    from stabilitylab.studies.demo import DEMO_LRS, run_demo

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs, history = run_demo(store, sizes=sizes, lrs=DEMO_LRS if lrs is None else lrs, variants=variants,
                             steps=steps, progress=progress)
    largest = runs.sort_values("n_params")["size"].iloc[-1]
    figures = {
        "lr_vs_loss.png": plots.lr_vs_loss(runs),
        "lr_sensitivity_vs_size.png": plots.lr_sensitivity_vs_size(runs),
        "attn_max_logit.png": plots.max_attention_logit(history, runs),
        "lse_drift.png": plots.lse_drift(history, runs[runs["size"] == largest]),
        "scaling_fit.png": scaling_figure(runs, history),
    }
    return [Path(plots.save(fig, out / name)) for name, fig in figures.items()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/gallery", help="where the PNGs go (default docs/gallery)")
    ap.add_argument("--store", default="runs/demo", help="demo sweep store to train into / reuse")
    ap.add_argument("--steps", type=int, default=300, help="training steps per run")
    ap.add_argument("--quick", action="store_true", help="tiny grid (3 tiny sizes x 2 LRs, 20 steps)")
    args = ap.parse_args(argv)
    if args.quick:
        tiny = [{"d_model": d, "n_layers": 1, "head_dim": 8, "name": f"d{d}"} for d in (16, 24, 32)]
        paths = make_gallery(args.out, args.store, sizes=tiny, lrs=(1e-2, 1e-1), steps=20, progress=False)
    else:
        paths = make_gallery(args.out, args.store, steps=args.steps)
    print("\n".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
