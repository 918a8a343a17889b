"""Every figure function returns a Figure that saves as a valid PNG."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from stabilitylab import plots
from stabilitylab.analysis import fit_scaling, load_store


def _valid_png(path) -> None:
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50


def test_every_figure_is_a_figure_and_a_valid_png(tiny_sweep_store, tmp_path):
    runs, history = load_store(tiny_sweep_store)
    rid = runs["run_id"].iloc[0]
    fit = fit_scaling(pd.DataFrame({"x": [1e3, 1e4, 1e5, 1e6], "y": [1.0, 2.1, 3.9, 8.2]}), "x", "y")
    figs = {
        "lr_vs_loss": plots.lr_vs_loss(runs),
        "max_attention_logit": plots.max_attention_logit(history, runs),
        "lr_sensitivity_vs_size": plots.lr_sensitivity_vs_size(runs),
        "heatmap": plots.attention_logit_heatmap(history, rid),
        "lse_drift": plots.lse_drift(history, runs),
        "scaling_fit": plots.scaling_fit(fit, holdout=(1e7, 15.0)),
        "timeline": plots.warning_timeline(history, rid),
    }
    for name, fig in figs.items():
        assert isinstance(fig, Figure), name
        _valid_png(plots.save(fig, tmp_path / f"{name}.png"))


def test_heatmap_has_one_row_per_layer_and_names_missing_run(tiny_sweep_store):
    runs, history = load_store(tiny_sweep_store)
    rid = runs["run_id"].iloc[0]
    fig = plots.attention_logit_heatmap(history, rid)
    img = fig.axes[0].images[0].get_array()
    h = history[(history.run_id == rid) & (history.metric == "attn.max_logit")]
    assert img.shape == (h["module"].nunique(), h["step"].nunique())
    np.testing.assert_allclose(np.nanmax(img), np.log10(h["value"].abs().max()), rtol=1e-6)
    with pytest.raises(ValueError, match="run_id='nope'"):
        plots.attention_logit_heatmap(history, "nope")
