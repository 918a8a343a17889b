"""Analysis of tidy tables: LR sensitivity, LR curves, scaling fits, predictions, early warning.

Reads tables (``runs``: one row per run; ``history``: run_id, step, metric, module, value), never live
models, the proxy or a sink. ``EarlyWarning`` (re-exported) is the live probe of
``stabilitylab.probes.early_warning``; the offline evaluation here replays it over tables.
"""

from stabilitylab.analysis.early_warning import EarlyWarning, divergence_step, evaluate_warnings
from stabilitylab.analysis.ladder import LadderFit, fit_ladder
from stabilitylab.analysis.lr_curves import critical_lr, lr_curves, optimal_lr
from stabilitylab.analysis.predict import Prediction, basin_edges, predict, predict_instability, run_signals
from stabilitylab.analysis.scaling import ScalingFit, fit_scaling
from stabilitylab.analysis.sensitivity import lr_sensitivity, lr_sensitivity_curve
from stabilitylab.analysis.tables import load_store

__all__ = ["EarlyWarning", "LadderFit", "Prediction", "ScalingFit", "basin_edges", "critical_lr",
           "divergence_step", "evaluate_warnings", "fit_ladder", "fit_scaling", "load_store", "lr_curves",
           "lr_sensitivity", "lr_sensitivity_curve", "optimal_lr", "predict", "predict_instability", "run_signals"]
