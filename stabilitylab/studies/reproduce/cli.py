"""``stabilitylab reproduce``: the subcommand's parser and handler."""

from __future__ import annotations

import argparse

from stabilitylab.report import markdown_table
from stabilitylab.studies.reproduce.run import reproduce
from stabilitylab.studies.reproduce.scales import SCALES, STUDIES


def _cmd(args: argparse.Namespace) -> int:
    rep = reproduce(args.scale, out=args.out, executor=args.executor, workers=args.workers,
                    studies=args.studies or STUDIES, device=args.device, progress=not args.no_progress)
    print(markdown_table(rep.findings))
    failed = sum(c.get("failed", 0) for c in rep.counts.values())
    return 1 if failed else 0


def add_parser(sub) -> None:
    """Register ``stabilitylab reproduce`` on the CLI's subparsers."""
    from stabilitylab.sweeps.executors import EXECUTORS

    p = sub.add_parser(
        "reproduce", help="reproduce the main paper's findings on the proxy (one command)",
        description="Run the five studies of Wortsman et al. (2023) on the proxy (attention logit growth, "
                    "output logit divergence, interventions, Adam eps, prediction) into resumable sweep "
                    "stores and write a report with a findings table (HTML + markdown + figures + parquet).")
    p.add_argument("--scale", choices=list(SCALES), default="quick",
                   help="quick: 42k..1.25M parameters, CPU; full: 0.66M..101M parameters, one GPU")
    p.add_argument("--executor", choices=list(EXECUTORS), default=None,
                   help="sweep executor (default: vectorized when available, else local)")
    p.add_argument("--out", default=None, help="output folder (default: runs/reproduce_<scale>)")
    p.add_argument("--workers", type=int, default=None, help="worker processes / Ray tasks (processes, ray)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--studies", nargs="+", choices=list(STUDIES), default=None,
                   help="run only these studies (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd)
