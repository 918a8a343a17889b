"""The W&B stability view, built offline: its sections and charts cover exactly the keys the sink writes."""

from __future__ import annotations

import re

import pytest
import torch

from stabilitylab import sinks
from stabilitylab.sinks.wandb import STEP_METRIC, WandB, stability_workspace
from stabilitylab.sweeps.runner import MonitorFactory
from stabilitylab.sweeps.spec import SweepSpec

pytest.importorskip("wandb_workspaces")
SECTIONS = ["Attention", "Output logits", "Gradients and updates", "Adam", "Activations", "Health and events"]


@pytest.fixture
def sweep_run(tiny_model, tiny_batch):
    """A real short monitored run built the way a sweep builds it: (monitor, memory sink)."""
    point = SweepSpec(name="t", lrs=[1e-3], sizes=[{"d_model": 32, "n_layers": 2, "head_dim": 16}]).points()[0]
    memory = sinks.Memory()
    x, y = tiny_batch
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    mon = MonitorFactory(point)(tiny_model, opt, every=1, sinks=[memory])
    for _ in range(2):
        _, loss = tiny_model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        mon.step(loss)
    mon.close()
    return mon, memory


def _written_keys(memory, max_modules):
    """Every key the W&B sink logs for these records (its own row function), without the step metric."""
    sink = WandB(max_modules=max_modules)
    keys = set()
    for r in memory.batches:
        keys |= set(sink.row(r))
    return keys - {STEP_METRIC}


def _charts(view):
    """section name -> list of the y keys of each line chart (regex charts as ('regex', pattern))."""
    out = {}
    for s in view.sections:
        out[s.name] = [tuple(p.y) if p.y else ("regex", p.metric_regex) for p in s.panels if hasattr(p, "y")]
    return out


@pytest.mark.parametrize("max_modules", [128, 3])
def test_view_charts_exactly_the_keys_the_sink_writes(sweep_run, max_modules):
    mon, memory = sweep_run
    written = _written_keys(memory, max_modules)
    hist = mon.history()
    view = stability_workspace("team", "proj", history=hist, max_modules=max_modules)
    assert _charts(view) == _charts(stability_workspace("team", "proj", keys=written | {STEP_METRIC},
                                                        max_modules=max_modules))
    names = [s.name for s in view.sections]
    main = [n for n in names if not n.endswith(": per layer") and n != "Sweep summary"]
    assert main == SECTIONS
    for n in names:  # each per-layer section sits right below its summary section, collapsed
        if n.endswith(": per layer"):
            assert names[names.index(n) - 1] == n.removesuffix(": per layer")
    charts = _charts(view)
    plotted = [k for ys in charts.values() for y in ys for k in y]
    assert sorted(plotted) == sorted(written)  # every written key once, nothing that is never written
    for section, ys in charts.items():
        for (k,) in ys:  # one key per chart
            module = k.split("/", 1)[1]
            summary = module in ("model", "max", "min", "mean")
            assert summary == (not section.endswith(": per layer")), (section, k)
    assert ("attn.max_logit/max",) == charts["Attention"][0]  # summary charts first
    per_tensor = [k for k in written if k.startswith("grad.rms/") and k != "grad.rms/max"]
    assert bool(per_tensor) == (max_modules == 128)
    sections = {s.name: s for s in view.sections}
    assert sections["Attention"].is_open and not sections["Attention: per layer"].is_open
    assert all(p.x == STEP_METRIC for s in view.sections for p in s.panels if hasattr(p, "y"))
    assert any(getattr(p, "table_name", None) == "stabilitylab/events" for p in sections["Health and events"].panels)


def test_runs_group_by_the_sweep_config_the_sink_records(sweep_run):
    mon, _ = sweep_run
    view = stability_workspace("team", "proj", sweep_group="t")
    groups = [g.name for g in view.runset_settings.groupby]
    assert groups == ["stabilitylab.size", "stabilitylab.variant"]
    # the WandB sink stores the Monitor settings under run config "stabilitylab"
    assert all(g.split(".", 1)[1] in mon.config for g in groups)
    model = view._to_model()  # what .save() would send: builds without a server
    # the backend path of nested config key stabilitylab -> size
    assert [g.name for g in model.spec.section.run_sets[0].grouping] == ["stabilitylab.value.size", "stabilitylab.value.variant"]
    assert stability_workspace("team", "proj", group_by=()).runset_settings.groupby == []


def test_without_history_per_layer_charts_are_regexes_covering_every_module_key(sweep_run):
    _, memory = sweep_run
    written = _written_keys(memory, None)
    charts = _charts(stability_workspace("team", "proj"))
    summary = {k for n, ys in charts.items() if not n.endswith("per layer") for y in ys for k in y}
    regexes = [y[1] for n, ys in charts.items() if n.endswith("per layer") for y in ys]
    for key in written:
        if key.split("/", 1)[1] in ("model", "max", "min", "mean"):
            assert key in summary, key
        else:
            assert sum(bool(re.match(r, key)) for r in regexes) == 1, key


@pytest.mark.parametrize("kwargs, match", [
    ({"entity": ""}, "entity=''"),
    ({"group_by": "size"}, "group_by='size'"),
    ({"history": "x"}, "history="),
    ({"history": None, "keys": [], "group_by": ("size",), "name": " "}, "name=' '"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    args = {"entity": "team", "project": "proj", **kwargs}
    with pytest.raises(ValueError, match=match):
        stability_workspace(args.pop("entity"), args.pop("project"), **args)


def test_sweep_figures_reach_the_sweep_summary_under_the_keys_the_view_shows(wandb_offline, tiny_sweep_store):
    import pandas as pd

    from stabilitylab.diagnosis import run_label
    from stabilitylab.plots import sweep_figures
    from stabilitylab.studies.sweep_summary import log_sweep_summary

    runs = pd.read_parquet(tiny_sweep_store / "runs.parquet")
    history = pd.read_parquet(tiny_sweep_store / "history.parquet")
    figs = sweep_figures(runs, history)
    attn = history[history["metric"] == "attn.max_logit"]
    worst = max(attn["run_id"].unique(), key=lambda r: attn.loc[attn["run_id"] == r, "value"].max())
    assert run_label(runs.set_index("run_id").loc[worst].to_dict()) in figs["attn_logit_per_layer"].axes[0].get_title()
    panels = [ax for ax in figs["lr_vs_loss"].axes if ax.get_lines()]  # one panel per variant, a line per size
    assert len(panels) == runs["variant"].nunique()
    assert {t.get_text().split(" ")[0] for t in panels[-1].get_legend().get_texts()} == set(runs["size"])
    out = log_sweep_summary(runs, figs, group="tiny")

    (run,) = wandb_offline()
    view = stability_workspace("team", "proj")
    (media,) = [p for s in view.sections if s.name == "Sweep summary" for p in s.panels if hasattr(p, "media_keys")]
    assert sorted(media.media_keys) == sorted(k for k in out["keys"] if k.startswith("sweep/figures/"))
    for key in media.media_keys:
        assert run["summary"][f"{key}/_type"] == "image-file"
