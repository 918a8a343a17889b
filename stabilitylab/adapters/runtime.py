"""What runs inside an attention module on a logged step: frames, and the capture function mode.

Every attention module the probe covers gets a forward pre-hook and a forward hook (``always_call``).
On steps where the probe is disarmed they return after one flag check. On logged steps the pre-hook
pushes a *frame* for the module onto the probe's stack, and the outermost capturing frame enters
``AttentionCapture``, a ``TorchFunctionMode`` that sees every Python-level torch call until the module
returns. Inside a capturing frame (the innermost frame on the stack owns each call) it records:

- ``F.scaled_dot_product_attention``: q, k, ``attn_mask`` (every additive bias a model puts there),
  ``is_causal``, ``scale`` and ``enable_gqa`` exactly as given;
- ``softmax`` (``torch.softmax``, ``F.softmax``, ``Tensor.softmax``) over the last dim of a tensor of at
  least 3 dims: its input *is* the score the model uses, biases (ALiBi, T5 relative position bias),
  masks (``-inf`` / ``finfo.min``) and soft-capping included;
- ``tanh`` on such a tensor, when the module has a known soft-cap ``c`` (``config.attn_logit_softcapping``,
  ``config.attention_logit_softcapping``, a ``softcap`` argument of a Hugging Face attention function):
  the model computes ``c * tanh(s / c)``, so ``c * tanh_input`` is the raw pre-cap score ``s``, whose
  max is recorded as ``attn.max_logit`` next to the capped ``attn.max_logit_capped``.

Frames of modules that report q/k themselves (``record_qk``, ``nn.MultiheadAttention``) capture
nothing, so an SDPA or softmax call inside them is never recorded twice; a ``record_qk`` call inside a
capturing frame also switches that frame's capture off. A frame that ends having recorded nothing gets
one warning per module naming it and the fix. Forwards re-run by activation checkpointing during
backward (``torch.utils.checkpoint``, reentrant or not, and HF ``gradient_checkpointing_enable``) push
no frame, so they are not counted twice.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_SDPA = F.scaled_dot_product_attention
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}
_TANH = {torch.tanh, torch.Tensor.tanh}
_WATCHED = {_SDPA, *_SOFTMAX, *_TANH}
#: Names whose use in any method of a module's class makes it a candidate attention module.
ATTENTION_NAMES = ("scaled_dot_product_attention", "softmax", "flex_attention")
#: Attributes (on the module or its ``config``) that hold an attention-logit soft-cap.
SOFTCAP_ATTRS = ("attn_logit_softcapping", "attention_logit_softcapping", "attn_softcap", "logit_softcap")


def in_backward() -> bool:
    """True while autograd's engine runs a backward pass (e.g. a checkpointed forward being recomputed)."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class Frame:
    """One call of a covered module on a logged step.

    Attributes:
        module: the module; ``name`` its name in the probe's model.
        capture: record SDPA / softmax calls made inside (False for self-reporting modules).
        cap: the soft-cap in force, if any (see module docstring).
        records: attention calls recorded while this frame was innermost.
        tanh_input: the last ``tanh`` input seen under a cap (pre-cap score / cap).
        implementation: Hugging Face ``attn_implementation`` seen in this call, for the warning.
        mode: the capture mode this frame entered (only the outermost capturing frame enters one).
        probe_ref: the probe that opened the frame.
        allowed: allowed (query, key) pairs of the call in progress, when the caller knows its mask.
    """

    module: torch.nn.Module
    name: str
    capture: bool
    cap: float | None = None
    records: int = 0
    tanh_input: torch.Tensor | None = None
    implementation: str | None = None
    mode: AttentionCapture | None = field(default=None, repr=False)
    probe_ref: Any = field(default=None, repr=False)
    allowed: torch.Tensor | None = field(default=None, repr=False)


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _code_names(c)
    return names


def class_code_names(cls: type) -> frozenset[str]:
    """Global and attribute names used by any function defined in ``cls`` or its bases (not torch's).

    Looks through every method (``forward`` and helpers such as x-transformers' ``Attend.flash_attn``),
    decorated functions, closures and lambdas, so a call placed in a helper is seen.
    """
    cached = _NAMES.get(cls)
    if cached is not None:
        return cached
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.") or klass is object:
            continue
        for attr in vars(klass).values():
            fn = attr.__func__ if isinstance(attr, (staticmethod, classmethod)) else attr
            fn = getattr(fn, "fget", fn)  # properties
            if callable(fn):
                fn = inspect.unwrap(fn)
            code = getattr(fn, "__code__", None)
            if isinstance(code, types.CodeType):
                names |= _code_names(code)
    out = frozenset(names)
    _NAMES[cls] = out
    return out


_NAMES: dict[type, frozenset[str]] = {}


def module_softcap(module: torch.nn.Module) -> float | None:
    """The attention soft-cap declared on ``module`` or its ``config`` (None when absent or off)."""
    for owner in (module, getattr(module, "config", None)):
        for attr in SOFTCAP_ATTRS:
            v = getattr(owner, attr, None)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
                return float(v)
    return None


def _softmax_dim(func: Any, args: tuple, kwargs: dict) -> Any:
    if len(args) > 1:
        return args[1]
    return kwargs.get("dim")


