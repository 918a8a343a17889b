"""qk-layernorm: LayerNorm on queries and keys (per head, over head_dim) before the dot product.

``QKLayerNorm`` is the building block; ``apply_qk_layernorm(model)`` adds it to an existing model by
module surgery, through a registry of attention-module types (``register_qk_layernorm`` adds your own):

- proxy ``CausalSelfAttention``: sets its ``q_norm`` / ``k_norm`` (what ``qk_layernorm=True`` builds).
- Hugging Face ``GPT2Attention`` (self-attention): ``q_norm`` / ``k_norm`` children; a forward hook on
  the fused ``c_attn`` normalises the q and k thirds of its output.
- Hugging Face ``LlamaAttention``, ``MistralAttention``, ``Qwen2Attention``: ``q_norm`` / ``k_norm``
  children; forward hooks on ``q_proj`` / ``k_proj`` normalise each head **before RoPE**, as Qwen3 and
  OLMo-2 do (RoPE rotates pairs of features, so ``|q . k| <= |q| |k|`` and the logit bound still holds).

The surgery adds parameters (``<attn>.q_norm.norm.weight`` and ``<attn>.k_norm.norm.weight``, gains
initialised to 1) and changes no existing parameter or state-dict key; the model computes exactly
what it did before with q and k replaced by ``LayerNorm(q)``, ``LayerNorm(k)`` per head. Build the
optimizer *after* the surgery so it sees the new gains.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn


class QKLayerNorm(nn.Module):
    """LayerNorm over the last dim (``head_dim``) with a learnable gain and no bias.

    Applied to q and k of shape ``(B, H, T, head_dim)``, it bounds every attention logit by
    ``|q.k| * scale <= head_dim * max|gain_q| * max|gain_k| * scale``, which is what stops attention
    logit growth (Wortsman et al., 2023; Dehghani et al., 2023).
    """

    def __init__(self, head_dim: int, eps: float = 1e-5, bias: bool = False):
        super().__init__()
        if not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"QKLayerNorm(head_dim={head_dim!r}): must be a positive int")
        self.head_dim = head_dim
        self.norm = nn.LayerNorm(head_dim, eps=eps, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def normalise_features(self, y: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """``y`` with features ``start:stop`` (whole heads, concatenated) normalised head by head."""
        seg = y[..., start:stop]
        seg = self.norm(seg.unflatten(-1, (-1, self.head_dim))).flatten(-2)
        return torch.cat([y[..., :start], seg, y[..., stop:]], dim=-1)


class _ProjectionHook:
    """Forward hook on a projection: normalises output features ``start:stop`` with ``norm``.

    A plain object holding the norm module, so ``copy.deepcopy`` / pickling the model keep the hook
    pointing at the copied gains.
    """

    def __init__(self, norm: QKLayerNorm, start: int, stop: int):
        self.norm, self.start, self.stop = norm, start, stop

    def __call__(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        return self.norm.normalise_features(output, self.start, self.stop)


Surgery = Callable[[nn.Module, float], None]
#: attention module type -> ``surgery(module, eps)`` adding qk-layernorm in place.
QK_LAYERNORM_REGISTRY: dict[type, Surgery] = {}


def register_qk_layernorm(module_type: type, surgery: Surgery) -> Surgery:
    """Register ``surgery(module, eps)`` that adds qk-layernorm to modules of ``module_type`` in place.

    Subclasses of ``module_type`` use it too unless they have their own entry.
    """
    if not isinstance(module_type, type) or not callable(surgery):
        raise TypeError("register_qk_layernorm(module_type, surgery): pass a class and a callable "
                        f"surgery(module, eps); got {module_type!r}, {surgery!r}")
    QK_LAYERNORM_REGISTRY[module_type] = surgery
    return surgery


def add_qk_norms(module: nn.Module, head_dim: int, eps: float) -> tuple[QKLayerNorm, QKLayerNorm]:
    """Give ``module`` new ``q_norm`` / ``k_norm`` (``QKLayerNorm(head_dim)`` on its device and dtype); returns them."""
    if getattr(module, "q_norm", None) is not None or getattr(module, "k_norm", None) is not None:
        raise ValueError(f"apply_qk_layernorm: {type(module).__name__} already has q_norm/k_norm "
                         "(qk-layernorm is already applied)")
    p = next(module.parameters())
    module.q_norm = QKLayerNorm(head_dim, eps=eps).to(device=p.device, dtype=p.dtype)
    module.k_norm = QKLayerNorm(head_dim, eps=eps).to(device=p.device, dtype=p.dtype)
    return module.q_norm, module.k_norm


def _gpt2_surgery(module: nn.Module, eps: float) -> None:
    if getattr(module, "is_cross_attention", False):
        raise ValueError("apply_qk_layernorm: GPT2Attention cross-attention is not supported (self-attention only)")
    q_norm, k_norm = add_qk_norms(module, module.head_dim, eps)
    C = module.embed_dim  # c_attn output: [q (C) | k (C) | v (C)]
    module.c_attn.register_forward_hook(_ProjectionHook(q_norm, 0, C))
    module.c_attn.register_forward_hook(_ProjectionHook(k_norm, C, 2 * C))


def _llama_surgery(module: nn.Module, eps: float) -> None:
    q_norm, k_norm = add_qk_norms(module, module.head_dim, eps)
    module.q_proj.register_forward_hook(_ProjectionHook(q_norm, 0, module.q_proj.out_features))
    module.k_proj.register_forward_hook(_ProjectionHook(k_norm, 0, module.k_proj.out_features))


_HF_FAMILIES = {
    "transformers.models.gpt2.modeling_gpt2": (("GPT2Attention",), _gpt2_surgery),
    "transformers.models.llama.modeling_llama": (("LlamaAttention",), _llama_surgery),
    "transformers.models.mistral.modeling_mistral": (("MistralAttention",), _llama_surgery),
    "transformers.models.qwen2.modeling_qwen2": (("Qwen2Attention",), _llama_surgery),
}


def _register_builtins() -> None:
    """Hugging Face families whose modelling module is already imported (no import cost); the proxy
    registers its own surgery (``stabilitylab.proxy.surgery``)."""
    for mod_name, (classes, surgery) in _HF_FAMILIES.items():
        mod = sys.modules.get(mod_name)
        for cls_name in classes if mod is not None else ():
            QK_LAYERNORM_REGISTRY.setdefault(getattr(mod, cls_name), surgery)


def find_surgery(module: nn.Module, registry: dict[type, Callable]) -> Callable | None:
    """The registry entry for ``type(module)`` or its nearest registered base class, else None."""
    for cls in type(module).__mro__:
        if cls in registry:
            return registry[cls]
    return None


def apply_qk_layernorm(model: nn.Module, eps: float = 1e-5) -> list[str]:
    """Add qk-layernorm to every supported attention module of ``model``, in place.

    Args:
        model: the built-in proxy, a Hugging Face GPT-2 / Llama / Mistral / Qwen2 model, or any model
            whose attention type was registered with ``register_qk_layernorm``.
        eps: LayerNorm epsilon.

    Returns:
        Names of the modules that were changed.

    Raises:
        ValueError: no supported attention module in ``model``, or one already has q_norm/k_norm.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_qk_layernorm(model=...): expected an nn.Module, got {type(model).__name__}")
    _register_builtins()
    todo = [(n, m, s) for n, m in model.named_modules()
            if (s := find_surgery(m, QK_LAYERNORM_REGISTRY)) is not None]
    if not todo:
        known = ", ".join(sorted({c.__name__ for c in QK_LAYERNORM_REGISTRY} |
                                 {c for cs, _ in _HF_FAMILIES.values() for c in cs}))
        raise ValueError(f"apply_qk_layernorm: no supported attention module in {type(model).__name__} "
                         f"(supported: {known}); register yours with "
                         "stabilitylab.mitigations.register_qk_layernorm(YourAttention, surgery)")
    for _, m, surgery in todo:
        surgery(m, eps)
    return [n for n, _, _ in todo]
