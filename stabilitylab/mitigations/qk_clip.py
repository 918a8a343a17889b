"""QK-clip: after an optimizer step, shrink the q/k projections of heads whose max attention logit is too large.

For head ``h`` with measured max logit ``m_h`` (the attention probe's per-head maximum ``head_max``)
and threshold ``tau``, ``gamma_h = min(1, tau / m_h)``. The logit ``s_ij = scale * q_i . k_j`` is
bilinear in the q and k projections (weights and biases; RoPE is linear too), so multiplying head
``h``'s q rows by ``a_h`` and its k rows by ``c_h`` with ``a_h * c_h = gamma_h`` multiplies every logit
of the head by exactly ``gamma_h``: the measured maximum becomes ``min(m_h, tau)``. Without
grouped-query attention ``a_h = c_h = sqrt(gamma_h)`` (MuonClip, Kimi K2); when a key head serves
several query heads it is left alone and ``a_h = gamma_h``.

Two modes. ``"after_step"`` (MuonClip's rule; call the clip after ``optimizer.step()``) clips with the
logits measured in the step's forward: exact for those logits and the weights they were measured with,
but the optimizer step in between and the next batch move the next measurement, so a run sits near
``tau`` with overshoots of one step's growth (measured: up to ~2x tau right after warm-up at LR 0.1).
``"before_forward"`` measures each attention module on its actual input just before it runs (one
extra no-grad pass through the attention module) and clips first, so every max logit the model
computes in training is at most ``tau``. That pass never receives a KV cache, whatever its keyword
(``cache=`` in transformers 5.x, ``past_key_values=`` in 4.x; see ``stabilitylab._caches``): it would
append to the live cache, and the real forward would then attend over stale, detached keys and values.
It measures the logits among the current input's keys (a cache carried over from earlier calls holds
keys it does not see).

Supported attention types (``register_qk_clip`` adds yours): the proxy's ``CausalSelfAttention``,
Hugging Face ``GPT2Attention`` (``c_attn`` weight and bias) and ``LlamaAttention`` /
``MistralAttention`` / ``Qwen2Attention`` (``q_proj`` / ``k_proj``). Modules with qk-layernorm are
refused: the norm undoes any weight scaling.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stabilitylab._caches import without_caches
from stabilitylab.adapters import generic
from stabilitylab.mitigations.qk_layernorm import find_surgery
from stabilitylab.probes.attention import AttentionProbe


@dataclass
class QKSlices:
    """Where the q and k heads of an attention module live.

    Attributes:
        q: ``(tensor, dim, offset)`` for each tensor holding q heads: head ``h`` is
            ``tensor.narrow(dim, offset + h * head_dim, head_dim)``.
        k: the same for the key heads.
        n_heads: query heads; n_kv_heads: key heads (``n_heads % n_kv_heads == 0``).
        head_dim: per-head width.
    """

    q: list[tuple[torch.Tensor, int, int]]
    k: list[tuple[torch.Tensor, int, int]]
    n_heads: int
    n_kv_heads: int
    head_dim: int


#: attention module type -> ``fn(module) -> QKSlices``.
QK_CLIP_REGISTRY: dict[type, Callable[[nn.Module], QKSlices]] = {}


def register_qk_clip(module_type: type, slices: Callable[[nn.Module], QKSlices]) -> None:
    """Register ``slices(module) -> QKSlices`` for an attention module type (and its subclasses)."""
    if not isinstance(module_type, type) or not callable(slices):
        raise TypeError(f"register_qk_clip(module_type, slices): pass a class and a callable, got {module_type!r}")
    QK_CLIP_REGISTRY[module_type] = slices


def _gpt2_slices(m: nn.Module) -> QKSlices:
    C = m.embed_dim  # Conv1D: weight (C, 3C) = [q | k | v] columns, bias (3C,)
    w, b = m.c_attn.weight, m.c_attn.bias
    return QKSlices([(w, 1, 0), (b, 0, 0)], [(w, 1, C), (b, 0, C)], m.num_heads, m.num_heads, m.head_dim)


def _llama_slices(m: nn.Module) -> QKSlices:
    def parts(lin: nn.Linear) -> list[tuple[torch.Tensor, int, int]]:
        return [(lin.weight, 0, 0)] + ([(lin.bias, 0, 0)] if lin.bias is not None else [])

    d = m.head_dim
    return QKSlices(parts(m.q_proj), parts(m.k_proj), m.q_proj.out_features // d, m.k_proj.out_features // d, d)


_HF = {"transformers.models.gpt2.modeling_gpt2": ("GPT2Attention", _gpt2_slices),
       "transformers.models.llama.modeling_llama": ("LlamaAttention", _llama_slices),
       "transformers.models.mistral.modeling_mistral": ("MistralAttention", _llama_slices),
       "transformers.models.qwen2.modeling_qwen2": ("Qwen2Attention", _llama_slices)}


def _register_builtins() -> None:
    """Hugging Face families already imported; the proxy registers its own (``stabilitylab.proxy.surgery``)."""
    for mod_name, (cls_name, fn) in _HF.items():
        if (mod := sys.modules.get(mod_name)) is not None:
            QK_CLIP_REGISTRY.setdefault(getattr(mod, cls_name), fn)


def clip_factors(head_max: torch.Tensor, threshold: float) -> torch.Tensor:
    """``gamma_h = min(1, threshold / m_h)`` in float64 (1 where ``m_h`` is not finite)."""
    m = head_max.detach().double()
    return torch.where(torch.isfinite(m) & (m > threshold), threshold / m, torch.ones_like(m))


def head_scales(gamma: torch.Tensor, n_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multipliers ``(a, c)`` of the q heads ``(H,)`` and k heads ``(Hk,)`` with ``a_h * c_g(h) = gamma_h``."""
    if n_kv_heads == gamma.numel():
        return gamma.sqrt(), gamma.sqrt()
    return gamma, torch.ones(n_kv_heads, dtype=gamma.dtype, device=gamma.device)


