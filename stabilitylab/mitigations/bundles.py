"""Named mitigation bundles for sweeps: each maps to proxy-config and train-config overrides.

=======================  ===========================================================================
bundle                   what changes
=======================  ===========================================================================
``baseline``             nothing (no qk-layernorm, no z-loss, independent wd 1e-4, eps 1e-8, AdamW)
``qk_layernorm``         LayerNorm on q and k per head
``z_loss``               z-loss 1e-4 on the output log Z
``qk_layernorm+z_loss``  both
=======================  ===========================================================================
"""

from __future__ import annotations

from typing import Any

BUNDLES: dict[str, dict[str, dict[str, Any]]] = {
    "baseline": {"model": {}, "train": {}},
    "qk_layernorm": {"model": {"qk_layernorm": True}, "train": {}},
    "z_loss": {"model": {"z_loss": 1e-4}, "train": {}},
    "qk_layernorm+z_loss": {"model": {"qk_layernorm": True, "z_loss": 1e-4}, "train": {}},
}


def bundle(name: str) -> dict[str, dict[str, Any]]:
    """Overrides ``{"model": {...ProxyConfig fields}, "train": {...TrainConfig fields}}`` of a bundle."""
    if name not in BUNDLES:
        raise ValueError(f"unknown mitigation bundle {name!r}; known: {', '.join(BUNDLES)}")
    return {"model": dict(BUNDLES[name]["model"]), "train": dict(BUNDLES[name]["train"])}
