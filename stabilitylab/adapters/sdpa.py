"""Seeing ``scaled_dot_product_attention`` calls: a function mode, and an adapter for custom modules.

``SDPACapture(module)`` is a ``TorchFunctionMode``: while it is active, every call of
``torch.nn.functional.scaled_dot_product_attention`` made from Python hands its exact arguments (q, k,
``attn_mask``, ``is_causal``, ``scale``, ``enable_gqa``) to ``record_qk`` under ``module``'s name. The
adapters enter it only on logged steps, so other steps run the model untouched.

``SDPAAdapter`` covers any module whose own ``forward`` calls ``scaled_dot_product_attention``
(nanoGPT-style attention, for example): a forward pre-hook enters the capture on logged steps and a
forward hook (``always_call``) leaves it.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from stabilitylab.adapters import generic
from stabilitylab.adapters.base import AttentionAdapter

_SDPA = torch.nn.functional.scaled_dot_product_attention
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_busy = False  # an SDPA call is being handled: enclosing captures must not record it twice


def any_armed() -> bool:
    """True when some attached attention probe is armed for the step in progress."""
    return any(p.armed for p in generic.ACTIVE)


class SDPACapture(TorchFunctionMode):
    """Function mode that reports every SDPA call to ``record_qk`` as ``module``'s attention.

    Attributes:
        calls: number of SDPA calls seen so far.
    """

    def __init__(self, module: torch.nn.Module | str | None):
        super().__init__()
        self.module = module
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        global _busy
        kwargs = kwargs or {}
        if func is not _SDPA or _busy:
            return func(*args, **kwargs)
        a = dict(zip(_SDPA_ARGS, args), **kwargs)
        self.calls += 1
        _busy = True
        try:
            generic.record_qk(a["query"], a["key"], attn_mask=a.get("attn_mask"),
                              is_causal=bool(a.get("is_causal", False)), scale=a.get("scale"),
                              enable_gqa=bool(a.get("enable_gqa", False)), module=self.module)
            return func(*args, **kwargs)
        finally:
            _busy = False


def forward_code_names(module: torch.nn.Module) -> tuple[str, ...]:
    """Global and attribute names used by ``type(module).forward`` (decorators unwrapped)."""
    fwd = inspect.unwrap(type(module).forward)
    code = getattr(fwd, "__code__", None)
    return code.co_names if code is not None else ()


class SDPAAdapter(AttentionAdapter):
    """Custom modules whose ``forward`` calls ``F.scaled_dot_product_attention`` directly."""

    name = "sdpa"
    description = "any module whose forward calls torch.nn.functional.scaled_dot_product_attention"

    def find(self, model: torch.nn.Module) -> list[str]:
        return [n for n, m in model.named_modules()
                if not isinstance(m, torch.nn.MultiheadAttention)
                and "scaled_dot_product_attention" in forward_code_names(m)]

    def install(self, probe: Any, model: torch.nn.Module, names: list[str]) -> list[Any]:
        handles = []
        stack: list[SDPACapture | None] = []

        def enter(module: torch.nn.Module, args: Any) -> None:
            cap = SDPACapture(module) if probe.armed else None
            if cap is not None:
                cap.__enter__()
            stack.append(cap)

        def leave(module: torch.nn.Module, args: Any, output: Any) -> None:
            cap = stack.pop() if stack else None
            if cap is not None:
                cap.__exit__(None, None, None)

        for n in names:
            m = model.get_submodule(n)
            handles.append(m.register_forward_pre_hook(enter))
            handles.append(m.register_forward_hook(leave, always_call=True))
        return handles
