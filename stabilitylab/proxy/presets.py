"""Named proxy sizes for sweeps: width and depth grow together."""

from __future__ import annotations

from stabilitylab.proxy.model import ProxyConfig

#: Named sizes: width and depth grow together (head_dim 64 from "m" up; smaller below).
PRESETS: dict[str, dict] = {
    "xxs": dict(d_model=32, n_layers=2, head_dim=16),
    "xs": dict(d_model=64, n_layers=2, head_dim=32),
    "s": dict(d_model=128, n_layers=3, head_dim=32),
    "m": dict(d_model=256, n_layers=4, head_dim=64),
    "l": dict(d_model=384, n_layers=6, head_dim=64),
    "xl": dict(d_model=512, n_layers=8, head_dim=64),
    "xxl": dict(d_model=768, n_layers=12, head_dim=64),
}


def preset(name: str, **overrides) -> ProxyConfig:
    """A ``ProxyConfig`` for a named size (see ``PRESETS``), with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown proxy size {name!r}; presets: {', '.join(PRESETS)}")
    return ProxyConfig(**{**PRESETS[name], **overrides})
