"""Hugging Face transformers: attention modules that dispatch through ``AttentionInterface``.

Every modern ``transformers`` attention module (GPT-2, Llama, Mistral, Qwen2, Gemma, ...) picks its
attention function at call time with ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation,
eager_attention_forward)`` and calls it as ``fn(self, query, key, value, attention_mask, scaling=...,
...)``, with q and k already rotated (RoPE) and the mask HF built for that implementation.

While a probe of this adapter is attached, ``AttentionInterface.get_interface`` is wrapped. On steps
where no probe is armed it returns the usual function unchanged. On logged steps it returns a wrapper
that runs the function inside ``SDPACapture`` (the "sdpa" implementation: the exact q, k, mask,
``is_causal``, scale and ``enable_gqa`` that reach ``scaled_dot_product_attention``) or, for the
model's own eager function, reports ``query``, ``key``, the additive ``attention_mask`` and ``scaling``
exactly as the eager code uses them (keys are repeated for grouped-query attention). Other
implementations (flash-attention, flex) are not observed and warn once.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any

import torch

from stabilitylab.adapters import generic
from stabilitylab.adapters.base import AttentionAdapter
from stabilitylab.adapters.sdpa import SDPACapture, any_armed, forward_code_names

_state: dict[str, Any] = {"users": 0, "orig": None}
_wrapped: dict[tuple[Any, bool], Any] = {}
_warned: set[str] = set()


@functools.cache
def _signature(fn) -> inspect.Signature:
    return inspect.signature(fn)


def _observe_eager(fn, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Report an eager call: scores = query @ key^T * scaling + attention_mask (no is_causal)."""
    bound = _signature(fn).bind(module, *args, **kwargs)
    query, key, mask = bound.arguments["query"], bound.arguments["key"], bound.arguments["attention_mask"]
    scaling = bound.arguments.get("scaling")
    if mask is not None and mask.shape[-1] > key.shape[-2]:
        mask = mask[..., : key.shape[-2]]
    generic.record_qk(query, key, attn_mask=mask, scale=scaling, enable_gqa=key.shape[1] != query.shape[1],
                      module=module)


def _wrap(fn, eager: bool, implementation: str):
    def observed(module, *args, **kwargs):
        capture = SDPACapture(module)
        with capture:
            out = fn(module, *args, **kwargs)
        if not capture.calls:
            if eager:
                _observe_eager(fn, module, args, kwargs)
            elif implementation not in _warned:
                _warned.add(implementation)
                warnings.warn(f"stabilitylab attention probe: attn_implementation={implementation!r} is not "
                              "observed; use 'sdpa' or 'eager' to record attn.* metrics", stacklevel=2)
        return out

    return observed


def _get_interface(self, attn_implementation, default):
    fn = _state["orig"](self, attn_implementation, default)
    if not any_armed():
        return fn
    eager = fn is default
    key = (fn, eager)
    if key not in _wrapped:
        _wrapped[key] = _wrap(fn, eager, str(attn_implementation))
    return _wrapped[key]


class _Uninstall:
    removed = False

    def remove(self) -> None:
        from transformers.modeling_utils import AttentionInterface

        if self.removed:
            return
        self.removed = True
        _state["users"] -= 1
        if _state["users"] == 0:
            AttentionInterface.get_interface = _state["orig"]
            _state["orig"] = None
            _wrapped.clear()


class HFAdapter(AttentionAdapter):
    """Hugging Face attention modules (GPT-2, Llama family, ...) with attn_implementation sdpa/eager."""

    name = "huggingface"
    description = ("Hugging Face transformers attention modules that dispatch through AttentionInterface "
                   "(GPT2LMHeadModel, LlamaForCausalLM and relatives; attn_implementation 'sdpa' or 'eager')")

    def find(self, model: torch.nn.Module) -> list[str]:
        names = []
        for n, m in model.named_modules():
            if "get_interface" not in forward_code_names(m) or not hasattr(getattr(m, "config", None),
                                                                           "_attn_implementation"):
                continue
            if getattr(m, "reorder_and_upcast_attn", False) and m.config._attn_implementation == "eager":
                warnings.warn(f"stabilitylab attention probe: {n} uses reorder_and_upcast_attn=True with eager "
                              "attention, which bypasses AttentionInterface, so it is not observed; use "
                              "attn_implementation='sdpa' or reorder_and_upcast_attn=False", stacklevel=2)
                continue
            names.append(n)
        return names

    def install(self, probe: Any, model: torch.nn.Module, names: list[str]) -> list[Any]:
        from transformers.modeling_utils import AttentionInterface

        if _state["users"] == 0:
            _state["orig"] = AttentionInterface.get_interface
            AttentionInterface.get_interface = _get_interface
        _state["users"] += 1
        return [_Uninstall()]
