"""``reproduce()``: run the studies, analyse them and write the report."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from stabilitylab.studies.reproduce.findings import (
    analyse_adam_eps,
    analyse_attention,
    analyse_interventions,
    analyse_output_logits,
    analyse_prediction,
)
from stabilitylab.studies.reproduce.report import study_figures, write_report
from stabilitylab.studies.reproduce.scales import SCALES, STUDIES, TRAINING_STUDIES, Scale
from stabilitylab.studies.reproduce.studies import default_executor, run_study, study_specs


@dataclass
class Reproduction:
    """What ``reproduce`` measured: the findings, every table, the timings and where it wrote them."""

    findings: pd.DataFrame
    tables: dict[str, pd.DataFrame]
    timings: dict[str, float]
    counts: dict[str, dict[str, int]]
    out: Path
    report_html: Path | None = None
    report_md: Path | None = None
    figures: dict[str, Path] = field(default_factory=dict)

def reproduce(scale: str | Scale = "quick", out: str | Path | None = None, executor: str | None = None,
              workers: int | None = None, studies: Sequence[str] = STUDIES, device: str | None = None,
              progress: bool = True) -> Reproduction:
    """Run the studies (resuming from ``out``) and write the report; prints the wall time per study.

    Args:
        scale: ``"quick"`` (CPU, minutes), ``"full"`` (one GPU) or a ``Scale``.
        out: output folder (default ``runs/reproduce_<scale name>``).
        executor: sweep executor (default: ``"vectorized"`` when available, else ``"local"``); points the
            vectorized executor cannot train (Adam-atan2) run with ``"local"``.
        workers: worker processes / Ray tasks (``processes`` / ``ray`` executors).
        studies: subset of ``STUDIES`` (``prediction`` and the grad-RMS part of ``adam_eps`` need ``attention``).
        device: torch device (default ``"cuda"`` when available, else ``"cpu"``).
        progress: tqdm progress bars.

    Returns:
        a ``Reproduction`` (findings, tables, timings in seconds, counts of trained / reused runs, paths).
    """
    from stabilitylab.sweeps.executors import EXECUTORS

    if isinstance(scale, str):
        if scale not in SCALES:
            raise ValueError(f"reproduce(scale={scale!r}): choose one of {', '.join(SCALES)} or pass a Scale")
        scale = SCALES[scale]
    if not isinstance(scale, Scale):
        raise TypeError(f"reproduce(scale=...): expected 'quick', 'full' or a Scale, got {type(scale).__name__}")
    executor = executor or default_executor()
    if executor not in EXECUTORS:
        raise ValueError(f"reproduce(executor={executor!r}): choose one of {', '.join(EXECUTORS)}")
    bad = [s for s in studies if s not in STUDIES]
    if bad or not studies:
        raise ValueError(f"reproduce(studies={list(studies)!r}): choose a non-empty subset of {', '.join(STUDIES)}")
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out) if out is not None else Path("runs") / f"reproduce_{scale.name}"
    out.mkdir(parents=True, exist_ok=True)
    specs = study_specs(scale, device)
    data: dict[str, tuple[pd.DataFrame, pd.DataFrame]] = {}
    rep = Reproduction(findings=pd.DataFrame(), tables={}, timings={}, counts={}, out=out)
    findings: list[dict] = []
    figs: dict[str, Any] = {}
    summary_attention = None
    t_all = time.time()
    for study in STUDIES:
        need = study in studies or (study == "attention" and "prediction" in studies)
        if not need:
            continue
        t0 = time.time()
        if study in TRAINING_STUDIES:
            runs, history, rep.counts[study] = run_study(study, specs[study], out, executor, workers, progress)
            data[study] = (runs, history)
        else:
            runs, history = data["attention"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if study == "attention":
                tables, f, summary_attention = analyse_attention(runs, history, scale)
            elif study == "output_logits":
                tables, f, _ = analyse_output_logits(runs, history, scale)
            elif study == "interventions":
                tables, f, _ = analyse_interventions(runs, history, scale)
            elif study == "adam_eps":
                tables, f, extra = analyse_adam_eps(runs, history, scale, summary_attention)
            else:
                tables, f, pred = analyse_prediction(runs, history, scale)
                (out / "prediction.json").write_text(json.dumps(pred.summary(), indent=1) + "\n", encoding="utf-8")
                if pred.fits:
                    from stabilitylab import plots

                    figs["prediction_heldout"] = plots.heldout_prediction(pred)
            if study in TRAINING_STUDIES:
                figs.update(study_figures(study, runs, history, extra if study == "adam_eps" else None))
        rep.tables.update(tables)
        findings += f
        rep.timings[study] = time.time() - t0
        print(f"reproduce {study}: {rep.timings[study]:.1f} s"
              + (f" ({rep.counts[study]['trained']} trained, {rep.counts[study]['reused']} reused, "
                 f"{rep.counts[study]['resumed']} resumed)" if study in rep.counts else ""), flush=True)
    rep.findings = pd.DataFrame(findings, columns=["study", "finding", "measured", "held", "note"])
    rep.tables["run_times"] = _run_times(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        write_report(rep, scale, executor, device, figs)
    rep.timings["total"] = time.time() - t_all
    print(f"reproduce: total {rep.timings['total']:.1f} s; report {rep.report_html}", flush=True)
    return rep


def _run_times(data: dict[str, tuple[pd.DataFrame, pd.DataFrame]]) -> pd.DataFrame:
    """Mean wall time per run by size and variant over the distinct runs of every study (seconds)."""
    runs = pd.concat([r for r, _ in data.values()], ignore_index=True).drop_duplicates("run_id")
    return runs.groupby("size", as_index=False).agg(
        n_params=("n_params", "min"), runs=("run_id", "size"), mean_run_s=("wall_time", "mean"),
        total_s=("wall_time", "sum")).sort_values("n_params")
