"""Attention probe: per-layer max attention logit and attention entropy, from q and k.

Metrics (``module`` is the attention module's own name, e.g. ``blocks.3.attn``):

- ``attn.max_logit``  max over batch, heads and allowed (query, key) pairs of ``q.k * scale``
                      (+ additive mask), i.e. the largest pre-softmax score; reduce: max
- ``attn.entropy``    mean over softmax rows of ``-sum_j p_ij log p_ij`` (nats); reduce: token-weighted mean
- ``attn.max_logit_capped``  only under attention soft-capping (Gemma-2, litgpt ``attention_logit_softcapping``):
                      max of the capped score ``cap * tanh(s / cap)`` the softmax sees; ``attn.max_logit``
                      then stays the raw pre-cap score and ``attn.entropy`` is that of the capped softmax

Scores are what the model computes: additive biases (ALiBi, T5 relative position bias) are included,
whether they reach SDPA as ``attn_mask`` or a hand-written softmax as part of its input (see
``stabilitylab.adapters.runtime``). Query rows that are padding (a 2-D ``attention_mask`` of 0 given to a
Hugging Face style model) are left out of both metrics unless ``include_padded_rows=True``.

Computed only on logged steps, in query chunks (``functional.attention_stats`` / ``score_stats``), from
what an adapter (``stabilitylab.adapters``) sees run or from the model's own ``record_qk`` call; forwards
recomputed by activation checkpointing during backward are skipped. The last logged step's per-head
maxima are kept in ``probe.head_max`` (used by QK-clip).
"""

from __future__ import annotations

from typing import Any

import torch

from stabilitylab import functional as F
from stabilitylab import metrics as M
from stabilitylab.adapters import base as adapters_base
from stabilitylab.adapters import generic, runtime
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
        include_padded_rows: also count query rows that are padding (2-D ``attention_mask`` zeros of a
            Hugging Face style model); by default they are excluded from max logit and entropy.
    """

    name = "attention"
    metrics = (M.ATTN_MAX_LOGIT, M.ATTN_ENTROPY, M.ATTN_MAX_LOGIT_CAPPED)

    def __init__(self, modules: list[str] | None = None, adapters: list | None = None, required: bool = True,
                 chunk_elements: int = F.ATTN_CHUNK_ELEMENTS, include_padded_rows: bool = False):
        super().__init__()
        self.include_padded_rows = include_padded_rows
        self._frames: list[runtime.Frame] = []
        self._row_masks: list[tuple[torch.nn.Module, torch.Tensor | None]] = []
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
        found_by = []
        for adapter in (self.adapters if self.adapters is not None else adapters_base.ADAPTERS):
            found = [n for n in adapter.find(self.model) if n not in self.covered]
            self.covered.update(dict.fromkeys(found, adapter.name))
            found_by.append((adapter, found))
        # A candidate found only by the methods it uses (an adapter with ``by_code_scan``) that contains
        # another attention module is a block or a whole model (a softmax in its generate, say): drop it.
        def contains_other(n: str) -> bool:
            return any(o != n and (n == "" or o.startswith(n + ".")) for o in self.covered)

        drop = {n for a, found in found_by if getattr(a, "by_code_scan", False) for n in found if contains_other(n)}
        for n in drop:
            del self.covered[n]
        for h in runtime.install_frames(self, self.model, self.module_names, capture=False):
            self._hook(h)
        for adapter, found in found_by:
            found = [n for n in found if n not in drop]
            if found:
                for h in adapter.install(self, self.model, found):
                    self._hook(h)
        if not self.covered and self.required:
            raise UnsupportedModelError(unsupported_message(self.model))
        if self.covered:
            for h in runtime.install_row_masks(self, self.model):
                self._hook(h)
        generic.ACTIVE.append(self)

    def unused(self) -> str | None:
        """A warning when no attention module was found (only reachable with ``required=False``)."""
        if self.covered:
            return None
        return (f"no attention found in {type(self.model).__name__}, so attn.* metrics are off. Add "
                "stabilitylab.record_qk(q, k, ..., module=self) where it computes attention to get them.")

    def _detach(self) -> None:
        if self in generic.ACTIVE:
            generic.ACTIVE.remove(self)
        self.covered = {}
        self.names = {}
        self._frames.clear()
        self._row_masks.clear()

    def row_mask(self) -> torch.Tensor | None:
        """``(B, T)`` bool mask of the query rows that count in the forward in progress (None: all)."""
        if self.include_padded_rows or not self._row_masks:
            return None
        return self._row_masks[-1][1]

    def warn_silent(self, frame: runtime.Frame) -> None:
        """One warning for a covered module that ran on a logged step without an observed attention call."""
        impl = f" (attn_implementation={frame.implementation!r})" if frame.implementation else ""
        hf = "load the model with attn_implementation='sdpa' or 'eager', or " if frame.implementation else ""
        self.warn_once(f"silent:{frame.name}", f"{frame.name} ({type(frame.module).__name__}) ran on a logged step "
                       f"but no attention call was observed in it{impl}, so it records no attn.* metrics. Fix: "
                       f"{hf}call stabilitylab.record_qk(q, k, is_causal=..., attn_mask=..., module=self) where "
                       "it computes attention")

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
        if not self.armed or runtime.in_backward():
            return
        name = self.module_name(module)
        if name is None:
            return
        if self._frames:  # the module reports itself: its own SDPA / softmax calls must not count again
            self._frames[-1].records += 1
            self._frames[-1].capture = False
        self.observe(name, q, k, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)

    def observe(self, name: str, q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> None:
        """Record max logit and entropy of one attention call of module ``name``."""
        with torch.no_grad():
            st = F.attention_stats(q, k, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                   enable_gqa=enable_gqa, chunk_elements=self.chunk_elements,
                                   row_mask=self.row_mask())
        self._record_stats(name, st)

    def observe_scores(self, name: str, scores: torch.Tensor, raw: torch.Tensor | None = None,
                       capped: bool = False, allowed: torch.Tensor | None = None) -> None:
        """Record one attention call of module ``name`` from the scores its softmax takes.

        Args:
            name: module name.
            scores: the softmax input ``(..., H, Tq, Tk)``, masks and biases included.
            raw: pre-cap scores under soft-capping (their max becomes ``attn.max_logit``).
            capped: a soft-cap is in force (``attn.max_logit_capped`` is recorded).
            allowed: optional bool mask of allowed pairs, broadcastable to ``scores``.
        """
        with torch.no_grad():
            st = F.score_stats(scores, raw=raw, row_mask=self.row_mask(), allowed=allowed,
                               chunk_elements=self.chunk_elements)
        if capped and st.capped_head_max is None:
            self.record(M.ATTN_MAX_LOGIT_CAPPED, name, st.max_logit, 1.0)
            self.record(M.ATTN_ENTROPY, name, st.entropy_sum.sum(), st.rows.sum())
            return
        self._record_stats(name, st)

    def _record_stats(self, name: str, st: F.AttentionStats) -> None:
        self.record(M.ATTN_MAX_LOGIT, name, st.max_logit, 1.0)
        self.record(M.ATTN_ENTROPY, name, st.entropy_sum.sum(), st.rows.sum())
        if st.capped_head_max is not None:
            self.record(M.ATTN_MAX_LOGIT_CAPPED, name, st.capped_head_max.amax(), 1.0)
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
