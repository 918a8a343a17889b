"""Hugging Face transformers: attention modules that dispatch through ``AttentionInterface``.

Every modern ``transformers`` attention module (GPT-2, Llama, Mistral, Qwen2, Gemma, ...) picks its
attention function at call time with ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation,
eager_attention_forward)`` and calls it as ``fn(self, query, key, value, attention_mask, scaling=...,
...)``, with q and k already rotated (RoPE) and the mask HF built for that implementation.

Each such module gets a capturing frame (``stabilitylab.adapters.runtime``) on logged steps, so what runs
inside it is recorded: the ``scaled_dot_product_attention`` call of the "sdpa" implementation (T5's
relative position bias and Falcon's ALiBi arrive there inside ``attn_mask``), and the softmax of the
"eager" implementations, whose input is the full score the model uses (relative position bias, ALiBi,
soft-capping and the mask included; Gemma-2's pre-cap score is read from the ``tanh`` input).

While a probe of this adapter is attached, ``AttentionInterface.get_interface`` is wrapped. On steps
where no probe is armed it returns the usual function unchanged. On logged steps it returns a wrapper
that names the implementation in the frame (for the warning) and, for "flex_attention", computes the
statistics from the call's own arguments exactly as its ``score_mod`` does (``q.k * scaling``, the
soft-cap, the additive score mask or ``position_bias``, and the ``BlockMask``'s ``mask_mod`` evaluated on
every (query, key) pair), with the capture mode suspended so that the compiled flex kernel never
traces it. Implementations that run outside Python (``flash_attention_2``/``3``, kernels from the Hub)
record nothing and get the single warning for a found-but-silent module, naming them.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from typing import Any

import torch

from stabilitylab.adapters import runtime
from stabilitylab.adapters.base import AttentionAdapter
from stabilitylab.adapters.sdpa import any_armed, forward_code_names

_state: dict[str, Any] = {"users": 0, "orig": None}
_wrapped: dict[tuple[Any, str], Any] = {}


@functools.cache
def _signature(fn) -> inspect.Signature:
    return inspect.signature(fn)


@contextmanager
def _mode_suspended():
    """Take stabilitylab's capture modes off the torch-function mode stack for the duration."""
    popped = []
    while torch._C._len_torch_function_stack() and isinstance(torch._C._get_function_stack_at(
            torch._C._len_torch_function_stack() - 1), runtime.AttentionCapture):
        popped.append(torch._C._pop_torch_function_stack())
    try:
        yield
    finally:
        for mode in reversed(popped):
            torch._C._push_on_torch_function_stack(mode)


def flex_scores(query: torch.Tensor, key: torch.Tensor, attention_mask: Any, scaling: float | None,
                softcap: float | None = None, position_bias: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scores fed to the softmax, pre-cap scores or None) of a Hugging Face ``flex_attention_forward`` call.

    Mirrors its ``score_mod``: ``s = q.k * scaling``, then ``softcap * tanh(s / softcap)``, then the additive
    score mask (a tensor ``attention_mask``) and ``position_bias``; a ``BlockMask``'s ``mask_mod`` sets
    forbidden pairs to ``-inf``. Float64 for float64 inputs, float32 otherwise.
    """
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    q, k = query.detach().to(dtype), key.detach().to(dtype)
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = q.shape[-1] ** -0.5 if scaling is None else float(scaling)
    raw = q @ k.transpose(-2, -1) * scale  # (B, H, Tq, Tk)
    s = raw if softcap is None else softcap * torch.tanh(raw / softcap)
    B, H, Tq, Tk = s.shape
    if isinstance(attention_mask, torch.Tensor):
        s = s + attention_mask[:, :, :, :Tk].detach().to(dtype)
    elif attention_mask is not None:  # BlockMask
        from torch.nn.attention.flex_attention import create_mask

        mb = attention_mask.mask_mod
        allowed = create_mask(mb, B, H, Tq, Tk, device=s.device)
        s = s.masked_fill(~allowed.expand_as(s), float("-inf"))
    if position_bias is not None:
        s = s + position_bias.detach().to(dtype)
    return s, (raw if softcap is not None else None)


def _allowed(fn, module: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """Allowed (query, key) pairs from the ``attention_mask`` argument (bool, or additive above finfo.min/2).

    A softmax input can hold NaN at masked pairs (a row of padding keys that overflowed to NaN upstream),
    which its value alone cannot tell from an allowed NaN; the mask the model was given can.
    """
    try:
        mask = _signature(fn).bind(module, *args, **kwargs).arguments.get("attention_mask")
    except TypeError:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return None
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2 if mask.is_floating_point() else None


def _observe_flex(fn, module: torch.nn.Module, args: tuple, kwargs: dict, frame: runtime.Frame) -> None:
    a = _signature(fn).bind(module, *args, **kwargs).arguments
    extra = a.get("kwargs", {})
    softcap = a.get("softcap", extra.get("softcap"))
    s, raw = flex_scores(a["query"], a["key"], a.get("attention_mask"), a.get("scaling", extra.get("scaling")),
                         softcap=softcap, position_bias=a.get("position_bias", extra.get("position_bias")))
    frame.records += 1
    frame.probe_ref.observe_scores(frame.name, s, raw=raw, capped=softcap is not None)


def _wrap(fn, implementation: str):
    flex = implementation == "flex_attention"

    def observed(module, *args, **kwargs):
        frames = [f for p in runtime.probes_with_frame(module) for f in [p._frames[-1]]]
        for f in frames:
            f.implementation = implementation
        if not frames:
            return fn(module, *args, **kwargs)
        if not flex:
            allowed = _allowed(fn, module, args, kwargs)
            for f in frames:
                f.allowed = allowed
            try:
                return fn(module, *args, **kwargs)
            finally:
                for f in frames:
                    f.allowed = None
        for f in frames:
            f.probe_ref.guard(_observe_flex)(fn, module, args, kwargs, f)
            f.capture = False
        with _mode_suspended():
            return fn(module, *args, **kwargs)

    return observed


def _get_interface(self, attn_implementation, default):
    fn = _state["orig"](self, attn_implementation, default)
    if not any_armed():
        return fn
    impl = "eager" if fn is default else str(attn_implementation)
    key = (fn, impl)
    if key not in _wrapped:
        _wrapped[key] = _wrap(fn, impl)
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
                   "(GPT-2, Llama, Mistral, Qwen, Gemma, Phi-3, GPT-NeoX, OPT, BERT, ModernBERT, T5, BART and "
                   "relatives; attn_implementation 'sdpa', 'eager' or 'flex_attention')")

    def find(self, model: torch.nn.Module) -> list[str]:
        names = []
        for n, m in model.named_modules():
            if "get_interface" not in forward_code_names(m) or not hasattr(getattr(m, "config", None),
                                                                           "_attn_implementation"):
                continue
            names.append(n)
        return names

    def install(self, probe: Any, model: torch.nn.Module, names: list[str]) -> list[Any]:
        from transformers.modeling_utils import AttentionInterface

        if _state["users"] == 0:
            _state["orig"] = AttentionInterface.get_interface
            AttentionInterface.get_interface = _get_interface
        _state["users"] += 1
        return [_Uninstall(), *runtime.install_frames(probe, model, names, capture=True)]
