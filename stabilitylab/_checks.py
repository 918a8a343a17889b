"""Argument checks shared by the public entry points (each caller words its own error)."""

from __future__ import annotations

from typing import Any


def int_at_least(value: Any, lo: int) -> bool:
    """True for a real int (not a bool) that is ``>= lo``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= lo
