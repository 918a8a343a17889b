"""Activation probe: output size, batch entropy and kurtosis of each Transformer block.

Metrics (``module`` is the block's name):

- ``act.rms``            sqrt(mean(h^2)) of the block output
- ``act.batch_entropy``  mean over units of 0.5*log(2*pi*e*var over tokens) (Peer et al., 2022)
- ``act.kurtosis``       mean over tokens of E[(h-mu)^4]/E[(h-mu)^2]^2 across features

Forwards that activation checkpointing re-runs during backward are not counted again. Blocks are
found automatically: the elements of the longest ``nn.ModuleList`` of identical modules
(``transformer.h``, ``model.layers``, the proxy's ``blocks``), or the names passed as ``modules``.
"""

from __future__ import annotations

from typing import Any

import torch

from stabilitylab import functional as F
from stabilitylab import metrics as M
from stabilitylab import shards
from stabilitylab.adapters.runtime import in_backward
from stabilitylab.probes.base import Probe


def find_blocks(model: torch.nn.Module) -> list[str]:
    """Names of the repeated blocks of a model (the longest ModuleList of one module type)."""
    best: list[str] = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > len(best):
            types = {type(m) for m in mod}
            if len(types) == 1:
                best = [f"{name}.{i}" if name else str(i) for i in range(len(mod))]
    return best


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return getattr(output, "last_hidden_state", None)


class ActivationProbe(Probe):
    """Per-block activation statistics.

    Args:
        modules: names of the modules to watch (default: the model's repeated blocks).
        stats: which of ``"rms"``, ``"batch_entropy"``, ``"kurtosis"`` to compute.
    """

    name = "activations"
    metrics = (M.ACT_RMS, M.ACT_BATCH_ENTROPY, M.ACT_KURTOSIS)
    _STATS = ("rms", "batch_entropy", "kurtosis")

    def __init__(self, modules: list[str] | None = None, stats: tuple[str, ...] = _STATS):
        super().__init__()
        bad = [s for s in stats if s not in self._STATS]
        if bad:
            raise ValueError(f"ActivationProbe(stats={stats!r}): unknown {bad}; choose from {self._STATS}")
        self.module_names = modules
        self.stats = tuple(stats)

    def _attach(self) -> None:
        names = self.module_names if self.module_names is not None else find_blocks(self.model)
        if not names:
            names = [n for n, m in self.model.named_children()]
        for n in names:
            try:
                mod = self.model.get_submodule(n)
            except AttributeError:
                raise ValueError(f"ActivationProbe(modules=...): the model has no submodule {n!r}") from None
            self._hook(mod.register_forward_hook(self._make_hook(n)))
        self.watched = list(names)

    def _make_hook(self, name: str):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if not self.armed or in_backward():  # a checkpointed forward recomputed in backward: seen once
                return
            h = _first_tensor(output)
            if h is None or not h.is_floating_point():
                return
            self.observe(name, h)
        return hook

    def observe(self, name: str, h: torch.Tensor) -> None:
        """Record the statistics of activation ``h`` (``(..., D)``) for module ``name``.

        A DTensor is read through its local shard (``shards.local_activation``); one sharded on the
        feature dim records ``act.rms`` only (the per-token statistics need every feature of a token).
        """
        x, whole_tokens = shards.local_activation(h.detach())
        stats = self.stats if whole_tokens else tuple(s for s in self.stats if s == "rms")
        x = x.float() if x.dtype not in (torch.float32, torch.float64) else x  # cast 16-bit input once
        tokens = float(x[..., 0].numel())
        if "rms" in stats:
            self.record(M.ACT_RMS, name, torch.linalg.vector_norm(x).square(), float(x.numel()))
        if "batch_entropy" in stats and tokens > 1:
            self.record(M.ACT_BATCH_ENTROPY, name, F.batch_entropy(x) * tokens, tokens)
        if "kurtosis" in stats:
            self.record(M.ACT_KURTOSIS, name, F.kurtosis(x) * tokens, tokens)
