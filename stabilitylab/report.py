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
    """The report's tables: ``sensitivity``, ``lr_curves``, ``predictions`` and, holding out the largest
    size, ``heldout_critical_lr`` / ``heldout_attn_logit`` (``analysis.predict``; both when >= 3 sizes),
    ``warnings`` (per-run early-warning evaluation) and ``warning_summary``."""
    from stabilitylab.analysis import evaluate_warnings, lr_curves, lr_sensitivity, predict_instability
    from stabilitylab.analysis.tables import check_history, check_runs

    runs = check_runs(runs, "analysis_tables")
    history = check_history(history, "analysis_tables")
    by = [c for c in ("size", "n_params", "variant") if c in runs.columns]
    out = {"sensitivity": lr_sensitivity(runs, by=by), "lr_curves": lr_curves(runs, by=by, n_boot=n_boot)}
    if "n_params" in runs.columns and runs["size"].nunique() >= 3 and len(history):
        out["predictions"] = predict_instability(runs, history, holdout=holdout, n_boot=n_boot)
        if holdout == "largest":
            from stabilitylab.analysis import predict

            pred = predict(runs, history, holdout="largest", n_boot=max(n_boot, 100))
            out["heldout_critical_lr"], out["heldout_attn_logit"] = pred.critical_lr, pred.attn_logit
    if len(history) and (history["metric"] == M.LOSS).any():
        per_run, summary = evaluate_warnings(runs, history)
        out["warnings"] = per_run.merge(runs[["run_id", *by, "lr"]], on="run_id")
        out["warning_summary"] = pd.DataFrame([summary])
    return out


#: Figures shown right after the findings, in this order; the rest follow the tables.
KEY_FIGURES = ("attn_logit_per_layer", "lr_vs_loss", "attn_max_logit", "lr_sensitivity_vs_size")
FIGURE_TITLES = {
    "attn_logit_per_layer": "Max attention logit per layer over training, worst run (log colour scale)",
    "lr_vs_loss": "Final loss vs peak LR, one line per size, one panel per variant (x: diverged, drawn at init loss)",
    "lr_sensitivity_vs_size": "LR sensitivity vs parameters, one line per variant (lower is better)",
    "attn_max_logit": "Max attention logit (max over layers) vs step, largest size, one line per LR",
    "lse_drift": "Output-logit log Z drift from its first value vs step",
    "scaling_attn_logit": "Scaling fit of the early max attention logit, largest size held out",
    "warning_timeline": "Loss and watched signals of one run, with early warnings (orange) and divergence (red)",
    "heldout_prediction": "Fits across the smaller sizes (band: interval for one run) and the held-out size "
                          "(red): critical LR and peak attention logit",
}
TABLE_TITLES = {
    "sensitivity": "LR sensitivity per size and variant (nats; lower is better)",
    "lr_curves": "Optimal and critical LR per size and variant",
    "predictions": "Predictions for the held-out size",
    "heldout_critical_lr": "Held-out size: critical LR and largest stable LR, predicted vs observed",
    "heldout_attn_logit": "Held-out size: peak max attention logit per LR, predicted vs observed",
    "warnings": "Early warnings per run",
    "warning_summary": "Early-warning summary",
}
#: Tables longer than this are collapsed (<details>).
COLLAPSE_ROWS = 8


def _labelled(df: pd.DataFrame, labels: pd.Series) -> pd.DataFrame:
    """``run_id`` replaced by a readable ``run`` label (size, variant, lr, seed) as the first column."""
    if "run_id" not in df.columns:
        return df
    run = df["run_id"].map(labels).fillna(df["run_id"])
    return df.drop(columns="run_id").assign(run=run.to_numpy())[["run", *[c for c in df.columns if c != "run_id"]]]


