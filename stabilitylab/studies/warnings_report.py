"""The warnings benchmark report: tables, the lead-time vs false-alarm figure and a timeline per diverged run."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any


def write_warnings_report(path: str | os.PathLike, result: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write ``report.html`` (self-contained), ``report.md`` and the PNG figures of a ``warnings_bench.evaluate``
    result into ``out``; returns the HTML path.

    Args:
        path: the benchmark folder or store the result was measured on (for the histories).
        result: ``warnings_bench.evaluate(path)``.
        out: output folder.
    """
    from stabilitylab import plots
    from stabilitylab.report import format_cells
    from stabilitylab.studies.warnings_bench import load_benchmark, markdown

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _, history = load_benchmark(path)
    pr = result["per_run"]
    first = pr["every"].min() if len(pr) else 1
    held = pr[(pr["every"] == first) & pr["split"].str.startswith("held-out ") & (pr["split"] != "held-out seed")
              & (pr["outcome"] == "diverged")].sort_values(["mechanism", "lr", "seed"])
    figs = {"warning_timelines": plots.warning_timelines(history, held)}
    if len(result["tradeoff"]):
        figs["warning_tradeoff"] = plots.warning_tradeoff(result["tradeoff"])
    md = markdown(result)
    body = [f"<h1>Early warning on the warnings benchmark ({html.escape(str(path))})</h1>",
            "<h2>summary</h2>", format_cells(result["summary"]).to_html(index=False, border=0),
            "<h2>lead time vs false alarms</h2>", format_cells(result["tradeoff"]).to_html(index=False, border=0)]
    md += "\n## figures\n"
    for name, fig in figs.items():
        png = Path(plots.save(fig, out / f"{name}.png", dpi=100))
        b64 = base64.b64encode(png.read_bytes()).decode("ascii")
        body.append(f'<h3>{html.escape(name)}</h3><img alt="{name}" src="data:image/png;base64,{b64}"/>')
        md += f"\n![{name}]({name}.png)\n"
    body += ["<h2>per run (mechanism held out)</h2>", format_cells(held).to_html(index=False, border=0)]
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;"
             "font-size:11px}td,th{padding:2px 6px;border-bottom:1px solid #ddd}img{max-width:100%}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>warnings report</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")
    (out / "report.md").write_text(md + "\n", encoding="utf-8")
    html_path = out / "report.html"
    html_path.write_text(page, encoding="utf-8")
    return html_path