class AttentionCapture(TorchFunctionMode):
    """Function mode that records the attention calls made inside the probe's innermost capturing frame."""

    def __init__(self, probe: Any):
        super().__init__()
        self.probe = probe

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _WATCHED:
            frames = self.probe._frames
            frame = frames[-1] if frames else None
            if frame is not None and frame.capture and self.probe.armed:
                self.probe.guard(self._handle)(frame, func, args, kwargs)
        return func(*args, **kwargs)

    def _handle(self, frame: Frame, func: Any, args: tuple, kwargs: dict) -> None:
        if func is _SDPA:
            a = dict(zip(_SDPA_ARGS, args), **kwargs)
            frame.records += 1
            self.probe.observe(frame.name, a["query"], a["key"], attn_mask=a.get("attn_mask"),
                               is_causal=bool(a.get("is_causal", False)), scale=a.get("scale"),
                               enable_gqa=bool(a.get("enable_gqa", False)))
            return
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor) or x.dim() < 3 or not x.is_floating_point():
            return
        if func in _TANH:
            if frame.cap is not None:
                frame.tanh_input = x
            return
        dim = _softmax_dim(func, args, kwargs)
        if dim is None or dim not in (-1, x.dim() - 1):
            return
        raw, t = None, frame.tanh_input
        frame.tanh_input = None
        if frame.cap is not None:
            if t is not None and t.shape[-2:] == x.shape[-2:]:
                raw = t.detach() * frame.cap
            else:
                self.probe.warn_once(f"cap:{frame.name}", f"{frame.name} has attention soft-cap {frame.cap} but "
                                     "its tanh was not seen; attn.max_logit is the capped score there")
        allowed = frame.allowed
        if allowed is not None and (allowed.dim() != x.dim() or allowed.shape[-1] < x.shape[-1]):
            allowed = None
        frame.records += 1
        self.probe.observe_scores(frame.name, x, raw=raw, capped=frame.cap is not None,
                                  allowed=None if allowed is None else allowed[..., :x.shape[-1]])


def push(probe: Any, module: torch.nn.Module, capture: bool, cap: float | None = None,
         implementation: str | None = None) -> Frame | None:
    """Open a frame for ``module`` (None when the probe is disarmed or autograd is recomputing)."""
    if not probe.armed or in_backward():
        return None
    name = probe.module_name(module)
    if name is None:
        return None
    frame = Frame(module, name, capture, cap=cap, implementation=implementation, probe_ref=probe)
    if capture and not any(f.mode is not None for f in probe._frames):
        frame.mode = AttentionCapture(probe)
        frame.mode.__enter__()
    probe._frames.append(frame)
    return frame


def pop(probe: Any, frame: Frame | None, warn: bool = True) -> None:
    """Close ``frame``; warn once if a capturing module ran and no attention call was observed."""
    if frame is None:
        return
    while probe._frames and probe._frames[-1] is not frame:  # an exception skipped inner forward hooks
        pop(probe, probe._frames[-1], warn=False)
    if probe._frames:
        probe._frames.pop()
    if frame.mode is not None:
        frame.mode.__exit__(None, None, None)
    if warn and frame.capture and frame.records == 0 and probe.armed:
        probe.warn_silent(frame)


def probes_with_frame(module: torch.nn.Module) -> list[Any]:
    """Attached attention probes whose innermost open frame is ``module``'s."""
    from stabilitylab.adapters import generic

    return [p for p in generic.ACTIVE if p._frames and p._frames[-1].module is module]


def install_frames(probe: Any, model: torch.nn.Module, names: list[str], capture: bool) -> list[Any]:
    """Pre/post forward hooks that open and close a frame around each named module's forward."""
    handles = []
    open_frames: dict[int, list[Frame | None]] = {}

    def enter(module: torch.nn.Module, args: Any) -> None:
        if not probe.armed:
            return
        cap = module_softcap(module) if capture else None
        open_frames.setdefault(id(module), []).append(push(probe, module, capture, cap=cap))

    def leave(module: torch.nn.Module, args: Any, output: Any) -> None:
        stack = open_frames.get(id(module))
        if stack:
            pop(probe, stack.pop())

    for n in names:
        m = model.get_submodule(n)
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave, always_call=True))
    return handles


def install_row_masks(probe: Any, model: torch.nn.Module) -> list[Any]:
    """Hooks that remember which query rows are padding, from a Hugging Face style 2-D ``attention_mask``.

    Modules whose ``forward`` takes both ``attention_mask`` and ``input_ids`` or ``inputs_embeds`` (the
    model, and the encoder/decoder stacks of encoder-decoder models, which get their own masks) push
    the mask they were called with on logged steps; ``None`` there means no padding. Attention calls
    read the innermost one (``probe.row_mask()``).
    """
    handles = []
    for _, m in model.named_modules():
        try:
            params = inspect.signature(m.forward).parameters
        except (TypeError, ValueError):
            continue
        if "attention_mask" not in params or not ({"input_ids", "inputs_embeds"} & set(params)):
            continue
        names = list(params)

        def enter(module: torch.nn.Module, args: tuple, kwargs: dict, names=names) -> None:
            if not probe.armed:
                return
            mask = kwargs.get("attention_mask")
            if mask is None and "attention_mask" in names and names.index("attention_mask") < len(args):
                mask = args[names.index("attention_mask")]
            ok = isinstance(mask, torch.Tensor) and mask.dim() == 2
            probe._row_masks.append((module, mask.detach() != 0 if ok else None))

        def leave(module: torch.nn.Module, args: Any, output: Any) -> None:
            if probe._row_masks and probe._row_masks[-1][0] is module:
                probe._row_masks.pop()

        handles.append(m.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(m.register_forward_hook(leave, always_call=True))
    return handles
