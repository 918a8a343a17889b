"""The report renders from a tiny real sweep; figures are valid PNGs, embedded in one HTML file."""

from __future__ import annotations

import base64
import re

from stabilitylab.cli import main
from stabilitylab.report import TABLE_TITLES, write_report


def test_report_html_is_self_contained_and_every_figure_is_png(tiny_sweep_store, tmp_path):
    html, md = write_report(tiny_sweep_store, tmp_path / "rep", n_boot=100)
    page = html.read_text()
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    pngs = sorted((tmp_path / "rep").glob("*.png"))
    assert len(imgs) == len(pngs) >= 6
    for b in imgs:
        assert base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n"
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "src=\"http" not in page and "<link" not in page
    for section in ("sensitivity", "lr_curves", "predictions", "warning_summary"):
        assert f'id="table-{section}"' in page and f"### {TABLE_TITLES[section]}" in md.read_text()


def test_report_opens_with_the_findings_then_key_figures_then_labelled_tables(tiny_sweep_store, tmp_path,
                                                                              monkeypatch):
    import html as h

    import pandas as pd

    from stabilitylab import report
    from stabilitylab.diagnosis import diagnose, run_label

    monkeypatch.setattr(report, "COLLAPSE_ROWS", 4)  # the 6-row warnings table is then a long one
    page = write_report(tiny_sweep_store, tmp_path / "rep", n_boot=50)[0].read_text()
    runs = pd.read_parquet(tiny_sweep_store / "runs.parquet")
    d = diagnose(runs, pd.read_parquet(tiny_sweep_store / "history.parquet"))
    findings, figures, tables = (page.index(s) for s in ("<h2>Findings</h2>", "<h2>Key figures</h2>",
                                                         "<h2>Tables</h2>"))
    assert findings < page.index("<img") and findings < figures < tables
    assert page.index('id="fig-attn_logit_per_layer"') < page.index('id="fig-lr_vs_loss"') < tables
    for line in d.lines:
        assert findings < page.index(f"<li>{h.escape(line)}</li>") < figures
    assert '<details id="table-warnings"><summary>Early warnings per run (6 rows)</summary>' in page
    body = page[tables:]
    for r in runs.to_dict("records"):
        assert f"<td>{h.escape(run_label(r))}</td>" in body and f"<td>{r['run_id']}</td>" not in body


def test_cli_analyze_prints_tables_and_report_writes(tiny_sweep_store, tmp_path, capsys):
    assert main(["analyze", str(tiny_sweep_store), "--n-boot", "50"]) == 0
    out = capsys.readouterr().out
    assert "LR sensitivity" in out and "critical LR" in out and "Predictions" in out
    assert main(["report", str(tiny_sweep_store), "--out", str(tmp_path / "r"), "--n-boot", "50"]) == 0
    assert (tmp_path / "r" / "report.html").exists()
    assert main(["analyze", str(tmp_path / "missing")]) == 2