def _scale(parts: list[tuple[torch.Tensor, int, int]], factors: torch.Tensor, head_dim: int) -> None:
    for t, dim, offset in parts:
        seg = t.data.narrow(dim, offset, factors.numel() * head_dim)
        f = factors.to(device=t.device, dtype=t.dtype).repeat_interleave(head_dim)
        seg.mul_(f.view([-1] + [1] * (t.dim() - 1 - dim)))


class QKClip:
    """Rescale q/k projections after each optimizer step so no head's max logit exceeds ``threshold``.

    Use it without a Monitor (it then owns an attention probe that measures every step)::

        clip = QKClip(model, threshold=100.0)
        ...; loss.backward(); opt.step(); clip(); opt.zero_grad()

    or with a Monitor's attention probe (it then acts on the Monitor's logged steps), or as an
    optimizer post-step hook: ``clip.hook(opt)``. This is MuonClip's rule: it acts on the logits measured
    in the step's forward, before the step changed the weights, so the next measurement can overshoot
    ``tau`` by one step's growth.

    ``mode="before_forward"`` is the exact variant: in training mode, before each attention module runs,
    it measures that module's logits on the actual input with a private probe (an extra no-grad pass
    through the attention module, with caches off and dropout off), clips, then lets the real forward
    run, so every max logit the model computes in training is at most ``tau`` (to float rounding).

    Args:
        model: the model (proxy, Hugging Face GPT-2 / Llama family, or registered types).
        threshold: ``tau``, the largest allowed max attention logit (Kimi K2 uses 100).
        source: ``None`` (own probe), an ``AttentionProbe``, or a ``Monitor`` with an attention probe
            (``mode="after_step"`` only).
        mode: ``"after_step"`` (call it after ``optimizer.step()``) or ``"before_forward"`` (automatic).

    Attributes:
        last_gamma: per module, the ``(H,)`` factors ``gamma_h`` of the last clip that had measurements.
    """

    def __init__(self, model: nn.Module, threshold: float = 100.0, source: Any = None, mode: str = "after_step"):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
                threshold > 0 and math.isfinite(threshold)):
            raise ValueError(f"QKClip(threshold={threshold!r}): must be a positive finite number, e.g. 100.0")
        if mode not in ("after_step", "before_forward"):
            raise ValueError(f"QKClip(mode={mode!r}): use 'after_step' or 'before_forward'")
        if mode == "before_forward" and source is not None:
            raise ValueError("QKClip(source=...): mode='before_forward' measures with its own probe; drop source")
        self.model, self.threshold, self.mode = model, float(threshold), mode
        self._own = source is None
        if source is None:
            source = AttentionProbe().attach(model)
            source.arm(mode == "after_step")
        elif not isinstance(source, AttentionProbe):
            probe = getattr(source, "probe", None)
            if not callable(probe):
                raise TypeError(f"QKClip(source=...): pass None, an AttentionProbe or a Monitor, got {type(source).__name__}")
            source = probe("attention")
        self.probe = source
        self._handles: list[Any] = []
        self._inside = False
        try:
            self._slices = self._layouts(model)
        except Exception:
            self.close()
            raise
        if mode == "before_forward":
            modules = dict(model.named_modules())
            for name in self._slices:
                hook = functools.partial(self._before_forward, name)
                self._handles.append(modules[name].register_forward_pre_hook(hook, with_kwargs=True))
        self._used: dict[str, torch.Tensor] = {}
        self.last_gamma: dict[str, torch.Tensor] = {}

    def _layouts(self, model: nn.Module) -> dict[str, Callable[[], QKSlices]]:
        _register_builtins()
        modules = dict(model.named_modules())
        out = {}
        for name in self.probe.covered:
            m = modules[name]
            fn = find_surgery(m, QK_CLIP_REGISTRY)
            if fn is None:
                raise ValueError(f"QKClip: no q/k layout known for {type(m).__name__} ({name}); register one with "
                                 "stabilitylab.mitigations.register_qk_clip(type, fn(module) -> QKSlices)")
            if getattr(m, "q_norm", None) is not None:
                raise ValueError(f"QKClip: {name} has qk-layernorm, which undoes weight scaling; use one or the other")
            out[name] = functools.partial(fn, m)
        return out

    def _before_forward(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Measure ``module`` on this input with the private probe, then clip, before the real forward."""
        if self._inside or not module.training:
            return
        others = [p for p in generic.ACTIVE if p is not self.probe and p.armed]
        args, kw = without_caches(module.forward, args, kwargs)  # the real forward keeps the live cache
        self._inside = True
        for p in others:
            p.armed = False  # the Monitor's probes must not see this extra pass
        self.probe.arm(True)
        modes = [(m, m.training) for m in module.modules()]
        module.train(False)
        try:
            with torch.no_grad():
                module(*args, **kw)
        finally:
            for m, mode in modes:
                m.training = mode
            self.probe.arm(False)
            for p in others:
                p.armed = True
            self._inside = False
        self.probe.collect()
        measured = self.probe.head_max.get(name)
        if measured is not None:
            self._used[name] = measured
            self.last_gamma = {**self.last_gamma, **self.apply({name: measured})}  # one module per pass

    def _fresh(self) -> dict[str, torch.Tensor]:
        """Per-head maxima measured since the last clip (the current step's if it was measured)."""
        if self._own:
            self.probe.collect()
        # A Monitor moves the step's maxima into head_max at its step(); before that they are pending.
        latest = self.probe.latest_head_max()
        return {n: t for n, t in latest.items() if self._used.get(n) is not t}

    @torch.no_grad()
    def apply(self, head_max: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Clip the heads of each named module given its measured per-head max logits ``(H,)``.

        Returns ``{module: gamma}`` with the factors applied to each module's logits (float64 device
        tensors; no host sync).
        """
        out = {}
        for name, m in head_max.items():
            if name not in self._slices:
                raise KeyError(f"QKClip.apply: {name!r} is not an attention module QKClip knows; "
                               f"known: {sorted(self._slices)}")
            sl = self._slices[name]()
            if m.numel() != sl.n_heads:
                raise ValueError(f"QKClip.apply: {name} has {sl.n_heads} heads, head_max has {m.numel()} values")
            gamma = clip_factors(m, self.threshold)
            a, c = head_scales(gamma, sl.n_kv_heads)
            _scale(sl.q, a, sl.head_dim)
            _scale(sl.k, c, sl.head_dim)
            out[name] = gamma
        return out

    def __call__(self) -> dict[str, torch.Tensor]:
        """Clip with the maxima measured since the last call (no-op if none were measured)."""
        fresh = self._fresh()
        if not fresh:
            return {}
        self._used.update(fresh)
        self.last_gamma = self.apply(fresh)
        return self.last_gamma

    def hook(self, optimizer: torch.optim.Optimizer):
        """Run this clip after every ``optimizer.step()``; returns the removable handle."""
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self())

    def close(self) -> None:
        """Remove this clip's hooks and detach the probe it owns (a Monitor's probe is left alone)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._own:
            self.probe.detach()
