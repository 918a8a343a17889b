"""The reproduction's report: figures, ``report.html`` / ``report.md``, ``findings.*`` and ``tables/``.

The pages are rendered by ``stabilitylab.report`` (the one HTML + markdown renderer).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from stabilitylab import metrics as M
from stabilitylab.studies.reproduce.scales import Scale

if TYPE_CHECKING:
    from stabilitylab.studies.reproduce.run import Reproduction


def study_figures(study: str, runs: pd.DataFrame, history: pd.DataFrame, extra) -> dict[str, Any]:
    """The figures of one training study (name -> Figure); ``extra`` is ``adam_eps``'s grad-RMS fit (or None)."""
    from stabilitylab import plots

    figs = {f"{study}_lr_vs_loss": plots.lr_vs_loss(runs)}
    if runs["size"].nunique() >= 2:
        figs[f"{study}_lr_sensitivity_vs_size"] = plots.lr_sensitivity_vs_size(runs)
    if study == "attention" and (history["metric"] == M.ATTN_MAX_LOGIT).any():
        figs["attention_max_logit"] = plots.max_attention_logit(history, runs)
    if study == "output_logits" and (history["metric"] == M.LOGITS_LSE_MEAN).any():
        big = runs.sort_values("n_params")["size"].iloc[-1]
        figs["output_logits_lse_drift"] = plots.lse_drift(history, runs[runs["size"] == big])
    if study == "adam_eps" and extra is not None:
        figs["adam_eps_grad_rms_fit"] = plots.scaling_fit(extra, title="grad RMS vs size (baseline)")
    return figs


def write_report(rep: Reproduction, scale: Scale, executor: str, device: str, figs: dict[str, Any]) -> None:
    """Write ``rep``'s tables, findings, figures and ``report.html`` / ``report.md`` under ``rep.out``.

    Sets ``rep.figures``, ``rep.report_html`` and ``rep.report_md``.
    """
    from stabilitylab import plots
    from stabilitylab.report import FigureFile, Heading, Paragraph, Table, markdown_table, write_page

    out = rep.out
    (out / "tables").mkdir(parents=True, exist_ok=True)
    for name, df in {"findings": rep.findings, **rep.tables}.items():
        df.to_parquet(out / "tables" / f"{name}.parquet", index=False)
    rep.findings.to_parquet(out / "findings.parquet", index=False)
    (out / "findings.md").write_text(markdown_table(rep.findings) + "\n", encoding="utf-8")
    for name, fig in figs.items():
        rep.figures[name] = Path(plots.save(fig, out / f"{name}.png", dpi=100))
    title = f"stabilitylab reproduce --scale {scale.name}"
    setup = (f"Proxy sizes {', '.join(s if isinstance(s, str) else s['name'] for s in scale.sizes)}; "
             f"LRs {', '.join(f'{v:.3g}' for v in scale.lrs)}; {scale.steps} steps x {scale.batch_size} "
             f"sequences x {scale.seq_len} tokens; seeds {list(scale.seeds)} in study 1 (held-out size "
             f"{list(scale.heldout_seeds if scale.heldout_seeds is not None else scale.seeds)}), "
             f"{scale.seeds[0]} elsewhere; studies without the largest size: "
             f"{', '.join(scale.small_studies) or 'none'}; executor {executor}; device {device}.")
    timing = pd.DataFrame([{"study": k, "wall_s": v, **rep.counts.get(k, {})} for k, v in rep.timings.items()])
    sections = [("Findings", rep.findings), ("Timing", timing), *rep.tables.items()]
    parts = [Paragraph(setup), *(Table(df, name, level=2) for name, df in sections), Heading("Figures"),
             *(FigureFile(png, name, anchor=f"fig-{name}") for name, png in rep.figures.items())]
    rep.report_html, rep.report_md = write_page(out, title, parts)
