"""Analysis of tidy tables: LR sensitivity, fits, predictions. Reads tables, never live models."""

from stabilitylab.analysis.sensitivity import lr_sensitivity, lr_sensitivity_curve

__all__ = ["lr_sensitivity", "lr_sensitivity_curve"]
