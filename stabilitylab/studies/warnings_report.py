"""The warnings benchmark report: tables, the lead-time vs false-alarm figure and a timeline per diverged run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def write_warnings_report(path: str | os.PathLike, result: dict[str, Any], out: str | os.PathLike,
                          build_meta: dict[str, Any] | None = None) -> Path:
    """Write ``report.html`` (self-contained), ``report.md`` and the PNG figures of a ``warnings_bench.evaluate``
    result into ``out`` (the tables of ``warnings_bench.page`` plus the figures, through
    ``stabilitylab.report.write_page``); returns the HTML path.

    Args:
        path: the benchmark folder or store the result was measured on (for the histories).
        result: ``warnings_bench.evaluate(path)``.
        out: output folder.
        build_meta: the benchmark's ``benchmark.json`` (how it was built), if any.
    """
    from stabilitylab import plots
    from stabilitylab.report import FigureFile, Heading, write_page
    from stabilitylab.studies.warnings_bench import load_benchmark, page

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _, history = load_benchmark(path)
    pr = result["per_run"]
    first = pr["every"].min() if len(pr) else 1
    held = pr[(pr["every"] == first) & (pr["kind"] == "mechanism") & (pr["outcome"] == "diverged")].sort_values(["mechanism", "lr", "seed"])
    figs = {"warning_timelines": ("diverged runs (mechanism held out): leading signal, warning, forecast band, divergence",
                                  plots.warning_timelines(history, held))}
    if len(result["tradeoff"]):
        figs["warning_tradeoff"] = ("lead time vs false alarms (each seed held out, per threshold margin)",
                                    plots.warning_tradeoff(result["tradeoff"]))
    title, parts = page(result, build_meta)
    parts += [Heading("Figures"), *(FigureFile(Path(plots.save(fig, out / f"{name}.png", dpi=100)), caption,
                                               anchor=f"fig-{name}") for name, (caption, fig) in figs.items())]
    return write_page(out, title, parts)[0]
