"""``stabilitylab sweep SPEC.toml`` and ``stabilitylab status STORE``."""

from __future__ import annotations

import argparse
import importlib
import warnings

import pandas as pd

from stabilitylab.sweeps.executors import EXECUTORS

_STATUSES = ("ok", "diverged", "failed", "missing")
#: Example specs to copy (paths relative to the repository root).
EXAMPLE_SPECS = {
    "examples/sweeps/demo.toml": "the `stabilitylab demo` study: 2 sizes x 6 LRs x {baseline, qk_layernorm}",
    "examples/sweeps/lr_size_mitigation.toml": "LR x size x mitigation, 3 sizes, 2 seeds (report fits scaling)",
    "examples/sweeps/hf_model.toml": "your own model: a Hugging Face GPT-2 via --train-fn",
}
SWEEP_EPILOG = "example specs to copy:\n" + "\n".join(f"  {k:42s} {v}" for k, v in EXAMPLE_SPECS.items()) + (
    "\n\n  PYTHONPATH=examples stabilitylab sweep examples/sweeps/hf_model.toml --train-fn sweep_hf_model:train_gpt2"
    "\n  then: stabilitylab report runs/<name>")


def _load_train_fn(ref: str | None):
    if ref is None:
        return None
    module, _, name = ref.partition(":")
    if not module or not name:
        raise ValueError(f"--train-fn {ref!r}: use module:function, e.g. mypkg.train:train_fn")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--train-fn {ref!r}: cannot import it ({e})") from None


def _sweep_cmd(args: argparse.Namespace) -> int:
    from stabilitylab.sweeps.run import sweep
    from stabilitylab.sweeps.spec import SweepSpec

    spec = SweepSpec.from_toml(args.spec)
    store = args.store or f"runs/{spec.name}"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"sweep .* runs failed")  # the summary below says it
        runs = sweep(spec, executor=args.executor, store=store, workers=args.workers, address=args.address,
                     train_fn=_load_train_fn(args.train_fn), extend=args.extend, progress=not args.no_progress,
                     run_progress=args.run_progress, retry_failed=not args.no_retry_failed)
    counts = runs["status"].value_counts()
    print(f"sweep {spec.name!r}: {len(runs)} points: "
          + ", ".join(f"{int(counts.get(s, 0))} {s}" for s in _STATUSES[:3]) + f"; store: {store}")
    return 1 if counts.get("failed", 0) else 0


def format_status(table: pd.DataFrame, path: str, show_all: bool = False) -> str:
    """Text summary of ``sweep_status``: counts, then failed (with the error's last line) and missing points."""
    counts = table["status"].value_counts()
    specs = sorted(set(table.loc[table["in_spec"], "sweep"]))
    lines = [f"sweep store {path} (spec: {', '.join(specs) or '-'}): {int(table['in_spec'].sum())} points: "
             + ", ".join(f"{int(counts.get(s, 0))} {s}" for s in _STATUSES)]
    if (~table["in_spec"]).any():
        lines.append(f"{int((~table['in_spec']).sum())} recorded run(s) belong to no stored spec")
    show = table if show_all else table[table["status"].isin(["failed", "missing"])]
    if len(show):
        err = show["error"].fillna("").map(lambda e: e.strip().splitlines()[-1][:100] if e.strip() else "")
        cols = ["run_id", "size", "variant", "lr", "seed", "status"]
        lines.append(show[cols].assign(error=err).to_string(index=False))
    return "\n".join(lines)


def _status_cmd(args: argparse.Namespace) -> int:
    from stabilitylab.sweeps.store import sweep_status

    print(format_status(sweep_status(args.store), args.store, args.all))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sweep", help="train every point of a TOML sweep spec once (resumable)",
        description="Train every (size, variant, lr, seed) point of a TOML spec once into a store directory; "
                    "re-running skips finished points. Exit status 1 if any run failed.",
        epilog=SWEEP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="TOML spec file (see stabilitylab.sweeps.spec for the format)")
    p.add_argument("--executor", choices=list(EXECUTORS), default="local",
                   help="local: sequential; processes: worker processes; ray: one Ray task per point; "
                        "vectorized: stabilitylab.proxy.vectorized (default: local)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (processes) or Ray tasks in flight / local Ray CPUs (ray)")
    p.add_argument("--address", default=None, help="Ray cluster address, e.g. auto or ray://host:10001 "
                                                   "(default: start a local Ray)")
    p.add_argument("--store", default=None, help="result directory (default: runs/<spec name>)")
    p.add_argument("--extend", action="store_true",
                   help="add this spec's points to a store written by a different spec")
    p.add_argument("--train-fn", default=None, metavar="MODULE:FUNCTION",
                   help="your train_fn(config, monitor) instead of the built-in proxy")
    p.add_argument("--no-retry-failed", action="store_true", help="do not re-run points recorded as failed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--run-progress", action="store_true", help="also a per-step bar per run (local executor)")
    p.set_defaults(func=_sweep_cmd)

    s = sub.add_parser("status", help="what is done, failed and missing in a sweep store",
                       description="Counts of ok / diverged / failed / missing points of a sweep store, then "
                                   "the failed (with their error) and missing points.")
    s.add_argument("store", help="sweep store directory (what sweep --store / store= wrote)")
    s.add_argument("--all", action="store_true", help="list every point, not only failed and missing ones")
    s.set_defaults(func=_status_cmd)
