"""One self-contained HTML report (figures embedded as base64 PNG) and a markdown summary of a sweep.

    from stabilitylab.report import write_report
    html, md = write_report("runs/demo")          # runs/demo/report/report.html, report.md, *.png
"""

from __future__ import annotations

import base64
import html
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from stabilitylab import metrics as M


def analysis_tables(runs: pd.DataFrame, history: pd.DataFrame, holdout: str | None = "largest",
                    n_boot: int = 1000) -> dict[str, pd.DataFrame]:
    """The report's tables: ``sensitivity``, ``lr_curves``, ``predictions`` (when >= 3 sizes),
    ``warnings`` (per-run early-warning evaluation) and ``warning_summary``."""
    from stabilitylab.analysis import evaluate_warnings, lr_curves, lr_sensitivity, predict_instability
    from stabilitylab.analysis.tables import check_history, check_runs

    runs = check_runs(runs, "analysis_tables")
    history = check_history(history, "analysis_tables")
    by = [c for c in ("size", "n_params", "variant") if c in runs.columns]
    out = {"sensitivity": lr_sensitivity(runs, by=by), "lr_curves": lr_curves(runs, by=by, n_boot=n_boot)}
    if "n_params" in runs.columns and runs["size"].nunique() >= 3 and len(history):
        out["predictions"] = predict_instability(runs, history, holdout=holdout, n_boot=n_boot)
    if len(history) and (history["metric"] == M.LOSS).any():
        per_run, summary = evaluate_warnings(runs, history)
        out["warnings"] = per_run.merge(runs[["run_id", *by, "lr"]], on="run_id")
        out["warning_summary"] = pd.DataFrame([summary])
    return out


def _fmt(df: pd.DataFrame) -> pd.DataFrame:
    return df.apply(lambda c: c.map(lambda v: f"{v:.4g}" if isinstance(v, (float, np.floating)) else v))


def _markdown(df: pd.DataFrame) -> str:
    f = _fmt(df).map(str)
    lines = ["| " + " | ".join(map(str, f.columns)) + " |", "|" + "---|" * len(f.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in f.to_numpy().tolist()]
    return "\n".join(lines)


def _figures(runs: pd.DataFrame, history: pd.DataFrame, tables: dict) -> dict[str, object]:
    """name -> Figure for every figure the data supports."""
    from stabilitylab import plots
    from stabilitylab.analysis import fit_scaling, run_signals

    figs = {"lr_vs_loss": plots.lr_vs_loss(runs)}
    if "n_params" in runs.columns:
        figs["lr_sensitivity_vs_size"] = plots.lr_sensitivity_vs_size(runs)
    attn = history[history["metric"] == M.ATTN_MAX_LOGIT]
    if len(attn):
        figs["attn_max_logit"] = plots.max_attention_logit(history, runs)
        worst = attn.groupby("run_id")["value"].max().idxmax()
        figs["attn_logit_per_layer"] = plots.attention_logit_heatmap(history, worst)
    if (history["metric"] == M.LOGITS_LSE_MEAN).any():
        figs["lse_drift"] = plots.lse_drift(history, runs)
    sizes = runs.groupby("size")["n_params"].median().sort_values() if "n_params" in runs.columns else []
    if len(attn) and len(sizes) >= 3:
        sig = run_signals(runs, history).merge(runs[["run_id", "size", "n_params", "variant", "lr"]], on="run_id")
        held = sizes.index[-1]
        for (variant, lr), g in sorted(sig.groupby(["variant", "lr"]), key=lambda kv: -kv[0][1]):
            train = g[g["size"] != held].dropna(subset=["attn_logit"])
            test = g[(g["size"] == held)].dropna(subset=["attn_logit"])
            if train["n_params"].nunique() >= 2 and len(test):
                fit = fit_scaling(train, "n_params", "attn_logit")
                figs["scaling_attn_logit"] = plots.scaling_fit(
                    fit, holdout=(float(test["n_params"].iloc[0]), float(test["attn_logit"].median())),
                    title=f"early max attention logit, {variant}, lr={lr:g}")
                break
    w = tables.get("warnings")
    if w is not None and len(w):
        pick = w.sort_values(["diverge_step", "n_warnings"], ascending=[True, False], na_position="last")
        figs["warning_timeline"] = plots.warning_timeline(history, pick["run_id"].iloc[0])
    return figs


def write_report(path: str | Path, out: str | Path | None = None, holdout: str | None = "largest",
                 n_boot: int = 1000) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained) and ``report.md`` (+ the PNG figures) for a store.

    Args:
        path: the store (``runs.parquet`` + ``history.parquet``, or a sweep store).
        out: output folder (default ``<path>/report``).
        holdout: passed to ``predict_instability``.
        n_boot: bootstrap replicates of the fits.

    Returns:
        ``(html_path, markdown_path)``.
    """
    from stabilitylab import plots
    from stabilitylab.analysis import load_store

    runs, history = load_store(path)
    out = Path(out) if out is not None else Path(path) / "report"
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        tables = analysis_tables(runs, history, holdout=holdout, n_boot=n_boot)
        figs = _figures(runs, history, tables)
    title = f"stabilitylab report: {Path(path).resolve().name}"
    intro = (f"{len(runs)} runs, {runs['size'].nunique()} sizes, {runs['variant'].nunique()} variants, "
             f"{int(runs['diverged'].sum())} diverged.")
    md = [f"# {title}", "", intro, ""]
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>"]
    for name, df in tables.items():
        md += [f"## {name}", "", _markdown(df), ""]
        body += [f"<h2>{html.escape(name)}</h2>", _fmt(df).to_html(index=False, border=0)]
    md.append("## figures\n")
    body.append("<h2>figures</h2>")
    for name, fig in figs.items():
        png = Path(plots.save(fig, out / f"{name}.png", dpi=100))
        b64 = base64.b64encode(png.read_bytes()).decode("ascii")
        body.append(f'<h3>{html.escape(name)}</h3><img alt="{name}" src="data:image/png;base64,{b64}"/>')
        md.append(f"![{name}]({name}.png)")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;"
             "font-size:12px}td,th{padding:2px 6px;border-bottom:1px solid #ddd}img{max-width:100%}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(page, encoding="utf-8")
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return html_path, md_path
