"""The report renders from a tiny real sweep; figures are valid PNGs, embedded in one HTML file."""

from __future__ import annotations

import base64
import re

from stabilitylab.cli import main
from stabilitylab.report import write_report


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
        assert f"<h2>{section}</h2>" in page and f"## {section}" in md.read_text()


def test_cli_analyze_prints_tables_and_report_writes(tiny_sweep_store, tmp_path, capsys):
    assert main(["analyze", str(tiny_sweep_store), "--n-boot", "50"]) == 0
    out = capsys.readouterr().out
    assert "LR sensitivity" in out and "critical LR" in out and "Predictions" in out
    assert main(["report", str(tiny_sweep_store), "--out", str(tmp_path / "r"), "--n-boot", "50"]) == 0
    assert (tmp_path / "r" / "report.html").exists()
    assert main(["analyze", str(tmp_path / "missing")]) == 2
