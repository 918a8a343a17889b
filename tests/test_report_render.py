"""The one HTML + markdown renderer (``report.render`` / ``write_page``) and the reproduction report built on it."""

from __future__ import annotations

import base64
import html
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from stabilitylab.report import (
    Bullets,
    Code,
    FigureFile,
    Heading,
    Paragraph,
    Table,
    markdown_table,
    render,
    write_page,
)


class _Tags(HTMLParser):
    """Checks that every opened element is closed in order; collects table cells and ids."""

    VOID = {"img", "meta", "br", "hr", "link"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.ids: list[str] = []
        self.cells: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.ids += [v for k, v in attrs if k == "id"]
        if tag not in self.VOID:
            self.stack.append(tag)
        if tag in ("td", "th"):
            self._cell = []

    def handle_startendtag(self, tag, attrs):  # <img .../>: opened and closed at once
        self.ids += [v for k, v in attrs if k == "id"]

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (self.stack, tag)
        self.stack.pop()
        if tag in ("td", "th"):
            self.cells.append("".join(self._cell or []).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _parse(page: str) -> _Tags:
    p = _Tags()
    p.feed(page)
    p.close()
    assert p.stack == []
    return p


def _figure() -> Figure:
    fig = Figure(figsize=(1, 1))
    fig.subplots().plot([0, 1], [1, 0])
    return fig


def _png(path):
    _figure().savefig(path, dpi=20)
    return path


def test_render_writes_each_part_to_html_and_markdown_in_order(tmp_path):
    df = pd.DataFrame({"run": ["a <1>", "b"], "loss": [2.0 / 3.0, np.nan]})
    long = pd.DataFrame({"x": np.arange(5)})
    png = _png(tmp_path / "curve.png")
    parts = [Paragraph("intro & more"), Heading("Findings"), Bullets(["one < two", "three"], "findings"),
             Table(df, "Small table", anchor="table-small"), Table(long, "Long table", anchor="table-long",
                                                                  collapse_rows=3),
             Table(df.iloc[:0], "Empty table", level=2), FigureFile(png, "A curve", anchor="fig-curve")]
    page, md = render("Title <x>", parts)
    tags = _parse(page)
    assert page.startswith("<!doctype html>") and "<title>Title &lt;x&gt;</title>" in page
    assert tags.ids == ["table-small", "table-long", "fig-curve"]
    order = [page.index(s) for s in ("<h1>Title &lt;x&gt;</h1>", "<p>intro &amp; more</p>", "<h2>Findings</h2>",
                                     "<ul class='findings'><li>one &lt; two</li><li>three</li></ul>",
                                     '<h3 id="table-small">Small table</h3>',
                                     '<details id="table-long"><summary>Long table (5 rows)</summary>',
                                     "<h2>Empty table</h2>", '<figure id="fig-curve">')]
    assert order == sorted(order)
    # the cells are format_cells' (4 significant digits, NaN as "-"), HTML-escaped
    assert tags.cells[:6] == ["run", "loss", "a <1>", "0.6667", "b", "-"]
    b64 = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(b64) == 1 and base64.b64decode(b64[0]) == png.read_bytes()
    assert md.splitlines()[:8] == ["# Title <x>", "", "intro & more", "", "## Findings", "", "- one < two", "- three"]
    assert f"### Small table\n\n{markdown_table(df)}\n" in md
    assert "## Empty table\n\n(no rows)\n" in md and "![A curve](curve.png)" in md
    assert md.index("### Small table") < md.index("### Long table") < md.index("![A curve]")


def test_write_page_writes_both_files_and_rejects_unknown_parts(tmp_path):
    html_path, md_path = write_page(tmp_path, "t", [Heading("h", level=3)], stem="page")
    assert (html_path.name, md_path.name) == ("page.html", "page.md")
    assert "<h3>h</h3>" in html_path.read_text() and md_path.read_text() == "# t\n\n### h\n\n"
    page, md = render("t", [Code('{"a": "<1>"}', "json")])
    assert md == '# t\n\n```json\n{"a": "<1>"}\n```\n\n'
    assert "<pre><code>{&quot;a&quot;: &quot;&lt;1&gt;&quot;}</code></pre>" in page
    try:
        render("t", ["not a part"])
    except TypeError as e:
        assert "render(parts=...)" in str(e) and "Heading" in str(e)
    else:
        raise AssertionError("render accepted a str part")


def test_reproduce_report_renders_every_table_and_figure_through_the_one_renderer(tmp_path):
    from stabilitylab.studies import reproduce as R
    from stabilitylab.studies.reproduce.report import write_report
    from stabilitylab.studies.reproduce.run import Reproduction

    scale = R.Scale(name="tiny", sizes=("xxs", "xs", "s"), lrs=(1e-3, 1e-1), steps=2, batch_size=1, seq_len=8)
    findings = pd.DataFrame({"study": ["attention"], "finding": ["logits grow"], "held": ["yes"], "value": [1.5]})
    tables = {"sensitivity": pd.DataFrame({"size": ["xxs", "xs"], "lr_sensitivity": [0.25, np.nan]}),
              "empty": pd.DataFrame({"a": []})}
    rep = Reproduction(findings=findings, tables=tables, timings={"attention": 1.25, "total": 2.5},
                       counts={"attention": {"trained": 4, "reused": 0}}, out=tmp_path)
    write_report(rep, scale, "local", "cpu", {"attention_lr_vs_loss": _figure()})
    page, md = rep.report_html.read_text(), rep.report_md.read_text()
    tags = _parse(page)
    assert (rep.report_html.name, rep.report_md.name) == ("report.html", "report.md")
    assert rep.figures == {"attention_lr_vs_loss": tmp_path / "attention_lr_vs_loss.png"}
    assert "fig-attention_lr_vs_loss" in tags.ids and page.count("data:image/png;base64,") == 1
    for name in ("Findings", "Timing", "sensitivity", "empty", "Figures"):
        assert f"<h2>{html.escape(name)}</h2>" in page and f"\n## {name}\n" in md
    assert f"## Findings\n\n{markdown_table(findings)}\n" in md
    assert f"## sensitivity\n\n{markdown_table(tables['sensitivity'])}\n" in md
    assert "## empty\n\n(no rows)\n" in md and "![attention_lr_vs_loss](attention_lr_vs_loss.png)" in md
    assert {"logits grow", "0.25", "-", "1.25", "2.5", "trained"} <= set(tags.cells)
    assert (tmp_path / "findings.md").read_text() == markdown_table(findings) + "\n"
    assert pd.read_parquet(tmp_path / "tables" / "sensitivity.parquet").equals(tables["sensitivity"])
