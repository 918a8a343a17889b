"""A ready W&B stability view (``wandb-workspaces``): ``stabilitylab.sinks.wandb.stability_workspace``.

    from stabilitylab.sinks.wandb import stability_workspace
    view = stability_workspace("my-team", "my-project", history=mon.history())   # builds it, offline
    view.save()                                                                    # needs `wandb login`

What the saved view shows, top to bottom (every chart's x axis is ``stabilitylab/step``):

- **Attention**, **Output logits**, **Gradients and updates**, **Adam**, **Activations**, **Health and
  events**: open sections with one chart per metric's summary series (``attn.max_logit/max``,
  ``attn.entropy/min``, ``logits.lse_mean/model``, ``grad.global_norm/model``, ``loss/model`` ...), log
  scale where the signal grows by orders of magnitude; *Health and events* also holds the
  ``stabilitylab/events`` table (spikes, non-finite values, early warnings).
- **<section>: per layer**: a collapsed section under each of them with one chart per module series
  (``attn.max_logit/blocks.3.attn`` ...) when ``history`` or ``keys`` says which modules exist, else one
  chart per metric of all its series (a regex panel).
- **Sweep summary**: the ``sweep/figures/*`` images (heatmap, LR-vs-loss per size) and the
  ``sweep/lr_sensitivity`` table that ``log_sweep_summary`` logs.
- Runs grouped by the sweep's ``size`` and ``variant`` (run config ``stabilitylab.size`` /
  ``stabilitylab.variant``), each chart drawing a group's mean with its min-max band.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd

from stabilitylab import metrics as M
from stabilitylab.sinks._keys import series_key, series_keys, summary_key

#: (section, metrics) in order; metrics with named modules also get a "<section>: per layer" section.
SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Attention", (M.ATTN_MAX_LOGIT, M.ATTN_ENTROPY)),
    ("Output logits", (M.LOGITS_LSE_MEAN, M.LOGITS_LSE_STD, M.LOGITS_MAX)),
    ("Gradients and updates", (M.GRAD_GLOBAL_NORM, M.GRAD_RMS, M.UPDATE_RMS, M.UPDATE_RATIO, M.PARAM_RMS)),
    ("Adam", (M.ADAM_EPS_DOMINANCE, M.ADAM_V_RMS)),
    ("Activations", (M.ACT_RMS, M.ACT_BATCH_ENTROPY, M.ACT_KURTOSIS)),
    ("Health and events", (M.LOSS, M.LR, M.HEALTH_SPIKE, M.HEALTH_NONFINITE, M.SHARPNESS_PRECONDITIONED,
                           M.SHARPNESS_THRESHOLD)),
)
#: Metrics the probes record for the whole model (module ""); the rest are per module.
WHOLE_MODEL_METRICS = frozenset({M.LOSS, M.LR, M.GRAD_GLOBAL_NORM, M.LOGITS_LSE_MEAN, M.LOGITS_LSE_STD,
                                 M.LOGITS_MAX, M.HEALTH_SPIKE, M.SHARPNESS_PRECONDITIONED,
                                 M.SHARPNESS_THRESHOLD})
#: Per-module metrics whose probe also records a whole-model value.
BOTH_METRICS = frozenset({M.ADAM_EPS_DOMINANCE})
_LOG_Y = frozenset({M.ATTN_MAX_LOGIT, M.LOGITS_MAX, M.GRAD_GLOBAL_NORM, M.GRAD_RMS, M.UPDATE_RMS,
                    M.UPDATE_RATIO, M.ADAM_V_RMS, M.SHARPNESS_PRECONDITIONED, M.SHARPNESS_THRESHOLD})
SWEEP_SECTION = "Sweep summary"


def _layer_order(key: str) -> list:
    """Sort key putting ``blocks.2`` before ``blocks.10`` (numbers compared as numbers)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"[./]", key)]


def _summary_keys(metric: str, keys: list[str] | None) -> list[str]:
    """The summary chart's keys: whole-model and/or summary series (as written, when known)."""
    if keys is not None:
        return [k for k in (series_key(metric, ""), summary_key(metric)) if k in keys]
    if metric in WHOLE_MODEL_METRICS:
        return [series_key(metric, "")]
    return [series_key(metric, "")] * (metric in BOTH_METRICS) + [summary_key(metric)]


