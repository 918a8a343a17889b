"""Mitigations: plain PyTorch building blocks that change training (probes never do)."""

from stabilitylab.mitigations.qk_layernorm import QKLayerNorm
from stabilitylab.mitigations.schedules import warmup_cosine, warmup_cosine_factor
from stabilitylab.mitigations.z_loss import z_loss

__all__ = ["QKLayerNorm", "warmup_cosine", "warmup_cosine_factor", "z_loss"]
