"""How the attention probe finds q and k in a model family.

An adapter says which modules of a model compute attention (``find``) and arranges for their q and k
to reach the probe on logged steps (``install``), e.g. by a hook, by intercepting
``scaled_dot_product_attention`` or by the model calling ``stabilitylab.record_qk`` itself. Register
new adapters with ``register_adapter``; the probe tries them in order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from stabilitylab.probes.attention import AttentionProbe


class AttentionAdapter:
    """Base adapter. ``name`` and ``description`` appear in the unsupported-model error."""

    name = "adapter"
    description = ""

    def find(self, model: torch.nn.Module) -> list[str]:
        """Names of the attention modules this adapter covers in ``model`` (empty if none)."""
        raise NotImplementedError

    def install(self, probe: AttentionProbe, model: torch.nn.Module, names: list[str]) -> list[Any]:
        """Arrange for q/k of ``names`` to reach ``probe.observe``; return removable handles."""
        return []


class SelfReportingAdapter(AttentionAdapter):
    """Modules that call ``stabilitylab.record_qk(q, k, ..., module=self)`` themselves.

    A module opts in by setting the class attribute ``stabilitylab_records_qk = True`` (the built-in
    proxy does); any module can also just call ``record_qk`` and be named explicitly in
    ``AttentionProbe(modules=[...])``.
    """

    name = "record_qk"
    description = "modules that call stabilitylab.record_qk(q, k, module=self) (the built-in proxy does)"

    def find(self, model: torch.nn.Module) -> list[str]:
        return [n for n, m in model.named_modules() if getattr(m, "stabilitylab_records_qk", False)]

    def install(self, probe: AttentionProbe, model: torch.nn.Module, names: list[str]) -> list[Any]:
        from stabilitylab.adapters import runtime

        return runtime.install_frames(probe, model, names, capture=False)


ADAPTERS: list[AttentionAdapter] = [SelfReportingAdapter()]


def register_adapter(adapter: AttentionAdapter, first: bool = True) -> AttentionAdapter:
    """Add an adapter to the registry the attention probe consults."""
    if not isinstance(adapter, AttentionAdapter):
        raise TypeError(f"register_adapter: expected an AttentionAdapter, got {type(adapter).__name__}")
    ADAPTERS.insert(0, adapter) if first else ADAPTERS.append(adapter)
    return adapter
