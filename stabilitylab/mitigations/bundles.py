"""Named mitigation bundles for sweeps: each maps to proxy-config and train-config overrides.

``baseline`` is the plain recipe with every mitigation off: no qk-layernorm, no z-loss, PyTorch's
coupled AdamW weight decay (``lr_t * 1e-4``, which at these LRs is almost no decay), eps 1e-8,
standard parameterisation. Each other bundle turns mitigations *on* over that baseline, so a sweep
over bundles shows what each one buys. The paper (Wortsman et al., 2023) runs the opposite design,
its standard recipe with one mitigation turned *off*; that recipe is the ``standard`` bundle, and
"standard minus X" is ``bundle("standard")`` with X's overrides reverted.

=======================  ==========================================  ==========================================
bundle                   model (``ProxyConfig``) overrides           train (``TrainConfig``) overrides
=======================  ==========================================  ==========================================
``baseline``             --                                          ``independent_wd=False`` (coupled AdamW)
``qk_layernorm``         ``qk_layernorm=True``                       as baseline
``z_loss``               ``z_loss=1e-4``                             as baseline
``qk_layernorm+z_loss``  ``qk_layernorm=True, z_loss=1e-4``          as baseline
``indep_wd``             --                                          ``independent_wd=True`` (decay 1e-4 x
                                                                     schedule factor)
``mup``                  ``mup=True`` (logits x base/width)          ``mup_lr_scaling=True`` (hidden LR x
                                                                     base/width), coupled wd
``adam_atan2``           --                                          ``optimizer="adam_atan2"`` (no eps),
                                                                     coupled wd
``eps1e-15``             --                                          ``eps=1e-15``, coupled wd
``standard``             ``qk_layernorm=True, z_loss=1e-4``          ``independent_wd=True`` (the paper's recipe)
``all``                  union of all the above                      union of all the above (Adam-atan2 has
                                                                     no eps, so ``eps`` is moot there)
=======================  ==========================================  ==========================================

Every other setting keeps the ``ProxyConfig`` / ``TrainConfig`` defaults (weight decay 1e-4 on
matrices, beta2 0.95, warm-up + cosine to 1e-5, clipping 1.0; ``attn_scale="sqrt"`` -- muP's
``attn_scale="linear"`` is available as a plain override).
"""

from __future__ import annotations

from typing import Any

_COUPLED = {"independent_wd": False}
_QKLN = {"qk_layernorm": True}
_Z = {"z_loss": 1e-4}

BUNDLES: dict[str, dict[str, dict[str, Any]]] = {
    "baseline": {"model": {}, "train": dict(_COUPLED)},
    "qk_layernorm": {"model": dict(_QKLN), "train": dict(_COUPLED)},
    "z_loss": {"model": dict(_Z), "train": dict(_COUPLED)},
    "qk_layernorm+z_loss": {"model": {**_QKLN, **_Z}, "train": dict(_COUPLED)},
    "indep_wd": {"model": {}, "train": {"independent_wd": True}},
    "mup": {"model": {"mup": True}, "train": {**_COUPLED, "mup_lr_scaling": True}},
    "adam_atan2": {"model": {}, "train": {**_COUPLED, "optimizer": "adam_atan2"}},
    "eps1e-15": {"model": {}, "train": {**_COUPLED, "eps": 1e-15}},
    "standard": {"model": {**_QKLN, **_Z}, "train": {"independent_wd": True}},
}
BUNDLES["all"] = {
    "model": {k: v for b in BUNDLES.values() for k, v in b["model"].items()},
    "train": {k: v for b in BUNDLES.values() for k, v in b["train"].items() if k != "independent_wd"}
    | {"independent_wd": True},
}


def bundle(name: str) -> dict[str, dict[str, Any]]:
    """Overrides ``{"model": {...ProxyConfig fields}, "train": {...TrainConfig fields}}`` of a bundle (a copy)."""
    if name not in BUNDLES:
        raise ValueError(f"unknown mitigation bundle {name!r}; known: {', '.join(BUNDLES)}")
    return {"model": dict(BUNDLES[name]["model"]), "train": dict(BUNDLES[name]["train"])}
