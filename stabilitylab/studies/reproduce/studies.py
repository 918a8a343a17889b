"""The sweeps of each training study and running them into one store per study (resumable, with runs
shared between studies copied rather than retrained)."""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from stabilitylab.studies.reproduce.scales import Scale


def study_specs(scale: Scale, device: str = "cpu") -> dict[str, list]:
    """The sweeps of each training study: one ``SweepSpec`` per variant (so each can pick its executor).

    Args:
        scale: sizes, LRs and run length.
        device: torch device of every run.

    Returns:
        ``{study: [SweepSpec, ...]}`` for the studies in ``TRAINING_STUDIES``.
    """
    from stabilitylab.sweeps import SweepSpec

    common = dict(lrs=list(scale.lrs), steps=scale.steps, batch_size=scale.batch_size, seq_len=scale.seq_len,
                  every=scale.every, device=device)
    long = {"name": "long_warmup", "bundle": "baseline", "warmup_steps": max(1, int(scale.long_warmup * scale.steps))}

    def sizes_of(study: str) -> list:
        return list(scale.sizes[:-1] if study in scale.small_studies else scale.sizes)

    def specs(study: str, variants: list, sizes: Sequence | None = None, suffix: str = "", **kw: Any) -> list:
        sizes = sizes_of(study) if sizes is None else sizes
        return [SweepSpec(name=f"{study}-{v if isinstance(v, str) else v['name']}{suffix}", sizes=list(sizes),
                          variants=[v], **common, **kw) for v in variants]

    attention = ["baseline", "qk_layernorm"]
    held = scale.heldout_seeds if scale.heldout_seeds is not None else scale.seeds
    if tuple(held) == tuple(scale.seeds):
        att = specs("attention", attention, seeds=list(scale.seeds))
    else:  # fitted sizes with every seed, the held-out size with its own seeds
        att = [s for v in attention for s in
               (specs("attention", [v], scale.sizes[:-1], seeds=list(scale.seeds))
                + specs("attention", [v], scale.sizes[-1:], "-heldout", seeds=list(held)))]
    first = [scale.seeds[0]]
    return {
        "attention": att,
        "output_logits": specs("output_logits", ["baseline", "z_loss"], weight_decay=0.0, seeds=first),
        "interventions": specs("interventions", ["baseline", long, "indep_wd", "mup", "all"], seeds=first),
        "adam_eps": specs("adam_eps", ["baseline", "eps1e-15", "adam_atan2"], sizes=sizes_of("adam_eps")[-1:],
                          seeds=first),
    }


def default_executor() -> str:
    """``"vectorized"`` when ``stabilitylab.proxy.vectorized.train_many`` is importable, else ``"local"``."""
    try:
        found = importlib.util.find_spec("stabilitylab.proxy.vectorized") is not None
    except ImportError:
        found = False
    if found:
        from stabilitylab.proxy import vectorized

        found = hasattr(vectorized, "train_many")
    return "vectorized" if found else "local"


def _executor_for(spec, executor: str) -> str:
    """``vectorized`` trains AdamW with warm-up + cosine only; other points (Adam-atan2) use ``local``."""
    from stabilitylab.proxy.vectorized import unsupported

    if executor == "vectorized" and any(unsupported(p.config) for p in spec.points()):
        return "local"
    return executor


def run_study(study: str, specs: list, out: Path, executor: str, workers: int | None = None,
              progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """Train (or resume, or copy from sibling studies) every point of ``specs`` into ``out/<study>``.

    Returns:
        ``(runs, history, counts)``: this study's finished runs and their history, and how many points
        were ``trained``, ``reused`` (copied from another study's store) and ``resumed`` (already there).
    """
    from stabilitylab.sweeps import load_sweep, sweep
    from stabilitylab.sweeps.run import trainer_name
    from stabilitylab.sweeps.store import FINISHED, SweepStore

    path = out / study
    others = sorted(p for p in out.iterdir() if p.is_dir() and p != path and (p / "spec.json").exists())
    counts = {"trained": 0, "reused": 0, "resumed": 0, "failed": 0}
    ids: list[str] = []
    for spec in specs:
        store = SweepStore(path)
        store.open(spec, trainer_name(None), extend=True)
        counts["reused"] += len(store.copy_finished(others, [p.run_id for p in spec.points()]))
        rows = store.rows()
        done = sum(rows.get(p.run_id, {}).get("status") in FINISHED for p in spec.points())
        ex = _executor_for(spec, executor)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"sweep .* runs failed")
            runs = sweep(spec, executor=ex, store=path, workers=workers, extend=True, progress=progress)
            if ex != "local" and (runs["status"] == "failed").any():
                print(f"reproduce {study}: {int((runs['status'] == 'failed').sum())} run(s) failed under "
                      f"executor {ex!r} (first error: {runs.loc[runs['status'] == 'failed', 'error'].iloc[0][-200:]!r});"
                      " retrying them with executor 'local'")
                runs = sweep(spec, executor="local", store=path, extend=True, progress=progress)
        counts["trained"] += len(spec) - done
        counts["failed"] += int((runs["status"] == "failed").sum())
        ids += list(runs["run_id"])
    counts["resumed"] = len(ids) - counts["trained"] - counts["reused"]
    runs, history = load_sweep(path)
    runs = runs[runs["run_id"].isin(ids) & (runs["status"] != "failed")].reset_index(drop=True)
    history = history[history["run_id"].isin(runs["run_id"])].reset_index(drop=True)
    return runs, history, counts