def format_cells(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with floats shown to 4 significant digits and NaN as ``-`` (for HTML and markdown tables)."""

    def cell(v):
        if isinstance(v, (float, np.floating)):
            return "-" if np.isnan(v) else f"{v:.4g}"
        return v

    return df.apply(lambda c: c.map(cell))


def markdown_table(df: pd.DataFrame) -> str:
    """``df`` as a GitHub-flavoured markdown table (cells formatted by ``format_cells``)."""
    f = format_cells(df).map(str)
    lines = ["| " + " | ".join(map(str, f.columns)) + " |", "|" + "---|" * len(f.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in f.to_numpy().tolist()]
    return "\n".join(lines)


def _figures(runs: pd.DataFrame, history: pd.DataFrame, tables: dict) -> dict[str, object]:
    """name -> Figure for every figure the data supports."""
    from stabilitylab import plots
    from stabilitylab.analysis import fit_scaling, run_signals
    from stabilitylab.diagnosis import run_label

    figs = {"lr_vs_loss": plots.lr_vs_loss(runs)}
    if "n_params" in runs.columns:
        figs["lr_sensitivity_vs_size"] = plots.lr_sensitivity_vs_size(runs)
    attn = history[history["metric"] == M.ATTN_MAX_LOGIT]
    if len(attn):
        figs["attn_max_logit"] = plots.max_attention_logit(history, runs)
        worst = attn.groupby("run_id")["value"].max().idxmax()
        figs["attn_logit_per_layer"] = plots.attention_logit_heatmap(
            history, worst, label=run_label(runs.set_index("run_id").loc[worst].to_dict()))
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
    if len(sizes) >= 3:
        from stabilitylab.analysis import predict

        pred = predict(runs, history, holdout="largest", n_boot=1000)
        if pred.fits:
            figs["heldout_prediction"] = plots.heldout_prediction(pred)
    w = tables.get("warnings")
    if w is not None and len(w):
        pick = w.sort_values(["diverge_step", "n_warnings"], ascending=[True, False], na_position="last")
        rid = pick["run_id"].iloc[0]
        figs["warning_timeline"] = plots.warning_timeline(
            history, rid, label=run_label(runs.set_index("run_id").loc[rid].to_dict()))
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
    from stabilitylab.diagnosis import diagnose, run_labels

    diag = diagnose(runs, history, tables)
    labels = run_labels(runs)
    title = f"stabilitylab report: {Path(path).resolve().name}"
    intro = (f"{len(runs)} runs, {runs['size'].nunique()} sizes, {runs['variant'].nunique()} variants, "
             f"{int(runs['diverged'].sum())} diverged.")
    md = [f"# {title}", "", intro, "", "## Findings", "", diag.text(), ""]
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>", "<h2>Findings</h2>",
            "<ul class='findings'>" + "".join(f"<li>{html.escape(line)}</li>" for line in diag.lines) + "</ul>"]
    key = [n for n in KEY_FIGURES if n in figs]
    rest = [n for n in figs if n not in key]

    def figure(name: str) -> None:
        png = Path(plots.save(figs[name], out / f"{name}.png", dpi=100))
        b64 = base64.b64encode(png.read_bytes()).decode("ascii")
        caption = FIGURE_TITLES.get(name, name)
        body.append(f'<figure id="fig-{name}"><img alt="{html.escape(caption)}" src="data:image/png;base64,{b64}"/>'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        md.extend([f"![{caption}]({name}.png)", ""])

    md.append("## Key figures\n")
    body.append("<h2>Key figures</h2>")
    for name in key:
        figure(name)
    md.append("## Tables\n")
    body.append("<h2>Tables</h2>")
    for name, df in tables.items():
        df = _labelled(df, labels)
        caption = TABLE_TITLES.get(name, name)
        md += [f"### {caption}", "", markdown_table(df), ""]
        table = format_cells(df).to_html(index=False, border=0, na_rep="-")
        if len(df) > COLLAPSE_ROWS:
            body.append(f'<details id="table-{name}"><summary>{html.escape(caption)} ({len(df)} rows)</summary>'
                        f"{table}</details>")
        else:
            body += [f'<h3 id="table-{name}">{html.escape(caption)}</h3>', table]
    if rest:
        md.append("## More figures\n")
        body.append("<h2>More figures</h2>")
        for name in rest:
            figure(name)
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:0 1em;line-height:1.4}"
             "table{border-collapse:collapse;font-size:12px;margin:.5em 0}td,th{padding:2px 6px;"
             "border-bottom:1px solid #ddd;text-align:left}img{max-width:100%}"
             "ul.findings{background:#f6f8fa;border-left:4px solid #d9480f;padding:.8em 1em .8em 2em}"
             "ul.findings li{margin:.3em 0}figure{margin:1em 0}figcaption{font-size:13px;color:#444}"
             "details{margin:.6em 0}summary{cursor:pointer;font-weight:bold}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(page, encoding="utf-8")
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return html_path, md_path
