"""Count the lines of a newcomer's first read, so the number in the release notes is reproducible.

The read (issue 16, STYLE.md): the README up to and including its "What is recorded" section, then
``monitor.py``, one probe, the proxy model, and the files needed to follow them (``probes/base.py``,
``metrics.py``). Every line counts (docstrings, comments and blank lines too). Usage::

    python scripts/newcomer_read.py [--probe activations|logits]
"""

from __future__ import annotations

import argparse
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
README_LAST_SECTION = "## What is recorded"
CODE = ("stabilitylab/monitor.py", "{probe}", "stabilitylab/proxy/model.py", "stabilitylab/probes/base.py",
        "stabilitylab/metrics.py")


def readme_lines(path: pathlib.Path) -> int:
    """Lines of ``path`` up to the end of its "What is recorded" section (the line before the next ``## ``)."""
    lines = path.read_text().splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == README_LAST_SECTION)
    except StopIteration:
        raise SystemExit(f"newcomer_read: no {README_LAST_SECTION!r} heading in {path}") from None
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return end


def count(probe: str) -> list[tuple[str, int]]:
    """``(file, lines)`` of every part of the read, in reading order."""
    parts = [("README.md (to the end of 'What is recorded')", readme_lines(ROOT / "README.md"))]
    for name in CODE:
        rel = name.format(probe=f"stabilitylab/probes/{probe}.py")
        parts.append((rel, len((ROOT / rel).read_text().splitlines())))
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probe", default="activations", choices=["activations", "logits"],
                    help="the one probe the newcomer reads (default: activations, the shorter)")
    args = ap.parse_args()
    parts = count(args.probe)
    for name, n in parts:
        print(f"{n:6d}  {name}")
    print(f"{sum(n for _, n in parts):6d}  total")


if __name__ == "__main__":
    main()
