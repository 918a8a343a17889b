"""Output-logit probe: log Z drift of the LM head.

Metrics (``module`` ""):

- ``logits.lse_mean``  mean over tokens of log Z = logsumexp(z) over the vocabulary
- ``logits.lse_std``   std over tokens of log Z (unbiased, per forward; token-weighted over micro-batches)
- ``logits.max``       max output logit

The logits are read from the output of ``module`` (default: the model itself) on logged steps: a tensor,
the first tensor of a tuple (the proxy returns ``(logits, loss)``), an object with ``.logits`` (Hugging
Face) or a dict with ``"logits"``.
"""

from __future__ import annotations

from typing import Any

import torch

from stabilitylab import functional as F
from stabilitylab import metrics as M
from stabilitylab.probes.base import Probe


def find_logits(output: Any) -> torch.Tensor | None:
    """The logits tensor in a model output, or None."""
    if isinstance(output, torch.Tensor):
        return output if output.dim() >= 2 and output.is_floating_point() else None
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor) and item.dim() >= 2 and item.is_floating_point():
                return item
    return None


class LogitsProbe(Probe):
    """log Z statistics of the output logits.

    Args:
        module: dotted name of the submodule whose output holds the logits (default: the model).
    """

    name = "logits"
    metrics = (M.LOGITS_LSE_MEAN, M.LOGITS_LSE_STD, M.LOGITS_MAX)

    def __init__(self, module: str | None = None):
        super().__init__()
        self.module_name = module

    def _attach(self) -> None:
        target = self.model
        if self.module_name:
            try:
                target = self.model.get_submodule(self.module_name)
            except AttributeError:
                raise ValueError(f"LogitsProbe(module={self.module_name!r}): the model has no such submodule") from None
        self._hook(target.register_forward_hook(self._on_output))

    def _on_output(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not self.armed:
            return
        logits = find_logits(output)
        if logits is None:
            self.warn_once("nologits", "the model output holds no logits tensor; pass LogitsProbe(module='lm_head')")
            return
        self.observe(logits)

    def observe(self, logits: torch.Tensor) -> None:
        """Record log Z statistics of ``logits`` (``(..., vocab)``)."""
        mean, std, mx = F.lse_stats(logits)
        n = logits[..., 0].numel()
        self.record(M.LOGITS_LSE_MEAN, "", mean * n, float(n))
        self.record(M.LOGITS_LSE_STD, "", std * n, float(n))
        self.record(M.LOGITS_MAX, "", mx, 1.0)
