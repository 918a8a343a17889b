"""Attention probe: per-layer max attention logit and attention entropy, from q and k.

Metrics (``module`` is the attention module's own name, e.g. ``blocks.3.attn``):

- ``attn.max_logit``  max over batch, heads and allowed (query, key) pairs of ``q.k * scale``
                      (+ additive mask), i.e. the largest pre-softmax score; reduce: max
- ``attn.entropy``    mean over softmax rows of ``-sum_j p_ij log p_ij`` (nats); reduce: token-weighted mean

Computed only on logged steps, in query chunks (``functional.attention_stats``), from q and k handed
over by an adapter (``stabilitylab.adapters``) or by the model's own ``record_qk`` call. The last logged
step's per-head maxima are kept in ``probe.head_max`` (used by QK-clip).
"""

from __future__ import annotations

from typing import Any

import torch

from stabilitylab import functional as F
from stabilitylab import metrics as M
from stabilitylab.adapters import base as adapters_base
from stabilitylab.adapters import generic
from stabilitylab.probes.base import Probe


class UnsupportedModelError(ValueError):
    """The attention probe found no attention it can observe in the model."""


def unsupported_message(model: torch.nn.Module) -> str:
    lines = "; ".join(f"{a.name}: {a.description}" for a in adapters_base.ADAPTERS)
    return (f"attention probe: found no attention it can observe in {type(model).__name__}. "
            f"Supported: {lines}. For any other model add one line where it computes attention: "
            "stabilitylab.record_qk(q, k, is_causal=..., attn_mask=..., module=self), and set "
            "`stabilitylab_records_qk = True` on that module class or pass AttentionProbe(modules=[...]); "
            "or drop 'attention' from probes")


class AttentionProbe(Probe):
    """Max attention logit and attention entropy per attention module.

    Args:
        modules: names of attention modules that report through ``record_qk`` (in addition to what the
            adapters find).
        adapters: adapters to try (default: the registry ``stabilitylab.adapters.ADAPTERS``).
        required: raise ``UnsupportedModelError`` at attach when no attention is found (the default
            probe set passes False and the Monitor drops the probe with a warning instead).
        chunk_elements: memory budget of one chunk of materialised scores.
    """

    name = "attention"
    metrics = (M.ATTN_MAX_LOGIT, M.ATTN_ENTROPY)

    def __init__(self, modules: list[str] | None = None, adapters: list | None = None, required: bool = True,
                 chunk_elements: int = F.ATTN_CHUNK_ELEMENTS):
        super().__init__()
        self.module_names = list(modules or [])
        self.adapters = adapters
        self.required = required
        self.chunk_elements = chunk_elements
        self.names: dict[int, str] = {}
        self.covered: dict[str, str] = {}  # module name -> adapter name
        self.head_max: dict[str, torch.Tensor] = {}
        self._step_head_max: dict[str, torch.Tensor] = {}
        self._anon = 0

    def _attach(self) -> None:
        modules = dict(self.model.named_modules())
        self.names = {id(m): n for n, m in modules.items()}
        for n in self.module_names:
            if n not in modules:
                raise ValueError(f"AttentionProbe(modules=...): the model has no submodule {n!r}")
            self.covered[n] = "record_qk"
        for adapter in (self.adapters if self.adapters is not None else adapters_base.ADAPTERS):
            found = [n for n in adapter.find(self.model) if n not in self.covered]
            if found:
                for n in found:
                    self.covered[n] = adapter.name
                for h in adapter.install(self, self.model, found):
                    self._hook(h)
        if not self.covered and self.required:
            raise UnsupportedModelError(unsupported_message(self.model))
        generic.ACTIVE.append(self)

    def _detach(self) -> None:
        if self in generic.ACTIVE:
            generic.ACTIVE.remove(self)
        self.covered = {}
        self.names = {}

    def module_name(self, module: torch.nn.Module | str | None) -> str | None:
        """Name of ``module`` in this probe's model, or None if it belongs to another model."""
        if isinstance(module, str):
            return module
        if module is None:
            self._anon += 1
            return f"attn{self._anon - 1}"
        return self.names.get(id(module))

    def observe_call(self, q: torch.Tensor, k: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
                     is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
                     module: Any = None) -> None:
        """Entry point of ``record_qk`` and of the adapters."""
        if not self.armed:
            return
        name = self.module_name(module)
        if name is None:
            return
        self.observe(name, q, k, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)

    def observe(self, name: str, q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> None:
        """Record max logit and entropy of one attention call of module ``name``."""
        with torch.no_grad():
            st = F.attention_stats(q, k, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                   enable_gqa=enable_gqa, chunk_elements=self.chunk_elements)
        self.record(M.ATTN_MAX_LOGIT, name, st.max_logit, 1.0)
        self.record(M.ATTN_ENTROPY, name, st.entropy_sum.sum(), st.rows.sum())
        old = self._step_head_max.get(name)
        self._step_head_max[name] = st.head_max if old is None else torch.maximum(old, st.head_max)

    def latest_head_max(self) -> dict[str, torch.Tensor]:
        """Per-head max logits of the most recent attention calls: this step's if it recorded any, else
        the last logged step's (``head_max``). Device tensors, no host sync (QK-clip reads them)."""
        return {**self.head_max, **self._step_head_max}

    def _before_collect(self) -> None:
        if self._step_head_max:
            self.head_max = self._step_head_max
            self._step_head_max = {}
        self._anon = 0
