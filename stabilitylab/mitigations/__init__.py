"""Mitigations: plain PyTorch building blocks that change training (probes never do).

qk-layernorm (``QKLayerNorm``, ``apply_qk_layernorm``), z-loss (``z_loss``, ``add_z_loss``), logit
soft-capping (``softcap``), QK-clip (``QKClip``), optimizers (``AdamWIndependentWD``, ``AdamAtan2``),
schedules (``warmup_cosine``, ``constant_with_warmup``, ``wsd``) and the named sweep bundles
(``bundles.BUNDLES``). The muP coordinate check is a study: ``stabilitylab.studies.coord_check``
(``mitigations.coord_check`` / ``plot_coord_check`` / ``width_slopes`` still work, with a DeprecationWarning).
"""

import warnings as _warnings

from stabilitylab.mitigations import bundles
from stabilitylab.mitigations.bundles import BUNDLES, bundle
from stabilitylab.mitigations.optimizers import AdamAtan2, AdamWIndependentWD
from stabilitylab.mitigations.qk_clip import QKClip, QKSlices, register_qk_clip
from stabilitylab.mitigations.qk_layernorm import QKLayerNorm, apply_qk_layernorm, register_qk_layernorm
from stabilitylab.mitigations.schedules import (
    constant_with_warmup,
    constant_with_warmup_factor,
    warmup_cosine,
    warmup_cosine_factor,
    wsd,
    wsd_factor,
)
from stabilitylab.mitigations.softcap import softcap
from stabilitylab.mitigations.z_loss import add_z_loss, z_loss

__all__ = ["BUNDLES", "AdamAtan2", "AdamWIndependentWD", "QKClip", "QKLayerNorm", "QKSlices", "add_z_loss",
           "apply_qk_layernorm", "bundle", "bundles", "constant_with_warmup", "constant_with_warmup_factor",
           "register_qk_clip", "register_qk_layernorm", "softcap", "warmup_cosine", "warmup_cosine_factor", "wsd",
           "wsd_factor", "z_loss"]

_MOVED = {"coord_check", "plot_coord_check", "width_slopes"}


def __getattr__(name: str):
    """Deprecated names that moved to ``stabilitylab.studies.coord_check`` (a study, not a mitigation)."""
    if name not in _MOVED:
        raise AttributeError(f"module 'stabilitylab.mitigations' has no attribute {name!r}")
    _warnings.warn(f"stabilitylab.mitigations.{name} moved to stabilitylab.studies.coord_check.{name}; "
                   "import it from there", DeprecationWarning, stacklevel=2)
    from stabilitylab.studies import coord_check as study

    return getattr(study, name)
