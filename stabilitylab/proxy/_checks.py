"""``ProxyConfig``'s argument checks (each error names the field, the bad value and the fix)."""

from __future__ import annotations

import math
from typing import Any

from stabilitylab._checks import int_at_least


def _real(v: object) -> bool:
    """A finite int/float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_proxy_config(cfg: Any) -> None:
    """Raise a ValueError / TypeError naming the first invalid field of the ``ProxyConfig`` ``cfg``."""
    for name in ("vocab_size", "seq_len", "d_model", "n_layers", "head_dim", "mlp_ratio", "mup_base_width"):
        v = getattr(cfg, name)
        if not int_at_least(v, 1):
            raise ValueError(f"ProxyConfig({name}={v!r}): must be a positive int")
    if cfg.d_model % cfg.head_dim:
        raise ValueError(f"ProxyConfig: d_model={cfg.d_model} is not a multiple of head_dim={cfg.head_dim}")
    for name in ("tie_embeddings", "qk_layernorm", "mup", "use_sdpa"):
        if not isinstance(getattr(cfg, name), bool):
            raise TypeError(f"ProxyConfig({name}={getattr(cfg, name)!r}): must be True or False")
    if not _real(cfg.z_loss) or cfg.z_loss < 0:
        raise ValueError(f"ProxyConfig(z_loss={cfg.z_loss!r}): must be a finite number >= 0")
    if cfg.attn_scale not in ("sqrt", "linear"):
        raise ValueError(f"ProxyConfig(attn_scale={cfg.attn_scale!r}): use 'sqrt' or 'linear'")
    for name in ("logit_softcap", "attn_softcap"):
        v = getattr(cfg, name)
        if v is not None and (not _real(v) or v <= 0):
            raise ValueError(f"ProxyConfig({name}={v!r}): must be a finite number > 0 or None")
