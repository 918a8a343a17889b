"""Seeing ``scaled_dot_product_attention`` calls: a function mode, and an adapter for custom modules.

``SDPACapture(module)`` is a ``TorchFunctionMode``: while it is active, every call of
``torch.nn.functional.scaled_dot_product_attention`` made from Python hands its exact arguments (q, k,
``attn_mask``, ``is_causal``, ``scale``, ``enable_gqa``) to ``record_qk`` under ``module``'s name. The
adapters enter it only on logged steps, so other steps run the model untouched.

``SDPAAdapter`` covers any module whose class uses ``scaled_dot_product_attention`` or a softmax in any
method (nanoGPT-style attention, timm, x-transformers' ``Attend``, litgpt, ...) and records what runs
inside it on logged steps (see ``stabilitylab.adapters.runtime``).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from stabilitylab.adapters import generic, runtime
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
    """Custom modules whose methods call SDPA, a softmax or flex attention; observed by what runs.

    A module is a candidate when any method of its class (``forward`` or a helper, e.g. x-transformers'
    ``Attend.flash_attn``) names ``scaled_dot_product_attention``, ``softmax`` or ``flex_attention``;
    torch's own modules are not (``nn.MultiheadAttention`` has its own adapter). A candidate that
    contains another attention module is a block or a model and is dropped by the probe. On logged steps
    the SDPA or softmax call that actually runs inside it is recorded (``stabilitylab.adapters.runtime``),
    so a module that mentions SDPA but takes a hand-written path (timm ``fused_attn=False``) is exact,
    and one where neither runs gets a single warning naming it.
    """

    name = "sdpa"
    description = ("any module whose methods call torch.nn.functional.scaled_dot_product_attention or a softmax "
                   "over attention scores (what runs is recorded)")
    by_code_scan = True

    def find(self, model: torch.nn.Module) -> list[str]:
        return [n for n, m in model.named_modules()
                if not type(m).__module__.startswith("torch.")
                and any(a in runtime.class_code_names(type(m)) for a in runtime.ATTENTION_NAMES)]

    def install(self, probe: Any, model: torch.nn.Module, names: list[str]) -> list[Any]:
        return runtime.install_frames(probe, model, names, capture=True)
