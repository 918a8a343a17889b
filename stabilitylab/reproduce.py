"""Deprecated: ``stabilitylab reproduce`` lives in ``stabilitylab.studies.reproduce`` (a study package).

``from stabilitylab.reproduce import reproduce, Scale, SCALES, ...`` (any name in that package's
``__all__``) still works, with a DeprecationWarning.
"""

from __future__ import annotations

import warnings as _warnings


def __getattr__(name: str):
    """Names that moved to ``stabilitylab.studies.reproduce``."""
    from stabilitylab.studies import reproduce as study

    if name not in study.__all__:
        raise AttributeError(f"module 'stabilitylab.reproduce' has no attribute {name!r}")
    _warnings.warn(f"stabilitylab.reproduce.{name} moved to stabilitylab.studies.reproduce.{name}; "
                   "import it from there", DeprecationWarning, stacklevel=2)
    return getattr(study, name)
