"""One self-contained HTML report (figures embedded as base64 PNG) and a markdown summary of a sweep.

    from stabilitylab.report import write_report
    html, md = write_report("runs/demo")          # runs/demo/report/report.html, report.md, *.png

This module is the one HTML + markdown renderer: ``write_page(out, title, parts)`` renders a list of
``Heading`` / ``Paragraph`` / ``Bullets`` / ``Table`` / ``FigureFile`` / ``Code`` parts to ``report.html`` and
``report.md``; ``format_cells`` and ``markdown_table`` format single tables the same way.
"""

from __future__ import annotations

import base64
import html
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass
class Heading:
    """A section heading, ``<h{level}>`` / ``#`` x ``level``."""

    text: str
    level: int = 2


@dataclass
class Paragraph:
    """A paragraph of plain text."""

    text: str


@dataclass
class Bullets:
    """A bulleted list; ``css_class`` styles it in HTML (``"findings"``: the highlighted findings box)."""

    lines: Sequence[str]
    css_class: str = ""


@dataclass
class Table:
    """A table under a ``level`` heading ``caption``; longer than ``collapse_rows`` rows it is a collapsed
    ``<details>`` in HTML. ``anchor`` is the HTML id; cells are formatted by ``format_cells``."""

    df: pd.DataFrame
    caption: str
    anchor: str = ""
    level: int = 3
    collapse_rows: int | None = None


@dataclass
class FigureFile:
    """A figure saved as a PNG: embedded as base64 in HTML, linked by file name in markdown."""

    png: Path
    caption: str
    anchor: str = ""


@dataclass
class Code:
    """A preformatted block (``language`` tags the markdown fence, e.g. ``"json"``)."""

    text: str
    language: str = ""


Part = Heading | Paragraph | Bullets | Table | FigureFile | Code

STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:0 1em;line-height:1.4}"
         "table{border-collapse:collapse;font-size:12px;margin:.5em 0}td,th{padding:2px 6px;"
         "border-bottom:1px solid #ddd;text-align:left}img{max-width:100%}"
         "ul.findings{background:#f6f8fa;border-left:4px solid #d9480f;padding:.8em 1em .8em 2em}"
         "ul.findings li{margin:.3em 0}figure{margin:1em 0}figcaption{font-size:13px;color:#444}"
         "details{margin:.6em 0}summary{cursor:pointer;font-weight:bold}")


def render(title: str, parts: Sequence[Part]) -> tuple[str, str]:
    """``(html, markdown)`` of a page: the ``title`` heading, then ``parts`` in order.

    The HTML is self-contained (inline style, figures as base64 PNG); the markdown links each figure by
    its file name (next to the ``.md`` file) and writes ``(no rows)`` for an empty table.
    """
    esc = html.escape
    md, body = [f"# {title}", ""], [f"<h1>{esc(title)}</h1>"]
    for p in parts:
        if isinstance(p, Heading):
            md += [f"{'#' * p.level} {p.text}", ""]
            body.append(f"<h{p.level}>{esc(p.text)}</h{p.level}>")
        elif isinstance(p, Paragraph):
            md += [p.text, ""]
            body.append(f"<p>{esc(p.text)}</p>")
        elif isinstance(p, Bullets):
            md += [*(f"- {line}" for line in p.lines), ""]
            cls = f" class='{p.css_class}'" if p.css_class else ""
            body.append(f"<ul{cls}>" + "".join(f"<li>{esc(line)}</li>" for line in p.lines) + "</ul>")
        elif isinstance(p, Table):
            md += [f"{'#' * p.level} {p.caption}", "", markdown_table(p.df) if len(p.df) else "(no rows)", ""]
            table = format_cells(p.df).to_html(index=False, border=0, na_rep="-")
            anchor = f' id="{p.anchor}"' if p.anchor else ""
            if p.collapse_rows is not None and len(p.df) > p.collapse_rows:
                body.append(f"<details{anchor}><summary>{esc(p.caption)} ({len(p.df)} rows)</summary>{table}"
                            "</details>")
            else:
                body += [f"<h{p.level}{anchor}>{esc(p.caption)}</h{p.level}>", table]
        elif isinstance(p, FigureFile):
            b64 = base64.b64encode(Path(p.png).read_bytes()).decode("ascii")
            anchor = f' id="{p.anchor}"' if p.anchor else ""
            body.append(f'<figure{anchor}><img alt="{esc(p.caption)}" src="data:image/png;base64,{b64}"/>'
                        f"<figcaption>{esc(p.caption)}</figcaption></figure>")
            md += [f"![{p.caption}]({Path(p.png).name})", ""]
        elif isinstance(p, Code):
            md += [f"```{p.language}", p.text, "```", ""]
            body.append(f"<pre><code>{esc(p.text)}</code></pre>")
        else:
            raise TypeError(f"render(parts=...): {p!r} is not a Heading, Paragraph, Bullets, Table, FigureFile "
                            "or Code")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>")
    return page, "\n".join(md) + "\n"


def write_page(out: str | Path, title: str, parts: Sequence[Part], stem: str = "report") -> tuple[Path, Path]:
    """Render ``parts`` (``render``) to ``<out>/<stem>.html`` and ``<out>/<stem>.md``.

    Args:
        out: an existing folder (the PNGs of the ``FigureFile`` parts belong in it, for the markdown links).
        title: the page title and first heading.
        parts: the page's content, in order.
        stem: the file names without extension.

    Returns:
        ``(html_path, markdown_path)``.
    """
    page, md = render(title, parts)
    html_path, md_path = Path(out) / f"{stem}.html", Path(out) / f"{stem}.md"
    html_path.write_text(page, encoding="utf-8")
    md_path.write_text(md, encoding="utf-8")
    return html_path, md_path


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
    key = [n for n in KEY_FIGURES if n in figs]
    rest = [n for n in figs if n not in key]

    def figure(name: str) -> FigureFile:
        png = Path(plots.save(figs[name], out / f"{name}.png", dpi=100))
        return FigureFile(png, FIGURE_TITLES.get(name, name), anchor=f"fig-{name}")

    parts: list[Part] = [Paragraph(intro), Heading("Findings"), Bullets(diag.lines, "findings"),
                         Heading("Key figures"), *(figure(n) for n in key), Heading("Tables")]
    parts += [Table(_labelled(df, labels), TABLE_TITLES.get(name, name), anchor=f"table-{name}",
                    collapse_rows=COLLAPSE_ROWS) for name, df in tables.items()]
    if rest:
        parts += [Heading("More figures"), *(figure(n) for n in rest)]
    return write_page(out, title, parts)
