"""Deprecated: ``stabilitylab demo`` lives in ``stabilitylab.studies.demo``.

``from stabilitylab.demo import run_demo, DEMO_LRS, ...`` (any name in that module's ``__all__``) still
works, with a DeprecationWarning.
"""

from __future__ import annotations

import warnings as _warnings


def __getattr__(name: str):
    """Names that moved to ``stabilitylab.studies.demo``."""
    from stabilitylab.studies import demo as study

    if name not in study.__all__:
        raise AttributeError(f"module 'stabilitylab.demo' has no attribute {name!r}")
    _warnings.warn(f"stabilitylab.demo.{name} moved to stabilitylab.studies.demo.{name}; import it from there",
                   DeprecationWarning, stacklevel=2)
    return getattr(study, name)