def stability_workspace(entity: str, project: str, *, name: str = "stabilitylab: stability",
                        history: pd.DataFrame | None = None, keys: Iterable[str] | None = None,
                        group_by: Sequence[str] = ("size", "variant"), max_modules: int | None = 128,
                        sweep_group: str | None = None) -> Any:
    """Build (not save) a W&B workspace view of the stability signals the ``WandB`` sink logs.

    Args:
        entity: W&B entity (user or team) that will own the view.
        project: W&B project of the runs.
        name: the view's name in the workspace menu.
        history: a tidy history (``Monitor.history()`` or a sweep's) naming the modules, so each layer gets
            its own chart; without it (and ``keys``) per-layer sections hold one regex chart per metric.
        keys: the W&B keys the sink wrote (e.g. ``WandB.row(records)``), instead of ``history``.
        group_by: run-config columns (``stabilitylab.<column>``) to group runs by; ``()`` for no grouping.
        max_modules: the sink's ``max_modules`` (per-module series of larger metrics are not logged).
        sweep_group: show only runs of this W&B group (a sweep's name); None: every run of the project.

    Returns:
        a ``wandb_workspaces.workspaces.Workspace``; call ``.save()`` on it to create the view.
    """
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError:
        raise ImportError("stability_workspace needs the wandb-workspaces package: "
                          "pip install 'stabilitylab[wandb-workspaces]' (or pip install wandb-workspaces)") from None
    from stabilitylab.sinks.wandb import EVENTS_KEY, STEP_METRIC

    for arg, v in (("entity", entity), ("project", project), ("name", name)):
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"stability_workspace({arg}={v!r}): pass a non-empty string")
    if history is not None and keys is not None:
        raise ValueError("stability_workspace(history=..., keys=...): pass one of them")
    if isinstance(group_by, str) or not all(isinstance(c, str) and c for c in group_by):
        raise ValueError(f"stability_workspace(group_by={group_by!r}): pass a sequence of config column names, "
                         "e.g. ('size', 'variant')")
    known: dict[str, list[str]] | None = None
    if history is not None:
        if not isinstance(history, pd.DataFrame) or not {"metric", "module"} <= set(history.columns):
            raise ValueError("stability_workspace(history=...): pass a tidy history DataFrame with metric and "
                             "module columns (Monitor.history() or stabilitylab.load_sweep(path)[1])")
        known = series_keys(zip(history["metric"], history["module"].fillna("")), max_modules)
    elif keys is not None:
        known = {}
        for k in keys:
            metric, sep, _ = str(k).partition("/")
            if sep and metric in M.METRICS:
                known.setdefault(metric, []).append(str(k))

    def line(metric: str, y: list[str], title: str, grouped: bool) -> Any:
        return wr.LinePlot(title=title, x=STEP_METRIC, y=y, log_y=metric in _LOG_Y or None,
                           groupby_rangefunc="minmax" if grouped and group_by else None)

    sections = []
    for section, metrics in SECTIONS:
        summary, per_layer = [], []
        for metric in metrics:
            ks = None if known is None else known.get(metric)
            if known is not None and not ks:
                continue  # not recorded by these runs
            doc = M.spec(metric).doc
            for k in _summary_keys(metric, ks):
                what = "" if k.endswith("/model") else f" ({M.spec(metric).summary} over modules)"
                summary.append(line(metric, [k], f"{metric}{what}: {doc}", grouped=True))
            if ks is None:
                if metric not in WHOLE_MODEL_METRICS:
                    per_layer.append(wr.LinePlot(title=f"{metric}: every module", x=STEP_METRIC,
                                                 metric_regex=f"^{re.escape(metric)}/.*",
                                                 log_y=metric in _LOG_Y or None))
                continue
            per_layer += [line(metric, [k], k, grouped=False) for k in sorted(ks, key=_layer_order)
                          if k not in (series_key(metric, ""), summary_key(metric))]
        if section == "Health and events":
            summary.append(wr.WeavePanelSummaryTable(table_name=EVENTS_KEY, layout=wr.Layout(w=24, h=8)))
        if summary:
            sections.append(ws.Section(name=section, panels=summary, is_open=True))
        if per_layer:
            sections.append(ws.Section(name=f"{section}: per layer", panels=per_layer, is_open=False))
    sections.append(ws.Section(name=SWEEP_SECTION, is_open=False, panels=[
        wr.MediaBrowser(title="sweep figures", media_keys=[f"sweep/figures/{f}" for f in SWEEP_FIGURES]),
        wr.WeavePanelSummaryTable(table_name="sweep/lr_sensitivity", layout=wr.Layout(w=24, h=8)),
    ]))
    runset = ws.RunsetSettings(
        groupby=[ws.Config(f"stabilitylab.{c}") for c in group_by],
        filters=[ws.Metric("Group") == sweep_group] if sweep_group else "",
    )
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections,
                        settings=ws.WorkspaceSettings(x_axis=STEP_METRIC), runset_settings=runset)


#: Figures ``plots.sweep_figures`` makes (``log_sweep_summary`` logs them under ``sweep/figures/<name>``).
SWEEP_FIGURES = ("attn_logit_per_layer", "lr_vs_loss")
